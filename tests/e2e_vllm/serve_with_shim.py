"""``python tests/e2e_vllm/serve_with_shim.py ARGS...``: vLLM's OpenAI server (``vllm.entrypoints.openai.api_server``,
the real one) with the test-only CPU shim installed. The shim is installed at import, so a process vLLM spawns
(which re-imports this file as its main module) has it too."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: ``tests`` is a package

from tests.e2e_vllm.vllm_cpu_shim import installed  # noqa: E402

_SHIM = installed()
_SHIM.__enter__()

if __name__ == "__main__":
    sys.argv = ["vllm.entrypoints.openai.api_server", *sys.argv[1:]]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
