"""GSM8K end to end: accuracy of a converted checkpoint next to its source's, and how often their answers agree.

    from nvfp4ckpt.gsm8k import run_gsm8k
    report = run_gsm8k("qwen3-trtllm", source="Qwen3-30B-A3B-NVFP4", data="tests/data/gsm8k")
    print(report.converted.accuracy, report.source.accuracy, report.agreement, report.passed)

Harness (vLLM's ``tests/evals/gsm8k`` and SGLang's ``bench_sglang.py`` completion mode; lm-eval's ``gsm8k`` task
for the strict score):

- Prompt: ``k`` few-shot examples from the train split, each ``"Question: {q}\\nAnswer: {full answer}\\n\\n"``,
  then ``"Question: {q}\\nAnswer:"``. No chat template unless asked for.
- Greedy decoding, stop strings ``Question``, ``</s>``, ``<|im_end|>`` (and the model's eos); the completion is
  cut before the first stop string.
- Flexible score (the primary one, as vLLM/SGLang): the last number in the completion, after removing ``,`` and
  ``$``, equals the number after ``####`` in the reference (compared as decimals: ``18.00`` == ``18``).
- Strict score (lm-eval ``strict-match``): the first ``#### N`` in the completion, with ``,``, ``$`` and a trailing
  ``.`` removed, equals the reference string.

Pass/fail: ``accuracy`` check: the converted flexible accuracy is within ``tolerance`` points of the source's
(or of ``baseline_accuracy``), or at least ``min_accuracy``. ``agreement`` check (needs the source run):
- torch backend (``Gsm8kReport.exact``): the converted side runs the source's own float32 reference on the
  un-shuffled bytes, so the two sides compute the same numbers; at least ``min_agreement`` (default all) of the
  completions must be token-identical, whatever the answers (a near-uniform random model included). A completion
  that differs is reported with the first differing token and the two sides' logits there.
- GPU kernels: at least ``min_agreement`` (default 80%) of the questions with an answer on either side get the same
  answer. Questions without an answer on either side are counted apart (not a disagreement); with none answered
  the check is skipped.
Both sides run in fresh processes with the same pinned numerics (``eval/fresh.py``), so the same inputs and
options give the same report.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable

from ..progress import TickFn
from ..verify.report import CheckResult, all_passed
from ..runtime.backends import resolve_backend
from ..errors import InputError

STOP_STRINGS = ("Question", "</s>", "<|im_end|>")
HUB_REPO = "openai/gsm8k"
HUB_FILES = {"train": "main/train-00000-of-00001.parquet", "test": "main/test-00000-of-00001.parquet"}
DEFAULT_MIN_AGREEMENT = 0.80
EXACT_MIN_AGREEMENT = 1.0
CACHE_ENV = "NVFP4CKPT_CACHE"
# Torch CPU threads of each side's process on the CPU. One: the CPU runs tiny models, where a second thread saves
# little, and on a busy machine two OpenMP threads wait on each other at every operator (4 questions of the tiny
# model took 3 to 15 s with 2 threads on 2 shared cores, 0.3 s with one); one thread also splits no sum, so the
# numbers do not depend on the machine's core count.
CPU_THREADS = 1
# Defaults by device. A GPU runs the benchmark as published (all 1319 test questions, 512 new tokens). The CPU runs
# only small models, at about 0.3 to 2 s per question and side for the tiny example: the full benchmark would take
# hours, so its defaults are a check of the conversion (with --backend torch every completion must be
# token-identical to the source's, which a wrong byte breaks within a few tokens), not a measure of accuracy.
GPU_MAX_NEW_TOKENS = 512
CPU_NUM_QUESTIONS = 50
CPU_MAX_NEW_TOKENS = 256  # vLLM's, SGLang's and lm-eval's own limit for GSM8K



# ----------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Problem:
    index: int  # line number in its split (0-based): the question's stable id
    question: str
    answer: str  # the full reference solution, ending with "#### N"

    @property
    def target(self) -> str:
        return reference_answer(self.answer)


def read_jsonl(path: Path) -> list[Problem]:
    problems = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text; pass the jsonl files of the grade-school-math repository") from exc
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problems.append(Problem(len(problems), str(row["question"]), str(row["answer"])))
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}:{n + 1}: not a JSON object with 'question' and 'answer'") from None
    if not problems:
        raise InputError(f"{path}: no questions")
    for p in problems:
        if reference_answer(p.answer) is None:
            raise InputError(f"{path}: question {p.index} has no '#### N' final answer; is this GSM8K?")
    return problems


def read_parquet(path: Path) -> list[Problem]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or pass --gsm8k-data with jsonl files") from None
    table = pq.read_table(path, columns=["question", "answer"]).to_pylist()
    return [Problem(i, str(r["question"]), str(r["answer"])) for i, r in enumerate(table)]


def _read_split(path: Path) -> list[Problem]:
    return read_parquet(path) if path.suffix == ".parquet" else read_jsonl(path)


def load_gsm8k(data: str | Path | None = None, *, need_train: bool = True) -> tuple[list[Problem], list[Problem]]:
    """(train, test) problems.

    ``data``: a folder with ``test.jsonl`` (and ``train.jsonl`` for few-shot examples), as in the public
    grade-school-math repository, or one jsonl file with the test split (``train.jsonl`` is then looked for next
    to it). ``None``: the Hub dataset ``openai/gsm8k`` (huggingface-hub; cached).
    """
    if data is None:
        return download_gsm8k()
    path = Path(data).expanduser()
    if path.is_dir():
        test_path = _first(path, ("test.jsonl", "test.parquet", HUB_FILES["test"]))
        if test_path is None:
            raise InputError(f"{path}: no test.jsonl; pass the folder with GSM8K's test.jsonl and train.jsonl (grade_school_math/data)")
        train_path = _first(path, ("train.jsonl", "train.parquet", HUB_FILES["train"]))
    elif path.is_file():
        test_path, train_path = path, _first(path.parent, ("train.jsonl",))
        if train_path == test_path:
            train_path = None
    else:
        raise InputError(f"--gsm8k-data {data}: no such file or folder")
    test = _read_split(test_path)
    train = _read_split(train_path) if train_path is not None else []
    if need_train and not train:
        raise InputError(f"{path}: no train.jsonl for the few-shot examples; put it next to the test split or pass --num-shots 0")
    return train, test


def _first(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nvfp4ckpt")
    return Path(base) / "gsm8k"


def download_gsm8k() -> tuple[list[Problem], list[Problem]]:
    """openai/gsm8k's parquet files through huggingface-hub (its own cache), kept as jsonl in ``cache_dir()``."""
    cache = cache_dir()
    if (cache / "test.jsonl").is_file() and (cache / "train.jsonl").is_file():
        return read_jsonl(cache / "train.jsonl"), read_jsonl(cache / "test.jsonl")
    offline = _offline()
    if not offline:
        _fail_fast_offline()
    try:
        from huggingface_hub import hf_hub_download

        local = {
            split: Path(hf_hub_download(HUB_REPO, name, repo_type="dataset", local_files_only=offline))
            for split, name in HUB_FILES.items()
        }
    except Exception as exc:  # offline, no such file, hub errors: one message
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"could not download the GSM8K dataset {HUB_REPO} from the Hugging Face Hub ({type(exc).__name__}: {reason}); "
            f"{data_hint()}"
        ) from exc
    splits = {split: read_parquet(p) for split, p in local.items()}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for split, problems in splits.items():
            tmp = cache / f".{split}.jsonl.{os.getpid()}"
            tmp.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in problems))
            tmp.replace(cache / f"{split}.jsonl")
    except OSError:
        pass  # a read-only cache is not an error; huggingface-hub keeps its own copy
    return splits["train"], splits["test"]


