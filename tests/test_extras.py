"""The core install (numpy, safetensors, typer, rich, huggingface-hub) runs inspect and convert; a command that needs
an extra says which in one line and exits 2. Each case runs in a fresh interpreter in which the optional packages
cannot be imported (a meta-path finder refuses them, as a venv without them would)."""

from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

import pytest

from nvfp4ckpt import write_example
from nvfp4ckpt._install import CPU_TORCH_INDEX, Origin, has_nvidia_gpu, install_hint, origin_from_direct_url
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
    # the hint installs the extra from where this nvfp4ckpt came from: here, the source checkout the tests import
    root = Path(__file__).resolve().parents[1]
    assert f"pip install -e '{root}[{extra}]'" in lines[0] and "Traceback" not in proc.stderr
    assert "'nvfp4ckpt[" not in lines[0]  # not on PyPI: a bare package name would not install
    if not has_nvidia_gpu() and sys.platform.startswith("linux"):
        assert f"pip install torch --index-url {CPU_TORCH_INDEX} && " in lines[0]
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


# ---- Issue 25: hints that install the extra from where the tool came from; extras a CPU GSM8K run can take -------


@pytest.mark.parametrize(
    "direct_url, kind, pip",
    [
        (None, "index", "pip install 'nvfp4ckpt[gsm8k]'"),
        ('{"url": "https://github.com/o/nvfp4ckpt", "vcs_info": {"vcs": "git", "commit_id": "abc123"}}', "vcs",
         "pip install 'nvfp4ckpt[gsm8k] @ git+https://github.com/o/nvfp4ckpt@abc123'"),
        ('{"url": "https://example.org/nvfp4ckpt-0.1.0-py3-none-any.whl", "archive_info": {}}', "url",
         "pip install 'nvfp4ckpt[gsm8k] @ https://example.org/nvfp4ckpt-0.1.0-py3-none-any.whl'"),
        ('{"url": "file:///nonexistent/nvfp4ckpt", "dir_info": {}}', "index", "pip install 'nvfp4ckpt[gsm8k]'"),
        ("not json", "index", "pip install 'nvfp4ckpt[gsm8k]'"),
    ],
)  # fmt: skip
def test_hint_follows_the_installation(direct_url, kind, pip):
    where = origin_from_direct_url(direct_url)
    assert where.kind == kind
    assert install_hint("gsm8k", "transformers", where, platform="linux", gpu=False) == pip


def test_hint_for_a_local_wheel_or_folder(tmp_path):
    wheel = tmp_path / "nvfp4ckpt-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    where = origin_from_direct_url(json.dumps({"url": wheel.as_uri(), "archive_info": {}}))
    assert where == Origin("file", str(wheel))
    assert install_hint("torch", "tokenizers", where, platform="linux", gpu=False) == f"pip install '{wheel}[torch]'"
    where = origin_from_direct_url(json.dumps({"url": tmp_path.as_uri(), "dir_info": {"editable": True}}))
    assert install_hint("torch", "tokenizers", where, gpu=True) == f"pip install '{tmp_path}[torch]'"


@pytest.mark.parametrize(
    "platform, gpu, cpu_index",
    [("linux", False, True), ("linux", True, False), ("darwin", False, False), ("win32", False, False)],
)
def test_torch_hint_takes_the_cpu_build_only_where_pypi_would_give_cuda(platform, gpu, cpu_index):
    hint = install_hint("torch", "torch", Origin("checkout", "/src/nvfp4ckpt"), platform=platform, gpu=gpu)
    assert hint.endswith("pip install -e '/src/nvfp4ckpt[torch]'") or "(no NVIDIA GPU" in hint
    assert (f"pip install torch --index-url {CPU_TORCH_INDEX} && " in hint) == cpu_index


def _extras() -> dict[str, set[str]]:
    """Each extra of pyproject.toml resolved to the distribution names it installs (nvfp4ckpt[...] followed)."""
    import re
    import tomllib

    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def resolve(extra: str) -> set[str]:
        out: set[str] = set()
        for req in declared[extra]:
            name = re.match(r"[A-Za-z0-9_.-]+", req).group().lower()
            if name == "nvfp4ckpt":
                for sub in re.search(r"\[(.*)\]", req).group(1).split(","):
                    out |= resolve(sub.strip())
            else:
                out.add(name)
        return out

    return {extra: resolve(extra) for extra in declared}


def test_cpu_gsm8k_extra_installs_no_gpu_kernels():
    extras = _extras()
    assert {"torch", "transformers", "tokenizers", "pyarrow"} <= extras["gsm8k"]
    assert not {"flashinfer-python", "nvidia-cutlass-dsl", "triton"} & extras["gsm8k"]
    assert {"flashinfer-python", "torch"} <= extras["gpu"] and extras["verify"] == extras["gpu"]
    assert extras["gpu"] | extras["gsm8k"] <= extras["all"]


def test_each_hinted_extra_installs_its_package():
    from nvfp4ckpt._lazy import EXTRA_OF

    extras = _extras()
    pip_name = {"flashinfer": "flashinfer-python"}
    for module, extra in EXTRA_OF.items():
        assert pip_name.get(module, module) in extras[extra], (module, extra)
