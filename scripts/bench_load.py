#!/usr/bin/env python3
"""Time to GPU-ready expert tensors for one MoE layer: nvfp4ckpt's converted files against what an engine
does at every start (read the per-expert source tensors, copy to the GPU, run the load-time preparation
with FlashInfer's helpers, as SGLang/vLLM `prepare_static_weights_for_trtllm_fp4_moe` do).

    python scripts/bench_load.py --workdir /tmp/bench-load [--shape deepseek-v3]

Writes a one-MoE-layer synthetic checkpoint at the shape's real sizes (vocab shrunk), converts it, then in
one process: (1) engine path cold (first use of FlashInfer's fp4 module: includes its JIT build when the
machine has none cached), (2) engine path warm, (3) converted path. Both paths read through the page cache
(each is run once untimed first to warm it). Prints a markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4ckpt import convert_checkpoint, write_example  # noqa: E402
from nvfp4ckpt.source.checkpoint import open_checkpoint  # noqa: E402
from nvfp4ckpt.layouts.trtllm_gen.converted import open_converted  # noqa: E402


def sync() -> None:
    torch.cuda.synchronize()


def engine_path(src_root: Path, device: str) -> tuple[float, float, dict]:
    """(read+copy seconds, prepare seconds, tensors) the way engines do it per expert at load time."""
    from flashinfer import nvfp4_block_scale_interleave
    from flashinfer.fused_moe.core import _maybe_get_cached_w3_w1_permute_indices, get_w2_permute_indices_with_cache

    ckpt = open_checkpoint(src_root)
    layer = ckpt.layers[0]
    f = ckpt.files
    t0 = time.perf_counter()
    w13, s13, w2, s2 = [], [], [], []
    for names in layer.experts:  # loader: one tensor at a time, [w3; w1] as the trtllm loader swaps them
        w13.append(torch.cat([f.read(names["up"].weight), f.read(names["gate"].weight)]).to(device, non_blocking=True))
        s13.append(torch.cat([f.read(names["up"].weight_scale), f.read(names["gate"].weight_scale)]).to(device, non_blocking=True))
        w2.append(f.read(names["down"].weight).to(device, non_blocking=True))
        s2.append(f.read(names["down"].weight_scale).to(device, non_blocking=True))
    sync()
    t1 = time.perf_counter()
    cache: dict = {}
    g1w, g1s, g2w, g2s = [], [], [], []
    for e in range(layer.num_experts):  # prepare_static_weights_for_trtllm_fp4_moe, per expert, cached indices
        p = _maybe_get_cached_w3_w1_permute_indices(cache, w13[e].view(torch.uint8), 128).to(device)
        g1w.append(w13[e].view(torch.uint8)[p])
        ps = _maybe_get_cached_w3_w1_permute_indices(cache, s13[e].view(torch.uint8), 128, num_elts_per_sf=16).to(device)
        g1s.append(nvfp4_block_scale_interleave(s13[e].view(torch.uint8)[ps].contiguous()))
        p2 = get_w2_permute_indices_with_cache(cache, w2[e].view(torch.uint8), 128).to(device)
        g2w.append(w2[e].view(torch.uint8)[p2])
        p2s = get_w2_permute_indices_with_cache(cache, s2[e].view(torch.uint8), 128, num_elts_per_sf=16).to(device)
        g2s.append(nvfp4_block_scale_interleave(s2[e].view(torch.uint8)[p2s].contiguous()))
    out = {"w13": torch.stack(g1w), "s13": torch.stack(g1s), "w2": torch.stack(g2w), "s2": torch.stack(g2s)}
    sync()
    return t1 - t0, time.perf_counter() - t1, out


def converted_path(dst_root: Path, device: str) -> tuple[float, dict]:
    ckpt = open_converted(dst_root)
    t0 = time.perf_counter()
    t = ckpt.read_layer(ckpt.layers[0], device)
    sync()
    return time.perf_counter() - t0, t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nvfp4ckpt-bench-load"))
    ap.add_argument("--shape", default="deepseek-v3")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    src, dst = args.workdir / "src", args.workdir / "dst"
    t = time.perf_counter()
    if not (src / "config.json").exists():
        write_example(src, shape=args.shape, layers=1, config_overrides={"vocab_size": 1024, "first_k_dense_replace": 0}, overwrite=True)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    if not (dst / "config.json").exists():
        convert_checkpoint(src, dst)
    conv_s = time.perf_counter() - t
    dev = "cuda"
    cold_read, cold_prep, eng = engine_path(src, dev)
    warm_read, warm_prep, eng = engine_path(src, dev)
    converted_path(dst, dev)  # warm the page cache for the converted files too
    conv_read, conv = converted_path(dst, dev)
    identical = all(
        torch.equal(a.view(torch.uint8).reshape(-1), b.view(torch.uint8).reshape(-1))
        for a, b in ((eng["w13"], conv["w13_weight"]), (eng["s13"], conv["w13_weight_scale"]), (eng["w2"], conv["w2_weight"]), (eng["s2"], conv["w2_weight_scale"]))
    )
    nbytes = sum(v.numel() * v.element_size() for k, v in conv.items() if k in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"))
    rows = {
        "layer_bytes": nbytes,
        "generate_s": round(gen_s, 2),
        "convert_s": round(conv_s, 2),
        "engine_cold": {"read_copy_s": round(cold_read, 3), "prepare_s": round(cold_prep, 3), "total_s": round(cold_read + cold_prep, 3)},
        "engine_warm": {"read_copy_s": round(warm_read, 3), "prepare_s": round(warm_prep, 3), "total_s": round(warm_read + warm_prep, 3)},
        "converted": {"read_copy_s": round(conv_read, 3)},
        "identical_bytes_engine_vs_converted": identical,
    }
    print(f"## GPU-ready expert tensors, one {args.shape} MoE layer ({nbytes / 1e9:.2f} GB), {torch.cuda.get_device_name()}\n")
    print("| path | read + copy to GPU s | prepare s | total s | ratio to converted |\n|---|---|---|---|---|")
    for name, r in (("engine, cold (first FlashInfer fp4 call)", rows["engine_cold"]), ("engine, warm", rows["engine_warm"])):
        print(f"| {name} | {r['read_copy_s']} | {r['prepare_s']} | {r['total_s']} | {r['total_s'] / conv_read:.2f}x |")
    print(f"| nvfp4ckpt converted files | {rows['converted']['read_copy_s']} | 0 | {rows['converted']['read_copy_s']} | 1.00x |")
    print(f"\nengine-prepared bytes identical to the converted files: {identical}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