def data_hint() -> str:
    """What to pass instead of the download; a source checkout has the files in tests/data/gsm8k."""
    hint = "pass --gsm8k-data DIR with test.jsonl and train.jsonl (github.com/openai/grade-school-math, grade_school_math/data)"
    shipped = Path(__file__).resolve().parents[2] / "tests" / "data" / "gsm8k"
    if (shipped / "test.jsonl").is_file():
        hint += f"; this source checkout has them: --gsm8k-data {shipped}"
    return hint


def _offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface-hub reads it once, at its import, which may have been earlier)."""
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def _fail_fast_offline(timeout: float = 3.0) -> None:
    """One TCP connect to the Hub before huggingface-hub's download, which retries for about 25 s when offline."""
    import socket
    from urllib.parse import urlparse

    no_data = data_hint()
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise InputError(f"cannot reach {host}:{port} to download GSM8K ({exc.strerror or exc}); {no_data}") from None


# ----------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class Prompt:
    id: int  # test-split index of the question
    text: str
    target: str


def fewshot_prefix(examples: list[Problem]) -> str:
    return "".join(f"Question: {p.question}\nAnswer: {p.answer}\n\n" for p in examples)


def build_prompts(
    train: list[Problem],
    test: list[Problem],
    *,
    num_shots: int = 5,
    num_questions: int | None = None,
    seed: int | None = None,
) -> tuple[list[Prompt], list[int]]:
    """(prompts, few-shot train indices).

    ``seed=None``: the first ``num_shots`` train problems and the first ``num_questions`` test problems (vLLM's
    choice). An integer seed draws both at random (the same shots for every question; questions kept in order).
    """
    if num_shots < 0:
        raise InputError("--num-shots must be 0 or more")
    if num_shots > len(train):
        raise InputError(f"--num-shots {num_shots}: the train split has {len(train)} problems")
    n = len(test) if num_questions is None else num_questions
    if n < 1:
        raise InputError("--num-questions must be at least 1")
    n = min(n, len(test))
    if seed is None:
        shots = list(range(num_shots))
        questions = list(range(n))
    else:
        rng = random.Random(seed)
        shots = rng.sample(range(len(train)), num_shots)
        questions = sorted(rng.sample(range(len(test)), n))
    prefix = fewshot_prefix([train[i] for i in shots])
    prompts = [Prompt(test[i].index, f"{prefix}Question: {test[i].question}\nAnswer:", test[i].target) for i in questions]
    return prompts, shots


