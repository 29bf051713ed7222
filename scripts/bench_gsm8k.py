#!/usr/bin/env python3
"""Timing of ``verify --gsm8k``'s whole-model runner: seconds per GSM8K question, per model and MoE backend.

Models (written with ``nvfp4ckpt.write_example`` and converted in a work folder; seeded random weights, so the
numbers time the runner, not a trained model's accuracy):
  tiny:            the built-in example (Qwen3-MoE, H=256, 8 experts, top-2, 2 layers; real NVFP4 quantization)
  qwen3-30b-a3b:   Qwen3-30B-A3B's layer shapes (H=2048, moe_intermediate 768, 128 experts, top-8, 32 heads,
                   4 KV heads, head_dim 128) with --layers decoder layers (default 4) and a 512-token vocabulary.
                   --weights random-codes (default): ``write_example(shape="qwen3-30b-a3b", ...)``, random valid
                   E2M1 codes and block scales (about 5 s per layer to write on 2 CPU cores); --weights quantized:
                   ``write_example(config_overrides=...)``, real quantization of random weights (about 36 s per
                   layer on 2 CPU cores).

For each model: the converted side with each backend (default: triton on a CUDA GPU from SM80, plus trtllm on
SM100/SM103; torch on CPU) and, unless --no-source, the source side through the float32 torch reference (what
``verify --gsm8k --source`` runs), on the same prompts (few-shot GSM8K from --data). Each row: load time,
warm-up (first call: Triton compilation, un-shuffling), generation time, seconds per question, generated tokens
per second, and how often the answers / token streams agree with the source side's (informational: a random
model's near-tied logits make greedy decoding sensitive to any rounding difference).

    python scripts/bench_gsm8k.py [--models tiny,qwen3-30b-a3b] [--layers 4] [--num-questions 16]
        [--max-new-tokens 64] [--batch-size 16] [--backends triton] [--weights random-codes|quantized]
        [--no-source] [--json out.json]
    python scripts/bench_gsm8k.py --device cpu --backends torch --models tiny     # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nvfp4ckpt import convert_checkpoint, write_example  # noqa: E402
from nvfp4ckpt.eval.gsm8k import STOP_STRINGS, agreement_rate, build_prompts, load_gsm8k, score_completion  # noqa: E402
from nvfp4ckpt.eval.model_runner import eos_ids, generate, load_converted_model, load_source_model  # noqa: E402

QWEN3_30B_A3B = {
    "hidden_size": 2048,
    "moe_intermediate_size": 768,
    "intermediate_size": 6144,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 512,
}


def default_backends(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["torch"]
    major, _ = torch.cuda.get_device_capability(device)
    return ["triton", "trtllm"] if major == 10 else ["triton"]


def make_model(name: str, work: Path, layers: int, weights: str) -> tuple[Path, Path, dict]:
    src, dst = work / name, work / f"{name}-trtllm"
    t0 = time.perf_counter()
    if name == "tiny":
        write_example(src, arch="qwen3_moe", overwrite=True)
    elif name == "qwen3-30b-a3b" and weights == "random-codes":
        write_example(src, shape="qwen3-30b-a3b", layers=layers, overwrite=True, config_overrides={"vocab_size": 512})
    elif name == "qwen3-30b-a3b":
        write_example(src, arch="qwen3_moe", overwrite=True, config_overrides={**QWEN3_30B_A3B, "num_hidden_layers": layers})
    else:
        raise SystemExit(f"unknown model {name!r}; choose tiny or qwen3-30b-a3b")
    t1 = time.perf_counter()
    convert_checkpoint(src, dst, overwrite=True)
    t2 = time.perf_counter()
    size = sum(f.stat().st_size for f in dst.iterdir() if f.suffix == ".safetensors")
    return src, dst, {"write_s": t1 - t0, "convert_s": t2 - t1, "bytes": size}


def timed_side(loaded, prompts, args, eos) -> dict:
    t0 = time.perf_counter()
    generate(loaded, prompts[:1], max_new_tokens=2, batch_size=1, stop_strings=STOP_STRINGS, eos_token_ids=eos)
    warm = time.perf_counter() - t0
    gens, seconds = generate(
        loaded, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, stop_strings=STOP_STRINGS,
        eos_token_ids=eos,
    )  # fmt: skip
    if loaded.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(loaded.device)
        torch.cuda.reset_peak_memory_stats(loaded.device)
    else:
        peak = None
    tokens = sum(g.num_tokens for g in gens)
    return {
        "side": loaded.side,
        "backend": loaded.backend,
        "routing": loaded.routing,
        "load_s": loaded.load_seconds,
        "warmup_s": warm,
        "generate_s": seconds,
        "s_per_question": seconds / len(prompts),
        "tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "peak_gib": peak / 2**30 if peak else None,
        "gens": gens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the qwen3-30b-a3b-shaped model")
    ap.add_argument("--weights", default="random-codes", choices=("random-codes", "quantized"),
                    help="how the qwen3-30b-a3b-shaped model's NVFP4 tensors are made")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k"))
    ap.add_argument("--num-questions", type=int, default=16)
    ap.add_argument("--num-shots", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--backends", default=None, help="comma-separated converted-side backends (default: per device)")
    ap.add_argument("--act", default="nvfp4", choices=("nvfp4", "bf16"))
    ap.add_argument("--no-source", action="store_true", help="skip the torch-reference source side")
    ap.add_argument("--device", default=None)
    ap.add_argument("--work", default=None, help="folder for the written checkpoints (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = args.backends.split(",") if args.backends else default_backends(device)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-gsm8k-"))
    work.mkdir(parents=True, exist_ok=True)
    train, test = load_gsm8k(args.data, need_train=args.num_shots > 0)
    built, _ = build_prompts(train, test, num_shots=args.num_shots, num_questions=args.num_questions)
    prompts, targets = [p.text for p in built], [p.target for p in built]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device_name}; {len(prompts)} questions, {args.num_shots}-shot, max {args.max_new_tokens} new tokens, "
          f"batch {args.batch_size}, act {args.act}; torch {torch.__version__}", flush=True)

    rows, setups = [], []
    for name in args.models.split(","):
        src, dst, setup = make_model(name, work, args.layers, args.weights)
        setups.append({"model": name, **setup})
        print(f"{name}: written in {setup['write_s']:.1f} s, converted in {setup['convert_s']:.1f} s "
              f"({setup['bytes'] / 1e9:.2f} GB)", flush=True)
        sources: dict[str, dict] = {}
        if not args.no_source:
            for routing in sorted({"kernel" if b == "trtllm" else "hf" for b in backends}):
                loaded = load_source_model(src, device=device, act=args.act, routing=routing)
                sources[routing] = timed_side(loaded, prompts, args, eos_ids(loaded.path, loaded.tokenizer))
                loaded.close()
                rows.append({"model": name, **sources[routing]})
        for backend in backends:
            loaded = load_converted_model(dst, device=device, backend=backend, act=args.act)
            row = timed_side(loaded, prompts, args, eos_ids(loaded.path, loaded.tokenizer))
            loaded.close()
            ref = sources.get(row["routing"])
            if ref is not None:
                a = [score_completion(g.text, t) for g, t in zip(row["gens"], targets)]
                b = [score_completion(g.text, t) for g, t in zip(ref["gens"], targets)]
                row["agree"] = agreement_rate(zip(a, b))  # over questions with an answer on either side
                row["identical"] = sum(g.token_ids == h.token_ids for g, h in zip(row["gens"], ref["gens"])) / len(a)
            rows.append({"model": name, **row})
        if not args.work:
            shutil.rmtree(work / name, ignore_errors=True)
            shutil.rmtree(work / f"{name}-trtllm", ignore_errors=True)

    print()
    print("| model | side | MoE backend | routing | load s | warm-up s | generate s | s/question | tokens/s | peak GiB | answers agree | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        agree = (f"{100 * r['agree']:.0f}%" if r['agree'] is not None else "- (no answers)") if "agree" in r else ""
        same = f"{100 * r['identical']:.0f}%" if "identical" in r else ""
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] else ""
        print(f"| {r['model']} | {r['side']} | {r['backend']}/{args.act} | {r['routing']} | {r['load_s']:.1f} | "
              f"{r['warmup_s']:.1f} | {r['generate_s']:.1f} | {r['s_per_question']:.3f} | {r['tokens_per_s']:.1f} | "
              f"{peak} | {agree} | {same} |")
    if args.json:
        out = {"device": device_name, "args": vars(args), "setups": setups,
               "rows": [{k: v for k, v in r.items() if k != "gens"} for r in rows]}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
