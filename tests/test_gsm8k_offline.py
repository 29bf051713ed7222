"""Without --gsm8k-data and without a network, verify --gsm8k fails in one line within seconds (huggingface-hub's
own retries took about 25 s)."""

from __future__ import annotations

import socket
import time

import pytest

from nvfp4ckpt.errors import InputError
from nvfp4ckpt.eval.gsm8k import load_gsm8k


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connect is refused at once
    return port


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable"])
def test_offline_download_fails_fast(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("NVFP4CKPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(InputError, match="--gsm8k-data") as info:
        load_gsm8k(None)
    assert time.monotonic() - start < 5
    assert "\n" not in str(info.value)
