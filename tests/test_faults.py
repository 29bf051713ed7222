"""Faults while writing: disk full, SIGKILL, Ctrl-C, a crash, a source rewritten mid-run, DST on another file
system, and --resume after each. Real processes and real files; the only patches are a write that fails with
ENOSPC (besides a real full tmpfs) and the interruptions themselves.

Every test compares the final output byte for byte (tree_digest) with an uninterrupted conversion."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from nvfp4ckpt import convert_checkpoint
from nvfp4ckpt.io import sink as nvio
from nvfp4ckpt.errors import ResumeMismatchError, SourceChangedError
from nvfp4ckpt.io import ShardWriter
from nvfp4ckpt.output import JOURNAL_NAME, partial_folder
from tests.conftest import tree_digest
from tests.test_errors import copy_ckpt, run_cli

REPO = Path(__file__).resolve().parents[1]
SHARD = "100KB"  # the qwen3 example then converts into 13 shards


@pytest.fixture(scope="module")
def reference(example_factory, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Uninterrupted conversions, by options: what every resumed run must reproduce byte for byte."""
    cache: dict[str, dict[str, str]] = {}

    def get(*extra: str) -> dict[str, str]:
        key = " ".join(extra)
        if key not in cache:
            out = tmp_path_factory.mktemp("reference") / "dst"
            convert_checkpoint(example_factory(), out, max_shard_size=SHARD, **_kwargs(extra))
            cache[key] = tree_digest(out)
        return cache[key]

    return get


def _kwargs(extra: tuple[str, ...]) -> dict:
    args = dict(zip(extra[::2], extra[1::2]))
    return {k.lstrip("-"): int(v) for k, v in args.items()}


@pytest.fixture
def src(example_factory, tmp_path) -> Path:
    return copy_ckpt(example_factory(), tmp_path / "src")


def journal_entries(dst: Path) -> list[dict]:
    path = partial_folder(dst) / JOURNAL_NAME
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines[1:] if line.endswith("}")]


def assert_nothing_complete(dst: Path) -> None:
    """The guarantee after any fault: no DST at all, and the partial folder (if any) has no manifest."""
    assert not dst.exists()
    assert not (partial_folder(dst) / "nvfp4ckpt_manifest.json").exists()
    assert not list(dst.parent.glob(f".{dst.name}.nvfp4ckpt-old-*"))


def resume_cli(capsys, src: Path, dst: Path, *extra: str) -> dict:
    code = run_cli_json(capsys, "convert", str(src), str(dst), "--max-shard-size", SHARD, "--resume", *extra)
    assert code["code"] == 0, code
    return code["json"]


def run_cli_json(capsys, *args: str) -> dict:
    from nvfp4ckpt.cli import main

    code = main([*args, "--json"])
    captured = capsys.readouterr()
    return {"code": code, "json": json.loads(captured.out) if code == 0 else None, "err": " ".join(captured.err.split())}


def interrupt_after_journal(monkeypatch, dst: Path, exc: BaseException, shards: int = 2) -> None:
    """Raise ``exc`` from the main thread's next tensor write once ``shards`` shards are journaled (fsynced):
    deterministic, whatever the speed of the disk."""
    real_write, real_close = ShardWriter.write, ShardWriter.close
    closed = {"n": 0}

    def close(self, on_durable=None):
        real_close(self, on_durable)
        closed["n"] += 1

    def write(self, name, data):
        deadline = time.monotonic() + 30
        while closed["n"] >= shards and len(journal_entries(dst)) < shards and time.monotonic() < deadline:
            time.sleep(0.01)  # enough shards closed: let the fsync thread journal them
        if len(journal_entries(dst)) >= shards:
            raise exc
        return real_write(self, name, data)

    monkeypatch.setattr(ShardWriter, "write", write)
    monkeypatch.setattr(ShardWriter, "close", close)


# ----------------------------------------------------------------------------------------------
# Disk full


