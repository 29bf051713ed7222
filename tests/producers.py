"""Make small NVFP4 MoE checkpoints with the REAL producer libraries, on the CPU, at test time.

This is a helper module for the tests, not a test file.  Each ``make_*`` function builds a tiny,
randomly initialised (``torch.manual_seed(seed)``) bf16 MoE model from a ``transformers`` config
(no download), calibrates it on a few random token batches, and lets the producer library write a
complete model folder (``config.json`` with ``quantization_config``, ``model.safetensors``,
``generation_config.json``; ModelOpt also writes ``hf_quant_config.json``, llm-compressor also
writes ``recipe.yaml``).  The producers are imported lazily inside the functions, so this module
imports without them; a missing producer raises ``ImportError`` from the function call (they are in the test
extra: a test that needs one fails without it, it does not skip).

Architectures (``arch``): ``"qwen3_moe"``, ``"mixtral"``, ``"deepseek_v3"``.  All have
hidden_size 256, expert intermediate size 128, 8 routed experts, top-k 2, 2 layers, vocab 512,
4 heads of head_dim 64 (DeepSeek-V3: MLA with q_lora_rank 128, kv_lora_rank 64, qk_nope 32 +
qk_rope 32, v_head_dim 64; layer 0 dense (first_k_dense_replace=1), one shared expert,
n_group 2 / topk_group 1).

Versions used when this was written (Python 3.11, CPU only)::

    torch 2.13.0+cpu, transformers 5.24.0, safetensors 0.8.0, huggingface_hub 2.4.0
    nvidia-modelopt 0.47.0          (pip install nvidia-modelopt==0.47.0, WITHOUT the [hf] extra)
    llmcompressor 0.14.0.1          (pip install --no-deps llmcompressor==0.14.0.1)
    compressed-tensors 0.20.1       (llmcompressor asks for ==0.19.0; 0.20.1 gives bit-identical
                                     tensors, only config.json's quantization_config differs a bit)
    datasets 5.2.0, accelerate 1.15.0 (needed by llmcompressor; installed normally)

Run time on the 2-core CPU machine (other work running): about 1-8 s per checkpoint once the
library is imported (ModelOpt ~1 s, llm-compressor 3-8 s; DeepSeek-V3 is the slowest), plus the
first import (llm-compressor ~4-5 s, ModelOpt ~4-8 s).  Outputs are bit-identical from run to run
and do not depend on the order in which the two producers run in one process.

Workarounds / notes:

* compressed-tensors alone cannot make an NVFP4 MoE checkpoint: it has no calibration (the
  observers live in llm-compressor) and it only quantizes ``nn.Linear``, while transformers 5
  keeps MoE experts as fused 3-D parameters.  llm-compressor's ``load_quantizable_moe``
  linearizes the experts and ``oneshot`` calibrates, so llm-compressor is the producer used.
* llm-compressor 0.14.0.1 pins ``transformers<=5.17.0`` and ``compressed-tensors==0.19.0``; a
  normal install downgrades transformers to 5.17.0 and huggingface_hub to 1.33.0.  Installed
  with ``--no-deps`` next to transformers 5.24.0 it works (``pip check`` complains about the
  pins and about auto-round / pillow, which this recipe never imports).
* ``oneshot`` wants a processor when given a dataset (else it tries to load one from the
  model's ``name_or_path``): a tiny byte-level tokenizer from ``tokenizers`` is passed.
  ``oneshot`` and llm-compressor's ``save_pretrained`` also read ``config.json`` back from
  ``model.config.name_or_path``, so the model is saved in bf16 to a temporary folder and loaded
  from there (through ``load_quantizable_moe``), and that folder lives until the save is done.
* ``load_quantizable_moe`` leaves transformers' global checkpoint-conversion registry changed
  (its save mapping stays registered for qwen3_moe / deepseek_v3): later ``from_pretrained`` of
  a plain checkpoint of that type in the same process silently leaves the experts randomly
  initialised.  ``make_compressed_tensors_checkpoint`` snapshots and restores that registry.
  llm-compressor also sets ``TOKENIZERS_PARALLELISM=false`` in the environment and logs through
  loguru.
* ModelOpt 0.47.0's ``[hf]`` extra pins ``transformers<5.15``; without the extra it runs with
  transformers 5.24.0 (it only warns "transformers 5.24.0 is not tested").
  ``export_hf_checkpoint`` needs ``model.config.architectures`` set (a model made with
  ``from_config`` has ``None`` there, and the export fails with ``'NoneType' object is not
  iterable``), so it is set here, as ``from_pretrained`` would have.
* Both producers write per-expert tensor names on disk (transformers' reverse weight conversion),
  even though the in-memory transformers 5 model has fused experts.  Mixtral keeps
  ``block_sparse_moe``; ModelOpt keeps ``w1/w2/w3`` while llm-compressor writes
  ``gate_proj/up_proj/down_proj``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

ARCHES = ("qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe", "glm4_moe", "minimax_m2", "llama4", "nemotron_h")
# What each producer cannot make here (llm-compressor 0.14's MoE linearizer expects Llama-4's multimodal config;
# ModelOpt's calibration of a tiny Nemotron-H trips over transformers' hybrid cache). The reason is in docs/formats.md.
UNSUPPORTED = {("compressed-tensors", "llama4"), ("modelopt", "nemotron_h")}

HIDDEN_SIZE = 256
EXPERT_INTERMEDIATE_SIZE = 128
NUM_EXPERTS = 8
TOP_K = 2
NUM_LAYERS = 2
VOCAB_SIZE = 512
NUM_HEADS = 4
HEAD_DIM = 64

# Calibration: CALIB_BATCHES batches of CALIB_BATCH_SIZE random sequences of CALIB_SEQ_LEN tokens.
CALIB_BATCHES = 4
CALIB_BATCH_SIZE = 2
CALIB_SEQ_LEN = 32


def tiny_config(arch: str = "qwen3_moe"):
    """The transformers config of the tiny model for ``arch``."""
    common = dict(
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        vocab_size=VOCAB_SIZE,
        num_attention_heads=NUM_HEADS,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        num_experts_per_tok=TOP_K,
    )
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            moe_intermediate_size=EXPERT_INTERMEDIATE_SIZE,
            intermediate_size=2 * HIDDEN_SIZE,
            num_experts=NUM_EXPERTS,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            **common,
        )
    if arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            intermediate_size=EXPERT_INTERMEDIATE_SIZE,
            num_local_experts=NUM_EXPERTS,
            **common,
        )
    if arch == "deepseek_v3":
        from transformers import DeepseekV3Config

        return DeepseekV3Config(
            num_key_value_heads=NUM_HEADS,
            intermediate_size=2 * HIDDEN_SIZE,
            moe_intermediate_size=EXPERT_INTERMEDIATE_SIZE,
            n_routed_experts=NUM_EXPERTS,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=128,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=32,
            v_head_dim=HEAD_DIM,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            **common,
        )
    if arch == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(
            num_key_value_heads=2,
            moe_intermediate_size=EXPERT_INTERMEDIATE_SIZE,
            intermediate_size=2 * HIDDEN_SIZE,
            shared_expert_intermediate_size=HIDDEN_SIZE,
            num_experts=NUM_EXPERTS,
            **common,
        )
    if arch == "glm4_moe":
        from transformers import Glm4MoeConfig

        return Glm4MoeConfig(
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            moe_intermediate_size=EXPERT_INTERMEDIATE_SIZE,
            intermediate_size=2 * HIDDEN_SIZE,
            n_routed_experts=NUM_EXPERTS,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            **common,
        )
    if arch == "minimax_m2":
        from transformers import MiniMaxM2Config

        return MiniMaxM2Config(
            num_key_value_heads=2, head_dim=HEAD_DIM, intermediate_size=EXPERT_INTERMEDIATE_SIZE, num_local_experts=NUM_EXPERTS, **common
        )
    if arch == "llama4":  # the text model (Llama4ForCausalLM); ModelOpt exports its experts fused
        from transformers import Llama4TextConfig

        return Llama4TextConfig(
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            intermediate_size=EXPERT_INTERMEDIATE_SIZE,
            intermediate_size_mlp=2 * HIDDEN_SIZE,
            num_local_experts=NUM_EXPERTS,
            **{**common, "num_experts_per_tok": 1},
        )
    if arch == "nemotron_h":  # one Mamba-2 layer, one MoE layer (non-gated relu2 experts)
        from transformers import NemotronHConfig

        return NemotronHConfig(
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            intermediate_size=2 * HIDDEN_SIZE,
            moe_intermediate_size=EXPERT_INTERMEDIATE_SIZE,
            moe_shared_expert_intermediate_size=HIDDEN_SIZE,
            n_routed_experts=NUM_EXPERTS,
            hybrid_override_pattern="ME",
            mamba_num_heads=8,
            mamba_head_dim=32,
            ssm_state_size=16,
            n_groups=1,
            **common,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")


def tiny_model(arch: str = "qwen3_moe", seed: int = 0):
    """A randomly initialised bf16 model for ``arch``, seeded with ``torch.manual_seed(seed)``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    # from_pretrained would fill this in; ModelOpt's export needs it.
    model.config.architectures = [type(model).__name__]
    return model


