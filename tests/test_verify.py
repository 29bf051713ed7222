"""verify: passes on good output, and each kind of damage fails the right check with exit 1."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvfp4ckpt import convert_checkpoint
from nvfp4ckpt.layouts.trtllm_gen import transform as layout
from nvfp4ckpt.cli import main
from nvfp4ckpt.io import read_header
from nvfp4ckpt import verify_checkpoint
from tests.conftest import ARCHS, FORMATS, swap_gate_up


@pytest.fixture
def converted(example_factory, tmp_path):
    def make(arch="qwen3_moe", fmt="modelopt", **kw) -> tuple[Path, Path]:
        src = example_factory(arch, fmt)
        dst = tmp_path / f"conv-{arch}-{fmt}"
        if not dst.exists():
            convert_checkpoint(src, dst, **kw)
        return src, dst

    return make


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, " ".join(cap.err.split())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_good_checkpoints_pass_every_check(converted, arch, fmt):
    src, dst = converted(arch, fmt)
    report = verify_checkpoint(dst, source=src, backend="torch", tokens=16)
    assert report.passed, report.to_dict()
    assert [c.status for c in report.checks] == ["pass", "pass", "pass"]
    assert len(report.numerics) == 2 and all(n.reference == "source" and n.rel_l2 == 0.0 for n in report.numerics)


def test_cli_json_report_and_selection(converted, tmp_path, capsys):
    src, dst = converted()
    report_path = tmp_path / "r.json"
    code, _, _ = run(capsys, "verify", dst, "--source", src, "--json-out", report_path, "--layers", "1", "--tokens", "8")
    assert code == 0
    data = json.loads(report_path.read_text())
    assert data["passed"] is True and [n["prefix"] for n in data["numerics"]] == ["model.layers.1.mlp.experts"]
    code, out, _ = run(capsys, "verify", dst, "--skip", "numerics", "--no-hash", "--json")
    data = json.loads(out)
    assert code == 0 and [c["name"] for c in data["checks"]] == ["structure", "layout"]
    assert data["checks"][1]["status"] == "skip" and "sha256 skipped" in data["checks"][0]["summary"]
    code, out, _ = run(capsys, "verify", dst, "--check", "structure", "--json")
    assert code == 0 and [c["name"] for c in json.loads(out)["checks"]] == ["structure"]


def _flip_byte(dst: Path, tensor: str, offset_in_tensor: int) -> None:
    for f in dst.glob("*.safetensors"):
        infos, _ = read_header(f)
        if tensor in infos:
            data = bytearray(f.read_bytes())
            data[infos[tensor].begin + offset_in_tensor] ^= 0x5A
            f.write_bytes(bytes(data))
            return
    raise AssertionError(tensor)


def test_flipped_weight_byte_is_located(converted, tmp_path, capsys):
    src, good = converted()
    dst = tmp_path / "bad"
    shutil.copytree(good, dst)
    p = "model.layers.1.mlp.experts"
    e, h, i = 8, 256, 128
    kernel_row = 37
    _flip_byte(dst, f"{p}.w13_weight", (3 * 2 * i + kernel_row) * (h // 2) + 5)
    # kernel row 37 holds W31[h*I + s] with h = (37>>3)&1 = 0 (up), s = (37//32)*16 + (37%8)*2 + ((37>>4)&1) = 26
    code, _, err = run(capsys, "verify", dst, "--source", src, "--quiet")
    assert code == 1
    # W4A16: a single changed weight survives into the output (with W4A4 the re-quantization of the
    # intermediate can round such a small change away; the exact layout check is what catches it then).
    report = verify_checkpoint(dst, source=src, backend="torch", act="bf16", tokens=64)
    status = {c.name: c for c in report.checks}
    assert status["structure"].status == "fail" and any("sha256" in p for p in status["structure"].problems)
    assert status["layout"].status == "fail"
    assert status["layout"].problems == [f"{p}.w13_weight: expert 3, source row 26 of up_proj weight differs after un-shuffling"]
    assert status["numerics"].status == "fail"
    assert "check failed" in err


def _rewrite(dst: Path, edit) -> None:
    """Edit tensors of a converted checkpoint keeping header metadata and manifest consistent (as a buggy
    tool would), so only the checks that look at the bytes' meaning can catch it."""
    manifest_path = dst / "nvfp4ckpt_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for f in dst.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            meta = sf.metadata()
        tensors = load_file(f)
        if edit(tensors):
            save_file(tensors, f, metadata=meta)
            for entry in manifest["files"]:
                if entry["name"] == f.name:
                    entry["size"] = f.stat().st_size
                    entry["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


def test_swapped_gate_and_up_fail_layout_and_numerics(converted, tmp_path):
    src, good = converted("deepseek_v3", "compressed-tensors")
    dst = tmp_path / "swapped"
    shutil.copytree(good, dst)

    _rewrite(dst, swap_gate_up)
    report = verify_checkpoint(dst, source=src, backend="torch", tokens=16)
    status = {c.name: c for c in report.checks}
    assert status["structure"].status == "pass"  # shapes, dtypes, scalars and manifest are all still consistent
    assert status["layout"].status == "fail" and "up_proj weight differs" in status["layout"].problems[0]
    assert status["numerics"].status == "fail"
    assert all(n.rel_l2 > 0.1 for n in report.numerics)


def test_tampered_scalar_fails_structure(converted, tmp_path):
    src, good = converted()
    dst = tmp_path / "scalar"
    shutil.copytree(good, dst)

    def bump(t):
        name = "model.layers.0.mlp.experts.g1_alphas"
        if name in t:
            t[name] = t[name] * 1.5
            return True
        return False

    _rewrite(dst, bump)
    report = verify_checkpoint(dst, checks=("structure",))
    assert not report.passed
    assert report.checks[0].problems == [
        "model.layers.0.mlp.experts.g1_alphas: does not match the formula applied to the stored input/weight scales"
    ]


def test_truncated_converted_file_fails_with_exit_1(converted, tmp_path, capsys):
    _, good = converted()
    dst = tmp_path / "trunc"
    shutil.copytree(good, dst)
    f = next(dst.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-100])
    code, _, err = run(capsys, "verify", dst, "--quiet")
    assert code == 1 and "structure check failed" in err and "truncated" in err


