"""``python tests/e2e_vllm/serve_with_shim.py ARGS...``: vLLM's OpenAI server with the test-only CPU shim installed.

It runs what ``python -m vllm.entrypoints.openai.api_server ARGS...`` runs (that module's ``__main__`` block calls
``vllm.entrypoints.launchers.api_server.entry.main``), with this file as the main module: the shim is installed at
import, so the engine-core process vLLM spawns (which re-imports the main module) has it too."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: ``tests`` is a package

from tests.e2e_vllm.vllm_cpu_shim import installed  # noqa: E402

_SHIM = installed()
_SHIM.__enter__()

if __name__ == "__main__":
    from vllm.entrypoints.launchers.api_server.entry import main

    main()