def _pretrained(source: Path):
    """A bf16 model folder, loaded as ModelOpt's export expects it (``config.architectures`` set)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    model.eval()
    return model


def _tokenizer(source: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def calibration_batches(seed: int = 0) -> list:
    """Random token-id batches, each a LongTensor [CALIB_BATCH_SIZE, CALIB_SEQ_LEN]."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    return [
        torch.randint(0, VOCAB_SIZE, (CALIB_BATCH_SIZE, CALIB_SEQ_LEN), generator=gen)
        for _ in range(CALIB_BATCHES)
    ]


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges, built with the ``tokenizers`` library.

    llm-compressor's ``oneshot`` wants a processor whenever a dataset is given (otherwise it
    tries to load one from the model's ``name_or_path``); the data here is already tokenized,
    so any tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def make_compressed_tensors_checkpoint(
    out_dir: Path, arch: str = "qwen3_moe", seed: int = 0, *, source: Path | None = None, calibration: list | None = None
) -> Path:
    """Write a compressed-tensors ``nvfp4-pack-quantized`` checkpoint, made by llm-compressor.

    ``source``: a bf16 Hugging Face folder to quantize instead of the tiny random model (``arch``/``seed`` then
    only name the registry snapshot / nothing); its tokenizer is the processor. ``calibration``: token-id batches
    (LongTensor ``[B, S]``) instead of the random ones.

    Recipe: save the tiny bf16 model, load it back through
    ``llmcompressor.modeling.moe.linearize.load_quantizable_moe(AutoModelForCausalLM)`` (which
    turns the fused experts into per-expert ``nn.Linear``), run ``oneshot`` with
    ``QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=[lm_head, routers])`` on the
    random token batches, then ``save_pretrained(out_dir, save_compressed=True)``.
    Returns ``out_dir``.
    """
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import load_quantizable_moe
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    batches = calibration if calibration is not None else calibration_batches(seed)
    ids = torch.cat(batches, dim=0)
    dataset = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    recipe = QuantizationModifier(
        targets="Linear",
        scheme="NVFP4",
        ignore=["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$"],
    )
    # load_quantizable_moe leaves its *save* mapping registered as transformers' global checkpoint
    # conversion mapping for the model type (qwen3_moe, deepseek_v3): after it, from_pretrained of
    # an ordinary checkpoint of that type in the same process leaves the experts unloaded (random),
    # and save_pretrained writes fused expert names.  Snapshot that registry and put it back.
    conversion_registry = _snapshot_conversion_registry(arch)
    try:
        # The bf16 source folder must outlive oneshot and save_pretrained: both read the original
        # config.json back from model.config.name_or_path.
        with tempfile.TemporaryDirectory(prefix="nvfp4ckpt-bf16-") as tmp:
            src = str(source) if source is not None else tmp
            if source is None:
                tiny_model(arch, seed).save_pretrained(src)
            with load_quantizable_moe(AutoModelForCausalLM):
                model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
            oneshot(
                model=model,
                dataset=dataset,
                recipe=recipe,
                max_seq_length=ids.shape[1],
                num_calibration_samples=len(ids),
                processor=tiny_tokenizer() if source is None else _tokenizer(source),
            )
            out_dir.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out_dir, save_compressed=True)
    finally:
        _restore_conversion_registry(conversion_registry)
    return out_dir


