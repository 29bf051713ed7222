"""verify --gsm8k: answer extraction and scoring, data loading, the whole-model runner, and the end-to-end check on
the tiny example model (CPU, torch backend)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvfp4ckpt import convert_checkpoint
from nvfp4ckpt.layouts.trtllm_gen import transform as layout
from nvfp4ckpt.source.checkpoint import open_checkpoint
from nvfp4ckpt.cli import main
from nvfp4ckpt.source.stacked import read_layer_source
from nvfp4ckpt.errors import InputError
from nvfp4ckpt.eval.gsm8k import (
    CPU_THREADS,
    Answer,
    Divergence,
    Gsm8kReport,
    QuestionResult,
    SideSummary,
    agreement_rate,
    answers_agree,
    build_prompts,
    decide,
    extract_flexible,
    extract_strict,
    first_divergence,
    load_gsm8k,
    numbers_equal,
    reference_answer,
    run_gsm8k,
    score_completion,
)
from nvfp4ckpt.eval.model_runner import (
    FusedExperts,
    FusedMoEBlock,
    Generation,
    build_skeleton,
    load_converted_model,
    load_source_model,
    load_tokenizer,
    load_weights,
)
from nvfp4ckpt.quant import dequantize
from tests.conftest import ARCHS, swap_gate_up

# The workspace's ../shared/data/gsm8k when present, else the copy in tests/data/gsm8k (same files, MIT, with
# their LICENSE and SHA256SUMS), so a clean clone anywhere runs these tests.
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
DATA = _SHARED if (_SHARED / "test.jsonl").is_file() else Path(__file__).resolve().parent / "data" / "gsm8k"
needs_data = pytest.mark.skipif(not (DATA / "test.jsonl").is_file(), reason="no GSM8K data (tests/data/gsm8k)")
FAST = dict(num_shots=2, num_questions=4, max_new_tokens=24, device="cpu")


@pytest.fixture(scope="module")
def pair(example_factory, tmp_path_factory):
    """(source, converted) of the tiny example, per (arch, format); treat as read-only."""
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def make(arch: str = "qwen3_moe", fmt: str = "modelopt") -> tuple[Path, Path]:
        if (arch, fmt) not in cache:
            src = example_factory(arch, fmt)
            dst = tmp_path_factory.mktemp(f"gsm8k-{arch}-{fmt}") / "conv"
            convert_checkpoint(src, dst)
            cache[arch, fmt] = (src, dst)
        return cache[arch, fmt]

    return make


def _rewrite(dst: Path, edit) -> None:
    """Edit the tensors of a converted checkpoint in place (header metadata kept; the manifest is not updated,
    which only the structure check, not run by --check gsm8k, would notice)."""
    for f in dst.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            meta = sf.metadata()
        tensors = load_file(f)
        if edit(tensors):
            save_file(tensors, f, metadata=meta)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, " ".join(cap.err.split())


# ----------------------------------------------------------------------------------------------
# extraction and scoring


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" Natalia sold 48/2 = 24 clips in May. 48+24 = 72 clips altogether.", "72"),
        (" The total is $1,234.50.", "1234.50"),
        (" He paid $12,000 for it", "12000"),
        (" The temperature dropped to -5 degrees", "-5"),
        (" The change is 12 = -3.5", "-3.5"),
        (" she has 5-3", "3"),  # a subtraction, not a negative number
        (" 10 - 3 = 7", "7"),
        (" so the answer is 18.\n\n", "18"),
        (" half of it is .5 cups", ".5"),
        (" She has 2,125 apples in 3 boxes", "3"),
        (" #### 1,000", "1000"),
        (" I do not know.", None),
        ("", None),
    ],
)
def test_flexible_extraction(completion, expected):
    assert extract_flexible(completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" 16 - 3 - 4 = 9 eggs. 9 * 2 = $18\n#### 18", "18"),
        (" ...\n#### 1,000.", "1000"),
        (" #### $1,000", None),  # lm-eval's pattern takes no "$" after "#### "
        (" #### -3\nQuestion", "-3"),
        (" #### 5 and later #### 6", "5"),  # lm-eval takes the first match
        (" The answer is 72", None),
        (" ####72", None),  # lm-eval's pattern needs the space
    ],
)
def test_strict_extraction(completion, expected):
    assert extract_strict(completion) == expected


def test_reference_answers_and_number_equality():
    assert reference_answer("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18") == "18"
    assert reference_answer("...\n#### 1,234") == "1234"
    assert reference_answer("...\n#### -3") == "-3"
    assert reference_answer("no final answer") is None
    assert numbers_equal("18.00", "18") and numbers_equal(".5", "0.5") and numbers_equal("-3", "-3.0")
    assert not numbers_equal("18", "180") and not numbers_equal(None, "18") and not numbers_equal("-3", "3")


def test_score_completion_flexible_and_strict():
    a = score_completion(" 9 * 2 = $18 every day.\n#### 18", "18", 12, "stop")
    assert (a.answer, a.strict_answer, a.correct, a.strict_correct, a.num_tokens) == ("18", "18", True, True, 12)
    b = score_completion(" She makes $18.00 a day.", "18")  # flexible only: no "#### N"
    assert b.correct and not b.strict_correct and b.strict_answer is None
    c = score_completion(" #### 18\nThen 3 more.", "18")  # strict finds 18, flexible takes the last number
    assert c.strict_correct and not c.correct and c.answer == "3"
    d = score_completion(" no idea", "18")
    assert d.answer is None and not d.correct and not d.strict_correct


def _answer(completion: str, target: str = "18") -> Answer:
    return score_completion(completion, target)


def test_agreement_rules():
    assert answers_agree(_answer(" 18"), _answer(" it is 18.0")) is True
    assert answers_agree(_answer(" 18"), _answer(" 17")) is False
    assert answers_agree(_answer(" 18"), _answer(" none")) is False
    # both invalid: neither agreement nor disagreement of answers, whatever the completions (counted apart)
    assert answers_agree(_answer(" none"), _answer(" none")) is None
    assert answers_agree(_answer(" none"), _answer(" nothing")) is None
    pairs = [(_answer(" 18"), _answer(" 18")), (_answer(" 18"), _answer(" 17")), (_answer(" x"), _answer(" y"))]
    assert agreement_rate(pairs) == 0.5 and agreement_rate(pairs[2:]) is None


def _report(conv_correct: list[bool], src_correct: list[bool] | None, baseline: float | None = None) -> Gsm8kReport:
    n = len(conv_correct)
    side = lambda name, flags: SideSummary(name, "x", "torch", "hf", "nvfp4", n, sum(flags), 0, 0, 10 * n, 1.0, 0.0)  # noqa: E731
    questions = []
    for i, ok in enumerate(conv_correct):
        q = QuestionResult(i, "18", _answer(" 18" if ok else " 17"))
        if src_correct is not None:
            q.source = _answer(" 18" if src_correct[i] else " 17")
        questions.append(q)
    return Gsm8kReport("conv", "src", {}, side("converted", conv_correct), side("source", src_correct) if src_correct else None, baseline, questions=questions)


def test_pass_fail_rules():
    same = _report([True] * 90 + [False] * 10, [True] * 90 + [False] * 10)
    checks = {c.name: c.status for c in decide(same, tolerance=1.0, min_accuracy=None, min_agreement=1.0)}
    assert checks == {"gsm8k-accuracy": "pass", "gsm8k-agreement": "pass"}
    assert same.agreement == 1.0 and same.difference_stderr == 0.0

    worse = _report([True] * 88 + [False] * 12, [True] * 90 + [False] * 10)  # 2 points lower, 98% agreement
    checks = {c.name: c.status for c in decide(worse, tolerance=1.0, min_accuracy=None, min_agreement=0.8)}
    assert checks == {"gsm8k-accuracy": "fail", "gsm8k-agreement": "pass"}
    checks = {c.name: c.status for c in decide(worse, tolerance=2.0, min_accuracy=None, min_agreement=0.99)}
    assert checks == {"gsm8k-accuracy": "pass", "gsm8k-agreement": "fail"}
    assert worse.problems("gsm8k-agreement")[0] == "question 88: converted answer '17', source answer '18' (reference 18)"
    checks = {c.name: c.status for c in decide(worse, tolerance=1.0, min_accuracy=85.0, min_agreement=0.8)}
    assert checks["gsm8k-accuracy"] == "pass"  # at least --min-accuracy

    base = _report([True] * 89 + [False] * 11, None, baseline=89.5)
    checks = {c.name: c.status for c in decide(base, tolerance=1.0, min_accuracy=None, min_agreement=None)}
    assert checks == {"gsm8k-accuracy": "pass", "gsm8k-agreement": "skip"}
    checks = {c.name: c.status for c in decide(base, tolerance=0.25, min_accuracy=None, min_agreement=None)}
    assert checks["gsm8k-accuracy"] == "fail"


def _generation(tokens: list[int], tops: list[list[tuple[int, float]]], eos: int | None = None) -> Generation:
    """A completion with its recorded top logits: ``tops[step] = [(token, logit), ...]``, largest first."""
    g = Generation("", tokens, "eos" if eos is not None else "length", eos)
    g.top_ids = np.array([[t for t, _ in row] for row in tops])
    g.top_logits = np.array([[v for _, v in row] for row in tops], dtype=np.float32)
    return g


def test_first_divergence_names_the_token_and_the_logits():
    same = [[(5, 2.0), (7, 1.0)], [(9, 3.0), (5, 0.5)]]
    assert first_divergence(_generation([5, 9], same), _generation([5, 9], same)) is None
    conv = _generation([5, 7], [[(5, 2.0), (7, 1.0)], [(7, 1.5), (9, 1.25)]])
    src = _generation([5, 9], [[(5, 2.0), (7, 1.0)], [(9, 1.5), (7, 1.25)]])
    d = first_divergence(conv, src, text_of=lambda t: f"<{t}>")
    assert (d.step, d.converted_token, d.source_token, d.converted_text, d.source_text) == (1, 7, 9, "<7>", "<9>")
    assert (d.top_k, d.shared, d.max_logit_difference, d.converted_margin, d.source_margin) == (2, 2, 0.25, 0.25, 0.25)
    assert d.describe() == (
        "completions first differ at generated token 1: converted '<7>' (id 7), source '<9>' (id 9); logits there "
        "differ by up to 0.25 over the 2 tokens in both sides' top 2; converted prefers its token by 0.25; source "
        "prefers its token by 0.25"
    )
    # the token that ends a completion counts: an eos where the other side goes on is where they differ
    ended = _generation([5], [same[0], [(0, 4.0), (9, 3.0)]], eos=0)
    d = first_divergence(ended, _generation([5, 9], same))
    assert (d.step, d.converted_token, d.source_token, d.max_logit_difference, d.source_margin) == (1, 0, 9, 0.0, None)
    assert d.describe().endswith("converted prefers its token by 1; source: the converted token is not in its top 2")


def _invalid_report(n: int) -> Gsm8kReport:
    report = _report([False] * n, [False] * n)
    for q in report.questions:
        q.converted, q.source = _answer(" no number"), _answer(" none here")
    return report


def test_exact_agreement_needs_identical_completions():
    report = _report([False] * 4, [False] * 4)  # both sides answer 17 to everything
    report.exact = True
    for q in report.questions:
        q.identical = True
    (check,) = [c for c in decide(report, tolerance=1.0, min_accuracy=None, min_agreement=1.0) if c.name == "gsm8k-agreement"]
    assert check.status == "pass" and check.summary.startswith("4/4 completions token-identical")
    q = report.questions[2]
    q.identical, q.divergence = False, Divergence(3, 11, 12, "a", "b", 5, 5, 0.0125, 0.0025, 0.005)
    (check,) = [c for c in decide(report, tolerance=1.0, min_accuracy=None, min_agreement=1.0) if c.name == "gsm8k-agreement"]
    assert check.status == "fail" and check.problems == [
        (
            "question 2: completions first differ at generated token 3: converted 'a' (id 11), source 'b' (id 12); "
            "logits there differ by up to 0.0125 over the 5 tokens in both sides' top 5; converted prefers its token "
            "by 0.0025; source prefers its token by 0.005 (answers: converted '17', source '17')"
        )
    ]
    # with a GPU kernel the same answers agree (rounding may change a token), and the divergence is still shown
    report.exact = False
    (check,) = [c for c in decide(report, tolerance=1.0, min_accuracy=None, min_agreement=0.8) if c.name == "gsm8k-agreement"]
    assert check.status == "pass" and check.summary.startswith("100.0% of answers agree (minimum 80%)")


def test_missing_answers_on_both_sides_are_counted_apart():
    report = _invalid_report(3)
    report.questions[0].source = _answer(" 18")
    assert report.agreement == 0.0 and report.no_answer == 2
    (check,) = [c for c in decide(report, tolerance=1.0, min_accuracy=None, min_agreement=0.8) if c.name == "gsm8k-agreement"]
    assert check.status == "fail" and check.problems == ["question 0: converted answer None, source answer '18' (reference 18)"]
    assert "answers agree on 0 of the 1 questions with an answer on either side, 2 without one on either side" in check.summary
    # no answer anywhere (a random model): nothing to compare with a GPU kernel; identical completions still count
    report = _invalid_report(3)
    assert report.agreement is None and report.no_answer == 3
    (check,) = [c for c in decide(report, tolerance=1.0, min_accuracy=None, min_agreement=0.8) if c.name == "gsm8k-agreement"]
    assert check.status == "skip" and check.summary.startswith("no question has an answer on either side")
    report.exact = True
    for q in report.questions:
        q.identical = True
    (check,) = [c for c in decide(report, tolerance=1.0, min_accuracy=None, min_agreement=None) if c.name == "gsm8k-agreement"]
    assert check.status == "pass" and check.summary.startswith("3/3 completions token-identical (minimum 100%")


# ----------------------------------------------------------------------------------------------
# data and prompts


@needs_data
def test_load_shared_data_and_build_prompts():
    train, test = load_gsm8k(DATA)
    assert len(test) == 1319 and len(train) == 7473 and test[0].target == "18"
    prompts, shots = build_prompts(train, test, num_shots=2, num_questions=3)
    assert shots == [0, 1] and [p.id for p in prompts] == [0, 1, 2]
    expected = (
        f"Question: {train[0].question}\nAnswer: {train[0].answer}\n\n"
        f"Question: {train[1].question}\nAnswer: {train[1].answer}\n\n"
        f"Question: {test[1].question}\nAnswer:"
    )
    assert prompts[1].text == expected and prompts[1].target == test[1].target
    drawn, drawn_shots = build_prompts(train, test, num_shots=3, num_questions=5, seed=7)
    again, _ = build_prompts(train, test, num_shots=3, num_questions=5, seed=7)
    assert [p.text for p in drawn] == [p.text for p in again] and len(set(drawn_shots)) == 3
    assert [p.id for p in drawn] == sorted(p.id for p in drawn) and [p.id for p in drawn] != [0, 1, 2, 3, 4]
    everything, _ = build_prompts(train, test, num_shots=0)
    assert len(everything) == 1319 and everything[0].text == f"Question: {test[0].question}\nAnswer:"
    with pytest.raises(InputError, match="--num-shots 8000"):
        build_prompts(train, test, num_shots=8000)


@needs_data
def test_load_single_file_and_bad_inputs(tmp_path):
    train, test = load_gsm8k(DATA / "test.jsonl")  # train.jsonl is found next to it
    assert len(test) == 1319 and len(train) == 7473
    lone = tmp_path / "lone" / "test.jsonl"
    lone.parent.mkdir()
    lone.write_text((DATA / "test.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(InputError, match="no train.jsonl .* --num-shots 0"):
        load_gsm8k(lone)
    assert len(load_gsm8k(lone, need_train=False)[1]) == 1
    with pytest.raises(InputError, match="no test.jsonl"):
        load_gsm8k(tmp_path)
    with pytest.raises(InputError, match="no such file or folder"):
        load_gsm8k(tmp_path / "missing")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(InputError, match="bad.jsonl:1: not a JSON object with 'question' and 'answer'"):
        load_gsm8k(bad, need_train=False)
    bad.write_text('{"question": "q", "answer": "forty-two"}\n')
    with pytest.raises(InputError, match="no '#### N' final answer"):
        load_gsm8k(bad, need_train=False)


def test_offline_without_data_says_to_pass_gsm8k_data(tmp_path, monkeypatch):
    monkeypatch.setenv("NVFP4CKPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached: HF_HUB_OFFLINE (conftest) must fail fast
    with pytest.raises(InputError, match="could not download the GSM8K dataset openai/gsm8k .* pass --gsm8k-data DIR"):
        load_gsm8k(None)


def test_cached_hub_copy_is_used(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "gsm8k"
    cache.mkdir(parents=True)
    row = json.dumps({"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}) + "\n"
    (cache / "train.jsonl").write_text(row)
    (cache / "test.jsonl").write_text(row * 2)
    monkeypatch.setenv("NVFP4CKPT_CACHE", str(tmp_path / "cache"))
    train, test = load_gsm8k(None)
    assert len(train) == 1 and len(test) == 2 and test[1].target == "4"


# ----------------------------------------------------------------------------------------------
# the model runner


def _plain_transformers_model(src_path: Path):
    """The source model in stock transformers: its own fused experts module holding the dequantized expert
    weights (bf16), its own router. Independent of the kernel layout and of nvfp4ckpt's MoE code."""
    src = open_checkpoint(src_path)
    arch, model = build_skeleton(src.config, src.root / "config.json")
    e4m3 = torch.float8_e4m3fn
    for layer in src.layers:
        s = read_layer_source(src, layer)
        ws2 = src.format.to_dequant_multiplier(s["raw_scalars"][:, :, 0])[:, :, None, None]
        i = layer.intermediate_size
        up = dequantize(s["w31"][:, :i], s["s31"][:, :i].view(e4m3), ws2[:, 1])
        gate = dequantize(s["w31"][:, i:], s["s31"][:, i:].view(e4m3), ws2[:, 0])
        down = dequantize(s["down"], s["down_scale"].view(e4m3), ws2[:, 2])
        experts = model.get_submodule(layer.block.replace("block_sparse_moe", "mlp")).experts
        experts.gate_up_proj = torch.nn.Parameter(torch.cat([gate, up], 1).to(torch.bfloat16), requires_grad=False)
        experts.down_proj = torch.nn.Parameter(down.to(torch.bfloat16), requires_grad=False)
    load_weights(model, arch, src.files, src.format.name, torch.device("cpu"))
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_runner_matches_plain_transformers(pair, arch):
    fmt = "compressed-tensors" if arch == "deepseek_v3" else "modelopt"
    src, dst = pair(arch, fmt)
    plain = _plain_transformers_model(src)
    tok = load_tokenizer(dst)
    enc = tok(["Question: Natalia sold 48 clips in April.\nAnswer:", "Question: 2+2?\nAnswer:"], return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        want = plain(**enc).logits.float()[mask]
        for routing, module in (("hf", FusedExperts), ("kernel", FusedMoEBlock)):
            # W4A16 (bf16 activations): the same arithmetic as the plain model up to bf16 rounding inside the MoE.
            conv = load_converted_model(dst, device="cpu", backend="torch", act="bf16", routing=routing)
            assert sum(isinstance(m, module) for m in conv.model.modules()) == 2
            got = conv.model(**enc).logits.float()[mask]
            cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
            rel = (got - want).norm() / want.norm()
            assert cos > 0.999 and rel < 0.05, (routing, float(cos), float(rel))


def test_runner_converted_equals_source_bit_for_bit(pair):
    src, dst = pair("deepseek_v3", "compressed-tensors")
    tok = load_tokenizer(dst)
    enc = tok(["Question: How many eggs?\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        for routing in ("hf", "kernel"):  # kernel: nvfp4ckpt's routing and the shared experts in FusedMoEBlock
            a = load_converted_model(dst, device="cpu", backend="torch", routing=routing).model(**enc).logits
            b = load_source_model(src, device="cpu", routing=routing).model(**enc).logits
            assert torch.equal(a, b)


def test_runner_errors(pair, tmp_path):
    src, dst = pair()
    with pytest.raises(InputError, match="--backend triton needs a CUDA GPU"):
        load_converted_model(dst, device="cpu", backend="triton")
    with pytest.raises(InputError, match="routes inside the kernel"):
        from nvfp4ckpt.eval.model_runner import resolve_routing

        resolve_routing("hf", "trtllm")
    from nvfp4ckpt.eval.fresh import apply_template

    with pytest.raises(InputError, match="no chat template"):
        apply_template(load_tokenizer(dst), ["Question: 1+1?\nAnswer:"], True)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(InputError, match="no tokenizer files .* pass --tokenizer PATH"):
        load_tokenizer(bare)
    assert load_tokenizer(bare, src).pad_token == "<|endoftext|>"


# ----------------------------------------------------------------------------------------------
# end to end


@needs_data
def test_end_to_end_converted_agrees_with_source_token_for_token(pair):
    src, dst = pair()
    report = run_gsm8k(dst, source=src, data=DATA, **FAST)
    assert report.passed, [c for c in report.checks]
    assert report.identical == 1.0 and report.agreement == 1.0
    assert len(report.questions) == 4 and [q.id for q in report.questions] == [0, 1, 2, 3]
    for q in report.questions:
        assert q.identical and q.converted == q.source
        assert q.converted == score_completion(q.converted.completion, q.target, q.converted.num_tokens, q.converted.finish)
        assert 0 < q.converted.num_tokens <= 24 and "Question" not in q.converted.completion
    conv, source = report.converted, report.source_side
    assert conv.backend == source.backend == "torch" and conv.routing == "hf"
    assert conv.correct == sum(q.converted.correct for q in report.questions)
    assert conv.invalid == sum(q.converted.answer is None for q in report.questions)
    assert conv.generated_tokens == sum(q.converted.num_tokens for q in report.questions) > 0
    assert conv.tokens_per_second > 0 and conv.accuracy == source.accuracy
    assert report.settings["fewshot_train_ids"] == [0, 1] and report.settings["min_agreement"] == 1.0


@needs_data
def test_cli_gsm8k_json_report(pair, tmp_path, capsys):
    src, dst = pair("mixtral", "compressed-tensors")
    out = tmp_path / "report.json"
    code, _, err = run(
        capsys, "verify", dst, "--check", "gsm8k", "--source", src, "--gsm8k-data", DATA, "--num-shots", "1",
        "--num-questions", "3", "--max-new-tokens", "16", "--json-out", out,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["passed"] is True and [c["name"] for c in data["checks"]] == ["gsm8k-accuracy", "gsm8k-agreement"]
    g = data["gsm8k"]
    assert g["identical"] == 1.0 and g["converted"]["num_questions"] == 3 and g["source_run"]["backend"] == "torch"
    q = g["questions"][0]
    assert set(q) >= {"id", "target", "converted", "source", "agree", "identical"}
    assert q["converted"]["completion"] == q["source"]["completion"] and "answer" in q["source"]

    # baseline instead of a source run: no agreement check; --min-accuracy alone can fail a random model
    code, out_text, _ = run(
        capsys, "verify", dst, "--check", "gsm8k", "--baseline-accuracy", "0", "--gsm8k-data", DATA,
        "--num-shots", "0", "--num-questions", "2", "--max-new-tokens", "8", "--json",
    )  # fmt: skip
    data = json.loads(out_text)
    assert code == 0 and data["gsm8k"]["source_run"] is None
    assert [c["status"] for c in data["checks"]] == ["pass", "skip"]
    code, _, err = run(
        capsys, "verify", dst, "--check", "gsm8k", "--min-accuracy", "50", "--gsm8k-data", DATA,
        "--num-shots", "0", "--num-questions", "2", "--max-new-tokens", "8", "--quiet",
    )  # fmt: skip
    assert code == 1 and "gsm8k-accuracy check failed" in err


@needs_data
def test_swapped_gate_and_up_fail_the_agreement_check(pair, tmp_path, capsys):
    src, good = pair()
    dst = tmp_path / "swapped"
    shutil.copytree(good, dst)

    _rewrite(dst, swap_gate_up)
    report_path = tmp_path / "r.json"
    code, _, err = run(
        capsys, "verify", dst, "--check", "gsm8k", "--source", src, "--gsm8k-data", DATA, "--num-shots", "2",
        "--num-questions", "4", "--max-new-tokens", "24", "--quiet", "--json-out", report_path,
    )  # fmt: skip
    assert code == 1 and "gsm8k-agreement check failed: question 0: completions first differ at generated token" in err
    data = json.loads(report_path.read_text())
    status = {c["name"]: c["status"] for c in data["checks"]}
    assert status == {"gsm8k-accuracy": "pass", "gsm8k-agreement": "fail"}  # accuracy of a random model says nothing
    # every question says where its completions part and what the logits were there
    for q in data["gsm8k"]["questions"]:
        d = q["divergence"]
        assert not q["identical"] and d["top_k"] == 5 and d["converted_token"] != d["source_token"]
        assert d["step"] < q["converted"]["num_tokens"] + 1
    # the same corruption also fails with a GPU kernel's looser default threshold (80%)
    report = run_gsm8k(dst, source=src, data=DATA, min_agreement=0.8, **FAST)
    assert not report.passed and report.agreement < 0.5 and report.identical == 0.0


@needs_data
def test_gsm8k_runs_after_the_other_checks(pair, capsys):
    src, dst = pair()
    code, out, _ = run(
        capsys, "verify", dst, "--gsm8k", "--source", src, "--gsm8k-data", DATA, "--num-shots", "0",
        "--num-questions", "2", "--max-new-tokens", "8", "--tokens", "8", "--no-hash", "--json",
    )  # fmt: skip
    data = json.loads(out)
    assert code == 0 and [c["name"] for c in data["checks"]] == ["structure", "layout", "numerics", "gsm8k-accuracy", "gsm8k-agreement"]


def _without_timings(value):
    """A report with its wall-clock fields (seconds, tokens per second) left out: everything else must repeat."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if "seconds" not in k and "per_second" not in k}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@needs_data
def test_verify_gsm8k_gives_the_same_report_every_time(pair, tmp_path, capsys):
    """Issue #26: the same `verify --gsm8k` (structure, layout and numerics first, in the same process) gave
    different verdicts on the same files, 2 runs in 8; each GSM8K side now runs in a fresh process."""
    src, dst = pair()
    reports = []
    for n in range(3):
        out = tmp_path / f"report{n}.json"
        code, _, err = run(
            capsys, "verify", dst, "--source", src, "--gsm8k", "--gsm8k-data", DATA, "--num-questions", "4",
            "--num-shots", "2", "--max-new-tokens", "16", "--backend", "torch", "--quiet", "--json-out", out,
        )  # fmt: skip
        assert code == 0, err
        reports.append(_without_timings(json.loads(out.read_text())))
    assert reports[1] == reports[0] and reports[2] == reports[0]
    data = reports[0]
    assert [c["name"] for c in data["checks"]] == ["structure", "layout", "numerics", "gsm8k-accuracy", "gsm8k-agreement"]
    g = data["gsm8k"]
    assert g["exact"] is True and g["identical"] == 1.0 and all(q["divergence"] is None for q in g["questions"])
    assert g["settings"]["numerics"] == {
        "process": "fresh per side", "threads": CPU_THREADS, "deterministic_algorithms": True,
        "float32_matmul_precision": "highest",
    }  # fmt: skip


@needs_data
def test_usage_and_input_errors_exit_2(pair, tmp_path, capsys):
    src, dst = pair()
    common = ["--check", "gsm8k", "--gsm8k-data", DATA, "--num-questions", "1", "--max-new-tokens", "4"]
    code, _, err = run(capsys, "verify", dst, *common)
    assert code == 2 and "--gsm8k needs a reference: --source SRC" in err
    code, _, err = run(capsys, "verify", dst, *common, "--source", src, "--backend", "triton")
    assert code == 2 and "needs a CUDA GPU" in err
    code, _, err = run(capsys, "verify", dst, *common, "--baseline-accuracy", "250")
    assert code == 2 and "percentage" in err
    code, _, err = run(capsys, "verify", src, *common, "--baseline-accuracy", "0")
    assert code == 2 and "not a converted checkpoint" in err

    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(dst, no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / name).unlink()
    code, _, err = run(capsys, "verify", no_tok, *common, "--baseline-accuracy", "0")
    assert code == 2 and "no tokenizer files" in err and "--tokenizer PATH" in err
    code, _, _ = run(capsys, "verify", no_tok, *common, "--baseline-accuracy", "0", "--tokenizer", src, "--quiet")
    assert code == 0

    other = tmp_path / "other-family"
    shutil.copytree(dst, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt_oss"
    (other / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "verify", other, *common, "--baseline-accuracy", "0")
    assert code == 2 and "model_type 'gpt_oss' is not supported" in err