def test_manifest_problems(converted, tmp_path):
    _, good = converted()
    dst = tmp_path / "man"
    shutil.copytree(good, dst)
    (dst / "extra.txt").write_text("x")
    (dst / "tokenizer_config.json").write_text("{}")
    report = verify_checkpoint(dst, checks=("structure",))
    problems = report.checks[0].problems
    assert "extra.txt: not listed in the manifest" in problems
    assert any(p.startswith("tokenizer_config.json: size") for p in problems)


def test_usage_errors_exit_2(example_factory, converted, capsys):
    code, _, err = run(capsys, "verify", example_factory())
    assert code == 2 and "not a converted checkpoint" in err
    _, dst = converted()
    code, _, err = run(capsys, "verify", dst, "--backend", "triton")
    assert code == 2 and "needs a CUDA GPU" in err
    code, _, err = run(capsys, "verify", dst, "--check", "speed")
    assert code == 2 and "'speed' is not one of 'structure', 'layout', 'numerics', 'gsm8k'" in " ".join(err.split())
    code, _, err = run(capsys, "verify", dst, "--layers", "7")
    assert code == 2 and "no MoE layer 7" in err


def test_missing_canonical_tensor(converted, tmp_path):
    _, good = converted()
    dst = tmp_path / "missing"
    shutil.copytree(good, dst)
    _rewrite(dst, lambda t: t.pop("model.layers.1.mlp.experts.w2_weight_scale", None) is not None)
    report = verify_checkpoint(dst, checks=("structure",))
    assert report.checks[0].problems == ["model.layers.1.mlp.experts.w2_weight_scale: missing"]