def test_disk_full_patched_then_resume(src, tmp_path, monkeypatch, capsys, reference):
    """ENOSPC half-way through (the lowest write function fails after 400 KB, inside the second shard):
    one line naming the shard and the remedy, exit 2, no DST, source untouched; --resume then finishes."""
    before = tree_digest(src)
    dst = tmp_path / "dst"
    written = {"n": 0}
    real_write_all = nvio.write_all

    def write_all(fd, data):
        written["n"] += memoryview(data).nbytes
        if written["n"] > 400_000:
            raise OSError(28, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(nvio, "write_all", write_all)
    code, err = run_cli(capsys, "convert", str(src), str(dst), "--max-shard-size", SHARD)
    assert code == 2, err
    assert err.startswith("Error:") and len(err.splitlines()) == 1
    assert "no space left on device" in err and "--resume" in err and "free space on" in err
    assert ".dst.nvfp4ckpt-partial/model-00002-of-00013.safetensors" in err  # the shard being written
    assert "keep the 1 finished shard" in err and "rerun with --resume" in err
    assert_nothing_complete(dst)
    assert tree_digest(src) == before
    assert len(journal_entries(dst)) == 1

    monkeypatch.setattr(nvio, "write_all", real_write_all)  # the disk frees
    result = resume_cli(capsys, src, dst)
    assert result["shards_reused"] == 1
    assert tree_digest(dst) == reference()
    assert tree_digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no partial folder, no lock


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -rm (user and mount namespaces) for a private tmpfs")
def test_disk_full_real_tmpfs_then_resume(src, tmp_path, reference):
    """A real full file system: DST on a 2 MB tmpfs (private mount namespace, no root needed) of which a
    filler takes 1.2 MB; the filler is deleted and --resume finishes byte-identically."""
    out = tmp_path / "out"
    out.mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = textwrap.dedent(
        f"""
        set -u
        mount -t tmpfs -o size=2m tmpfs {mnt}
        head -c 1200000 /dev/zero > {mnt}/filler
        cd {REPO}
        {sys.executable} -m nvfp4ckpt convert {src} {mnt}/dst --max-shard-size {SHARD} 2> {out}/checked.err
        echo $? > {out}/checked.rc
        ls -A {mnt} > {out}/after-checked
        NVFP4CKPT_NO_SPACE_CHECK=1 {sys.executable} -m nvfp4ckpt convert {src} {mnt}/dst --max-shard-size {SHARD} 2> {out}/first.err
        echo $? > {out}/first.rc
        ls -A {mnt} > {out}/after-first
        rm {mnt}/filler
        {sys.executable} -m nvfp4ckpt convert {src} {mnt}/dst --max-shard-size {SHARD} --resume --json > {out}/resume.json 2> {out}/resume.err
        echo $? > {out}/resume.rc
        ls -A {mnt} > {out}/after-resume
        cp -a {mnt}/dst {out}/dst
        """
    )
    before = tree_digest(src)
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"}
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, env=env, timeout=300)
    # the free-space check refuses up front, writing nothing; without it (a file system statvfs misreports) the
    # disk fills mid-run, and the partial folder is kept for --resume
    checked_err = " ".join((out / "checked.err").read_text().split())
    assert (out / "checked.rc").read_text().strip() == "2" and "not enough free space" in checked_err, checked_err
    assert (out / "after-checked").read_text().split() == ["filler"]
    first_err = " ".join((out / "first.err").read_text().split())
    assert (out / "first.rc").read_text().strip() == "2", first_err
    assert "no space left on device" in first_err and "--resume" in first_err and ".dst.nvfp4ckpt-partial/" in first_err
    assert sorted((out / "after-first").read_text().split()) == [".dst.nvfp4ckpt-partial", "filler"]  # no DST, no lock
    assert (out / "resume.rc").read_text().strip() == "0", (out / "resume.err").read_text()
    assert json.loads((out / "resume.json").read_text())["shards_reused"] >= 1
    assert (out / "after-resume").read_text().split() == ["dst"]
    assert tree_digest(out / "dst") == reference()
    assert tree_digest(src) == before


