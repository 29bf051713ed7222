"""A converted folder one can publish (issue 25): the model card convert writes, the hf_quant_config.json it
rewrites so that no engine takes the folder for plain ModelOpt NVFP4, revert restoring both byte for byte, and
``verify --update-card``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from nvfp4ckpt import convert_checkpoint, revert_checkpoint, verify_checkpoint, write_example
from nvfp4ckpt.cli import main
from nvfp4ckpt.output import MANIFEST_NAME
from nvfp4ckpt.output.card import (
    BEGIN,
    KERNEL_QUANT_ALGO,
    ORIGINALS,
    VERIFY_BEGIN,
    VERIFY_END,
    build_card,
    split_front_matter,
)

SOURCE_CARD = """---
license: apache-2.0
base_model: Qwen/Qwen3-30B-A3B   # the BF16 model
tags:
- nvfp4
- moe
pipeline_tag: text-generation
---

# Tiny-NVFP4

Serve with `vllm serve ./tiny --quantization modelopt_fp4`.
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A ModelOpt source with a model card, and its conversion."""
    root = tmp_path_factory.mktemp("publish")
    src = root / "tiny-nvfp4"
    write_example(src, arch="qwen3_moe", format="modelopt", seed=5)
    config = json.loads((src / "config.json").read_text())
    config["_name_or_path"] = "/home/producer/models/tiny-nvfp4/"  # what the card names (not the folder's name)
    (src / "config.json").write_text(json.dumps(config, indent=2))
    (src / "README.md").write_bytes(SOURCE_CARD.encode())
    convert_checkpoint(src, root / "conv")
    return src, root / "conv"


def test_card_keeps_the_source_card_and_its_front_matter(pair):
    src, conv = pair
    card = (conv / "README.md").read_text()
    front, body = split_front_matter(card)
    data = yaml.safe_load(front)
    original = yaml.safe_load(split_front_matter(SOURCE_CARD)[0])
    # every field of the source's front matter, tags added (the Hub reads the front matter: it must stay valid YAML)
    assert {k: v for k, v in data.items() if k != "tags"} == {k: v for k, v in original.items() if k != "tags"}
    assert data["tags"] == ["nvfp4", "moe", "nvfp4ckpt"]
    assert body.startswith(BEGIN) and "# Tiny-NVFP4" in body and "--quantization modelopt_fp4" in body
    # the nvfp4ckpt section comes first and says how to serve this folder; the source's text follows, marked as such
    section, source_part = body.split("<!-- nvfp4ckpt:end -->")
    assert "--quantization nvfp4_trtllm" in section and "`tiny-nvfp4`, ModelOpt NVFP4" in section
    assert "2 MoE layers, 8 experts, top-2" in section and VERIFY_BEGIN in section and VERIFY_END in section
    assert source_part.lstrip().startswith("## The source's model card")


def test_originals_kept_and_card_outside_the_manifest(pair):
    src, conv = pair
    assert (conv / ORIGINALS / "README.md").read_bytes() == (src / "README.md").read_bytes()
    assert (conv / ORIGINALS / "hf_quant_config.json").read_bytes() == (src / "hf_quant_config.json").read_bytes()
    hf = json.loads((conv / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == KERNEL_QUANT_ALGO and hf["producer"]["name"] == "nvfp4ckpt"
    listed = {f["name"] for f in json.loads((conv / MANIFEST_NAME).read_text())["files"]}
    assert "README.md" not in listed
    assert {"hf_quant_config.json", f"{ORIGINALS}/README.md", f"{ORIGINALS}/hf_quant_config.json"} <= listed
    report = verify_checkpoint(conv, source=src, checks=("structure",))
    assert report.passed, [c.problems for c in report.checks]


def test_revert_restores_the_card_and_hf_quant_config_byte_for_byte(pair, tmp_path):
    src, conv = pair
    revert_checkpoint(conv, tmp_path / "back")
    for name in ("README.md", "hf_quant_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes(), name
    assert not (tmp_path / "back" / ORIGINALS).exists()


def test_source_without_a_card_gets_one_and_revert_drops_it(tmp_path):
    src = tmp_path / "src"
    write_example(src, arch="deepseek_v3", format="compressed-tensors", seed=1)
    convert_checkpoint(src, tmp_path / "conv")
    card = (tmp_path / "conv" / "README.md").read_text()
    front, body = split_front_matter(card)
    assert yaml.safe_load(front) == {"tags": ["nvfp4ckpt", "nvfp4"]} and body.startswith(BEGIN)
    assert "compressed-tensors nvfp4-pack-quantized" in body
    assert not (tmp_path / "conv" / "hf_quant_config.json").exists() and not (tmp_path / "conv" / ORIGINALS).exists()
    revert_checkpoint(tmp_path / "conv", tmp_path / "back")
    names = lambda folder: {p.name for p in folder.iterdir() if "safetensors" not in p.name}  # noqa: E731
    assert names(tmp_path / "back") == names(src)  # no README.md: the source had none
    assert not (tmp_path / "back" / "README.md").exists()


@pytest.mark.parametrize(
    "card, tags",
    [
        ("# no front matter\n", ["nvfp4ckpt", "nvfp4"]),
        ("---\ntags: moe\n---\ntext\n", ["moe", "nvfp4ckpt", "nvfp4"]),
        ("---\n---\ntext\n", ["nvfp4ckpt", "nvfp4"]),
        ("---\r\nlicense: mit\r\n---\r\ntext\r\n", ["nvfp4ckpt", "nvfp4"]),
    ],
)
def test_front_matter_cases(card, tags):
    out = build_card(card.encode(), "owner/name", {"routing": {}, "layers": {}})
    front, body = split_front_matter(out)
    assert yaml.safe_load(front)["tags"] == tags
    assert body.startswith(BEGIN) and "text" in body or "no front matter" in body


def test_front_matter_that_is_not_a_mapping_is_kept_as_it_is():
    card = "---\n[unclosed\n---\nbody\n"
    front, _ = split_front_matter(build_card(card.encode(), "x", {"routing": {}, "layers": {}}))
    assert front == "[unclosed"


def test_the_same_source_gives_the_same_card(pair, tmp_path):
    import shutil

    src, conv = pair
    shutil.copytree(src, tmp_path / "copy")  # the same input under another name, into another destination
    convert_checkpoint(tmp_path / "copy", tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_bytes() == (conv / "README.md").read_bytes()


@pytest.mark.parametrize(
    "src, config, label",
    [
        ("owner/name", {}, "owner/name"),
        ("/nonexistent-dir-for-test", {}, "/nonexistent-dir-for-test"),  # not a folder: a Hub id as given
        (".", {"_name_or_path": "nvidia/Qwen3-30B-A3B-NVFP4"}, "nvidia/Qwen3-30B-A3B-NVFP4"),
        (".", {"_name_or_path": "/data/ckpts/qwen3-nvfp4/"}, "qwen3-nvfp4"),
        (".", {}, "the source checkpoint"),
    ],
)
def test_source_label(src, config, label):
    from nvfp4ckpt.output.card import source_label

    assert source_label(src, config) == label


def test_verify_update_card(pair, tmp_path, capsys):
    import shutil

    src, conv = pair
    work = tmp_path / "conv"
    shutil.copytree(conv, work)
    assert main(["verify", str(work), "--source", str(src), "--update-card", "--quiet"]) == 0
    card = (work / "README.md").read_text()
    part = card[card.index(VERIFY_BEGIN) : card.index(VERIFY_END)]
    assert "**PASS**" in part and "| layout | pass |" in part and "Not verified yet" not in part
    assert yaml.safe_load(split_front_matter(card)[0])["license"] == "apache-2.0"
    # the card is outside the manifest: the folder still passes, and a second run replaces the summary
    assert main(["verify", str(work), "--update-card", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["card"] == str((work / "README.md").resolve())
    part = (work / "README.md").read_text().split(VERIFY_BEGIN)[1].split(VERIFY_END)[0]
    assert part.count("**PASS**") == 1 and "without the source" in part


def test_verify_update_card_without_the_section_fails_before_the_run(pair, tmp_path, capsys):
    import shutil

    src, conv = pair
    work = tmp_path / "conv"
    shutil.copytree(conv, work)
    (work / "README.md").write_text("# edited by hand\n")
    before = (work / "README.md").read_bytes()
    assert main(["verify", str(work), "--update-card"]) == 2
    err = capsys.readouterr().err
    assert "no nvfp4ckpt verification part" in " ".join(err.split()) and len(err.strip().splitlines()) == 1
    assert (work / "README.md").read_bytes() == before


# ----------------------------------------------------------------------------------------------
# The engines that read hf_quant_config.json, with the real packages where they are installed. vLLM 0.33 and
# SGLang 0.5.23 read it only when config.json has no quantization_config (a converted config.json always has one);
# their ModelOpt readers, fed the rewritten file, refuse it. TensorRT-LLM (not installable here) reads it first and
# calls QuantAlgo(quant_algo), which refuses any value it does not know: KERNEL_QUANT_ALGO is none of ModelOpt's.


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "VLLM_PLUGINS": "", "SGLANG_PLUGINS": ""}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)


def test_vllm_reads_config_json_and_its_modelopt_reader_refuses_the_file(pair):
    src, conv = pair
    code = (
        "import json\n"
        "from vllm.transformers_utils.config import get_config\n"
        "from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config\n"
        f"print('METHOD', get_config({str(conv)!r}, trust_remote_code=False).quantization_config['quant_method'])\n"
        f"for f in ({str(conv / 'hf_quant_config.json')!r}, {str(src / 'hf_quant_config.json')!r}):\n"
        "    try:\n"
        "        ModelOptNvFp4Config.from_config(json.load(open(f))); print('ACCEPTED')\n"
        "    except ValueError as e:\n"
        "        print('REFUSED', e)\n"
    )
    out = _run(code)
    lines = [line for line in out.stdout.splitlines() if line.split(" ")[0] in ("METHOD", "ACCEPTED", "REFUSED")]
    assert lines[0] == "METHOD nvfp4_trtllm", out.stdout + out.stderr
    assert lines[1].startswith("REFUSED ModelOpt currently only supports") and lines[2] == "ACCEPTED", lines


def test_sglang_reads_config_json_and_its_modelopt_reader_refuses_the_file(pair):
    src, conv = pair
    code = (
        "import json\n"
        "from sglang.srt.configs.model_config import ModelConfig\n"
        "from sglang.srt.layers.quantization.modelopt_quant import ModelOptFp4Config\n"
        f"mc = ModelConfig.__new__(ModelConfig)\n"
        f"from transformers import AutoConfig\n"
        f"mc.hf_config = AutoConfig.from_pretrained({str(conv)!r}); mc.model_path = {str(conv)!r}\n"
        "print('METHOD', mc._parse_quant_hf_config()['quant_method'])\n"
        f"for f in ({str(conv / 'hf_quant_config.json')!r}, {str(src / 'hf_quant_config.json')!r}):\n"
        "    try:\n"
        "        ModelOptFp4Config.from_config(json.load(open(f))); print('ACCEPTED')\n"
        "    except ValueError as e:\n"
        "        print('REFUSED', e)\n"
    )
    out = _run(code)
    lines = [line for line in out.stdout.splitlines() if line.split(" ")[0] in ("METHOD", "ACCEPTED", "REFUSED")]
    assert lines and lines[0] == "METHOD nvfp4_trtllm", out.stdout + out.stderr
    assert lines[1].startswith("REFUSED") and lines[2] == "ACCEPTED", lines


def test_rewritten_quant_algo_is_no_modelopt_algorithm(pair):
    """TensorRT-LLM's ``QuantAlgo`` names ModelOpt's algorithms; vLLM's list of them is the closest one installed."""
    out = _run("from vllm.model_executor.layers.quantization.modelopt import QUANT_ALGOS; print(list(QUANT_ALGOS))")
    algos = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own subprocess's printed list
    assert "NVFP4" in algos and KERNEL_QUANT_ALGO not in algos
