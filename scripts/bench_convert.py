#!/usr/bin/env python3
"""Benchmark `nvfp4ckpt convert` against `cp -r` of the same folder, measured in the same run.

    python scripts/bench_convert.py --workdir /tmp/nvfp4-bench --layers 8 --rss-layers 4 16

Reports, each as a ratio to a baseline from this run on this machine:
- throughput of convert (workers 1, 2, ...) against `cp -r SRC X && sync` (convert fsyncs, so cp pays for a
  sync too; warm page cache for both: every timed command runs once untimed first),
- peak RSS of convert for two checkpoint sizes (it must not grow with the number of layers),
- that the output bytes do not depend on --workers (manifest equality).
Synthetic checkpoints come from `nvfp4ckpt example --shape` (random but valid NVFP4 at real layer shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a child process."""
    code = (
        "import resource, subprocess, sys, time, json;"
        "t=time.perf_counter(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
        "dt=time.perf_counter()-t; print(json.dumps([dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024]))"
    )
    out = subprocess.run([PY, "-c", code, *cmd], check=True, capture_output=True, text=True).stdout
    dt, rss = json.loads(out)
    return dt, rss


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make(workdir: Path, shape: str, layers: int, shard: str) -> Path:
    src = workdir / f"{shape}-{layers}L"
    if not (src / "config.json").exists():
        subprocess.run(
            [PY, "-m", "nvfp4ckpt", "example", str(src), "--shape", shape, "--layers", str(layers),
             "--max-shard-size", shard, "--overwrite", "-q"],
            check=True,
        )  # fmt: skip
    return src


def median_time(cmd_factory, repeats: int, cleanup) -> float:
    times = []
    for i in range(repeats + 1):  # first run warms the page cache and is not counted
        cleanup()
        dt = run(cmd_factory())
        if i:
            times.append(dt)
    cleanup()
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nvfp4ckpt-bench"))
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shard", default="2GB", help="source shard size")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-layers", type=int, nargs="*", default=[4, 16], help="layer counts for the peak-RSS runs (none: skip)")
    ap.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                    help="instead: ROUNDS rounds of cp, then convert with each --workers, in turn (medians; one "
                         "untimed warm-up round); fairer than back-to-back repeats on a shared machine")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.alternate:
        return alternate(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"cpus": os.cpu_count()}, "shape": args.shape}

    src = make(args.workdir, args.shape, args.layers, args.shard)
    size = du(src)
    out = args.workdir / "out"
    clean = lambda: shutil.rmtree(out, ignore_errors=True)  # noqa: E731
    cp_s = median_time(lambda: ["sh", "-c", f"cp -r '{src}' '{out}' && sync"], args.repeats, clean)
    rows = [("cp -r && sync", cp_s, 1.0)]
    # The fixed cost of any nvfp4ckpt command (Python, torch and package imports, exit), to show how much of
    # the convert time does not depend on the checkpoint's size; reported next to the ratio, not folded into it.
    startup_s = median_time(lambda: [PY, "-m", "nvfp4ckpt", "inspect", "--families", "--json"], args.repeats, lambda: None)
    results["startup_seconds"] = round(startup_s, 3)
    manifests = set()
    for w in args.workers:
        conv_s = median_time(
            lambda: [PY, "-m", "nvfp4ckpt", "convert", str(src), str(out), "-q", "--workers", str(w)], args.repeats, clean
        )
        subprocess.run([PY, "-m", "nvfp4ckpt", "convert", str(src), str(out), "-q", "--workers", str(w), "--overwrite"], check=True)
        manifests.add((out / "nvfp4ckpt_manifest.json").read_bytes())
        clean()
        rows.append((f"convert --workers {w}", conv_s, cp_s / conv_s))
    results["throughput"] = [
        {
            "what": name, "seconds": round(s, 3), "GB_per_s": round(size / s / 1e9, 3), "ratio_to_cp": round(r, 3),
            "ratio_to_cp_without_startup": round(cp_s / max(s - startup_s, 1e-9), 3) if name.startswith("convert") else None,
        }
        for name, s, r in rows
    ]  # fmt: skip
    results["bytes"] = size
    results["identical_output_across_workers"] = len(manifests) == 1

    rss = []
    for n in args.rss_layers:
        s = make(args.workdir, args.shape, n, args.shard)
        dt, peak = peak_rss_mb([PY, "-m", "nvfp4ckpt", "convert", str(s), str(out), "-q", "--workers", "1", "--overwrite"])
        rss.append({"layers": n, "bytes": du(s), "seconds": round(dt, 2), "peak_rss_mb": round(peak)})
        clean()
    results["peak_rss"] = rss

    print(f"## convert throughput ({args.shape}, {args.layers} MoE layers, {size / 1e9:.2f} GB, {os.cpu_count()} CPUs)\n")
    print(f"start-up of an nvfp4ckpt command (`inspect --families`): {startup_s:.2f} s\n")
    print("| command | median s | GB/s | ratio to cp | ratio to cp without the start-up |\n|---|---|---|---|---|")
    for r in results["throughput"]:
        extra = r["ratio_to_cp_without_startup"]
        print(f"| {r['what']} | {r['seconds']} | {r['GB_per_s']} | {r['ratio_to_cp']} | {'' if extra is None else extra} |")
    print(f"\nidentical output for workers {args.workers}: {results['identical_output_across_workers']}\n")
    if rss:
        print("## peak RSS (workers 1)\n\n| MoE layers | checkpoint GB | seconds | peak RSS MB |\n|---|---|---|---|")
    for r in rss:
        print(f"| {r['layers']} | {r['bytes'] / 1e9:.2f} | {r['seconds']} | {r['peak_rss_mb']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def alternate(args) -> int:
    """cp, convert --workers w1, w2, ... in turn for each round; medians and ratios to cp's median."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = make(args.workdir, args.shape, args.layers, args.shard)
    out = args.workdir / "out"
    clean = lambda: shutil.rmtree(out, ignore_errors=True)  # noqa: E731
    cmds = {"cp -r && sync": ["sh", "-c", f"cp -r '{src}' '{out}' && sync"]}
    for w in args.workers:
        cmds[f"convert --workers {w}"] = [PY, "-m", "nvfp4ckpt", "convert", str(src), str(out), "-q", "--workers", str(w)]
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for r in range(args.alternate + 1):  # round 0 warms the page cache and is not counted
        for name, cmd in cmds.items():
            clean()
            dt = run(cmd)
            if r:
                times[name].append(dt)
    clean()
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    med = {k: statistics.median(v) for k, v in times.items()}
    size = du(src)
    print(f"## convert, alternating ({args.shape}, {args.layers} MoE layers, {size / 1e9:.2f} GB, {os.cpu_count()} CPUs, "
          f"{args.alternate} rounds, load average {load_before} -> {load_after})\n")
    print("| command | runs s | median s | ratio to cp |\n|---|---|---:|---:|")
    for k, v in times.items():
        print(f"| {k} | {' '.join(f'{x:.2f}' for x in v)} | {med[k]:.2f} | {med['cp -r && sync'] / med[k]:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"times": times, "medians": med, "bytes": size, "load_before": load_before,
                                         "load_after": load_after}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