def _free(monkeypatch, nbytes: int) -> None:
    import nvfp4ckpt.output.writer as writer

    monkeypatch.setattr(writer, "free_bytes", lambda path: nbytes)


def test_free_space_checked_before_anything_is_written(src, tmp_path, monkeypatch, capsys, reference):
    """Issue 24: a file system too small for the output is refused up front, saying how much is missing; nothing
    is left behind, and the same command succeeds once there is room (free-space query patched)."""
    before = tree_digest(src)
    dst = tmp_path / "dst"
    _free(monkeypatch, 300_000)
    code, err = run_cli(capsys, "convert", str(src), str(dst), "--max-shard-size", SHARD)
    assert code == 2 and err.startswith("Error:") and len(err.splitlines()) == 1, err
    assert "not enough free space" in err and "missing" in err and repr(str(tmp_path)) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial folder, no lock, no DST
    assert tree_digest(src) == before
    _free(monkeypatch, 10**12)
    code, err = run_cli(capsys, "convert", str(src), str(dst), "--max-shard-size", SHARD, "--quiet")
    assert code == 0, err
    assert tree_digest(dst) == reference()


def test_free_space_counts_the_partial_folder_of_an_earlier_run(src, tmp_path, monkeypatch, capsys, reference):
    dst = tmp_path / "dst"
    interrupt_after_journal(monkeypatch, dst, KeyboardInterrupt(), shards=6)
    code, _ = run_cli(capsys, "convert", str(src), str(dst), "--max-shard-size", SHARD)
    assert code == 130
    monkeypatch.undo()
    kept = sum(p.stat().st_size for p in partial_folder(dst).rglob("*") if p.is_file())
    total = sum(v for v in [sum(p.stat().st_size for p in src.rglob("*") if p.is_file())])
    _free(monkeypatch, total + (2 << 20) - kept)  # enough only with the partial folder's bytes counted
    result = resume_cli(capsys, src, dst)
    assert result["shards_reused"] >= 1 and tree_digest(dst) == reference()


def test_revert_checks_free_space_too(src, tmp_path, monkeypatch, capsys):
    conv = tmp_path / "conv"
    convert_checkpoint(src, conv)
    _free(monkeypatch, 1000)
    code, err = run_cli(capsys, "revert", str(conv), str(tmp_path / "back"))
    assert code == 2 and "not enough free space" in err, err
    assert not (tmp_path / "back").exists() and not list(tmp_path.glob(".back*"))


# ----------------------------------------------------------------------------------------------
# SIGKILL