def _poison_cuda_cache() -> None:
    """Fill the caching allocator's free memory with NaN so any output element the kernel fails to write shows."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    poison = torch.full((min(free // 2, 8 * 2**30) // 4,), float("nan"), device="cuda")
    del poison


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_backend_on_every_example(converted, arch, fmt):
    src, dst = converted(arch, fmt)
    for act in ("nvfp4", "bf16"):
        _poison_cuda_cache()
        report = verify_checkpoint(dst, source=src, checks=("numerics",), backend="triton", act=act, tokens=48)
        assert report.passed, report.to_dict()
        assert all(n.rel_l2 < 0.02 and n.max_abs == n.max_abs for n in report.numerics)  # finite: every element written


@pytest.mark.gpu
def test_triton_backend_catches_swapped_gate_up(converted, tmp_path):
    src, good = converted("qwen3_moe", "modelopt")
    dst = tmp_path / "swapped"
    shutil.copytree(good, dst)

    _rewrite(dst, swap_gate_up)
    report = verify_checkpoint(dst, source=src, checks=("numerics",), backend="triton", tokens=48)
    assert not report.passed and all(n.rel_l2 > 0.1 for n in report.numerics)


# ---- Issue 24: one rule for damaged checkpoints: a failed check, exit 1, wherever it is found ---------------------


def _drop_rank_folder(dst: Path) -> None:
    shutil.rmtree(dst / "ranks" / "rank-001")


def _truncate_shard(dst: Path) -> None:
    f = sorted(dst.rglob("*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:-100])


def _drop_manifest(dst: Path) -> None:
    (dst / "nvfp4ckpt_manifest.json").unlink()


def _drop_canonical_tensor(dst: Path) -> None:
    _rewrite(dst, lambda t: t.pop("model.layers.1.mlp.experts.w2_weight_scale", None) is not None)


def _reshape_canonical_tensor(dst: Path) -> None:
    name = "model.layers.1.mlp.experts.w2_weight"
    _rewrite(dst, lambda t: name in t and t.__setitem__(name, t[name][:, :-1].contiguous()) is None)


def _corrupt_config(dst: Path) -> None:
    (dst / "config.json").write_text("{not json")


DAMAGE = {
    "rank folder missing": (_drop_rank_folder, {"tp": 2}),
    "shard truncated": (_truncate_shard, {}),
    "manifest missing": (_drop_manifest, {}),
    "canonical tensor missing": (_drop_canonical_tensor, {}),
    "canonical tensor of the wrong shape": (_reshape_canonical_tensor, {}),
    "config.json unreadable": (_corrupt_config, {}),
}


@pytest.mark.parametrize("what", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_a_failed_check_everywhere(example_factory, tmp_path, capsys, what):
    damage, kw = DAMAGE[what]
    src = example_factory("qwen3_moe", "modelopt")
    dst = tmp_path / "conv"
    convert_checkpoint(src, dst, **kw)
    damage(dst)
    runs = [["--check", "structure"], ["--no-hash"], ["--source", src, "--no-hash"], []]
    if what != "manifest missing":  # damage that stops the tensors being read fails even a numerics-only run
        runs.append(["--check", "numerics"])
    for args in runs:
        code, _, err = run(capsys, "verify", dst, "--quiet", "--tokens", "8", *args)
        assert code == 1, (what, args, err)
        assert err.startswith("Error: structure check failed") and len(err.splitlines()) == 1, (what, args, err)
        assert "Traceback" not in err
    code, _, err = run(capsys, "revert", dst, tmp_path / "back")
    assert code == 1 and err.startswith("Error:") and "Traceback" not in err, (what, err)
    assert not (tmp_path / "back").exists()
