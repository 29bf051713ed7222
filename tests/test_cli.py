"""The command line: JSON output, tables, exit codes, --version."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nvfp4ckpt import __version__
from nvfp4ckpt.cli import main


def test_example_convert_inspect_json(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    assert main(["example", str(src), "--arch", "deepseek_v3", "--format", "compressed-tensors", "--json"]) == 0
    ex = json.loads(capsys.readouterr().out)
    assert ex["architecture"] == "deepseek_v3" and ex["format"] == "compressed-tensors"
    assert "model.safetensors.index.json" in ex["files"] and "tokenizer.json" in ex["files"]

    assert main(["inspect", str(src), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["state"] == "source" and report["format"] == "compressed-tensors"
    assert report["routing"]["method"] == "DeepSeekV3" and report["routing"]["n_group"] == 2
    assert [l["prefix"] for l in report["moe_layers"]] == ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]
    assert report["moe_layers"][0]["num_experts"] == 8 and report["moe_layers"][0]["intermediate_size"] == 128
    assert not any("gate and up weight global scales differ" in i for i in report["issues"])  # tied, as llm-compressor

    assert main(["convert", str(src), str(dst), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_moe_layers"] == 2 and result["architecture"] == "deepseek_v3"
    assert {f["name"] for f in result["files"]} >= {"config.json", "model.safetensors", "tokenizer.json"}

    assert main(["inspect", str(dst), "--json"]) == 0
    conv = json.loads(capsys.readouterr().out)
    assert conv["state"] == "converted" and conv["descriptor"]["layout"] == "trtllm_fp4_moe"


def test_human_output_and_quiet(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    assert main(["example", str(src), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "qwen3_moe" in text and "RenormalizeNaive top-2 of 8" in text and "model.layers.1.mlp.experts" in text
    assert main(["convert", str(src), str(dst), "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["convert", str(src), str(dst)]) == 2


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path)]) == 2  # missing DST
    assert main(["example", str(tmp_path / "x"), "--format", "gguf"]) == 2
    assert "'gguf' is not one of 'modelopt', 'compressed-tensors'" in " ".join(capsys.readouterr().err.split())
    assert main(["example", str(tmp_path / "y"), "--arch", "llama"]) == 2
    assert "unknown architecture 'llama'" in capsys.readouterr().err


def test_console_script_version():
    out = subprocess.run([sys.executable, "-m", "nvfp4ckpt", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"nvfp4ckpt {__version__}"


# ---- Issue 24: a usage error is one line, as the README promises, in the tool's words ----------------------------


@pytest.mark.parametrize(
    "args,needles",
    [
        (["verify", "{dst}", "--tokens", "1e9"], ["--tokens '1e9' is not a whole number from 1 to 65536", "nvfp4ckpt verify --help"]),
        (["verify", "{dst}", "--tokens", "0"], ["--tokens '0' is not a whole number from 1 to 65536"]),
        (["verify", "{dst}", "--seed", "-1"], ["--seed '-1' is not a whole number from 0 to"]),
        (["verify", "{dst}", "--tolerance", "-1"], ["--tolerance '-1' is not a number >= 0"]),
        (["example", "{dst}", "--format", "gptq"], ["--format 'gptq' is not one of 'modelopt', 'compressed-tensors'", "nvfp4ckpt example --help"]),
        (["verify", "{dst}", "--check", "speed"], ["--check 'speed' is not one of 'structure', 'layout', 'numerics', 'gsm8k'"]),
        (["convert", "{dst}"], ["Missing argument 'dst'", "nvfp4ckpt convert --help"]),
        (["convert", "{dst}", "{dst}2", "--workers", "x"], ["--workers 'x' is not a whole number >= 1", "nvfp4ckpt convert --help"]),
        (["convert", "{dst}", "{dst}2", "--bogus"], ["No such option: --bogus", "nvfp4ckpt convert --help"]),
        (["verify", "{dst}", "--tokens"], ["Option '--tokens' requires an argument", "nvfp4ckpt verify --help"]),
        (["frob"], ["No such command 'frob'", "nvfp4ckpt --help"]),
        (["version"], ["nvfp4ckpt --version"]),
    ],
)
def test_usage_errors_are_one_line_in_the_tools_words(tmp_path, capsys, args, needles):
    code = main([a.replace("{dst}", str(tmp_path / "x")) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    for leak in ("Value error", "Input should", "Usage:", "Try '", "╭", "pydantic"):
        assert leak not in err, err
