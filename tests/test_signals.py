"""SIGTERM (kill, a CI timeout) is handled as Ctrl-C: exit 130 with the one-line message, the lock released and
removed, the partial folder kept for --resume; and NVFP4CKPT_DEBUG keeps the exit code while adding the traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import tree_digest
from tests.test_faults import CHILD, REPO, SHARD, assert_nothing_complete, journal_entries, reference, src  # noqa: F401


def test_sigterm_mid_run_then_resume(src, tmp_path, reference):  # noqa: F811 - pytest fixtures
    dst = tmp_path / "dst"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["convert", str(src), str(dst), "--max-shard-size", SHARD]
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(journal_entries(dst)) < 3:
            assert child.poll() is None, "the conversion ended before it could be stopped"
            assert time.monotonic() < deadline, "no shard was journaled in time"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "--resume" in lines[0], err
    assert_nothing_complete(dst)
    assert not (tmp_path / ".dst.nvfp4ckpt-lock").exists()  # released and removed, unlike SIGKILL
    done = subprocess.run(
        [sys.executable, "-m", "nvfp4ckpt", *args, "--resume", "--json"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["shards_reused"] >= 3
    assert tree_digest(dst) == reference()


def test_debug_keeps_the_exit_code(tmp_path):
    env = {**os.environ, "NVFP4CKPT_DEBUG": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "nvfp4ckpt", "inspect", str(tmp_path / "missing")], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("Error:")