# ----------------------------------------------------------------------------------------------
# Scoring

# A number, with a minus sign only when it is not a subtraction ("5-3" is 5 and 3, " -3" is -3).
_NUMBER = re.compile(r"(?:(?<![\d.])-)?(?:\d+(?:\.\d+)?|\.\d+)")
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval gsm8k strict-match


def reference_answer(answer: str) -> str | None:
    """The number after ``####`` in a reference solution, commas removed (``"#### 1,000"`` -> ``"1000"``)."""
    if "####" not in answer:
        return None
    tail = answer.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")
    m = _NUMBER.search(tail)
    return m.group(0) if m else None


def extract_flexible(completion: str) -> str | None:
    """The last number in the completion after removing ``,`` and ``$`` (None: no number, an invalid answer)."""
    numbers = _NUMBER.findall(completion.replace(",", "").replace("$", ""))
    return numbers[-1] if numbers else None


def extract_strict(completion: str) -> str | None:
    """lm-eval's strict match: the first ``#### N``, normalized like its ``regexes_to_ignore``."""
    m = _STRICT.search(completion)
    return _lm_eval_normalize(m.group(1)) if m else None


def _lm_eval_normalize(text: str) -> str:
    text = text.replace(",", "").replace("$", "")
    text = re.sub(r"(?s).*#### ", "", text)
    return re.sub(r"\.$", "", text).strip().lower()


