#!/usr/bin/env python3
"""Benchmark `nvfp4ckpt verify` against the work it cannot avoid, measured in the same run and cache state.

    python scripts/bench_verify.py --src /work/bench-data/src --dst /work/bench-data/dst --rounds 5

The manifest promises sha256, so DST's files must be hashed once, and `--source` must read SRC's files once:
- "unavoidable (with source)" = `sha256sum` of DST's files + `cat` of SRC's files to /dev/null,
- "unavoidable (no source)" = `sha256sum` of DST's files.
Runs alternate (every round times each command once, in the same order), and the medians over the rounds are
reported with their ratios. Cache state: warm (every file is read once before the first round, and the machine's
memory holds both folders); with `--cold` each command is preceded by `echo 3 > /proc/sys/vm/drop_caches` (root
only). The load average is printed before and after (the development machine is shared with other jobs).
Also reported: peak RSS of `verify --source` (from the child's rusage) for each `--rss` pair of folders, to show it
does not grow with the number of layers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable


def files_of(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def timed(cmd: list[str] | str, shell: bool = False) -> tuple[float, float]:
    """(seconds, peak RSS MB of this child) of one command (stdout discarded)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, shell=shell)
    dt = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return dt, (after if after > before else float("nan")) / 1024  # ru_maxrss of children is a running max


def drop_caches() -> None:
    subprocess.run("sync && echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--dst", type=Path, required=True, help="the converted checkpoint of --src")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every command (root only)")
    ap.add_argument("--extra", nargs="*", default=[], help="extra verify options, e.g. --numerics-full")
    ap.add_argument("--rss", nargs="*", default=[], help="SRC:DST pairs for the peak-RSS runs (different layer counts)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dst_files, src_files = files_of(args.dst), files_of(args.src)
    size = lambda fs: sum(os.path.getsize(f) for f in fs)  # noqa: E731
    verify = [PY, "-m", "nvfp4ckpt", "verify", str(args.dst), "--quiet", *args.extra]
    commands = {
        "sha256sum DST": ["sha256sum", *dst_files],
        "cat SRC > /dev/null": "cat " + " ".join(f"'{f}'" for f in src_files) + " > /dev/null",
        "verify DST --source SRC": [*verify, "--source", str(args.src)],
        "verify DST": verify,
        "start-up (inspect --families)": [PY, "-m", "nvfp4ckpt", "inspect", "--families", "--json"],
    }
    load_before = loadavg()
    for name, cmd in commands.items():  # warm-up: page cache, Python bytecode
        timed(cmd, shell=isinstance(cmd, str))
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, cmd in commands.items():
            if args.cold:
                drop_caches()
            times[name].append(timed(cmd, shell=isinstance(cmd, str))[0])
    load_after = loadavg()
    med = {name: statistics.median(v) for name, v in times.items()}
    floor_src = med["sha256sum DST"] + med["cat SRC > /dev/null"]
    floor = med["sha256sum DST"]
    rows = [
        ("sha256sum DST", med["sha256sum DST"], None),
        ("cat SRC > /dev/null", med["cat SRC > /dev/null"], None),
        ("unavoidable with source (sum of the two)", floor_src, 1.0),
        ("verify DST --source SRC", med["verify DST --source SRC"], med["verify DST --source SRC"] / floor_src),
        ("verify DST", med["verify DST"], med["verify DST"] / floor),
        ("start-up of any nvfp4ckpt command", med["start-up (inspect --families)"], None),
    ]
    rss = []
    for pair in args.rss:
        s, d = pair.split(":")
        dt, peak = _rss_run([PY, "-m", "nvfp4ckpt", "verify", d, "--source", s, "--quiet", *args.extra])
        rss.append({"src": s, "dst": d, "bytes": size(files_of(Path(d))), "seconds": round(dt, 2), "peak_rss_mb": round(peak)})
    results = {
        "cpus": os.cpu_count(), "cache": "cold (drop_caches before each command)" if args.cold else "warm",
        "dst_bytes": size(dst_files), "src_bytes": size(src_files), "rounds": args.rounds,
        "load_average_before": load_before, "load_average_after": load_after, "extra": args.extra,
        "times": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "medians": {k: round(v, 3) for k, v in med.items()},
        "ratio_verify_source_to_unavoidable": round(med["verify DST --source SRC"] / floor_src, 3),
        "ratio_verify_to_sha256sum": round(med["verify DST"] / floor, 3),
        "peak_rss": rss,
    }  # fmt: skip
    print(
        f"## verify ({size(dst_files) / 1e9:.2f} GB converted, {size(src_files) / 1e9:.2f} GB source, {os.cpu_count()} CPUs, "
        f"{results['cache']} cache, {args.rounds} alternating rounds, load average {load_before} -> {load_after})\n"
    )
    print("| command | median s | ratio to its unavoidable work |\n|---|---:|---:|")
    for name, s, r in rows:
        print(f"| {name} | {s:.2f} | {'' if r is None else f'{r:.2f}'} |")
    print("\n(`verify DST` is compared with `sha256sum DST` alone.)")
    for r in rss:
        print(f"\npeak RSS of verify --source: {r['dst']} ({r['bytes'] / 1e9:.2f} GB): {r['peak_rss_mb']} MB in {r['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _rss_run(cmd: list[str]) -> tuple[float, float]:
    code = (
        "import resource, subprocess, sys, time, json;"
        "t=time.perf_counter(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
        "dt=time.perf_counter()-t; print(json.dumps([dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024]))"
    )
    out = subprocess.run([PY, "-c", code, *cmd], check=True, capture_output=True, text=True).stdout
    return tuple(json.loads(out))


if __name__ == "__main__":
    sys.exit(main())
