#!/usr/bin/env python3
"""The data behind verify's numerics thresholds (docs/verify.md): every example family and format, each backend.

    python scripts/verify_thresholds.py [--tokens 64] [--seeds 0 1 2] [--backends torch triton] [--json OUT]
    python scripts/verify_thresholds.py --shape qwen3-30b-a3b --layers 2 --formats modelopt   # real layer sizes

For every registered architecture x {modelopt, compressed-tensors}: ``nvfp4ckpt example``, ``convert``, then for
every MoE layer and seed, with verify's own inputs (``check_layer_numerics``: seeded ``2*randn`` bf16 hidden
states, ``randn`` logits, the architecture's routing) and its reference (the source weights):

- ``whole``: rel-L2 of the whole output, ``token``: the worst token's rel-L2 (what verify holds each backend to);
- ``pair``: the worst single (token, expert) pair, each pair run on its own (top-1, weight 1);
- ``lost pair``: the smallest error one dropped (token, expert) pair would give its token (from the reference);
- the four mutations of tests/mutations.py applied to the layer's converted tensors: whole and worst-token rel-L2.

Without CUDA the Triton kernel runs under TRITON_INTERPRET=1 (set here before the kernels are imported).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from nvfp4ckpt import convert_checkpoint, write_example  # noqa: E402
from nvfp4ckpt.layouts.trtllm_gen.converted import open_converted  # noqa: E402
from nvfp4ckpt.runtime.layer import load_moe_layer  # noqa: E402
from nvfp4ckpt.source import architectures  # noqa: E402
from nvfp4ckpt.source.checkpoint import open_checkpoint  # noqa: E402
from nvfp4ckpt.verify.numerics import _reference_layer, check_layer_numerics  # noqa: E402
from tests.mutations import MUTATIONS  # noqa: E402


def pair_errors(ckpt, src, layer, backend, act, tokens, seed, dev):
    """(worst pair rel-L2, smallest lost-pair token error): every routed pair through the backend's experts alone."""
    from nvfp4ckpt.runtime.backends import BACKENDS

    gen = torch.Generator(device="cpu").manual_seed(seed)  # the inputs of check_layer_numerics
    hidden = (torch.randn(tokens, layer.hidden_size, generator=gen) * 2.0).to(torch.bfloat16).to(dev)
    logits = torch.randn(tokens, layer.num_experts, generator=gen).to(torch.bfloat16).to(dev)
    moe = load_moe_layer(ckpt, layer.prefix, dev)
    ref_layer = _reference_layer(ckpt, moe, src, layer, dev)
    ids, weights = ref_layer.route(logits)
    x, weights = ref_layer.weights_on_input(hidden, weights)
    k = ids.shape[1]
    xp, idp, one = x.repeat_interleave(k, 0), ids.reshape(-1, 1), torch.ones(ids.numel(), 1, device=dev)
    out = BACKENDS[backend].experts(moe, xp, idp.to(torch.int32), one, act, torch.float32).float()
    ref = ref_layer.forward_torch(xp, idp, one, act).float()
    per_pair = (out - ref).norm(dim=1) / ref.norm(dim=1).clamp(min=1e-30)
    contrib = (weights.reshape(-1, 1).float() * ref).view(tokens, k, -1)
    total = contrib.sum(1, keepdim=True).norm(dim=2).clamp(min=1e-30)
    lost = contrib.norm(dim=2) / total
    return float(per_pair.max()), float(lost[weights > 0].min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--backends", nargs="+", default=["torch", "triton"])
    ap.add_argument("--acts", nargs="+", default=["nvfp4"])
    ap.add_argument("--archs", nargs="+", default=[a.name for a in architectures.registered()])
    ap.add_argument("--formats", nargs="+", default=["modelopt", "compressed-tensors"])
    ap.add_argument("--mutation-seeds", type=int, default=1, help="seeds (from the first) the mutations run with")
    ap.add_argument("--shape", help="a real model's layer sizes (nvfp4ckpt example --shape), instead of every family")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers with --shape")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    print(f"device {dev}, tokens {args.tokens}, seeds {args.seeds}")
    print("| family | format | layer | backend/act | whole | token | pair | lost pair (min) | " + " | ".join(MUTATIONS) + " | s |")
    print("|---" * (9 + len(MUTATIONS)) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        from nvfp4ckpt.example import SHAPES

        for arch in [SHAPES[args.shape][0]] if args.shape else args.archs:
            for fmt in args.formats:
                src_dir, dst_dir = Path(tmp, f"{arch}-{fmt}"), Path(tmp, f"{arch}-{fmt}-c")
                if args.shape:
                    write_example(src_dir, format=fmt, arch=arch, shape=args.shape, layers=args.layers)
                else:
                    write_example(src_dir, format=fmt, arch=arch, shards=1)
                convert_checkpoint(src_dir, dst_dir)
                ckpt, src = open_converted(dst_dir), open_checkpoint(src_dir)
                for layer in ckpt.layers:
                    tensors = ckpt.read_layer(layer, "cpu")
                    for backend in args.backends:
                        for act in args.acts:
                            t0 = time.perf_counter()
                            runs = [
                                check_layer_numerics(ckpt, src, layer, backend, act, args.tokens, s, dev, tensors=tensors)
                                for s in args.seeds
                            ]
                            pairs = [pair_errors(ckpt, src, layer, backend, act, args.tokens, s, dev) for s in args.seeds]
                            muts = {}
                            for name, mutate in MUTATIONS.items():
                                bad = {k: v.clone() for k, v in tensors.items()}
                                assert mutate(bad, "")
                                got = [
                                    check_layer_numerics(ckpt, src, layer, backend, act, args.tokens, s, dev, tensors=bad)
                                    for s in args.seeds[: args.mutation_seeds]
                                ]
                                muts[name] = {"whole": min(r.rel_l2 for r in got), "token": min(r.token_rel_l2 for r in got)}
                            row = dict(
                                arch=arch, format=fmt, layer=layer.prefix, backend=backend, act=act,
                                whole=max(r.rel_l2 for r in runs), token=max(r.token_rel_l2 for r in runs),
                                pair=max(p[0] for p in pairs), lost_pair=min(p[1] for p in pairs), mutations=muts,
                                seconds=time.perf_counter() - t0,
                            )  # fmt: skip
                            rows.append(row)
                            cells = " | ".join(f"{m['whole']:.2g} / {m['token']:.2g}" for m in muts.values())
                            print(
                                f"| {arch} | {fmt} | {layer.prefix.split('.')[-3]} | {backend}/{act} | {row['whole']:.3g} "
                                f"| {row['token']:.3g} | {row['pair']:.3g} | {row['lost_pair']:.3g} | {cells} | {row['seconds']:.0f} |",
                                flush=True,
                            )
    for backend in args.backends:
        for act in args.acts:
            sel = [r for r in rows if r["backend"] == backend and r["act"] == act]
            if sel:
                weakest = {n: min(r["mutations"][n]["token"] for r in sel) for n in MUTATIONS}
                print(
                    f"\n{backend}/{act}: max whole {max(r['whole'] for r in sel):.3g}, max token {max(r['token'] for r in sel):.3g}, "
                    f"max pair {max(r['pair'] for r in sel):.3g}; smallest lost-pair token error {min(r['lost_pair'] for r in sel):.3g}; "
                    "weakest mutation (worst-token rel-L2): " + ", ".join(f"{n} {v:.2g}" for n, v in weakest.items())
                )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(dev), "tokens": args.tokens, "seeds": args.seeds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
