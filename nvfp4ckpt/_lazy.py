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


# Which extra installs each optional package (pyproject.toml's [project.optional-dependencies]; tests/test_extras.py
# checks that each extra really lists its package).
EXTRA_OF = {
    "torch": "torch", "tokenizers": "torch", "transformers": "gsm8k", "pyarrow": "gsm8k", "flashinfer": "gpu", "triton": "gpu",
}  # fmt: skip


def require(name: str) -> ModuleType:
    """``import name``, or a one-line ``MissingExtraError`` naming the extra that installs it: the core install
    (inspect, convert) leaves torch and the rest out."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        top = name.split(".")[0]
        if exc.name is None or exc.name.split(".")[0] != top:
            raise  # the package is there but one of its own imports failed: a real bug, keep the traceback
        from ._install import install_hint
        from .errors import MissingExtraError

        extra = EXTRA_OF.get(top, "all")
        raise MissingExtraError(
            f"this command needs the Python package {top!r}, which the core install leaves out: {install_hint(extra, top)}"
        ) from None


class LazyModule:
    """Stands in for a module until an attribute is first read, then forwards to the real module."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = require(self._name)
        value = getattr(module, attr)
        # kept on the instance, so later reads skip __getattr__: hot loops read torch.uint8 etc. per tensor. Module
        # attributes are bound once (patches of torch.cuda.x or torch.Tensor.x act on the same objects and still apply)
        self.__dict__[attr] = value
        return value

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


def torch_tensor_type() -> type | None:
    """``torch.Tensor`` if torch is imported, else None (no tensor can exist then): lets code accept torch
    tensors next to numpy arrays without importing torch itself."""
    mod = sys.modules.get("torch")
    return getattr(mod, "Tensor", None) if mod is not None else None


torch = LazyModule("torch")