def _as_decimal(text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    x, y = _as_decimal(a), _as_decimal(b)
    return x is not None and y is not None and x == y


def strict_equal(pred: str | None, target: str) -> bool:
    return pred is not None and pred == _lm_eval_normalize(target)


# ----------------------------------------------------------------------------------------------
# Report


@dataclass
class Answer:
    """One side's answer to one question."""

    completion: str
    answer: str | None  # flexible extraction
    strict_answer: str | None
    correct: bool
    strict_correct: bool
    num_tokens: int
    finish: str


@dataclass
class Divergence:
    """Where two completions of the same prompt first differ: the same tokens before ``step`` (so the same
    context on both sides) and a different choice at it, with the logits both sides saw there."""

    step: int  # 0-based index of the generated token
    converted_token: int | None  # None: that side had already ended
    source_token: int | None
    converted_text: str | None = None  # the token as text (None when no tokenizer was at hand)
    source_text: str | None = None
    top_k: int = 0  # logits recorded per step and side (model_runner.generate's top_logits)
    shared: int = 0  # tokens among both sides' top_k at that step
    max_logit_difference: float | None = None  # largest |converted - source| logit over those shared tokens
    converted_margin: float | None = None  # converted logit of its token minus its logit of the source's token
    source_margin: float | None = None  # source logit of its token minus its logit of the converted's token

    def describe(self) -> str:
        conv = f"{self.converted_text!r} (id {self.converted_token})" if self.converted_token is not None else "(ended)"
        src = f"{self.source_text!r} (id {self.source_token})" if self.source_token is not None else "(ended)"
        out = f"completions first differ at generated token {self.step}: converted {conv}, source {src}"
        if not self.top_k:
            return out
        if self.max_logit_difference is not None:
            out += (
                f"; logits there differ by up to {self.max_logit_difference:.3g} over the {self.shared} tokens in both "
                f"sides' top {self.top_k}"
            )
        else:
            out += f"; no token is in both sides' top {self.top_k}"
        if self.converted_token is None or self.source_token is None:
            return out
        for side, other, margin in (("converted", "source", self.converted_margin), ("source", "converted", self.source_margin)):
            if margin is not None:
                out += f"; {side} prefers its token by {margin:.3g}"
            else:
                out += f"; {side}: the {other} token is not in its top {self.top_k}"
        return out


def first_divergence(conv, src, text_of=None) -> Divergence | None:
    """The first step where two ``model_runner.Generation`` of the same prompt differ (None: token-identical,
    the token that ended them included). ``text_of``: token id -> text, for the report."""
    a, b = conv.steps, src.steps
    step = next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if step is None:
        if len(a) == len(b):
            return None
        step = min(len(a), len(b))
    ta = a[step] if step < len(a) else None
    tb = b[step] if step < len(b) else None
    d = Divergence(step, ta, tb)
    if text_of is not None:
        d.converted_text = text_of(ta) if ta is not None else None
        d.source_text = text_of(tb) if tb is not None else None
    if conv.top_ids is None or src.top_ids is None or step >= min(len(conv.top_ids), len(src.top_ids)):
        return d
    cl = {int(t): float(v) for t, v in zip(conv.top_ids[step], conv.top_logits[step]) if t >= 0}
    sl = {int(t): float(v) for t, v in zip(src.top_ids[step], src.top_logits[step]) if t >= 0}
    shared = cl.keys() & sl.keys()
    d.top_k, d.shared = conv.top_ids.shape[-1], len(shared)
    d.max_logit_difference = max((abs(cl[t] - sl[t]) for t in shared), default=None)
    if ta is not None and tb is not None:
        d.converted_margin = cl[ta] - cl[tb] if ta in cl and tb in cl else None
        d.source_margin = sl[tb] - sl[ta] if ta in sl and tb in sl else None
    return d


@dataclass
class QuestionResult:
    id: int  # test-split index
    target: str
    converted: Answer
    source: Answer | None = None
    identical: bool | None = None  # the same generated tokens on both sides, the ending one included (None: no source run)
    divergence: Divergence | None = None  # where the two completions first differ (None: identical, or no source run)

    @property
    def agree(self) -> bool | None:
        """Whether the two answers are the same number; None without a source run, and when neither side gave one."""
        return None if self.source is None else answers_agree(self.converted, self.source)

    def to_dict(self) -> dict:
        return {**asdict(self), "agree": self.agree}


def answers_agree(a: Answer, b: Answer) -> bool | None:
    """Same extracted answer (compared as decimals); None when neither has one: two missing answers are not two
    answers that agree, nor two that disagree (they are counted apart, as invalid on both sides)."""
    if a.answer is None and b.answer is None:
        return None
    return numbers_equal(a.answer, b.answer)


def agreement_rate(pairs) -> float | None:
    """Fraction of (answer, answer) pairs that agree, over the pairs where at least one side has an answer."""
    flags = [f for f in (answers_agree(a, b) for a, b in pairs) if f is not None]
    return sum(flags) / len(flags) if flags else None


@dataclass
class SideSummary:
    side: str  # "converted" | "source"
    path: str
    backend: str
    routing: str
    act: str
    num_questions: int
    correct: int
    strict_correct: int
    invalid: int
    generated_tokens: int
    seconds: float
    load_seconds: float

    @property
    def accuracy(self) -> float:
        """Flexible accuracy in percent."""
        return 100.0 * self.correct / max(1, self.num_questions)

    @property
    def strict_accuracy(self) -> float:
        return 100.0 * self.strict_correct / max(1, self.num_questions)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def seconds_per_question(self) -> float:
        return self.seconds / max(1, self.num_questions)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "accuracy": self.accuracy,
            "strict_accuracy": self.strict_accuracy,
            "tokens_per_second": self.tokens_per_second,
            "seconds_per_question": self.seconds_per_question,
        }


