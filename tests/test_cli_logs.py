"""The command line as CI sees it (piped: no terminal) and as a new user meets it: names never cut, one --json
convention, reports that say what is stored, progress in human units."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.progress import Progress

from nvfp4ckpt import convert_checkpoint, write_example
from nvfp4ckpt.cli import main
from nvfp4ckpt.cli._output import CountColumn

REPO = Path(__file__).resolve().parents[1]


def piped(*args: str) -> subprocess.CompletedProcess:
    """A real process whose stdout and stderr are pipes, as in a CI log."""
    return subprocess.run([sys.executable, "-m", "nvfp4ckpt", *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_piped_tables_never_cut_names(tmp_path):
    proc = piped("inspect", "--families")
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    assert "backbone.layers.{L}.mixer.experts.{e}.{up_proj,down_proj}" in proc.stdout
    src = tmp_path / "src"
    write_example(src, arch="nemotron_h")
    convert_checkpoint(src, tmp_path / "dst")
    proc = piped("inspect", str(tmp_path / "dst"))
    assert proc.returncode == 0 and "…" not in proc.stdout
    assert "backbone.layers.1.mixer.experts" in proc.stdout
    # the padded intermediate size is shown as stored, and each note is one line
    assert "192 (stored 256)" in proc.stdout
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    assert any("stored zero-padded" in n and n.endswith("contribute exactly 0") for n in notes)


def test_inspect_rank_sharded_output(example_factory, tmp_path, capsys):
    convert_checkpoint(example_factory(), tmp_path / "tp", tp=2, ep=2)
    assert main(["inspect", str(tmp_path / "tp"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["expert_bytes"] > 0 and all(l["ranks"] == 4 for l in report["moe_layers"])
    assert any("rank-sharded for MoE tp=2 ep=2: 4 rank folders" in i for i in report["issues"])
    # the whole checkpoint's tensors, rank folders included
    whole = tmp_path / "whole"
    convert_checkpoint(example_factory(), whole)
    assert main(["inspect", str(whole), "--json"]) == 0
    whole_bytes = json.loads(capsys.readouterr().out)["expert_bytes"]
    # the same weights; each rank also stores its own copy of the per-layer scalars
    assert whole_bytes <= report["expert_bytes"] < 1.01 * whole_bytes


def test_one_json_convention(example_factory, tmp_path, capsys):
    dst = tmp_path / "dst"
    convert_checkpoint(example_factory(), dst)
    # --json is a flag that prints to stdout, as every command's; --json-out PATH also writes a file
    assert main(["verify", str(dst), "--check", "structure", "--json", "--json-out", str(tmp_path / "r.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "r.json").read_text())
    assert main(["verify", str(dst), "--json", str(tmp_path / "x.json")]) == 2  # the old path form is a usage error


def test_inspect_quiet_and_families_with_src(example_factory, capsys):
    src = example_factory()
    assert main(["inspect", str(src), "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["inspect", str(src), "--families"]) == 2
    assert "either a checkpoint or --families" in capsys.readouterr().err


def test_version_is_an_option_and_the_message_says_so():
    proc = piped("version")
    assert proc.returncode == 2
    assert "nvfp4ckpt --version" in proc.stderr
    assert piped("--version").stdout.startswith("nvfp4ckpt ")


def test_completion_is_offered():
    assert "--install-completion" in piped("--help").stdout


@pytest.mark.parametrize("unit, expected", [("B", "1.50 MB/3.00 MB"), (None, "3/7")])
def test_progress_counts_in_human_units(unit, expected):
    bar = Progress(CountColumn())
    fields = {"unit": unit} if unit else {}
    total, done = (3_000_000, 1_500_000) if unit else (7, 3)
    task = bar.add_task("x", total=total, **fields)
    bar.update(task, completed=done)
    assert str(CountColumn().render(bar.tasks[0])).startswith(expected)


def test_example_reports_progress(tmp_path):
    ticks: list[tuple[str, int, int]] = []
    write_example(tmp_path / "ex", progress=lambda label, done, total: ticks.append((label, done, total)))
    assert ticks and ticks[-1][1] == ticks[-1][2] > 0
    assert all(a[1] <= b[1] for a, b in zip(ticks, ticks[1:]))


def test_mismatched_source_is_said_once(example_factory, tmp_path, capsys):
    """A --source of the other format: one line saying so, not a list of every tensor name that differs."""
    dst = tmp_path / "dst"
    convert_checkpoint(example_factory("qwen3_moe", "modelopt"), dst)
    other = example_factory("qwen3_moe", "compressed-tensors")
    assert main(["verify", str(dst), "--source", str(other), "--skip", "numerics", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    layout = next(c for c in report["checks"] if c["name"] == "layout")
    assert layout["status"] == "fail" and len(layout["problems"]) == 1
    assert "converted from modelopt" in layout["problems"][0] and "compared byte for byte" not in layout["summary"]