def _snapshot_conversion_registry(arch: str):
    from transformers import conversion_mapping

    conversion_mapping.get_checkpoint_conversion_mapping(arch)  # builds the registry if needed
    return (
        dict(conversion_mapping._checkpoint_conversion_mapping_cache),
        set(conversion_mapping.USER_REGISTERED_MAPPINGS),
    )


def _restore_conversion_registry(snapshot) -> None:
    from transformers import conversion_mapping

    cache, user = snapshot
    conversion_mapping._checkpoint_conversion_mapping_cache.clear()
    conversion_mapping._checkpoint_conversion_mapping_cache.update(cache)
    conversion_mapping.USER_REGISTERED_MAPPINGS.clear()
    conversion_mapping.USER_REGISTERED_MAPPINGS.update(user)


def make_modelopt_checkpoint(
    out_dir: Path, arch: str = "qwen3_moe", seed: int = 0, *, source: Path | None = None, calibration: list | None = None
) -> Path:
    """Write a ModelOpt NVFP4 checkpoint (``hf_quant_config.json`` + ``quantization_config``).

    ``source``/``calibration``: as for :func:`make_compressed_tensors_checkpoint` (a bf16 folder to quantize
    instead of the tiny random model; real token batches instead of random ones).

    Recipe: ``mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)`` with the random token
    batches as calibration, then ``modelopt.torch.export.export_hf_checkpoint(model,
    export_dir=out_dir)``.  Returns ``out_dir``.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        # "transformers 5.24.0 is not tested with current version of modelopt"
        warnings.simplefilter("ignore", UserWarning)
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint

    out_dir = Path(out_dir)
    model = tiny_model(arch, seed) if source is None else _pretrained(source)
    batches = calibration if calibration is not None else calibration_batches(seed)

    def forward_loop(m):
        for batch in batches:
            m(input_ids=batch)

    with torch.no_grad():
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
    out_dir.mkdir(parents=True, exist_ok=True)
    export_hf_checkpoint(model, export_dir=out_dir)
    return out_dir


if __name__ == "__main__":  # manual use: python tests/producers.py {ct,modelopt} ARCH OUT_DIR
    import sys
    import time

    which, arch, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    make = make_modelopt_checkpoint if which == "modelopt" else make_compressed_tensors_checkpoint
    t0 = time.perf_counter()
    make(out, arch)
    print(f"{which} {arch}: {time.perf_counter() - t0:.1f} s -> {out}")
