"""Issue 14: verify and revert check what the descriptor claims. Each tampering rewrites the descriptor in config.json
AND in every header, then rewrites the manifest to match (sizes, sha256), as a careful tamperer would."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from nvfp4ckpt import convert_checkpoint
from nvfp4ckpt.cli import main
from nvfp4ckpt.layouts.trtllm_gen.descriptor import METADATA_KEY
from nvfp4ckpt.verify.checks import verify_checkpoint
from tests.conftest import tree_digest


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from nvfp4ckpt import write_example

    src = tmp_path_factory.mktemp("claims-src")
    write_example(src, format="modelopt", arch="qwen3_moe", seed=0, shards=2)
    conv = tmp_path_factory.mktemp("claims-conv") / "conv"
    convert_checkpoint(src, conv)
    return src, conv


def tamper(conv: Path, out: Path, edit, edit_config=None) -> Path:
    shutil.copytree(conv, out)
    cfg = json.loads((out / "config.json").read_text())
    desc = cfg["quantization_config"]["moe_kernel_layout"]
    edit(desc)
    if edit_config:
        edit_config(cfg)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    meta = json.dumps(desc, sort_keys=True, separators=(",", ":"))
    for shard in out.rglob("*.safetensors"):
        raw = shard.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        header.setdefault("__metadata__", {})[METADATA_KEY] = meta
        body = json.dumps(header, separators=(",", ":")).encode()
        body += b" " * (-len(body) % 8)
        shard.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    manifest_path = out / "nvfp4ckpt_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        data = (out / entry["name"]).read_bytes()
        entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return out


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _swap_gate_up(d):
    for info in d["layers"].values():
        names = info["source_projection_names"]
        names["gate"], names["up"] = names["up"], names["gate"]


def _routing(key, value):
    return lambda d: d["routing"].__setitem__(key, value)


SELF_EVIDENT = {  # caught with or without --source
    "w13_order": _set("w13_order", "gate_up"),
    "epilogue_tile_m": _set("epilogue_tile_m", 64),
    "scale_swizzle": _set("scale_swizzle", "none"),
    "gated_act_row_interleave": _set("gated_act_row_interleave", False),
    "scalar_convention": _set("scalar_convention", "compressed_tensors_quant"),
    "source_projection_names": _swap_gate_up,
    "routing.top_k": _routing("top_k", 1),
    "routing.method": _routing("method", "Renormalize"),
    "architecture": _set("architecture", "mixtral"),
    "layers dropped": lambda d: d["layers"].pop(next(iter(d["layers"]))),
}


def _descriptor_row(report):
    return next(c for c in report.checks if c.name == "structure")


def test_untampered_passes_and_without_source_says_self_consistency_only(pair):
    src, conv = pair
    alone = _descriptor_row(verify_checkpoint(conv, checks=("structure",)))
    assert alone.status == "pass" and "self-consistency only" in alone.summary and "not checked" in alone.summary
    assert "source_scalar_dtype" in alone.summary
    full = _descriptor_row(verify_checkpoint(conv, source=src, checks=("structure",)))
    assert full.status == "pass" and "re-derived from the source" in full.summary


@pytest.mark.parametrize("what", sorted(SELF_EVIDENT))
def test_tampering_fails_verify_with_and_without_source_and_revert_refuses(pair, tmp_path, capsys, what):
    src, conv = pair
    bad = tamper(conv, tmp_path / "bad", SELF_EVIDENT[what])
    for source in (None, src):
        row = _descriptor_row(verify_checkpoint(bad, source=source, checks=("structure",)))
        assert row.status == "fail", (what, source, row)
    before = tree_digest(bad)
    code = main(["revert", str(bad), str(tmp_path / "back")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and "fails the structure check" in err, err  # a damaged checkpoint: a failed check
    assert not (tmp_path / "back").exists() and tree_digest(bad) == before


@pytest.mark.parametrize(
    "what,edit,edit_config",
    [
        ("top_k in config and descriptor", _routing("top_k", 1), lambda c: c.__setitem__("num_experts_per_tok", 1)),
        ("norm in config and descriptor", lambda d: d["routing"].update(method="Default", norm_topk_prob=False),
         lambda c: c.__setitem__("norm_topk_prob", False)),
        ("source scalar dtype", lambda d: [i.__setitem__("source_scalar_dtype", "F16") for i in d["layers"].values()], None),
    ],
)  # fmt: skip
def test_tampering_only_the_source_reveals(pair, tmp_path, what, edit, edit_config):
    src, conv = pair
    bad = tamper(conv, tmp_path / "bad", edit, edit_config)
    alone = _descriptor_row(verify_checkpoint(bad, checks=("structure",)))
    assert alone.status == "pass" and "not checked" in alone.summary  # self-consistent: only the source can tell
    row = _descriptor_row(verify_checkpoint(bad, source=src, checks=("structure",)))
    assert row.status == "fail" and any("descriptor" in p for p in row.problems), row


def test_numerics_take_routing_from_the_source(pair, tmp_path):
    src, conv = pair
    bad = tamper(
        conv, tmp_path / "bad", _routing("top_k", 1), lambda c: c.__setitem__("num_experts_per_tok", 1)
    )  # fmt: skip
    report = verify_checkpoint(bad, source=src, checks=("numerics",), backend="torch", tokens=16, layers=["0"])
    numerics = next(c for c in report.checks if c.name == "numerics")
    assert numerics.status == "fail", numerics
    good = verify_checkpoint(conv, source=src, checks=("numerics",), backend="torch", tokens=16, layers=["0"])
    assert good.passed


# ---- Issue 24: the source quantization config revert writes back ------------------------------------------------


def _source_quant(value):
    def edit(cfg):
        cfg["quantization_config"]["source_quantization_config"] = value

    return edit


SOURCE_QUANT = {
    "fp8": {"quant_method": "modelopt", "quant_algo": "FP8", "group_size": 16},
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {}},
    "a string": "NVFP4",
    "null": None,
    "a list": [1],
}


@pytest.mark.parametrize("what", sorted(SOURCE_QUANT))
def test_source_quantization_config_checked_against_source_format(pair, tmp_path, capsys, what):
    src, conv = pair
    bad = tamper(conv, tmp_path / "bad", lambda d: None, _source_quant(SOURCE_QUANT[what]))
    for source in (None, src):
        row = _descriptor_row(verify_checkpoint(bad, source=source, checks=("structure",)))
        assert row.status == "fail", (what, source, row)
        assert any("source_quantization_config" in p for p in row.problems), row.problems
    code = main(["verify", str(bad), "--check", "structure", "--quiet"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and "source_quantization_config" in err, err
    before = tree_digest(bad)
    code = main(["revert", str(bad), str(tmp_path / "back")])
    err = " ".join(capsys.readouterr().err.split())
    assert code != 0 and "source_quantization_config" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "back").exists() and tree_digest(bad) == before


def test_source_quantization_config_changed_within_nvfp4_only_the_source_reveals(pair, tmp_path):
    src, conv = pair
    cfg = json.loads((conv / "config.json").read_text())["quantization_config"]["source_quantization_config"]
    bad = tamper(conv, tmp_path / "bad", lambda d: None, _source_quant({**cfg, "exclude_modules": ["lm_head"]}))
    assert _descriptor_row(verify_checkpoint(bad, checks=("structure",))).status == "pass"
    row = _descriptor_row(verify_checkpoint(bad, source=src, checks=("structure",)))
    assert row.status == "fail" and any("exclude_modules" in p for p in row.problems), row.problems


@pytest.mark.parametrize(
    "edit_config,needle",
    [
        (lambda c: c.__setitem__("hidden_size", 512), "field hidden_size is 512"),
        (lambda c: c.__setitem__("moe_intermediate_size", 64), "field moe_intermediate_size is 64"),
        (lambda c: c.__setitem__("num_hidden_layers", 1), "field num_hidden_layers is 1"),
        (lambda c: c.__setitem__("mlp_only_layers", [0]), "decoder layer 0 dense"),
    ],
)
def test_converted_config_disagreeing_with_the_layers_fails_verify(pair, tmp_path, capsys, edit_config, needle):
    src, conv = pair
    bad = tamper(conv, tmp_path / "bad", lambda d: None, edit_config)
    row = _descriptor_row(verify_checkpoint(bad, checks=("structure",)))
    assert row.status == "fail" and any(needle in p for p in row.problems), row.problems
    code = main(["revert", str(bad), str(tmp_path / "back")])
    assert code == 1 and needle in " ".join(capsys.readouterr().err.split())


def test_modelopt_section_deferring_to_hf_quant_config_passes(tmp_path):
    """A ModelOpt source whose config.json section says nothing (``{}``) and whose hf_quant_config.json says NVFP4:
    convert carries ``{}`` as the source section, and verify detects it as convert did (hf_quant_config.json)."""
    from nvfp4ckpt import write_example

    src = tmp_path / "src"
    write_example(src, format="modelopt", arch="qwen3_moe", seed=0, shards=1)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {}
    (src / "config.json").write_text(json.dumps(cfg))
    convert_checkpoint(src, tmp_path / "conv")
    for source in (None, src):
        assert verify_checkpoint(tmp_path / "conv", source=source, checks=("structure",)).passed
    assert main(["revert", str(tmp_path / "conv"), str(tmp_path / "back"), "--quiet"]) == 0