@dataclass
class Gsm8kReport:
    path: str
    source: str | None
    settings: dict
    converted: SideSummary
    source_side: SideSummary | None = None
    baseline_accuracy: float | None = None
    checks: list[CheckResult] = field(default_factory=list)  # gsm8k-accuracy, gsm8k-agreement
    questions: list[QuestionResult] = field(default_factory=list)
    seconds: float = 0.0
    # True when the converted side runs the source's own float32 reference (--backend torch): the two sides then
    # compute the same numbers, and agreement means token-identical completions (see ``decide``).
    exact: bool = False

    @property
    def passed(self) -> bool:
        return all_passed(self.checks)

    @property
    def reference_accuracy(self) -> float | None:
        if self.baseline_accuracy is not None:
            return self.baseline_accuracy
        return self.source_side.accuracy if self.source_side is not None else None

    @property
    def agreement(self) -> float | None:
        """Fraction of questions whose answers agree, over those with an answer on at least one side (None without
        a source run, or when no question has an answer on either side)."""
        flags = [q.agree for q in self.questions if q.agree is not None]
        return sum(flags) / len(flags) if flags else None

    @property
    def no_answer(self) -> int:
        """Questions without an answer on either side (left out of ``agreement``)."""
        return sum(q.source is not None and q.agree is None for q in self.questions)

    @property
    def identical(self) -> float | None:
        """Fraction of questions with token-for-token identical completions."""
        flags = [q.identical for q in self.questions if q.identical is not None]
        return sum(flags) / len(flags) if flags else None

    @property
    def difference_stderr(self) -> float | None:
        """Standard error (points) of the paired accuracy difference, from the discordant questions."""
        if self.source_side is None or not self.questions:
            return None
        n = len(self.questions)
        d = [int(q.converted.correct) - int(q.source.correct) for q in self.questions if q.source is not None]
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
        return 100.0 * math.sqrt(var / n)

    def problems(self, check: str) -> list[str]:
        """Details of the agreement check: the questions whose completions differ (``exact``) or whose answers
        disagree, each with where the completions first differ when that is known."""
        if check != "gsm8k-agreement":
            return []
        out = []
        for q in self.questions:
            if self.exact and q.identical is False:
                line = f"question {q.id}: " + (q.divergence.describe() if q.divergence else "completions differ")
                out.append(line + f" (answers: converted {q.converted.answer!r}, source {q.source.answer!r})")
            elif not self.exact and q.agree is False:
                line = f"question {q.id}: converted answer {q.converted.answer!r}, source answer {q.source.answer!r} (reference {q.target})"
                out.append(line + (f"; {q.divergence.describe()}" if q.divergence else ""))
        return out

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "source": self.source,
            "passed": self.passed,
            "settings": self.settings,
            "converted": self.converted.to_dict(),
            "source_run": self.source_side.to_dict() if self.source_side else None,
            "baseline_accuracy": self.baseline_accuracy,
            "reference_accuracy": self.reference_accuracy,
            "exact": self.exact,
            "agreement": self.agreement,
            "no_answer": self.no_answer,
            "identical": self.identical,
            "difference_stderr": self.difference_stderr,
            "checks": [asdict(c) for c in self.checks],
            "seconds": self.seconds,
            "questions": [q.to_dict() for q in self.questions],
        }


def score_completion(completion: str, target: str, num_tokens: int = 0, finish: str = "length") -> Answer:
    flex = extract_flexible(completion)
    strict = extract_strict(completion)
    return Answer(completion, flex, strict, numbers_equal(flex, target), strict_equal(strict, target), num_tokens, finish)


def decide(
    report: Gsm8kReport,
    *,
    tolerance: float,
    min_accuracy: float | None,
    min_agreement: float | None,
) -> list[CheckResult]:
    """The pass/fail checks for a finished run (see the module docstring)."""
    checks = []
    acc = report.converted.accuracy
    ref = report.reference_accuracy
    what = "baseline" if report.baseline_accuracy is not None else "source"
    parts, ok = [], []
    if ref is not None:
        parts.append(f"{acc:.2f}% vs {what} {ref:.2f}% (tolerance {tolerance:g} point{'' if tolerance == 1 else 's'})")
        ok.append(abs(acc - ref) <= tolerance + 1e-9)
    if min_accuracy is not None:
        parts.append(f"minimum {min_accuracy:.2f}%")
        ok.append(acc >= min_accuracy - 1e-9)
    checks.append(CheckResult("gsm8k-accuracy", "pass" if any(ok) else "fail", "; ".join(parts) or f"{acc:.2f}%"))
    paired = [q for q in report.questions if q.source is not None]
    if not paired:
        checks.append(CheckResult("gsm8k-agreement", "skip", "no source run (--baseline-accuracy given)"))
        return checks
    problems = report.problems("gsm8k-agreement")
    answered = sum(q.agree is not None for q in paired)
    answers = (
        f"answers agree on {sum(q.agree is True for q in paired)} of the {answered} questions with an answer on "
        f"either side, {report.no_answer} without one on either side"
    )
    if report.exact:
        # The converted side runs the source's own arithmetic on the same bytes: any token that differs is a
        # conversion error (or lost determinism), whatever the answers; a near-uniform random model included.
        need = min_agreement if min_agreement is not None else EXACT_MIN_AGREEMENT
        same = sum(bool(q.identical) for q in paired)
        status = "pass" if same / len(paired) >= need - 1e-12 else "fail"
        summary = f"{same}/{len(paired)} completions token-identical (minimum {100 * need:g}%, exact: torch backend); {answers}"
        checks.append(CheckResult("gsm8k-agreement", status, summary, problems))
        return checks
    need = min_agreement if min_agreement is not None else DEFAULT_MIN_AGREEMENT
    identical = f"{100 * (report.identical or 0):.1f}% of completions identical"
    if report.agreement is None:
        summary = f"no question has an answer on either side: no answers to compare; {identical}"
        checks.append(CheckResult("gsm8k-agreement", "skip", summary))
        return checks
    status = "pass" if report.agreement >= need - 1e-12 else "fail"
    summary = f"{100 * report.agreement:.1f}% of answers agree (minimum {100 * need:g}%): {answers}; {identical}"
    checks.append(CheckResult("gsm8k-agreement", status, summary, problems))
    return checks


