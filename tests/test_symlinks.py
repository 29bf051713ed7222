"""Issue 14, security: nothing the tool creates next to DST/OUT (lock file, partial folder, aside folder, example's
partial folder, revert's output) ever follows a symlink planted there. Each case plants a real symlink pointing into
SRC and proves SRC byte-identical afterwards."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from nvfp4ckpt import convert_checkpoint
from nvfp4ckpt.cli import main
from tests.conftest import tree_digest


@pytest.fixture
def src(example_factory, tmp_path) -> Path:
    out = tmp_path / "src"
    shutil.copytree(example_factory("qwen3_moe", "modelopt"), out)
    return out


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err.strip()


def _refused(capsys, src: Path, *args: str, needle: str = "symbolic link") -> str:
    before = tree_digest(src)
    code, err = _cli(capsys, *args)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("Error:"), err
    assert needle in " ".join(err.split()), err
    assert tree_digest(src) == before
    return err


def _a_source_file(src: Path) -> Path:
    return sorted(src.glob("*.safetensors"))[0]


def test_lock_symlink_to_source_file(src, tmp_path, capsys):
    dst = tmp_path / "dst"
    (tmp_path / ".dst.nvfp4ckpt-lock").symlink_to(_a_source_file(src))
    _refused(capsys, src, "convert", str(src), str(dst), needle="lock file is a symbolic link")
    assert not dst.exists()


def test_lock_hard_link_to_source_file(src, tmp_path, capsys):
    os.link(_a_source_file(src), tmp_path / ".dst.nvfp4ckpt-lock")
    _refused(capsys, src, "convert", str(src), str(tmp_path / "dst"), needle="hard link")


def test_lock_fifo_does_not_block(src, tmp_path, capsys):
    os.mkfifo(tmp_path / ".dst.nvfp4ckpt-lock")
    _refused(capsys, src, "convert", str(src), str(tmp_path / "dst"), needle="not a plain file")


@pytest.mark.parametrize("resume", [False, True])
def test_partial_folder_symlink_to_source(src, tmp_path, capsys, resume):
    (tmp_path / ".dst.nvfp4ckpt-partial").symlink_to(src, target_is_directory=True)
    _refused(capsys, src, "convert", str(src), str(tmp_path / "dst"), *(["--resume"] if resume else []),
             needle="partial folder is a symbolic link")  # fmt: skip
    assert (tmp_path / ".dst.nvfp4ckpt-partial").is_symlink()  # left as found: not ours to remove


def test_symlink_inside_partial_folder_on_resume(src, tmp_path, capsys):
    partial = tmp_path / ".dst.nvfp4ckpt-partial"
    partial.mkdir()
    (partial / "model-00001-of-00002.safetensors").symlink_to(_a_source_file(src))
    (partial / "ranks").symlink_to(src, target_is_directory=True)
    _refused(capsys, src, "convert", str(src), str(tmp_path / "dst"), "--resume", needle="symbolic link or special file")


def test_planted_file_names_inside_fresh_partial_are_never_written_through(src, tmp_path, capsys):
    # Without --resume a leftover partial folder is removed whole (rmtree never follows links inside it).
    partial = tmp_path / ".dst.nvfp4ckpt-partial"
    partial.mkdir()
    (partial / "config.json").symlink_to(src / "config.json")
    before = tree_digest(src)
    code, err = _cli(capsys, "convert", str(src), str(tmp_path / "dst"))
    assert code == 0, err
    assert tree_digest(src) == before and not (tmp_path / "dst" / "config.json").is_symlink()


def test_destination_symlink_to_folder(src, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "dst").symlink_to(real, target_is_directory=True)
    _refused(capsys, src, "convert", str(src), str(tmp_path / "dst"), needle="is a symbolic link")
    link_into_src = tmp_path / "into-src"
    link_into_src.symlink_to(src, target_is_directory=True)
    _refused(capsys, src, "convert", str(src), str(link_into_src), "--overwrite", needle="")


def test_dot_as_destination(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    before = tree_digest(src)
    code, err = _cli(capsys, "convert", str(src), ".")
    assert code == 0, err
    assert (out / "config.json").is_file() and (out / "nvfp4ckpt_manifest.json").is_file()
    assert not list(out.glob(".*nvfp4ckpt*")) and not list(tmp_path.glob(".*nvfp4ckpt*"))
    assert tree_digest(src) == before


def test_overwrite_never_renames_onto_a_planted_aside_name(src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    # The aside name of older versions (".dst.nvfp4ckpt-old-<pid>") planted as a symlink into SRC.
    (tmp_path / f".dst.nvfp4ckpt-old-{os.getpid()}").symlink_to(src, target_is_directory=True)
    before = tree_digest(src)
    convert_checkpoint(src, dst, overwrite=True)
    assert tree_digest(src) == before
    assert (dst / "config.json").is_file() and not (dst / "old.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.nvfp4ckpt-old-") and not p.is_symlink()]


def test_example_partial_folder_and_out_symlinks(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    before = tree_digest(victim)
    (tmp_path / ".out.nvfp4ckpt-example-partial").symlink_to(victim, target_is_directory=True)
    _refused(capsys, victim, "example", str(tmp_path / "out"), needle="partial folder is a symbolic link")
    (tmp_path / "out2").symlink_to(victim, target_is_directory=True)
    _refused(capsys, victim, "example", str(tmp_path / "out2"), "--overwrite", needle="is a symbolic link")
    assert tree_digest(victim) == before


def test_revert_output_symlinks(src, tmp_path, capsys):
    conv = tmp_path / "conv"
    convert_checkpoint(src, conv)
    before = tree_digest(conv)
    (tmp_path / ".back.nvfp4ckpt-lock").symlink_to(_a_source_file(src))
    _refused(capsys, src, "revert", str(conv), str(tmp_path / "back"), needle="lock file is a symbolic link")
    (tmp_path / ".back.nvfp4ckpt-lock").unlink()
    (tmp_path / ".back.nvfp4ckpt-partial").symlink_to(src, target_is_directory=True)
    _refused(capsys, src, "revert", str(conv), str(tmp_path / "back"), needle="partial folder is a symbolic link")
    assert tree_digest(conv) == before
