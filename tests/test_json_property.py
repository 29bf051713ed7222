"""Issue 14: JSON values of every type at every field the tool reads (property-based, fixed seed, bounded).

For each generated case one field of config.json, hf_quant_config.json, the index, a safetensors header (a tensor
entry or ``__metadata__``) or a converted descriptor gets a JSON value of any type; the command must exit 0 with a
correct output, or exit 1/2 with one line; never a traceback or a hang, and the source never changes."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from nvfp4ckpt import convert_checkpoint
from nvfp4ckpt.cli import main
from nvfp4ckpt.verify.checks import verify_checkpoint
from tests.conftest import load_dir, tree_digest, u8

MISSING = object()

# Every type JSON has, and the values that broke the tool before: huge/negative/float numbers, NaN/Infinity
# (Python's json writes them bare), strings that look like numbers or booleans, nesting beyond any limit.
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 3, 7, 8, 16, -1, 2**63, 0.0, 0.5, 1.0, 2.5, 16.0, 1e400, -1e400, float("nan")]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "nan", "NaN", "Infinity", "false", "true", "16", "NVFP4", "re:(a+)+$", "re:[", "F32", "U8",
                     "*", "re:.*", "../x", "model.safetensors", "ranks/rank-000", "swiglu", "relu2", "bmm"]),
    st.text(max_size=8),
)  # fmt: skip
_values = st.recursive(
    _scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6,
)
_deep = st.integers(min_value=70, max_value=3000).map(lambda n: json.loads("[" * n + "]" * n) if n < 900 else "DEEP:%d" % n)
VALUES = st.one_of(_values, _deep, st.just(MISSING))

SOURCE_FIELDS = [
    ("config.json", "model_type"), ("config.json", "num_experts_per_tok"), ("config.json", "n_routed_experts"),
    ("config.json", "n_group"), ("config.json", "topk_group"), ("config.json", "routed_scaling_factor"),
    ("config.json", "norm_topk_prob"), ("config.json", "text_config"), ("config.json", "quantization_config"),
    ("config.json", "quantization_config.quant_algo"), ("config.json", "quantization_config.group_size"),
    ("config.json", "quantization_config.exclude_modules"), ("config.json", "quantization_config.ignore"),
    ("config.json", "quantization_config.quant_method"),
    ("config.json", "quantization_config.config_groups"),
    ("config.json", "quantization_config.config_groups.group_0.weights.group_size"), ("config.json", ""),
    ("hf_quant_config.json", "quantization"), ("hf_quant_config.json", "quantization.quant_algo"),
    ("hf_quant_config.json", "quantization.exclude_modules"), ("hf_quant_config.json", "quantization.group_size"),
    ("hf_quant_config.json", ""),
    ("model.safetensors.index.json", "weight_map"), ("model.safetensors.index.json", "weight_map.*"),
    ("model.safetensors.index.json", ""),
    ("header", "*"), ("header", "*.dtype"), ("header", "*.shape"), ("header", "*.data_offsets"),
    ("header", "__metadata__"), ("header", "__metadata__.format"), ("header", ""),
]  # fmt: skip
CT_FIELDS = [
    ("config.json", "quantization_config.ignore"), ("config.json", "quantization_config.format"),
    ("config.json", "quantization_config.config_groups.group_0.weights.group_size"),
    ("config.json", "quantization_config.config_groups.group_0.weights.num_bits"),
    ("config.json", "quantization_config.config_groups.group_0.format"),
]  # fmt: skip
DESCRIPTOR_FIELDS = [
    "layout", "layout_version", "source_format", "activation", "routing", "routing.top_k", "routing.method",
    "layers", "layers.*", "layers.*.num_experts", "layers.*.hidden_size", "layers.*.intermediate_size",
    "layers.*.hidden_size_padded", "layers.*.intermediate_size_padded", "layers.*.source_projection_names",
    "layers.*.source_projection_names.gate", "layers.*.source_scalar_dtype", "layers.*.source_scalar_shape",
    "layers.*.source_fused", "layers.*.ranks", "parallel", "parallel.tp", "parallel.ranks", "w13_order",
    "epilogue_tile_m", "scale_swizzle",
]  # fmt: skip


def _set(obj, path: str, value):
    """Set (or with MISSING delete) ``path`` ("a.b", "*" = the first key) in a JSON object; returns the new root."""
    if not path:
        return {} if value is MISSING else value
    keys = path.split(".")
    node = obj
    for k in keys[:-1]:
        k = next(iter(node)) if k == "*" else k
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    last = keys[-1]
    if last == "*":
        last = next((k for k in node if k != "__metadata__"), "x")
    if value is MISSING:
        node.pop(last, None)
    else:
        node[last] = value
    return obj


def _dump(value) -> str:
    if isinstance(value, str) and value.startswith("DEEP:"):  # nesting too deep for json.dumps to write
        n = int(value[5:])
        return "[" * n + "]" * n
    return json.dumps(value)


def _write_json_field(path: Path, field: str, value) -> None:
    data = _set(json.loads(path.read_text()), field, value)
    if isinstance(value, str) and value.startswith("DEEP:") and field:
        text = json.dumps(_set(data, field, "__DEEP__")).replace('"__DEEP__"', _dump(value))
    else:
        text = _dump(data)
    path.write_text(text)


def _write_header_field(path: Path, field: str, value) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    text = _dump(_set(header, field, value)) if not (isinstance(value, str) and value.startswith("DEEP:")) else (
        json.dumps(_set(header, field, "__DEEP__")).replace('"__DEEP__"', _dump(value)) if field else _dump(value)
    )  # fmt: skip
    body = text.encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


def _one_line_or_ok(code: int, err: str) -> None:
    assert code in (0, 1, 2), (code, err)
    if code:
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), err
        assert "Traceback" not in err and "Warning" not in err, err


def _strict_json(path: Path) -> None:
    # What convert writes is strict JSON: a bare NaN/Infinity would break every other reader.
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path}: bare {c} written"))


_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from nvfp4ckpt import write_example

    out = {}
    for arch, fmt in (("deepseek_v3", "modelopt"), ("qwen3_moe", "compressed-tensors")):
        path = tmp_path_factory.mktemp(f"prop-{arch}")
        write_example(path, format=fmt, arch=arch, seed=0, shards=2)
        out[fmt] = path
    conv = tmp_path_factory.mktemp("prop-conv") / "conv"
    convert_checkpoint(out["modelopt"], conv)
    out["converted"] = conv
    return out


def _convert_case(capsys, tmp_path: Path, pristine: Path, file: str, field: str, value, drop_inline_quant: bool = False):
    work = tmp_path / "case"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    shutil.copytree(pristine, work)
    if drop_inline_quant:  # make the tool read hf_quant_config.json
        _write_json_field(work / "config.json", "quantization_config", MISSING)
    if file == "header":
        _write_header_field(sorted(work.glob("*.safetensors"))[0], field, value)
    else:
        _write_json_field(work / file, field, value)
    before = tree_digest(work)
    _one_line_or_ok(main(["inspect", str(work)]), capsys.readouterr().err)
    code = main(["convert", str(work), str(tmp_path / "out")])
    err = capsys.readouterr().err
    _one_line_or_ok(code, err)
    assert tree_digest(work) == before
    if code == 0:
        _strict_json(tmp_path / "out" / "config.json")
        report = verify_checkpoint(tmp_path / "out", checks=("structure",))
        assert report.passed, report.checks


@seed(14)
@_SETTINGS
@given(case=st.sampled_from(SOURCE_FIELDS), value=VALUES)
def test_convert_any_json_at_any_source_field(sources, tmp_path, capsys, case, value):
    file, field = case
    _convert_case(capsys, tmp_path, sources["modelopt"], file, field, value, drop_inline_quant=file == "hf_quant_config.json")


@seed(14)
@settings(_SETTINGS, max_examples=80)
@given(case=st.sampled_from(CT_FIELDS), value=VALUES)
def test_convert_any_json_at_compressed_tensors_fields(sources, tmp_path, capsys, case, value):
    _convert_case(capsys, tmp_path, sources["compressed-tensors"], *case, value)


@seed(14)
@settings(_SETTINGS, max_examples=100)
@given(field=st.sampled_from(DESCRIPTOR_FIELDS), value=VALUES, in_headers=st.booleans())
def test_verify_and_revert_any_json_in_the_descriptor(sources, tmp_path, capsys, field, value, in_headers):
    from nvfp4ckpt.layouts.trtllm_gen.descriptor import METADATA_KEY

    conv = tmp_path / "conv"
    shutil.rmtree(conv, ignore_errors=True)
    shutil.rmtree(tmp_path / "back", ignore_errors=True)
    shutil.copytree(sources["converted"], conv)
    cfg_path = conv / "config.json"
    cfg = json.loads(cfg_path.read_text())
    desc = cfg["quantization_config"]["moe_kernel_layout"]
    new = _set(desc, field, value) if not (isinstance(value, str) and value.startswith("DEEP:")) else desc
    cfg["quantization_config"]["moe_kernel_layout"] = new
    cfg_path.write_text(json.dumps(cfg))
    if in_headers and isinstance(new, dict):  # the same descriptor in every header, as a careful tamperer would
        for shard in conv.glob("*.safetensors"):
            _write_header_field(shard, f"__metadata__.{METADATA_KEY}", json.dumps(new, sort_keys=True, separators=(",", ":")))
    before = tree_digest(conv)
    _one_line_or_ok(main(["inspect", str(conv)]), capsys.readouterr().err)
    code = main(["verify", str(conv), "--check", "structure", "--no-hash"])
    _one_line_or_ok(code if code != 1 else 0, capsys.readouterr().err)  # exit 1 = a failed check, reported as a table
    code = main(["revert", str(conv), str(tmp_path / "back")])
    _one_line_or_ok(code, capsys.readouterr().err)
    assert tree_digest(conv) == before
    if code == 0:  # a revert that succeeds gives the source's tensors back, byte for byte
        got, want = load_dir(tmp_path / "back"), load_dir(sources["modelopt"])
        assert sorted(got) == sorted(want)
        assert all(u8(got[k]).equal(u8(want[k])) for k in want)
