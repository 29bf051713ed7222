"""The ``pip install`` line that adds an extra to nvfp4ckpt *as it was installed here*.

nvfp4ckpt is not on PyPI, so ``pip install 'nvfp4ckpt[torch]'`` fails on most machines; and on Linux PyPI's
torch is the CUDA build (several GB of CUDA libraries), which a machine without an NVIDIA GPU does not need. The
hint names the same source the tool came from (a source checkout, a local folder or wheel, a git URL; the index only
when it came from one, per the installer's PEP 610 ``direct_url.json``) and, where torch is what is missing on a
Linux machine without an NVIDIA GPU, installs the CPU build of torch first.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

DIST = "nvfp4ckpt"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
CHECKOUT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Origin:
    """Where this nvfp4ckpt came from: ``kind`` is checkout | folder | file | vcs | url | index."""

    kind: str
    location: str = ""  # a path, or a URL (vcs: with @commit)


def origin() -> Origin:
    """How the running nvfp4ckpt was installed (the checkout it is imported from first: an editable install or a
    checkout on sys.path, whatever the metadata of another copy says)."""
    if _is_checkout(CHECKOUT_ROOT):
        return Origin("checkout", str(CHECKOUT_ROOT))
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        raw = distribution(DIST).read_text("direct_url.json")
    except (PackageNotFoundError, OSError):
        return Origin("index")
    return origin_from_direct_url(raw)


def origin_from_direct_url(raw: str | None) -> Origin:
    """PEP 610: no file means an index install; ``vcs_info``, ``archive_info`` or ``dir_info`` the others."""
    if not raw:
        return Origin("index")
    try:
        data = json.loads(raw)
        url = str(data["url"])
    except (ValueError, KeyError, TypeError):
        return Origin("index")
    if isinstance(data.get("vcs_info"), dict):
        vcs = data["vcs_info"]
        commit = vcs.get("commit_id") or vcs.get("requested_revision")
        return Origin("vcs", f"{vcs.get('vcs', 'git')}+{url}" + (f"@{commit}" if commit else ""))
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = unquote(parsed.path)
        if os.path.exists(path):
            return Origin("folder" if os.path.isdir(path) else "file", path)
        return Origin("index")  # the folder or wheel it came from is gone: nothing better to name
    return Origin("url", url)


def _is_checkout(root: Path) -> bool:
    try:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False
    return f'name = "{DIST}"' in text


def requirement(extra: str, where: Origin | None = None) -> str:
    """The pip arguments that install nvfp4ckpt with ``extra`` from where it came from."""
    o = where or origin()
    if o.kind == "checkout":
        return "-e " + shlex.quote(f"{o.location}[{extra}]")
    if o.kind in ("folder", "file"):
        return shlex.quote(f"{o.location}[{extra}]")
    if o.kind in ("vcs", "url"):
        return shlex.quote(f"{DIST}[{extra}] @ {o.location}")
    return shlex.quote(f"{DIST}[{extra}]")


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver on this machine (checked without importing torch, which may be the missing package)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def install_hint(extra: str, missing: str, where: Origin | None = None, *, platform: str | None = None,
                 gpu: bool | None = None) -> str:  # fmt: skip
    """One line: the command that installs ``extra`` (``missing`` is the package that could not be imported)."""
    pip = f"pip install {requirement(extra, where)}"
    platform = platform or sys.platform
    gpu = has_nvidia_gpu() if gpu is None else gpu
    if missing == "torch" and platform.startswith("linux") and not gpu:
        # PyPI's Linux torch is the CUDA build: take the CPU one from PyTorch's index first, pip keeps it
        return f"pip install torch --index-url {CPU_TORCH_INDEX} && {pip} (no NVIDIA GPU here: the CPU build of torch)"
    return pip


__all__ = ["CPU_TORCH_INDEX", "Origin", "has_nvidia_gpu", "install_hint", "origin", "origin_from_direct_url", "requirement"]