CHILD = """
import sys, time
import nvfp4ckpt.io as io

real_close = io.ShardWriter.close
closed = []

def close(self, on_durable=None):
    real_close(self, on_durable)
    closed.append(self.path.name)
    if len(closed) == 3:
        time.sleep(600)  # hold still after the third shard until the test SIGKILLs this process

io.ShardWriter.close = close
from nvfp4ckpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_run_then_resume(src, tmp_path, reference):
    """A real process killed with SIGKILL once the journal lists finished shards: no DST, a stale lock file
    nobody holds; `convert --resume` (a second real process) takes the lock over, reuses the shards and
    writes the same bytes as an uninterrupted run."""
    before = tree_digest(src)
    dst = tmp_path / "dst"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["convert", str(src), str(dst), "--max-shard-size", SHARD, "--quiet"]
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 120
        while len(journal_entries(dst)) < 3:
            assert child.poll() is None, "the conversion ended before it could be killed"
            assert time.monotonic() < deadline, "no shard was journaled in time"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert_nothing_complete(dst)
    assert (tmp_path / ".dst.nvfp4ckpt-lock").exists()  # left by the dead run, no longer held

    done = subprocess.run(
        [sys.executable, "-m", "nvfp4ckpt", *args[:-1], "--resume", "--json"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["shards_reused"] == 3
    assert tree_digest(dst) == reference()
    assert tree_digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


# ----------------------------------------------------------------------------------------------
# Ctrl-C and crashes


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("a bug")], ids=["ctrl-c", "crash"])
def test_interrupted_then_resume(src, tmp_path, monkeypatch, capsys, reference, exc):
    """Ctrl-C (exit 130) or an unexpected exception half-way keeps the partial folder, never a complete-looking
    DST; --resume reuses the journaled shards."""
    dst = tmp_path / "dst"
    interrupt_after_journal(monkeypatch, dst, exc)
    if isinstance(exc, KeyboardInterrupt):
        code, err = run_cli(capsys, "convert", str(src), str(dst), "--max-shard-size", SHARD)
        assert code == 130 and "interrupted" in err and "--resume" in err
    else:
        with pytest.raises(RuntimeError, match="a bug"):
            convert_checkpoint(src, dst, max_shard_size=SHARD)
    assert_nothing_complete(dst)
    assert partial_folder(dst).is_dir() and len(journal_entries(dst)) >= 2
    assert not (tmp_path / ".dst.nvfp4ckpt-lock").exists()
    monkeypatch.undo()
    if isinstance(exc, KeyboardInterrupt):
        result = resume_cli(capsys, src, dst)
        assert result["shards_reused"] >= 2
    else:  # the human output: a "resumed" column in the table, and a count
        from nvfp4ckpt.cli import main

        assert main(["convert", str(src), str(dst), "--max-shard-size", SHARD, "--resume"]) == 0
        out = capsys.readouterr().out
        assert "resumed" in out and "reused" in out and "shards reused from the interrupted run" in out
    assert tree_digest(dst) == reference()


def test_revert_resume(example_factory, tmp_path, monkeypatch, capsys):
    """revert shares the writer: an interrupted revert resumes into the same bytes as an uninterrupted one."""
    from nvfp4ckpt import revert_checkpoint

    converted = tmp_path / "converted"
    convert_checkpoint(example_factory(), converted)
    revert_checkpoint(converted, tmp_path / "whole", max_shard_size=SHARD)
    dst = tmp_path / "reverted"
    interrupt_after_journal(monkeypatch, dst, KeyboardInterrupt(), shards=1)
    with pytest.raises(KeyboardInterrupt):
        revert_checkpoint(converted, dst, max_shard_size=SHARD)
    assert_nothing_complete(dst)
    assert len(journal_entries(dst)) >= 1
    monkeypatch.undo()
    from nvfp4ckpt.cli import main

    assert main(["revert", str(converted), str(dst), "--max-shard-size", SHARD, "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_reused"] >= 1
    assert tree_digest(dst) == tree_digest(tmp_path / "whole")


def test_resume_rank_sharded_output(src, tmp_path, monkeypatch, capsys, reference):
    """--tp/--ep output (shards in rank folders) resumes byte-identically too."""
    dst = tmp_path / "dst"
    interrupt_after_journal(monkeypatch, dst, KeyboardInterrupt(), shards=1)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, dst, max_shard_size=SHARD, tp=2, ep=2)
    assert_nothing_complete(dst)
    monkeypatch.undo()
    result = resume_cli(capsys, src, dst, "--tp", "2", "--ep", "2")
    assert result["shards_reused"] >= 1
    assert tree_digest(dst) == reference("--tp", "2", "--ep", "2")


def test_resume_rewrites_a_damaged_shard(src, tmp_path, monkeypatch, capsys, reference):
    """Finished shards are re-hashed on resume: one altered after the interruption is written again."""
    dst = tmp_path / "dst"
    interrupt_after_journal(monkeypatch, dst, KeyboardInterrupt(), shards=2)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, dst, max_shard_size=SHARD)
    monkeypatch.undo()
    entries = journal_entries(dst)
    damaged = partial_folder(dst) / entries[0]["name"]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    damaged.write_bytes(bytes(data))
    result = resume_cli(capsys, src, dst)
    assert result["shards_reused"] == len(entries) - 1
    assert tree_digest(dst) == reference()


def test_leftover_partial_without_resume_starts_over(src, tmp_path, monkeypatch, capsys, reference):
    """What CI wants: a plain rerun after a dead run says so in one line, removes the partial folder and
    writes everything; --resume with nothing to resume simply converts."""
    dst = tmp_path / "dst"
    interrupt_after_journal(monkeypatch, dst, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, dst, max_shard_size=SHARD)
    monkeypatch.undo()
    out = run_cli_json(capsys, "convert", str(src), str(dst), "--max-shard-size", SHARD)
    assert out["code"] == 0 and out["json"]["shards_reused"] == 0
    assert "removing the partial folder of an interrupted run" in out["err"] and "--resume" in out["err"]
    assert tree_digest(dst) == reference()

    dst2 = tmp_path / "dst2"
    out = run_cli_json(capsys, "convert", str(src), str(dst2), "--max-shard-size", SHARD, "--resume")
    assert out["code"] == 0 and out["json"]["shards_reused"] == 0 and "no interrupted run to resume" in out["err"]
    assert tree_digest(dst2) == reference()


# ----------------------------------------------------------------------------------------------
# Resume refused


def test_resume_refused_when_source_or_options_changed(src, tmp_path, monkeypatch, capsys, reference):
    dst = tmp_path / "dst"
    interrupt_after_journal(monkeypatch, dst, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, dst, max_shard_size=SHARD)
    monkeypatch.undo()
    partial = tree_digest(partial_folder(dst))

    code, err = run_cli(capsys, "convert", str(src), str(dst), "--max-shard-size", "200KB", "--resume")
    assert code == 2 and err.startswith("Error:") and len(err.splitlines()) == 1
    assert "source or options changed since the interrupted run" in err and "rerun without --resume" in err
    assert '--max-shard-size was "100.00 KB", now "200.00 KB"' in err  # which option, from what to what
    assert tree_digest(partial_folder(dst)) == partial and not dst.exists()

    tokenizer = src / "tokenizer_config.json"
    tokenizer.write_text(tokenizer.read_text() + " ")
    code, err = run_cli(capsys, "convert", str(src), str(dst), "--max-shard-size", SHARD, "--resume")
    assert code == 2 and "source or options changed since the interrupted run" in err
    assert f"{tokenizer} changed" in err
    assert tree_digest(partial_folder(dst)) == partial and not dst.exists()
    with pytest.raises(ResumeMismatchError):
        convert_checkpoint(src, dst, max_shard_size=SHARD, resume=True)


@pytest.mark.parametrize(
    "first,second,needle",
    [
        ([], ["--tp", "2"], "--tp was 1, now 2"),
        ([], ["--pad-hidden", "256"], "--pad-hidden was 128, now 256"),
        (["--ep", "2"], ["--tp", "2"], "--ep was 2, now 1; --tp was 1, now 2"),
    ],
)
def test_resume_names_the_option_that_changed(src, tmp_path, monkeypatch, capsys, first, second, needle):
    """Issue 24: a refused --resume says which option changed from what to what, not just "options changed"."""
    dst = tmp_path / "dst"
    interrupt_after_journal(monkeypatch, dst, KeyboardInterrupt())
    code, _ = run_cli(capsys, "convert", str(src), str(dst), "--max-shard-size", SHARD, *first)
    assert code == 130
    monkeypatch.undo()
    partial = tree_digest(partial_folder(dst))
    code, err = run_cli(capsys, "convert", str(src), str(dst), "--max-shard-size", SHARD, "--resume", *second)
    assert code == 2 and err.startswith("Error:") and len(err.splitlines()) == 1, err
    assert needle in err and "rerun without --resume" in err, err
    assert tree_digest(partial_folder(dst)) == partial and not dst.exists()


def test_resume_names_a_changed_version(src, tmp_path, monkeypatch, capsys):
    import nvfp4ckpt.output.journal as journal

    dst = tmp_path / "dst"
    interrupt_after_journal(monkeypatch, dst, KeyboardInterrupt())
    monkeypatch.setattr(journal, "__version__", "0.0.9")
    monkeypatch.setattr("nvfp4ckpt.output.writer.job_fingerprint", lambda job, plans: "old")
    code, _ = run_cli(capsys, "convert", str(src), str(dst), "--max-shard-size", SHARD)
    assert code == 130
    monkeypatch.undo()
    code, err = run_cli(capsys, "convert", str(src), str(dst), "--max-shard-size", SHARD, "--resume")
    assert code == 2 and "the interrupted run was nvfp4ckpt 0.0.9, this is" in err, err


# ----------------------------------------------------------------------------------------------
# Source changed while converting


def test_source_changed_mid_run(src, tmp_path):
    """A source shard rewritten in place (same size) while the conversion runs: SourceChangedError naming it,
    nothing installed, no partial folder kept (its bytes may mix old and new source)."""
    dst = tmp_path / "dst"
    shard = sorted(src.glob("*.safetensors"))[-1]

    def on_progress(p) -> None:
        if p.stage == "bytes" and not on_progress.done:  # the public progress hook, after the first tensor
            on_progress.done = True
            data = bytearray(shard.read_bytes())
            data[-1] ^= 0xFF
            shard.write_bytes(bytes(data))

    on_progress.done = False
    with pytest.raises(SourceChangedError, match=f"{shard}: changed while it was being converted"):
        convert_checkpoint(src, dst, max_shard_size=SHARD, progress=on_progress)
    assert on_progress.done
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_source_changed_cli_message(src, tmp_path, monkeypatch, capsys):
    """The same through the CLI: one line, exit 2 (the source is replaced by a new file: another inode)."""
    dst = tmp_path / "dst"
    victim = src / "generation_config.json"
    real = ShardWriter.close
    replaced: list[bool] = []

    def close(self, on_durable=None):
        real(self, on_durable)
        if not replaced:  # after the first shard: a new file with the same content under the same name
            replaced.append(True)
            fresh = victim.with_suffix(".new")
            shutil.copy2(victim, fresh)
            os.replace(fresh, victim)

    monkeypatch.setattr(ShardWriter, "close", close)
    code, err = run_cli(capsys, "convert", str(src), str(dst), "--max-shard-size", SHARD)
    assert code == 2 and err.startswith("Error:") and len(err.splitlines()) == 1
    assert f"{victim}: changed while it was being converted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ----------------------------------------------------------------------------------------------
# DST on another file system


@pytest.mark.skipif(not Path("/dev/shm").is_dir() or not os.access("/dev/shm", os.W_OK), reason="needs /dev/shm")
def test_destination_on_another_file_system(src, tmp_path, reference):
    """SRC on one file system, DST on a tmpfs: the partial folder is created next to DST (so the final rename
    is atomic, never a cross-device copy), the output is byte-identical, nothing is left in either place."""
    base = Path("/dev/shm") / f"nvfp4ckpt-test-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    try:
        assert base.stat().st_dev != tmp_path.stat().st_dev
        dst = base / "dst"
        seen: list[bool] = []

        def on_progress(p) -> None:
            if p.stage == "bytes" and not seen:
                seen.append(partial_folder(dst).stat().st_dev == base.stat().st_dev)

        convert_checkpoint(src, dst, max_shard_size=SHARD, progress=on_progress)
        assert seen == [True]
        assert tree_digest(dst) == reference()
        assert [p.name for p in base.iterdir()] == ["dst"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
