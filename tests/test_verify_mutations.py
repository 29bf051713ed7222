"""verify tells the truth: each kind of damage a buggy converter could do fails ``verify --source`` (exit 1), and the
numerics check catches it on its own where the thresholds say it can (docs/verify.md, "Thresholds"); checks that
would compare nothing refuse to run or say so."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nvfp4ckpt import convert_checkpoint
from nvfp4ckpt.cli import main
from nvfp4ckpt.runtime.backends import BACKENDS
from tests.conftest import interpreted
from tests.mutations import MUTATIONS, rewrite

PREFIX = "model.layers.1.mlp.experts."

# Under TRITON_INTERPRET=1 when there is no GPU (the Triton backend then runs on the CPU, tiny shapes only).
interpreted("nvfp4ckpt.runtime.kernels.triton_moe")

# What the numerics check alone sees, per backend (scripts/verify_thresholds.py measures every family): the torch
# backend repeats the reference's arithmetic, so any changed weight shows; the Triton kernel's own rounding noise
# (a re-quantized intermediate block rounding the other way: 5.6e-3 on one token at Qwen3 sizes, H100) is as large as
# one e4m3 step of one block scale (1.4e-3 to 7.4e-3 on the worst token, every family), so only the exact checks see it.
CAUGHT_BY_NUMERICS = {
    "torch": set(MUTATIONS),
    "triton": {"experts swapped", "gate/up swapped", "row misplaced"},
}
LAYOUT_PROBLEM = {  # what the layout check names (expert 3 everywhere)
    "block scale +1 step": "w2_weight_scale: expert 3, source row 5 of down_proj weight_scale differs",
    "experts swapped": "w13_weight: expert 3, source row 0 of up_proj weight differs",
    "gate/up swapped": "w13_weight: expert 0, source row 0 of up_proj weight differs",
    "row misplaced": "w13_weight: expert 3, source row 5 of up_proj weight differs",
}


@pytest.fixture(scope="module")
def good(example_factory, tmp_path_factory):
    src = example_factory("qwen3_moe", "modelopt")
    dst = tmp_path_factory.mktemp("mut") / "good"
    convert_checkpoint(src, dst)
    return src, dst


def _verify(capsys, dst, *args) -> tuple[int, dict]:
    code = main(["verify", str(dst), "--layers", "1", "--tokens", "16", "--json", *map(str, args)])
    return code, json.loads(capsys.readouterr().out)


def _backend_args(kind: str, monkeypatch) -> list[str]:
    if kind == "triton" and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        return ["--backend", "triton", "--device", "cpu"]
    return ["--backend", kind]


# torch on the CPU; Triton on the GPU where there is one (then it is a `gpu` test, run by scripts/gpu_suite.sh's
# verify stage), else under the interpreter
ON_GPU = [pytest.mark.gpu] if torch.cuda.is_available() else []
BACKEND_CASES = ["torch", pytest.param("triton", marks=ON_GPU)]


@pytest.mark.parametrize("backend", BACKEND_CASES)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mutation_fails_verify(good, tmp_path, capsys, monkeypatch, mutation, backend):
    src, clean = good
    dst = tmp_path / "bad"
    shutil.copytree(clean, dst)
    rewrite(dst, MUTATIONS[mutation], PREFIX)
    extra = _backend_args(backend, monkeypatch)

    code, report = _verify(capsys, dst, "--source", src, *extra)
    status = {c["name"]: c for c in report["checks"]}
    assert code == 1 and status["structure"]["status"] == "pass"  # shapes, scalars and manifest still consistent
    assert status["layout"]["status"] == "fail"
    assert status["layout"]["problems"] == [PREFIX + LAYOUT_PROBLEM[mutation] + " after un-shuffling"]

    # the numerics check on its own
    code, report = _verify(capsys, dst, "--source", src, "--check", "numerics", *extra)
    (n,) = report["numerics"]
    th = BACKENDS[backend].thresholds["nvfp4"]
    if mutation in CAUGHT_BY_NUMERICS[backend]:
        assert code == 1 and not n["passed"], n
    else:  # below the kernel's own noise: passes numerics, and only the exact checks above catch it
        assert code == 0 and n["passed"] and 0 < n["rel_l2"] and n["token_rel_l2"] < th.max_token_rel_l2, n


@pytest.mark.parametrize("backend", BACKEND_CASES)
def test_clean_checkpoint_passes_with_margin(good, capsys, monkeypatch, backend):
    """The same run on the undamaged checkpoint: far inside the thresholds the mutations break."""
    src, dst = good
    code, report = _verify(capsys, dst, "--source", src, "--check", "numerics", *_backend_args(backend, monkeypatch))
    (n,) = report["numerics"]
    th = BACKENDS[backend].thresholds["nvfp4"]
    assert code == 0 and n["passed"]
    assert n["rel_l2"] <= th.max_rel_l2 / 100 and n["token_rel_l2"] <= th.max_token_rel_l2 / 100, n


def test_flipped_byte_without_source_is_not_shown_as_compared(good, tmp_path, capsys):
    """Without --source the torch backend would compare the checkpoint with itself: the numerics check says it did
    not run (never a row of rel-L2 0 and "yes"), and with --no-hash nothing reads the flipped byte at all."""
    _, clean = good
    dst = tmp_path / "flipped"
    shutil.copytree(clean, dst)
    rewrite(dst, lambda t, p: MUTATIONS["block scale +1 step"](t, p), PREFIX)  # as good as any changed byte
    code, report = _verify(capsys, dst, "--no-hash")
    status = {c["name"]: c for c in report["checks"]}
    assert code == 0 and report["numerics"] == []
    assert status["numerics"]["status"] == "skip" and "checkpoint itself" in status["numerics"]["summary"]
    assert status["layout"]["status"] == "skip" and "sha256 skipped" in status["structure"]["summary"]
    code = main(["verify", str(dst), "--no-hash", "--layers", "1", "--tokens", "16"])
    out = capsys.readouterr().out
    assert code == 0 and "yes" not in out and "not run" in " ".join(out.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--check", "layout"], "nothing to check: --check layout compares with the source: give --source SRC"),
        (["--check", "structure", "--skip", "structure"], "no check selected (--check and --skip leave none)"),
        (["--check", "numerics"], "nothing to check: --check numerics without --source would compare the checkpoint with itself"),
        (["--check", "layout", "--check", "numerics"], "--check layout compares with the source"),
    ],
)
def test_selections_that_check_nothing_are_usage_errors(good, capsys, args, message):
    _, dst = good
    code = main(["verify", str(dst), *args])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=ON_GPU)])
def test_triton_without_source_says_what_it_compares(good, capsys, monkeypatch, backend):
    """A kernel backend without --source still checks something (the kernel reads the stored layout as the
    un-shuffle does), and the summary says that this is not a comparison with the source."""
    _, dst = good
    code, report = _verify(capsys, dst, "--check", "numerics", *_backend_args(backend, monkeypatch))
    status = {c["name"]: c for c in report["checks"]}
    assert code == 0 and status["numerics"]["status"] == "pass" and report["numerics"][0]["reference"] == "converted"
    assert "reference: the converted weights themselves" in status["numerics"]["summary"]