def normalize_accuracy(value: float | None, flag: str) -> float | None:
    """Percent; a value of at most 1 is read as a fraction (0.893 -> 89.3)."""
    if value is None:
        return None
    if not 0 <= value <= 100:
        raise InputError(f"{flag} {value}: give a percentage (0-100) or a fraction (0-1)")
    return 100.0 * value if value <= 1.0 else float(value)


# ----------------------------------------------------------------------------------------------
# The run


def validate_options(
    source: object,
    tolerance: float,
    baseline_accuracy: float | None,
    min_accuracy: float | None,
    min_agreement: float | None,
) -> None:
    """Usage errors of a GSM8K run, raised before anything is loaded."""
    if tolerance < 0:
        raise InputError("--tolerance must be 0 or more")
    normalize_accuracy(baseline_accuracy, "--baseline-accuracy")
    normalize_accuracy(min_accuracy, "--min-accuracy")
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise InputError(f"--min-agreement {min_agreement}: give a fraction between 0 and 1")
    if source is None and baseline_accuracy is None and min_accuracy is None:
        raise InputError("--gsm8k needs a reference: --source SRC (run it too), --baseline-accuracy X or --min-accuracy X")



def run_gsm8k(
    converted: str | Path,
    *,
    source: str | Path | None = None,
    data: str | Path | None = None,
    num_shots: int = 5,
    num_questions: int | None = None,
    seed: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    backend: str = "auto",
    act: str = "nvfp4",
    routing: str = "auto",
    device: str | None = None,
    tokenizer: str | Path | None = None,
    chat_template: bool = False,
    tolerance: float = 1.0,
    baseline_accuracy: float | None = None,
    min_accuracy: float | None = None,
    min_agreement: float | None = None,
    stop_strings: tuple[str, ...] = STOP_STRINGS,
    progress: TickFn | None = None,
    threads: int | None = None,
    notice: Callable[[str], None] | None = None,
) -> Gsm8kReport:
    """Run GSM8K on the converted checkpoint and (unless ``baseline_accuracy``) on its source; see the module doc.

    Accuracies are percentages (``baseline_accuracy``/``min_accuracy`` also accept fractions <= 1). The source side
    runs the same transformers model with the un-converted expert tensors through the float32 torch reference, with
    the same routing mode as the converted side. ``min_agreement`` defaults to 1.0 with the torch backend and 0.8
    otherwise. ``threads``: torch's CPU threads in both sides' processes (default 1 on the CPU: see
    ``CPU_THREADS``; on a GPU, this process's count). ``num_questions``/``max_new_tokens`` default by device (see
    ``CPU_NUM_QUESTIONS``). ``notice``: one-line messages for the user before and early in the run: what will run,
    and the time it will take at most, measured on each side's first decode steps (``estimate_message``).
    """
    from .._lazy import require

    for package in ("torch", "transformers"):  # one-line error naming the extra, before any work
        require(package)
    import torch

    from . import model_runner as mr
    from .fresh import SideJob, run_side

    start = time.perf_counter()
    validate_options(source, tolerance, baseline_accuracy, min_accuracy, min_agreement)
    if threads is not None and threads < 1:
        raise InputError("threads must be at least 1")
    baseline_accuracy = normalize_accuracy(baseline_accuracy, "--baseline-accuracy")
    min_accuracy = normalize_accuracy(min_accuracy, "--min-accuracy")
    run_source = source is not None and baseline_accuracy is None

    dev = mr.resolve_device(device)
    chosen = resolve_backend(backend, act, dev)
    mode = mr.resolve_routing(routing, chosen)
    batch = batch_size or (64 if dev.type == "cuda" else 8)
    num_questions, max_new_tokens, cpu_defaults = resolve_limits(dev.type, num_questions, max_new_tokens)
    train, test = load_gsm8k(data, need_train=num_shots > 0)
    prompts, shots = build_prompts(train, test, num_shots=num_shots, num_questions=num_questions, seed=seed)
    tick = progress or (lambda stage, done, total: None)
    say = notice or (lambda message: None)
    say(plan_message(len(prompts), num_shots, max_new_tokens, batch, str(dev), run_source, cpu_defaults))
    batches = -(-len(prompts) // batch)

    def timing(side: str):
        then = " The source side runs after it." if side == "converted" and run_source else ""
        return lambda prefill, per_step, steps: say(
            estimate_message(side, prefill, per_step, steps, batches, max_new_tokens) + then
        )

    conv_root = _converted_root(converted, tokenizer)
    # Both sides: the same prompts, tokenizer, end-of-sequence ids, batches and numerics, each in a fresh process
    # (eval/fresh.py says why), one after the other.
    job = SideJob(
        side="converted", path=str(conv_root), device=str(dev), backend=chosen, act=act, routing=mode,
        tokenizer=str(tokenizer) if tokenizer else str(conv_root), eos_root=str(conv_root),
        prompts=[p.text for p in prompts], chat_template=chat_template, max_new_tokens=max_new_tokens,
        batch_size=batch, stop_strings=list(stop_strings),
        threads=threads or (CPU_THREADS if dev.type == "cpu" else torch.get_num_threads()),
    )  # fmt: skip
    conv = run_side(job, tick, timing("converted"))
    settings = {
        "num_shots": num_shots,
        "fewshot_train_ids": shots,
        "num_questions": len(prompts),
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch,
        "stop_strings": list(stop_strings),
        "chat_template": chat_template,
        "data": str(data) if data is not None else f"hf://datasets/{HUB_REPO}",
        "device": str(dev),
        "device_name": torch_device_name(dev),
        "backend": chosen,
        "routing": mode,
        "act": act,
        "tokenizer": job.tokenizer,
        "tolerance": tolerance,
        "min_accuracy": min_accuracy,
        "min_agreement": min_agreement if min_agreement is not None else (EXACT_MIN_AGREEMENT if chosen == "torch" else DEFAULT_MIN_AGREEMENT),
        "numerics": conv.numerics,
        "versions": _versions(),
    }
    questions = [
        QuestionResult(p.id, p.target, score_completion(g.text, p.target, g.num_tokens, g.finish))
        for p, g in zip(prompts, conv.generations)
    ]
    source_summary = None
    if run_source:
        src = run_side(SideJob(**{**asdict(job), "side": "source", "path": str(source)}), tick, timing("source"))
        source_summary = _summary("source", src, prompts)
        pairs = list(zip(questions, conv.generations, src.generations))
        for q, cg, sg in pairs:
            q.source = score_completion(sg.text, q.target, sg.num_tokens, sg.finish)
            q.identical = cg.steps == sg.steps
        differing = [(q, cg, sg) for q, cg, sg in pairs if not q.identical]
        text_of = _token_text(conv_root, tokenizer) if differing else None
        for q, cg, sg in differing:
            q.divergence = first_divergence(cg, sg, text_of)
    report = Gsm8kReport(
        path=str(converted),
        source=str(source) if source is not None else None,
        settings=settings,
        converted=_summary("converted", conv, prompts),
        source_side=source_summary,
        baseline_accuracy=baseline_accuracy,
        questions=questions,
        exact=chosen == "torch",
    )
    report.checks = decide(report, tolerance=tolerance, min_accuracy=min_accuracy, min_agreement=settings["min_agreement"])
    report.seconds = time.perf_counter() - start
    return report


def resolve_limits(device_type: str, num_questions: int | None, max_new_tokens: int | None) -> tuple[int | None, int, list[str]]:
    """(questions (None: all), new tokens, the flags left to the CPU defaults) for a run on ``device_type``."""
    if device_type != "cpu":
        return num_questions, max_new_tokens or GPU_MAX_NEW_TOKENS, []
    defaulted = [flag for flag, value in (("--num-questions", num_questions), ("--max-new-tokens", max_new_tokens)) if value is None]
    return num_questions or CPU_NUM_QUESTIONS, max_new_tokens or CPU_MAX_NEW_TOKENS, defaulted


def plan_message(questions: int, shots: int, max_new_tokens: int, batch: int, device: str, run_source: bool,
                 cpu_defaults: list[str]) -> str:  # fmt: skip
    """What a GSM8K run is about to do, printed before anything loads."""
    sides = "the converted side, then the source side" if run_source else "the converted side"
    text = (
        f"GSM8K: {questions} questions, {shots}-shot, at most {max_new_tokens} new tokens each, in batches of {batch} "
        f"on {device}: {sides}, each in a fresh process; the time estimate follows the first decode steps."
    )
    if cpu_defaults:
        text += (
            f" CPU defaults ({CPU_NUM_QUESTIONS} questions, {CPU_MAX_NEW_TOKENS} new tokens): a check of the conversion, "
            f"not a measure of accuracy; set {' and '.join(cpu_defaults)} to change them (all 1319 questions and "
            f"{GPU_MAX_NEW_TOKENS} tokens, a GPU's defaults, take hours on a CPU)."
        )
    return text


def estimate_seconds(prefill: float, per_step: float, batches: int, max_new_tokens: int) -> float:
    """At most this many seconds for one side: every batch as long to prefill as the first (prompts are batched
    longest first) and every question generating ``max_new_tokens`` (stop strings usually end one sooner)."""
    return batches * (prefill + max(0, max_new_tokens - 1) * per_step)


def estimate_message(side: str, prefill: float, per_step: float, steps: int, batches: int, max_new_tokens: int) -> str:
    total = estimate_seconds(prefill, per_step, batches, max_new_tokens)
    return (
        f"GSM8K {side} side: at most {format_duration(total)} ({batches} batches x (prefill + up to {max_new_tokens - 1} "
        f"decode steps), measured on the first batch: prefill {prefill:.2f} s, {per_step * 1000:.0f} ms per decode step "
        f"over {steps} steps; stop strings usually end a question sooner); shorten with --num-questions N or "
        "--max-new-tokens N."
    )


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _converted_root(converted: str | Path, tokenizer: str | Path | None) -> Path:
    """The converted checkpoint's folder (a Hub id resolved once, here), after the checks that need no model: a
    usage error then costs no worker process."""
    from ..layouts.trtllm_gen.converted import open_converted
    from .model_runner import check_runnable, check_tokenizer

    ckpt = open_converted(converted)
    check_tokenizer(ckpt.root, tokenizer)
    check_runnable(ckpt.config, ckpt.root / "config.json")
    return Path(ckpt.root)


def _token_text(conv_root: Path, tokenizer: str | Path | None):
    """token id -> its text, with the tokenizer both sides used (only loaded when completions differ)."""
    from .model_runner import load_tokenizer

    tok = load_tokenizer(conv_root, tokenizer)
    return lambda token: tok.decode([token], skip_special_tokens=False)


def _summary(side: str, run, prompts: list[Prompt]) -> SideSummary:
    gens = run.generations
    answers = [score_completion(g.text, p.target) for p, g in zip(prompts, gens)]
    return SideSummary(
        side=side,
        path=str(run.path),
        backend=run.backend,
        routing=run.routing,
        act=run.act,
        num_questions=len(prompts),
        correct=sum(a.correct for a in answers),
        strict_correct=sum(a.strict_correct for a in answers),
        invalid=sum(a.answer is None for a in answers),
        generated_tokens=sum(g.num_tokens for g in gens),
        seconds=run.seconds,
        load_seconds=run.load_seconds,
    )


def torch_device_name(dev) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return "cpu"


def _versions() -> dict:
    import torch
    import transformers

    from .. import __version__

    out = {"nvfp4ckpt": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib import metadata

        out["flashinfer"] = metadata.version("flashinfer-python")
    except Exception:  # noqa: BLE001 - optional
        out["flashinfer"] = None
    return out


__all__ = [
    "CPU_THREADS",
    "Answer",
    "Divergence",
    "Gsm8kReport",
    "Problem",
    "Prompt",
    "QuestionResult",
    "STOP_STRINGS",
    "SideSummary",
    "agreement_rate",
    "answers_agree",
    "build_prompts",
    "decide",
    "download_gsm8k",
    "estimate_message",
    "estimate_seconds",
    "resolve_limits",
    "extract_flexible",
    "extract_strict",
    "first_divergence",
    "load_gsm8k",
    "numbers_equal",
    "reference_answer",
    "run_gsm8k",
    "score_completion",
    "validate_options",
]
