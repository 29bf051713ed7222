"""Issue 14, security: nothing the tool creates next to DST/OUT (lock file, partial folder, aside folder, example's
partial folder, revert's output) ever follows a symlink planted there. Each case plants a real symlink pointing into
SRC and proves SRC byte-identical afterwards."""

from __future__ import annotations

import os
import shutil
import sys
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


# ---- Issue 24: output paths an option names (verify --json-out) -------------------------------------------------


@pytest.fixture(scope="module")
def verified_pair(tmp_path_factory):
    from nvfp4ckpt import write_example

    src = tmp_path_factory.mktemp("jo-src") / "src"
    write_example(src, format="modelopt", arch="qwen3_moe", seed=0, shards=2)
    conv = tmp_path_factory.mktemp("jo-conv") / "conv"
    convert_checkpoint(src, conv)
    return src, conv


def _json_out_refused(capsys, verified_pair, target: Path, needle: str, *extra: str, verify_after: bool = True) -> None:
    src, conv = verified_pair
    before_src, before_conv = tree_digest(src), tree_digest(conv)
    existed = os.path.lexists(target)
    code, err = _cli(capsys, "verify", str(conv), "--check", "structure", "--source", str(src), "--json-out", str(target), *extra)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("Error:") and "--json-out" in err, err
    assert needle in " ".join(err.split()), err
    assert tree_digest(src) == before_src and tree_digest(conv) == before_conv
    assert os.path.lexists(target) == existed
    if verify_after:
        assert main(["verify", str(conv), "--check", "structure", "--quiet"]) == 0  # nothing unlisted was added


@pytest.mark.parametrize("name", ["config.json", "verify.json", "nvfp4ckpt_manifest.json"])
def test_json_out_inside_the_checkpoint_is_refused(verified_pair, capsys, name):
    _json_out_refused(capsys, verified_pair, verified_pair[1] / name, "inside the checkpoint")


def test_json_out_onto_a_source_shard_is_refused(verified_pair, capsys):
    shard = sorted(verified_pair[0].glob("*.safetensors"))[0]
    _json_out_refused(capsys, verified_pair, shard, "inside the source")


def test_json_out_symlink_is_refused(verified_pair, capsys, tmp_path):
    link = tmp_path / "report.json"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    link.symlink_to(victim)
    _json_out_refused(capsys, verified_pair, link, "symbolic link")
    assert victim.read_text() == "keep"


def test_json_out_into_a_missing_folder_fails_before_any_work(verified_pair, capsys, tmp_path, monkeypatch):
    cli_verify = sys.modules["nvfp4ckpt.cli.verify"]

    def never(*a, **k):
        raise AssertionError("verify ran before the output path was checked")

    monkeypatch.setattr(cli_verify, "verify_checkpoint", never)
    _json_out_refused(capsys, verified_pair, tmp_path / "no" / "such" / "r.json", "does not exist", verify_after=False)


def test_gsm8k_data_missing_fails_before_any_work(verified_pair, capsys, tmp_path, monkeypatch):
    cli_verify = sys.modules["nvfp4ckpt.cli.verify"]

    monkeypatch.setattr(cli_verify, "verify_checkpoint", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    src, conv = verified_pair
    code, err = _cli(capsys, "verify", str(conv), "--gsm8k", "--baseline-accuracy", "50", "--gsm8k-data", str(tmp_path / "nope"))
    assert code == 2 and "--gsm8k-data" in err and len(err.splitlines()) == 1, err


def test_json_out_written_atomically_over_a_hard_link(verified_pair, capsys, tmp_path):
    src, conv = verified_pair
    outside = tmp_path / "copy.safetensors"
    shard = sorted(src.glob("*.safetensors"))[0]
    os.link(shard, outside)  # a hard link to a source shard, outside the source: the report replaces the name only
    before = tree_digest(src)
    assert main(["verify", str(conv), "--check", "structure", "--quiet", "--json-out", str(outside)]) == 0
    assert tree_digest(src) == before
    assert outside.read_text().startswith("{") and (outside.stat().st_mode & 0o777) == 0o644
