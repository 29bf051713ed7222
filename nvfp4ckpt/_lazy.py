"""``torch``, imported on first use.

``import torch`` takes 3-4 s, longer than copying a few GB of checkpoint; ``convert`` on the CPU fast path
(numpy only), ``inspect`` and ``--help`` never need it. Modules on those paths write
``from ._lazy import torch`` and use ``torch.x`` as usual: the real import happens at the first attribute
access, so code that touches torch pays for it and code that does not, does not.
(``tests/test_startup.py`` checks that a CPU conversion never imports it.)
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands in for a module until an attribute is first read, then forwards to the real module."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


def torch_tensor_type() -> type | None:
    """``torch.Tensor`` if torch is imported, else None (no tensor can exist then): lets code accept torch
    tensors next to numpy arrays without importing torch itself."""
    mod = sys.modules.get("torch")
    return getattr(mod, "Tensor", None) if mod is not None else None


torch = LazyModule("torch")
