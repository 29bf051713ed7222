"""verify's single pass (each file read once: hash, layout, numerics) and the sampled CPU numerics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nvfp4ckpt import convert_checkpoint, verify_checkpoint
from nvfp4ckpt.cli import main
from nvfp4ckpt.io import CheckpointFiles, read_header
from nvfp4ckpt.runtime import load_moe_layer
from nvfp4ckpt.verify.numerics import NumericsSample, only_experts
from tests.conftest import swap_gate_up
from tests.test_verify import _rewrite


@pytest.fixture
def converted(example_factory, tmp_path):
    def make(arch="qwen3_moe", fmt="modelopt", **kw) -> tuple[Path, Path]:
        src = example_factory(arch, fmt, shards=3)
        dst = tmp_path / f"conv-{arch}-{fmt}"
        if not dst.exists():
            convert_checkpoint(src, dst, max_shard_size=kw.pop("max_shard_size", "300KB"), **kw)
        return src, dst

    return make


def _tensor_bytes(root: Path) -> int:
    total = 0
    for f in root.glob("*.safetensors"):
        infos, _ = read_header(f)
        total += sum(i.nbytes for i in infos.values())
    return total


def test_each_file_is_read_once(converted, monkeypatch):
    src, dst = converted()
    assert len(list(dst.glob("*.safetensors"))) >= 2  # several shards: hashed on several threads
    seen: dict[Path, int] = {}
    original = CheckpointFiles.pread_into

    def counting(self, info, buf, offset=0):
        seen[self.root] = seen.get(self.root, 0) + len(buf.cast("B") if buf.format != "B" else buf)
        return original(self, info, buf, offset)

    monkeypatch.setattr(CheckpointFiles, "pread_into", counting)
    report = verify_checkpoint(dst, source=src, backend="torch", tokens=8, workers=3)
    assert report.passed, report.to_dict()
    manifest = json.loads((dst / "nvfp4ckpt_manifest.json").read_text())
    assert report.read_bytes == sum(e["size"] for e in manifest["files"])  # every converted byte hashed once
    assert seen[src] == _tensor_bytes(src)  # every source tensor byte read exactly once
    # the converted files go through the pass (not CheckpointFiles), except the structure check's scalars
    scalars = sum(
        i.nbytes for f in dst.glob("*.safetensors") for i in read_header(f)[0].values() if i.dtype == "F32"
    )
    assert seen.get(dst, 0) <= scalars


def _copy_with_bumped_embedding(good, dst, row: int, col: int) -> str:
    """Copy ``good`` to ``dst`` with one element of the (carried-over) embedding changed, manifest kept
    consistent: only the comparison with the source can see it. Returns the tensor's name."""
    shutil.copytree(good, dst)
    name = "model.embed_tokens.weight"

    def bump(t):
        if name in t:
            t[name][row, col] += 1
            return True
        return False

    _rewrite(dst, bump)
    return name


def test_carried_tensor_difference_is_found_in_the_pass(converted, tmp_path):
    src, good = converted()
    dst = tmp_path / "carried"
    name = _copy_with_bumped_embedding(good, dst, 3, 5)
    report = verify_checkpoint(dst, source=src, checks=("structure", "layout"))
    status = {c.name: c for c in report.checks}
    assert status["structure"].status == "pass"
    assert status["layout"].problems == [f"{name}: carried-over tensor differs from the source"]


def test_hash_mismatch_in_one_of_several_shards(converted, tmp_path):
    _, good = converted()
    dst = tmp_path / "flip"
    shutil.copytree(good, dst)
    shards = sorted(dst.glob("*.safetensors"))
    victim = shards[-1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x40
    victim.write_bytes(bytes(data))
    report = verify_checkpoint(dst, checks=("structure",), workers=4)
    assert report.checks[0].problems == [f"{victim.name}: sha256 does not match the manifest"]


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_sampled_numerics_runs_the_chosen_experts(converted, arch):
    src, dst = converted(arch)
    sample = NumericsSample(layers=1, experts=3)
    report = verify_checkpoint(dst, source=src, backend="torch", tokens=16, seed=5, numerics_sample=sample)
    assert report.passed, report.to_dict()
    (n,) = report.numerics
    first, end = n.experts
    assert end - first == 3 and 0 <= first and end <= 8
    assert report.numerics_sample["layers"] == [n.prefix] and report.numerics_sample["experts"][n.prefix] == [first, end]
    assert n.rel_l2 == 0.0 and "a seeded sample: 1 of 2 MoE layers, experts 3 of each" in report.checks[-1].summary
    again = verify_checkpoint(dst, source=src, checks=("numerics",), backend="torch", tokens=16, seed=5, numerics_sample=sample)
    assert again.numerics_sample == report.numerics_sample  # seeded: the same layers and experts


def test_only_experts_is_the_full_layer_with_other_experts_dropped(converted):
    _, dst = converted("deepseek_v3")
    moe = load_moe_layer(dst, 1)
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(32, moe.hidden_size, generator=gen) * 2).to(torch.bfloat16)
    logits = torch.randn(32, moe.num_experts, generator=gen)
    logits[:, 2:6] += 4
    logits = logits.to(torch.bfloat16)
    ids, weights = moe.route(logits)
    kept = (ids >= 2) & (ids < 6)
    assert kept.float().mean() > 0.4  # the boost routes most slots to the block
    want = moe.forward_torch(hidden, torch.where(kept, ids, -1), weights)
    got = only_experts(moe, range(2, 6))(hidden, logits, backend="torch")
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_sampled_numerics_catches_swapped_gate_up(converted, tmp_path):
    src, good = converted("deepseek_v3", "compressed-tensors")
    dst = tmp_path / "swapped"
    shutil.copytree(good, dst)
    _rewrite(dst, swap_gate_up)
    report = verify_checkpoint(
        dst, source=src, checks=("structure", "numerics"), backend="torch", tokens=16,
        numerics_sample=NumericsSample(layers=1, experts=2),
    )  # fmt: skip
    status = {c.name: c for c in report.checks}
    assert status["structure"].status == "pass" and status["numerics"].status == "fail"
    assert report.numerics[0].experts is not None and report.numerics[0].rel_l2 > 0.1


def test_cli_numerics_full_and_sample_in_json(converted, tmp_path, capsys):
    src, dst = converted()
    out = tmp_path / "r.json"
    assert main(["verify", str(dst), "--source", str(src), "--tokens", "8", "--json-out", str(out)]) == 0
    data = json.loads(out.read_text())
    # tiny examples have 8 experts: the default sample (2 layers, 8 experts) is all of them, and is said so
    assert data["numerics_sample"]["full"] is False and len(data["numerics_sample"]["layers"]) == 2
    assert main(["verify", str(dst), "--source", str(src), "--numerics-full", "--tokens", "8", "--json-out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["numerics_sample"]["full"] is True and len(data["numerics"]) == 2
    assert all(n["experts"] is None for n in data["numerics"])
    capsys.readouterr()


def test_no_hash_still_compares_in_the_pass(converted, tmp_path):
    src, good = converted()
    dst = tmp_path / "nohash"
    name = _copy_with_bumped_embedding(good, dst, 0, 0)
    report = verify_checkpoint(dst, source=src, checks=("structure", "layout"), hash_files=False)
    assert report.read_bytes > 0 and report.checks[0].status == "pass"
    assert report.checks[1].problems == [f"{name}: carried-over tensor differs from the source"]
