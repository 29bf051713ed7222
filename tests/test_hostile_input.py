"""Issue 14: each class of hostile input gets one line (exit 2) naming the file and field, quickly; SRC unchanged.

JSON of the wrong shape or type, non-regular files, regular expressions from the input, routing semantics."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nvfp4ckpt.errors import BadFieldError
from nvfp4ckpt.source.formats.patterns import compile_input_pattern
from tests.conftest import tree_digest
from tests.test_errors import assert_fails, run_cli


@pytest.fixture
def ds(example_factory, tmp_path) -> Path:
    out = tmp_path / "src"
    shutil.copytree(example_factory("deepseek_v3", "modelopt"), out)
    return out


@pytest.fixture
def qwen(example_factory, tmp_path) -> Path:
    out = tmp_path / "src"
    shutil.copytree(example_factory("qwen3_moe", "modelopt"), out)
    return out


@pytest.fixture
def ct(example_factory, tmp_path) -> Path:
    out = tmp_path / "src"
    shutil.copytree(example_factory("qwen3_moe", "compressed-tensors"), out)
    return out


def _config(root: Path, **changes) -> None:
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(changes)
    (root / "config.json").write_text(json.dumps(cfg))


def _config_text(root: Path, key: str, literal: str) -> None:
    """Set ``key`` to a raw JSON literal (``NaN``, ``Infinity``, ``1e400``: json.dumps would not write some)."""
    cfg = json.loads((root / "config.json").read_text())
    cfg[key] = "__LITERAL__"
    (root / "config.json").write_text(json.dumps(cfg).replace('"__LITERAL__"', literal))


def _header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = edit(raw[8 : 8 + n].decode())
    body = text.encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


def _first_tensor(path: Path) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return next(k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__")


# ---- 2. JSON of any shape ----------------------------------------------------------------------------------------


def test_config_nested_too_deeply(qwen, tmp_path, capsys):
    (qwen / "config.json").write_text("[" * 100000 + "]" * 100000)
    assert_fails(capsys, qwen, tmp_path, "config.json", "nested")


def test_config_nested_below_the_parser_limit_but_deep(qwen, tmp_path, capsys):
    _config_text(qwen, "extra", "[" * 500 + "]" * 500)
    assert_fails(capsys, qwen, tmp_path, "config.json", "nested more than")


@pytest.mark.parametrize("text", ["[]", "3", '"x"', "null"])
def test_config_not_an_object(qwen, tmp_path, capsys, text):
    (qwen / "config.json").write_text(text)
    assert_fails(capsys, qwen, tmp_path, "config.json", "expected a JSON object")


def test_quantization_config_a_list(qwen, tmp_path, capsys):
    (qwen / "hf_quant_config.json").unlink()  # else ModelOpt's own file is read instead, correctly
    _config(qwen, quantization_config=[1, 2])
    assert_fails(capsys, qwen, tmp_path, "quantization")


@pytest.mark.parametrize("value", [["lm_head", 3], "lm_head", {"a": 1}])
def test_exclusions_not_a_list_of_strings(qwen, tmp_path, capsys, value):
    cfg = json.loads((qwen / "config.json").read_text())
    cfg["quantization_config"]["exclude_modules"] = value
    (qwen / "config.json").write_text(json.dumps(cfg))
    assert_fails(capsys, qwen, tmp_path, "config.json", "quantization_config.exclude_modules")


@pytest.mark.parametrize("literal", ["[Infinity]", "[1e400]", '["2"]', "[2.5]", "[-1]", "{}", "[true]"])
def test_header_shape_of_any_type(qwen, tmp_path, capsys, literal):
    shard = sorted(qwen.glob("*.safetensors"))[0]
    name = _first_tensor(shard)
    _header(shard, lambda t: json.dumps({**json.loads(t), name: {**json.loads(t)[name], "shape": "__X__"}}).replace('"__X__"', literal))
    err = assert_fails(capsys, qwen, tmp_path, shard.name)
    assert "Infinity" not in err or "not valid JSON" in err


@pytest.mark.parametrize("literal", ["[0, 1e400]", "[0, Infinity]", '[0, "8"]', "[0]", "7", "[0, 1, 2]"])
def test_header_offsets_of_any_type(qwen, tmp_path, capsys, literal):
    shard = sorted(qwen.glob("*.safetensors"))[0]
    name = _first_tensor(shard)
    _header(shard, lambda t: json.dumps({**json.loads(t), name: {**json.loads(t)[name], "data_offsets": "__X__"}}).replace('"__X__"', literal))
    assert_fails(capsys, qwen, tmp_path, shard.name)


@pytest.mark.parametrize("meta", ['{"format": 3}', "[1]", '"pt"', '{"a": {"b": 1}}'])
def test_header_metadata_of_any_type(qwen, tmp_path, capsys, meta):
    shard = sorted(qwen.glob("*.safetensors"))[0]
    _header(shard, lambda t: json.dumps({**json.loads(t), "__metadata__": "__X__"}).replace('"__X__"', meta))
    assert_fails(capsys, qwen, tmp_path, shard.name, "__metadata__")


def test_header_tensor_entry_a_list(qwen, tmp_path, capsys):
    shard = sorted(qwen.glob("*.safetensors"))[0]
    name = _first_tensor(shard)
    _header(shard, lambda t: json.dumps({**json.loads(t), name: [1, 2]}))
    assert_fails(capsys, qwen, tmp_path, shard.name, name)


@pytest.mark.parametrize("weight_map", [[1], {"x": 3}, {"x": "../../etc/passwd"}, "model.safetensors"])
def test_index_of_any_type(qwen, tmp_path, capsys, weight_map):
    (qwen / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_fails(capsys, qwen, tmp_path, "model.safetensors.index.json")


def test_huge_config_refused_quickly(qwen, tmp_path, capsys):
    with open(qwen / "config.json", "r+b") as f:
        f.truncate(1 << 30)  # 1 GiB (sparse): refused by size before a byte is parsed
    start = time.perf_counter()
    code, err = run_cli(capsys, "convert", str(qwen), str(tmp_path / "dst"))
    assert time.perf_counter() - start < 5
    assert code == 2 and "config.json" in err and "bytes" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "dst").exists()


def test_hf_quant_config_of_any_type(qwen, tmp_path, capsys):
    cfg = json.loads((qwen / "config.json").read_text())
    del cfg["quantization_config"]
    (qwen / "config.json").write_text(json.dumps(cfg))
    (qwen / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4", "group_size": "16"}}))
    assert_fails(capsys, qwen, tmp_path, "hf_quant_config.json", "group_size")


# ---- 3. Non-regular files never block ----------------------------------------------------------------------------


def _cli_subprocess(*args: str, timeout: float = 120) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "nvfp4ckpt", *args], capture_output=True, text=True, timeout=timeout, env=env)
    return done.returncode, " ".join(done.stderr.split())


def test_fifo_as_shard_does_not_block(qwen, tmp_path):
    shard = sorted(qwen.glob("*.safetensors"))[0]
    (qwen / "model.safetensors.index.json").unlink()
    for other in qwen.glob("*.safetensors"):
        other.unlink()
    os.mkfifo(shard)
    before = tree_digest(qwen)
    code, err = _cli_subprocess("convert", str(qwen), str(tmp_path / "dst"))
    assert code == 2 and "not a regular file" in err and shard.name in err, err
    assert tree_digest(qwen) == before


def test_fifo_as_hf_quant_config_does_not_block(qwen, tmp_path):
    cfg = json.loads((qwen / "config.json").read_text())
    del cfg["quantization_config"]
    (qwen / "config.json").write_text(json.dumps(cfg))
    (qwen / "hf_quant_config.json").unlink()
    os.mkfifo(qwen / "hf_quant_config.json")
    code, err = _cli_subprocess("convert", str(qwen), str(tmp_path / "dst"))
    assert code == 2 and "hf_quant_config.json" in err and "not a regular file" in err, err


def test_fifo_as_config_json_does_not_block(qwen, tmp_path):
    (qwen / "config.json").unlink()
    os.mkfifo(qwen / "config.json")
    code, err = _cli_subprocess("inspect", str(qwen))
    assert code == 2 and "config.json" in err, err


# ---- 4. Regular expressions from the input -----------------------------------------------------------------------


def _ignore(root: Path, *patterns: str) -> None:
    cfg = json.loads((root / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = [*cfg["quantization_config"]["ignore"], *patterns]
    (root / "config.json").write_text(json.dumps(cfg))


def test_invalid_regex_is_one_line(ct, tmp_path, capsys):
    _ignore(ct, "re:model.(layers")
    assert_fails(capsys, ct, tmp_path, "config.json", "ignore", "is invalid")


@pytest.mark.parametrize("pattern", ["re:(a+)+$", "re:(.*a){20}$", "re:(a|aa)*b", "re:(x+x+)+y", "re:.*.*.*.*.*z", r"re:(a)\1"])
def test_backtracking_regex_refused_without_running(ct, tmp_path, capsys, pattern):
    _ignore(ct, pattern)
    start = time.perf_counter()
    assert_fails(capsys, ct, tmp_path, "config.json", "ignore")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("pattern", [r".*mlp\.gate$", r".*(q|k|v)_proj$", r"model\.layers\.\d+\.mlp\.shared_expert.*", "lm_head"])
def test_producer_patterns_accepted(pattern):
    assert compile_input_pattern(pattern, "config.json", "ignore").regex.pattern == pattern


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a*)*", "(ab|a)*c", "[", "a{99999999999}"])
def test_compile_refuses(pattern):
    with pytest.raises(BadFieldError):
        compile_input_pattern(pattern, "config.json", "ignore")


# ---- 5. Routing semantics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,literal,needle",
    [
        ("n_group", "3", "n_group"),  # 8 experts in 3 groups
        ("n_group", "0", "n_group"),
        ("topk_group", "5", "topk_group"),
        ("routed_scaling_factor", "NaN", "routed_scaling_factor"),
        ("routed_scaling_factor", "Infinity", "routed_scaling_factor"),
        ("routed_scaling_factor", '"nan"', "routed_scaling_factor"),
        ("routed_scaling_factor", "0", "routed_scaling_factor"),
        ("routed_scaling_factor", "false", "routed_scaling_factor"),
        ("routed_scaling_factor", "-2.5", "routed_scaling_factor"),
        ("routed_scaling_factor", "1e400", "routed_scaling_factor"),
        ("norm_topk_prob", '"false"', "norm_topk_prob"),
        ("num_experts_per_tok", "2.5", "num_experts_per_tok"),
        ("num_experts_per_tok", "true", "num_experts_per_tok"),
        ("num_experts_per_tok", "99", "num_experts_per_tok"),
        ("n_routed_experts", '"8"', "n_routed_experts"),
    ],
)
def test_routing_fields_refused_at_convert(ds, tmp_path, capsys, key, literal, needle):
    _config_text(ds, key, literal)
    err = assert_fails(capsys, ds, tmp_path, "config.json", needle)
    assert "expected" in err


def test_norm_topk_prob_string_in_qwen(qwen, tmp_path, capsys):
    _config(qwen, norm_topk_prob="false")
    assert_fails(capsys, qwen, tmp_path, "config.json", "norm_topk_prob", "true or false")


def test_valid_routing_is_written_as_strict_json(ds, tmp_path, capsys):
    code, err = run_cli(capsys, "convert", str(ds), str(tmp_path / "dst"))
    assert code == 0, err
    text = (tmp_path / "dst" / "config.json").read_text()
    cfg = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in config.json"))
    assert cfg["quantization_config"]["moe_kernel_layout"]["routing"]["routed_scaling_factor"] == 2.5


# ---- 6. Shapes the format cannot hold, ambiguous names, output-like sources ----------------------------------------


def _resize_experts(root: Path, hidden: int) -> None:
    """Every routed expert's hidden dimension cut to ``hidden`` (weights, block scales and down's rows alike)."""
    import re as _re

    from tests.test_errors import rewrite

    def edit(tensors):
        for name in list(tensors):
            if not _re.search(r"\.experts\.\d+\.", name):
                continue
            t = tensors[name]
            if _re.search(r"(gate|up)_proj\.weight$", name):
                tensors[name] = t[:, : hidden // 2].contiguous()
            elif _re.search(r"(gate|up)_proj\.weight_scale$", name):
                tensors[name] = t[:, : hidden // 16].contiguous()
            elif _re.search(r"down_proj\.weight(_scale)?$", name):
                tensors[name] = t[:hidden].contiguous()

    rewrite(root, edit)


def test_block_scales_cover_fewer_columns_than_the_weight(qwen, tmp_path, capsys):
    _resize_experts(qwen, 200)  # 200 = 12.5 blocks of 16: the scales ([I, 12]) cover 192 of 200 columns
    assert_fails(capsys, qwen, tmp_path, "hidden size of 200", "multiple of the 16-element")


def test_zero_sized_experts(qwen, tmp_path, capsys):
    _resize_experts(qwen, 0)
    assert_fails(capsys, qwen, tmp_path, "hidden size of 0")


def test_ambiguous_expert_indices(qwen, tmp_path, capsys):
    from tests.test_errors import rewrite

    def edit(tensors):
        for name in [n for n in tensors if ".layers.0.mlp.experts.7." in n]:
            tensors[name.replace(".experts.7.", ".experts.07.")] = tensors[name].clone()

    rewrite(qwen, edit)
    assert_fails(capsys, qwen, tmp_path, "experts.07", "'07'")


def test_source_with_output_names(qwen, tmp_path, capsys):
    (qwen / "ranks" / "rank-000").mkdir(parents=True)
    (qwen / "ranks" / "rank-000" / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert_fails(capsys, qwen, tmp_path, "ranks", "rank-sharded output")


# ---- 7. Options out of range --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["infGB", "nanGB", "-infGB", "1e-12GB", "0", "1e30TB", "0.5B"])
def test_size_options_out_of_range(qwen, tmp_path, capsys, size):
    code, err = run_cli(capsys, "convert", str(qwen), str(tmp_path / "dst"), "--max-shard-size", size)
    assert code == 2 and "--max-shard-size" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "dst").exists()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from nvfp4ckpt import convert_checkpoint, write_example

    src = tmp_path_factory.mktemp("opt-src")
    write_example(src, format="modelopt", arch="qwen3_moe", seed=0, shards=1)
    dst = tmp_path_factory.mktemp("opt-conv") / "conv"
    convert_checkpoint(src, dst)
    return dst


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--device", "gpu"], "--device"),
        (["--device", "cuda:99"], "--device"),
        (["--device", "cpu:3"], "--device"),
        (["--device", "meta"], "--device"),
        (["--tokens", "0"], "--tokens"),
        (["--tokens", "1000000000"], "--tokens"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**70)], "--seed"),
    ],
)
def test_verify_options_out_of_range(converted, capsys, args, needle):
    code, err = run_cli(capsys, "verify", str(converted), "--check", "numerics", *args)
    assert code == 2 and needle in err, err
    assert "Traceback" not in err


def test_convert_device_out_of_range(qwen, tmp_path, capsys):
    code, err = run_cli(capsys, "convert", str(qwen), str(tmp_path / "dst"), "--device", "cuda:99")
    assert code == 2 and "--device" in err and len(err.splitlines()) == 1, err


# ---- 9. No RuntimeWarning before the one-line error ---------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, float("inf"), -1.0, float("nan")])
def test_broken_global_scale_is_one_line_without_warnings(qwen, tmp_path, value):
    import torch

    from tests.test_errors import rewrite

    name = "model.layers.1.mlp.experts.3.up_proj.input_scale"
    rewrite(qwen, lambda t: t.__setitem__(name, torch.tensor(value)) if name in t else None)
    code, err = _cli_subprocess("convert", str(qwen), str(tmp_path / "dst"))
    assert code == 2 and "Warning" not in err, err
    assert "global scale" in err and "experts.3.up_proj.input_scale" in err, err


def test_generation_config_eos_of_any_type(tmp_path):
    from types import SimpleNamespace

    from nvfp4ckpt.eval.model_runner import eos_ids

    tok = SimpleNamespace(eos_token_id=2)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [5, 7]}')
    assert eos_ids(tmp_path, tok) == [5, 7, 2]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": ["5", null]}')
    with pytest.raises(BadFieldError, match="eos_token_id"):
        eos_ids(tmp_path, tok)
    (tmp_path / "generation_config.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(Exception, match="nested"):
        eos_ids(tmp_path, tok)


# ---- Issue 24: lenient safetensors headers ----------------------------------------------------------------------


def _edit_header_json(path: Path, edit) -> None:
    """Rewrite a shard's header through json (the data bytes stay where they are)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    data = raw[8 + n :]
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _same_size_pair(header: dict) -> tuple[str, str]:
    """Two tensors of equal byte size, the first not the last in the file (so shifting onto it stays inside)."""
    entries = sorted(((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__"))
    last_end = entries[-1][0][1]
    by_size: dict[int, list[str]] = {}
    for (b, e), k in entries:
        if e - b >= 2 and e + 1 <= last_end:
            by_size.setdefault(e - b, []).append(k)
    pair = next(v for v in by_size.values() if len(v) >= 2)
    return pair[0], pair[1]


@pytest.mark.parametrize("shift", [0, 1, -1])
def test_overlapping_data_offsets_are_refused(qwen, tmp_path, capsys, shift):
    shard = sorted(qwen.glob("*.safetensors"))[0]
    names = []

    def overlap(header):
        a, b = _same_size_pair(header)
        begin, end = header[a]["data_offsets"]
        shift_ok = shift if begin + shift >= 0 else 1
        header[b]["data_offsets"] = [begin + shift_ok, end + shift_ok]
        names.extend([a, b])

    _edit_header_json(shard, overlap)
    err = assert_fails(capsys, qwen, tmp_path, shard.name, "overlap")
    assert names[0] in err or names[1] in err


def test_tensor_missing_from_the_index_is_refused(qwen, tmp_path, capsys):
    index_path = qwen / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.norm.weight"
    assert index["weight_map"].pop(name)
    index_path.write_text(json.dumps(index))
    assert_fails(capsys, qwen, tmp_path, repr(name), "weight_map", "model.safetensors.index.json")


@pytest.mark.parametrize("bad", ["\x00", "\n", "\x7f"])
def test_control_character_in_a_tensor_name_is_refused(qwen, tmp_path, capsys, bad):
    shard = sorted(qwen.glob("*.safetensors"))[0]
    _edit_header_json(shard, lambda h: h.__setitem__(f"model.norm.weight{bad}x", h.pop(next(k for k in h if k != "__metadata__"))))
    assert_fails(capsys, qwen, tmp_path, shard.name, "control character")


# ---- Issue 24: config.json disagreeing with the tensors; layer indices --------------------------------------------


@pytest.mark.parametrize(
    "changes,needles",
    [
        ({"hidden_size": 512}, ["field hidden_size is 512", "experts.0.gate_proj.weight", "hidden size of 256"]),
        ({"moe_intermediate_size": 256}, ["field moe_intermediate_size is 256", "intermediate size of 128"]),
        ({"num_hidden_layers": 1}, ["field num_hidden_layers is 1", "model.layers.1.mlp.experts.0", "decoder layer 1"]),
        ({"mlp_only_layers": [1]}, ["mlp_only_layers", "decoder layer 1 dense", "model.layers.1.mlp.experts.0"]),
        ({"decoder_sparse_step": 2}, ["decoder_sparse_step", "decoder layer 0 dense", "model.layers.0.mlp.experts.0"]),
    ],
)
def test_config_disagreeing_with_the_tensors_is_refused(qwen, tmp_path, capsys, changes, needles):
    _config(qwen, **changes)
    assert_fails(capsys, qwen, tmp_path, "config.json", *needles)


def test_first_k_dense_replace_over_a_moe_layer_is_refused(ds, tmp_path, capsys):
    _config(ds, first_k_dense_replace=2)
    assert_fails(capsys, ds, tmp_path, "first_k_dense_replace", "decoder layer 1 dense", "model.layers.1.mlp.experts.0")


def test_mixtral_expert_size_is_intermediate_size(example_factory, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(example_factory("mixtral", "modelopt"), src)
    _config(src, intermediate_size=256)
    assert_fails(capsys, src, tmp_path, "field intermediate_size is 256", "block_sparse_moe.experts.0.w1.weight")


def test_mtp_layer_after_the_decoder_is_accepted(ds, tmp_path, capsys):
    # DeepSeek-V3/GLM checkpoints carry the multi-token-prediction layer as model.layers.<num_hidden_layers>
    _config(ds, num_hidden_layers=2, num_nextn_predict_layers=1)
    code, err = run_cli(capsys, "convert", str(ds), str(tmp_path / "dst"), "--quiet")
    assert code == 0, err


def _rename_layers(root: Path, old: str, new: str) -> None:
    from tests.test_errors import rewrite

    rewrite(root, lambda t: [t.__setitem__(k.replace(old, new), t.pop(k)) for k in list(t) if old in k])


@pytest.mark.parametrize("spelled", ["01", "\u0661", "\uff11"])  # leading zero, Arabic-Indic one, full-width one
def test_layer_index_spelled_oddly_is_refused(qwen, tmp_path, capsys, spelled):
    _rename_layers(qwen, "model.layers.1.", f"model.layers.{spelled}.")
    assert_fails(capsys, qwen, tmp_path, f"spells its decoder layer as {spelled!r}", "layers.1")


# ---- Issue 24: a source entry named like an output file --------------------------------------------------------


def test_source_folder_named_like_an_output_file(qwen, tmp_path, capsys):
    name = "model.safetensors"  # a folder next to the index; the output is one shard of that name
    (qwen / name).mkdir()
    (qwen / name / "readme.txt").write_text("x")
    for _ in range(2):  # the same one line, before anything is written, every time
        err = assert_fails(capsys, qwen, tmp_path, repr(str(qwen / name)), "named like the output's", "move it out")
        assert "partial" not in err

