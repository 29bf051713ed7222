"""Bad input: one clear line naming the file/tensor, exit code 2, source untouched, no output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvfp4ckpt import convert_checkpoint, write_example
from nvfp4ckpt.cli import main
from nvfp4ckpt.io import ShardWriter
from tests.conftest import tree_digest


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(root: Path, edit) -> None:
    """Apply edit(name -> tensor dict) to every shard with the real safetensors writer."""
    index_path = root / "model.safetensors.index.json"
    for f in sorted(root.glob("*.safetensors")):
        tensors = load_file(f)
        edit(tensors)
        save_file(tensors, f, metadata={"format": "pt"})
    if index_path.exists():
        index = json.loads(index_path.read_text())
        weight_map = {}
        for f in sorted(root.glob("*.safetensors")):
            for k in load_file(f):
                weight_map[k] = f.name
        index["weight_map"] = weight_map
        index_path.write_text(json.dumps(index))


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, " ".join(err.split())


def assert_fails(capsys, src: Path, tmp_path: Path, *needles: str) -> str:
    before = tree_digest(src)
    dst = tmp_path / "dst"
    code, err = run_cli(capsys, "convert", str(src), str(dst))
    assert code == 2, err
    assert err.startswith("Error:") and len(err.splitlines()) == 1
    for needle in needles:
        assert needle in err, err
    assert not dst.exists() and not list(tmp_path.glob(".dst*"))
    assert tree_digest(src) == before
    return err


@pytest.fixture
def src(example_factory, tmp_path) -> Path:
    return copy_ckpt(example_factory("qwen3_moe", "modelopt"), tmp_path / "src")


def _edit_config(root: Path, fn) -> None:
    cfg = json.loads((root / "config.json").read_text())
    fn(cfg)
    (root / "config.json").write_text(json.dumps(cfg))


def test_not_nvfp4(src, tmp_path, capsys):
    _edit_config(src, lambda c: c["quantization_config"].update(quant_algo="FP8"))
    assert_fails(capsys, src, tmp_path, "config.json", "'FP8'", "not 'NVFP4'")


def test_not_quantized_at_all(src, tmp_path, capsys):
    _edit_config(src, lambda c: c.pop("quantization_config"))
    (src / "hf_quant_config.json").unlink()
    assert_fails(capsys, src, tmp_path, "no NVFP4 quantization config")


def test_compressed_tensors_other_format(example_factory, tmp_path, capsys):
    src = copy_ckpt(example_factory("qwen3_moe", "compressed-tensors"), tmp_path / "src")

    def fp8(c):
        c["quantization_config"]["format"] = "float-quantized"
        c["quantization_config"]["config_groups"]["group_0"]["format"] = "float-quantized"

    _edit_config(src, fp8)
    assert_fails(capsys, src, tmp_path, "float-quantized", "nvfp4-pack-quantized")


def test_group_size_not_16(src, tmp_path, capsys):
    def to_32(c):  # where ModelOpt 0.47 writes it in config.json
        for part in c["quantization_config"]["config_groups"]["group_0"].values():
            if isinstance(part, dict):
                part["group_size"] = 32

    _edit_config(src, to_32)
    assert_fails(capsys, src, tmp_path, "group size 32", "16")


def test_unknown_architecture(src, tmp_path, capsys):
    _edit_config(src, lambda c: c.update(model_type="llama"))
    assert_fails(capsys, src, tmp_path, "model_type 'llama' is not supported", "qwen3_moe")


def test_no_moe_layers(src, tmp_path, capsys):
    _edit_config(src, lambda c: c["quantization_config"]["ignore"].append("*.experts.*"))
    (src / "hf_quant_config.json").unlink()
    assert_fails(capsys, src, tmp_path, "no NVFP4 MoE expert tensors", "excluded")


def test_missing_expert_scale(src, tmp_path, capsys):
    name = "model.layers.1.mlp.experts.5.up_proj.weight_scale"
    rewrite(src, lambda t: t.pop(name, None))
    assert_fails(capsys, src, tmp_path, f"missing tensor {name}")


def test_missing_expert(src, tmp_path, capsys):
    rewrite(src, lambda t: [t.pop(k) for k in list(t) if ".experts.3." in k and "layers.0" in k])
    assert_fails(capsys, src, tmp_path, "model.layers.0.mlp.experts.3 is missing")


def test_wrong_dtype(src, tmp_path, capsys):
    name = "model.layers.0.mlp.experts.2.down_proj.weight"
    rewrite(src, lambda t: t.__setitem__(name, t[name].to(torch.bfloat16)) if name in t else None)
    assert_fails(capsys, src, tmp_path, name, "BF16", "expected U8")


def test_wrong_shape(src, tmp_path, capsys):
    name = "model.layers.1.mlp.experts.0.gate_proj.weight_scale"
    rewrite(src, lambda t: t.__setitem__(name, t[name][:, :8].contiguous()) if name in t else None)
    assert_fails(capsys, src, tmp_path, name, "F8_E4M3[128, 8]", "expected F8_E4M3[128, 16]")


def test_broken_global_scale(src, tmp_path, capsys):
    name = "model.layers.1.mlp.experts.4.down_proj.weight_scale_2"
    rewrite(src, lambda t: t.__setitem__(name, torch.tensor(float("inf"))) if name in t else None)
    assert_fails(capsys, src, tmp_path, "model.layers.1.mlp.experts", "non-finite")


def test_corrupt_header(src, tmp_path, capsys):
    shard = sorted(src.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\xff" * 12
    shard.write_bytes(bytes(data))
    assert_fails(capsys, src, tmp_path, shard.name, "not valid JSON", "corrupt")


def test_truncated_file(src, tmp_path, capsys):
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert_fails(capsys, src, tmp_path, shard.name, "truncated")


def test_index_points_to_missing_shard(src, tmp_path, capsys):
    sorted(src.glob("*.safetensors"))[-1].unlink()
    assert_fails(capsys, src, tmp_path, "model.safetensors.index.json", "missing")


def test_already_converted(example_factory, tmp_path, capsys):
    converted = tmp_path / "converted"
    convert_checkpoint(example_factory("qwen3_moe", "modelopt"), converted)
    err = assert_fails(capsys, converted, tmp_path, "already in the TRT-LLM-gen kernel layout")
    assert "convert its source" in err


def test_existing_destination(example_factory, tmp_path, capsys):
    src = example_factory("qwen3_moe", "modelopt")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "convert", str(src), str(dst))
    assert code == 2 and "exists and is not empty" in err and "--overwrite" in err
    assert (dst / "keep.txt").read_text() == "mine"


def test_destination_inside_source(src, tmp_path, capsys):
    before = tree_digest(src)
    code, err = run_cli(capsys, "convert", str(src), str(src / "out"))
    assert code == 2 and "overlaps the source" in err
    assert tree_digest(src) == before


def test_missing_source(tmp_path, capsys):
    code, err = run_cli(capsys, "convert", str(tmp_path / "nope" / "x"), str(tmp_path / "dst"))
    assert code == 2 and "no such folder" in err


def test_hub_id_offline(tmp_path, capsys):
    code, err = run_cli(capsys, "inspect", "nvidia/Qwen3-30B-A3B-NVFP4")
    assert code == 2
    assert "nvidia/Qwen3-30B-A3B-NVFP4: could not download from the Hugging Face Hub" in err
    assert "pass a local folder" in err


def test_interrupted_conversion_leaves_no_dst(example_factory, tmp_path, monkeypatch, capsys):
    """A crash half-way (here: Ctrl-C during the 15th computed tensor) leaves no DST, only the partial folder
    (kept for --resume, see tests/test_faults.py) and no lock."""
    src = example_factory("deepseek_v3", "modelopt")
    real_write = ShardWriter.write
    calls = {"n": 0}

    def interrupted_write(self, name, data):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return real_write(self, name, data)

    monkeypatch.setattr(ShardWriter, "write", interrupted_write)
    dst = tmp_path / "dst"
    code, err = run_cli(capsys, "convert", str(src), str(dst))
    assert code == 130 and "interrupted" in err
    assert calls["n"] == 15
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".dst.nvfp4ckpt-partial"]
    assert not (tmp_path / ".dst.nvfp4ckpt-partial" / "nvfp4ckpt_manifest.json").exists()


def test_bad_max_shard_size(example_factory, tmp_path, capsys):
    code, err = run_cli(capsys, "convert", str(example_factory()), str(tmp_path / "d"), "--max-shard-size", "lots")
    assert code == 2 and "--max-shard-size" in err and "5GB" in err


def test_two_runs_into_one_destination(example_factory, tmp_path, capsys):
    """A second run while a first holds the destination lock fails cleanly and leaves the first's work alone;
    a lock file nobody holds (its run was SIGKILLed) is taken over."""
    import fcntl

    src = example_factory()
    dst = tmp_path / "dst"
    lock = tmp_path / ".dst.nvfp4ckpt-lock"
    lock.write_text("12345\n")  # a run in progress: it holds an flock on the file
    with open(lock, "rb+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, err = run_cli(capsys, "convert", str(src), str(dst))
        assert code == 2 and "another nvfp4ckpt run is writing it" in err and "pid 12345" in err and str(lock) in err
        assert lock.exists() and not dst.exists()
    assert lock.exists()  # left behind, unlocked: a dead run's lock
    assert run_cli(capsys, "convert", str(src), str(dst))[0] == 0
    assert not lock.exists()


def test_read_only_source_and_odd_paths(example_factory, tmp_path, capsys):
    """Spaces and non-ASCII in paths, a symlinked shard, a read-only source folder."""
    import os
    import stat

    src = tmp_path / "my models" / "Qwen3 ünï"
    src.mkdir(parents=True)
    original = example_factory()
    for f in original.iterdir():
        target = src / f.name
        if f.name.endswith("00001-of-00002.safetensors"):
            target.symlink_to(f)
        else:
            shutil.copy(f, target)
    for f in src.iterdir():
        if not f.is_symlink():
            f.chmod(stat.S_IRUSR)
    src.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        before = tree_digest(src)
        code, err = run_cli(capsys, "convert", str(src), str(tmp_path / "out dir ✓"))
        assert code == 0, err
        assert tree_digest(src) == before
    finally:
        src.chmod(stat.S_IRWXU)
        for f in src.iterdir():
            if not f.is_symlink():
                os.chmod(f, stat.S_IRUSR | stat.S_IWUSR)


# ---- Issue 24: a newline (or any control character) in a path never splits the one-line error --------------------


@pytest.mark.parametrize("odd", ["new\nline", "tab\there", "cr\rret", "nul\x01ctl"])
def test_control_characters_in_paths_keep_errors_on_one_line(example_factory, tmp_path, capsys, odd):
    src = copy_ckpt(example_factory(), tmp_path / f"src {odd}")
    _edit_config(src, lambda c: c["quantization_config"].update(quant_algo="FP8"))
    for args in (
        ["convert", str(src), str(tmp_path / f"dst {odd}")],
        ["convert", str(tmp_path / f"missing {odd}"), str(tmp_path / "dst")],
        ["verify", str(src)],
        ["revert", str(src), str(tmp_path / "back")],
        ["inspect", str(tmp_path / f"missing {odd}")],
    ):
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and err.endswith("\n") and err.startswith("Error:"), (args, err)
        assert "\r" not in err and "\t" not in err and "\x01" not in err
        assert repr(odd)[1:-1] in err, (args, err)  # the name, escaped as Python writes it


# ---- Issue 24: the library API checks its arguments as the CLI does ---------------------------------------------


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"device": None}, "device=None (--device)"),
        ({"workers": 1.5}, "workers=1.5 (--workers)"),
        ({"workers": 0}, "workers=0 (--workers)"),
        ({"workers": True}, "workers=True"),
        ({"overwrite": "no"}, "overwrite='no' (--overwrite)"),
        ({"resume": 1}, "resume=1 (--resume)"),
        ({"tp": "2"}, "tp='2' (--tp)"),
        ({"ep": 0}, "ep=0 (--ep)"),
        ({"max_shard_size": None}, "max_shard_size=None"),
        ({"progress": "yes"}, "progress='yes'"),
    ],
)
def test_convert_checkpoint_checks_its_arguments(src, tmp_path, kwargs, needle):
    from nvfp4ckpt.errors import InputError

    before = tree_digest(src)
    with pytest.raises(InputError) as info:
        convert_checkpoint(src, tmp_path / "dst", **kwargs)
    assert str(info.value).startswith("convert_checkpoint: ") and needle in str(info.value), str(info.value)
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".dst*"))
    assert tree_digest(src) == before


def test_revert_and_verify_check_their_arguments(src, tmp_path):
    from nvfp4ckpt import revert_checkpoint, verify_checkpoint
    from nvfp4ckpt.errors import InputError

    conv = tmp_path / "conv"
    convert_checkpoint(src, conv)
    for kwargs, needle in (({"overwrite": "no"}, "overwrite='no'"), ({"resume": None}, "resume=None")):
        with pytest.raises(InputError, match=f"revert_checkpoint: {needle}"):
            revert_checkpoint(conv, tmp_path / "back", **kwargs)
    assert not (tmp_path / "back").exists() and not list(tmp_path.glob(".back*"))
    for kwargs, needle in (
        ({"tokens": 1.5}, "tokens=1.5 (--tokens)"), ({"seed": -1}, "seed=-1 (--seed)"), ({"checks": "structure"}, "checks='structure'"),
        ({"hash_files": "no"}, "hash_files='no'"), ({"layers": 0}, "layers=0"), ({"device": 0}, "device=0"),
    ):  # fmt: skip
        with pytest.raises(InputError) as info:
            verify_checkpoint(conv, **kwargs)
        assert needle in str(info.value), str(info.value)
    assert main(["convert", str(src), str(tmp_path / "cli"), "--workers", "1", "--quiet"]) == 0  # the CLI's own values pass
