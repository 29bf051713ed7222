"""verify --gsm8k's defaults by device and its time estimate (issue 25): the plan is printed before anything loads,
each side's time at most a few decode steps in, measured on the run itself; the clock changes no token."""

from __future__ import annotations

import re

import pytest

from nvfp4ckpt import convert_checkpoint, write_example
from nvfp4ckpt.cli import main
from nvfp4ckpt.eval.gsm8k import (
    CPU_MAX_NEW_TOKENS,
    CPU_NUM_QUESTIONS,
    GPU_MAX_NEW_TOKENS,
    estimate_message,
    estimate_seconds,
    plan_message,
    resolve_limits,
    run_gsm8k,
)
from tests.test_gsm8k import DATA, needs_data


def test_limits_by_device():
    assert resolve_limits("cuda", None, None) == (None, GPU_MAX_NEW_TOKENS, [])  # the benchmark as published
    assert resolve_limits("cpu", None, None) == (CPU_NUM_QUESTIONS, CPU_MAX_NEW_TOKENS, ["--num-questions", "--max-new-tokens"])
    assert resolve_limits("cpu", 1319, None) == (1319, CPU_MAX_NEW_TOKENS, ["--max-new-tokens"])
    assert resolve_limits("cpu", 4, 8) == (4, 8, [])


def test_estimate_is_an_upper_bound_of_its_model():
    # 7 batches, each as long to prefill as the first, every question running to the token limit
    assert estimate_seconds(1.0, 0.02, 7, 256) == pytest.approx(7 * (1.0 + 255 * 0.02))
    message = estimate_message("converted", 1.0, 0.02, 4, 7, 256)
    assert message.startswith("GSM8K converted side: at most 43 s (7 batches") and "--num-questions N" in message
    assert "at most 2.2 h" in estimate_message("source", 10.0, 0.5, 4, 30, 512)


def test_plan_names_the_cpu_defaults_and_how_to_change_them():
    text = plan_message(50, 5, 256, 8, "cpu", True, ["--num-questions", "--max-new-tokens"])
    assert "50 questions" in text and "the converted side, then the source side" in text
    assert "set --num-questions and --max-new-tokens to change them" in text
    assert "CPU defaults" not in plan_message(1319, 5, 512, 64, "cuda:0", False, [])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate")
    write_example(root / "src", arch="qwen3_moe", format="modelopt", seed=2)
    convert_checkpoint(root / "src", root / "conv")
    return root / "src", root / "conv"


@needs_data
def test_run_prints_the_plan_then_each_sides_estimate(pair):
    src, conv = pair
    notes: list[str] = []
    report = run_gsm8k(conv, source=src, data=DATA, num_shots=1, num_questions=4, max_new_tokens=12, device="cpu",
                       batch_size=2, notice=notes.append)  # fmt: skip
    assert report.passed and report.identical == 1.0
    assert len(notes) == 3, notes
    assert notes[0].startswith("GSM8K: 4 questions, 1-shot, at most 12 new tokens each, in batches of 2 on cpu")
    assert notes[1].startswith("GSM8K converted side: at most ") and "(2 batches x" in notes[1]
    assert notes[1].endswith("The source side runs after it.") and notes[2].startswith("GSM8K source side: at most ")
    measured = re.search(r"prefill ([\d.]+) s, (\d+) ms per decode step over (\d+) steps", notes[1])
    assert measured and 1 <= int(measured.group(3)) <= 4


@needs_data
def test_the_clock_changes_no_token(pair):
    from nvfp4ckpt.eval.gsm8k import build_prompts, load_gsm8k
    from nvfp4ckpt.eval.model_runner import generate, load_converted_model

    _, conv = pair
    train, test = load_gsm8k(DATA)
    prompts = [p.text for p in build_prompts(train, test, num_shots=1, num_questions=3)[0]]
    loaded = load_converted_model(conv, device="cpu", backend="torch")
    timings = []
    with_clock, _ = generate(loaded, prompts, max_new_tokens=10, batch_size=2, on_timing=lambda *t: timings.append(t))
    without, _ = generate(loaded, prompts, max_new_tokens=10, batch_size=2)
    assert [g.token_ids for g in with_clock] == [g.token_ids for g in without]
    assert len(timings) == 1 and timings[0][0] > 0 and timings[0][1] > 0  # once, on the first batch


@needs_data
def test_quiet_silences_the_estimate_and_json_keeps_stdout_clean(pair, capsys):
    import json

    src, conv = pair
    args = ["verify", str(conv), "--check", "gsm8k", "--source", str(src), "--gsm8k-data", str(DATA), "--num-shots", "1",
            "--num-questions", "2", "--max-new-tokens", "6"]  # fmt: skip
    assert main(args + ["--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["gsm8k"]["settings"]["max_new_tokens"] == 6
    assert "GSM8K converted side: at most" in err
    assert main(args + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""
