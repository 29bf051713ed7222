"""docs/ci/convert-and-publish.yml, the CI recipe (issue 25): its shell steps run as written, on the built-in example,
with only what needs the network or a runner replaced: the install step (this environment is the install), the
source (a folder written by ``nvfp4ckpt example`` instead of a Hub id) and ``hf upload`` (a copy into a local folder
standing in for the Hub repo). Each step runs as GitHub Actions runs it: ``bash -eo pipefail``, in the workspace."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "docs" / "ci" / "convert-and-publish.yml"
REPLACED_STEPS = {"Install nvfp4ckpt"}  # pip installs: the test environment is the install

# Ahead of every step: `nvfp4ckpt` is the package under test, and `hf upload REPO DIR PATH ...` copies DIR into
# $HUB/REPO (what a Hub repo would hold after the upload), refusing anything but the call the recipe makes.
PRELUDE = f"""
nvfp4ckpt() {{ {sys.executable} -m nvfp4ckpt "$@"; }}
hf() {{
  [ "$1" = upload ] || {{ echo "unexpected: hf $*" >&2; return 2; }}
  local repo=$2 dir=$3 path=$4; shift 4
  mkdir -p "$HUB/$repo/$path" && cp -R "$dir"/. "$HUB/$repo/$path" && echo "uploaded $dir to $repo ($*)"
}}
python() {{ {sys.executable} "$@"; }}
"""


def _expand(value: str, inputs: dict[str, str]) -> str:
    """``${{ inputs.x }}`` and ``${{ secrets.X }}`` as the runner would fill them in (secrets: empty here)."""
    def one(m: re.Match) -> str:
        kind, name = m.group(1), m.group(2)
        return inputs.get(name, "") if kind == "inputs" else ""

    return re.sub(r"\$\{\{\s*(inputs|secrets)\.(\w+)\s*\}\}", one, str(value))


def _steps(workflow: dict) -> list[dict]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def run_recipe(workspace: Path, inputs: dict[str, str], hub: Path) -> list[subprocess.CompletedProcess]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    (job,) = workflow["jobs"].values()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HUB": str(hub)}
    env.update({k: _expand(v, inputs) for k, v in job["env"].items()})
    done = []
    for step in _steps(workflow):
        if "run" not in step or step.get("name") in REPLACED_STEPS:
            continue
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", PRELUDE + step["run"]],
                              cwd=workspace, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
        assert proc.returncode == 0, f"step {step['name']!r} failed:\n{proc.stdout}\n{proc.stderr}"
        done.append(proc)
    return done


def _workspace(tmp_path: Path) -> Path:
    """A checkout as actions/checkout leaves it, as far as the steps read it: the GSM8K files."""
    ws = tmp_path / "workspace"
    (ws / "tests" / "data").mkdir(parents=True)
    (ws / "tests" / "data" / "gsm8k").symlink_to(ROOT / "tests" / "data" / "gsm8k")
    return ws


def test_workflow_shape():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    names = [s.get("name") or s.get("uses") for s in _steps(workflow)]
    assert names[:2] == ["actions/checkout@v4", "actions/setup-python@v5"]
    assert names[2:6] == ["Install nvfp4ckpt", "Convert", "Verify", "Publish"]
    install = _steps(workflow)[2]["run"]
    assert "--index-url https://download.pytorch.org/whl/cpu" in install and '-e ".[gsm8k]"' in install
    assert "hf upload" in _steps(workflow)[5]["run"]
    assert set(workflow[True]["workflow_dispatch"]["inputs"]) >= {"source", "revision", "repo", "gsm8k"}  # `on:` is YAML 1.1's True


def test_recipe_converts_verifies_and_publishes_the_example(tmp_path):
    from nvfp4ckpt import write_example

    ws = _workspace(tmp_path)
    src = tmp_path / "tiny-nvfp4"  # stands in for the Hub id
    write_example(src, arch="qwen3_moe", format="modelopt", seed=4)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    hub = tmp_path / "hub"
    run_recipe(ws, {"source": str(src), "revision": "", "repo": "me/tiny-nvfp4-trtllm", "gsm8k": "false"}, hub)
    convert = json.loads((ws / "convert.json").read_text())
    verify = json.loads((ws / "verify.json").read_text())
    assert convert["num_moe_layers"] == 2 and all(c["status"] == "pass" for c in verify["checks"])
    published = hub / "me" / "tiny-nvfp4-trtllm"
    assert sorted(p.name for p in published.iterdir()) == sorted(p.name for p in (ws / "converted").iterdir())
    card = (published / "README.md").read_text()
    assert "license: apache-2.0" in card and "nvfp4ckpt" in card and "**PASS**" in card and "| layout | pass |" in card
    assert json.loads((published / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4_TRTLLM"
    from nvfp4ckpt import verify_checkpoint

    assert verify_checkpoint(published, source=src, checks=("structure",)).passed  # the upload is a sound checkpoint


@pytest.mark.slow
def test_recipe_with_gsm8k(tmp_path):
    from nvfp4ckpt import write_example

    ws = _workspace(tmp_path)
    src = tmp_path / "tiny-nvfp4"
    write_example(src, arch="qwen3_moe", format="modelopt", seed=4)
    inputs = {"source": str(src), "repo": "me/tiny", "gsm8k": "true", "gsm8k_questions": "4"}
    run_recipe(ws, inputs, tmp_path / "hub")
    verify = json.loads((ws / "verify.json").read_text())
    assert {c["name"] for c in verify["checks"]} >= {"gsm8k-accuracy", "gsm8k-agreement"}
    assert verify["gsm8k"]["settings"]["num_questions"] == 4
    assert "GSM8K: 4 questions" in (tmp_path / "hub" / "me" / "tiny" / "README.md").read_text()
