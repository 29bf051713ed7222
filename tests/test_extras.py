"""The core install (numpy, safetensors, typer, rich, huggingface-hub) runs inspect and convert; a command that needs
an extra says which in one line and exits 2. Each case runs in a fresh interpreter in which the optional packages
cannot be imported (a meta-path finder refuses them, as a venv without them would)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nvfp4ckpt import write_example
from tests.conftest import tree_digest

_RUN = """
import importlib.abc, json, sys

class NoExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "tokenizers", "transformers", "flashinfer", "triton"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoExtras())
from nvfp4ckpt.cli import main
sys.exit(main(json.loads(sys.argv[1])))
"""


def run_core(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RUN, json.dumps(list(args))], capture_output=True, text=True, timeout=300)


def test_inspect_and_convert_run_without_extras(tmp_path):
    src = tmp_path / "src"
    write_example(src, arch="qwen3_moe", format="modelopt", seed=3)
    proc = run_core("convert", str(src), str(tmp_path / "core"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run_core("inspect", str(tmp_path / "core"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["state"] == "converted"
    # Same bytes as a conversion with torch importable.
    from nvfp4ckpt import convert_checkpoint

    convert_checkpoint(src, tmp_path / "full")
    assert tree_digest(tmp_path / "core") == tree_digest(tmp_path / "full")


@pytest.mark.parametrize(
    "command, extra",
    [
        (["example", "{tmp}/ex"], "torch"),
        (["verify", "{conv}"], "torch"),
        (["revert", "{conv}", "{tmp}/back"], "torch"),
        (["convert", "{src}", "{tmp}/tp", "--tp", "2"], "torch"),
    ],
)
def test_missing_extra_is_one_line(tmp_path, command, extra):
    src = tmp_path / "src"
    write_example(src, arch="qwen3_moe", format="modelopt", seed=3)
    from nvfp4ckpt import convert_checkpoint

    convert_checkpoint(src, tmp_path / "conv")
    args = [a.format(tmp=tmp_path, src=src, conv=tmp_path / "conv") for a in command]
    proc = run_core(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"pip install 'nvfp4ckpt[{extra}]'" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "tp").exists() and not (tmp_path / "back").exists()


def test_engine_registry_matches_the_entry_points():
    """``ENGINES`` says where each plugin is found; the installed package metadata must agree (a plugin whose entry
    point is missing would never be loaded by its engine)."""
    from importlib.metadata import entry_points

    from nvfp4ckpt.engines import ENGINES

    assert set(ENGINES) == {"sglang", "vllm"}
    for engine in ENGINES.values():
        found = {ep.name: ep.value for ep in entry_points(group=engine.entry_point_group)}
        assert found.get("nvfp4ckpt") == engine.plugin, (engine.name, found)
