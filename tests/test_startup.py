"""Which commands import torch. ``import torch`` costs 3-4 s, more than copying a few GB, so the CLI's import
graph, ``inspect`` and a CPU ``convert`` of gated per-expert layers (the common case) must not import it; the
other paths (padding, ``--tp/--ep``, fused inputs, ``verify``) may. Each case runs in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nvfp4ckpt import write_example
from tests.conftest import tree_digest

SMALL = {"hidden_size": 256, "moe_intermediate_size": 128, "num_experts": 8, "vocab_size": 512,
         "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip

_RUN = """
import json, sys
from nvfp4ckpt.cli import main
code = main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def run_cli(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(list(args))], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_import_does_not_import_torch():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, nvfp4ckpt, nvfp4ckpt.cli; print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_cpu_convert_without_torch_gives_the_same_bytes(tmp_path, fmt):
    src = tmp_path / "src"
    write_example(src, format=fmt, shape="qwen3-30b-a3b", layers=2, config_overrides=SMALL, max_shard_size="400KB")
    got = run_cli("convert", str(src), str(tmp_path / "lean"), "--quiet")
    assert got == {"code": 0, "torch": False}
    assert run_cli("inspect", str(src), "--json") == {"code": 0, "torch": False}

    # The same conversion in this process (torch imported, as any library user has it) writes the same files.
    from nvfp4ckpt import convert_checkpoint

    convert_checkpoint(src, tmp_path / "in_process")
    assert tree_digest(tmp_path / "lean") == tree_digest(tmp_path / "in_process")
    # And verify (which needs torch) accepts it against the source.
    verified = run_cli("verify", str(tmp_path / "lean"), "--source", str(src), "--quiet")
    assert verified == {"code": 0, "torch": True}


def test_padded_layer_still_converts(tmp_path):
    # I = 96 needs padding to 128: the torch path, imported on demand.
    src = tmp_path / "src"
    write_example(src, shape="qwen3-30b-a3b", layers=1, config_overrides={**SMALL, "moe_intermediate_size": 96})
    assert run_cli("convert", str(src), str(tmp_path / "dst"), "--quiet") == {"code": 0, "torch": True}
    assert run_cli("verify", str(tmp_path / "dst"), "--source", str(src), "--quiet")["code"] == 0


def test_read_numpy_equals_torch_reads(tmp_path):
    # inspect reads scalars with numpy (no torch): every dtype it may meet gives the values torch reads, bit for bit.
    import torch
    from safetensors.torch import save_file

    from nvfp4ckpt.io import CheckpointFiles

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g) * 1e-3
    tensors = {
        "bf16": base.to(torch.bfloat16), "f16": base.to(torch.float16), "f32": base, "scalar": base[0, 0].clone(),
        "i32": torch.arange(7, dtype=torch.int32), "u8": torch.arange(9, dtype=torch.uint8),
    }  # fmt: skip
    save_file(tensors, str(tmp_path / "model.safetensors"))
    files = CheckpointFiles(tmp_path)
    for name, t in tensors.items():
        got = files.read_numpy(name)
        want = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name
    save_file({"fp8": base.to(torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="numpy cannot hold"):
        CheckpointFiles(tmp_path).read_numpy("fp8")
