"""One side of a GSM8K run (load the model, generate) in a fresh Python process, under pinned numerics.

Why a fresh process (issue #26): the same ``verify --gsm8k`` gave different verdicts on the same files, because
the converted side's first forward pass, run in the process that had just run the structure/layout/numerics
checks, sometimes computed part of its rotary-embedding table with a low-accuracy variant of ``cos`` (oneMKL VML's
"enhanced performance" kernel, bit for bit, where PyTorch asks for the high-accuracy one). No thread was still
running and no torch setting had changed: the state lives inside the math library, out of reach. A process that
has run nothing else starts from the same state every time, so each side gets one, and both get the same
settings (:func:`pin_numerics`), the same prompts, tokenizer, end-of-sequence ids and batches.

    run = run_side(SideJob("converted", "./qwen3-trtllm", ...), tick)   # parent: blocks, forwards progress

The worker is ``python -c BOOT ROOT JOB.json RESULT.json`` (``main``): the job and result are JSON (the recorded
top logits go in ``RESULT.npz``). A ``Nvfp4CkptError`` in the worker is raised again in the parent with the same
class and message; anything else becomes a ``RuntimeError`` with the worker's traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import errors
from ..progress import TickFn

TICK = "nvfp4ckpt-tick "  # stdout lines of the worker that carry progress; other lines are ignored
TIMING = "nvfp4ckpt-timing "  # the first batch's prefill and decode-step times (model_runner._StepClock)
TOP_LOGITS = 5  # logits kept per generated token: enough to show the two tokens of a near tie on both sides
CUBLAS_WORKSPACE = ":4096:8"  # what torch.use_deterministic_algorithms needs for deterministic cuBLAS (CUDA >= 10.2)


@dataclass
class SideJob:
    """What one side runs; both sides get the same fields except ``side`` and ``path``."""

    side: str  # "converted" | "source"
    path: str
    device: str
    backend: str  # converted side's MoE backend; the source side always runs the torch reference
    act: str
    routing: str  # hf | kernel
    tokenizer: str  # the tokenizer both sides use (the converted checkpoint's folder, or --tokenizer)
    eos_root: str  # the folder whose generation_config.json gives the end-of-sequence ids (the converted one)
    prompts: list[str]
    chat_template: bool
    max_new_tokens: int
    batch_size: int
    stop_strings: list[str]
    threads: int  # torch intra-op threads (CPU)
    top_logits: int = TOP_LOGITS


@dataclass
class SideRun:
    """What one side's worker reports."""

    side: str
    path: str  # the checkpoint folder the worker loaded (a Hub id resolved)
    backend: str
    routing: str
    act: str
    generations: list  # list[model_runner.Generation], in prompt order
    seconds: float  # generation only
    load_seconds: float
    numerics: dict = field(default_factory=dict)  # what pin_numerics set, as the worker read it back


def run_side(job: SideJob, progress: TickFn | None = None, on_timing=None) -> SideRun:
    """Run ``job`` in a fresh interpreter and wait for it (the worker is killed if this is interrupted).
    ``on_timing(prefill, per_step, steps)``: the worker's first-batch timing, a few decode steps into the run."""
    from .model_runner import Generation

    tick = progress or (lambda stage, done, total: None)
    with tempfile.TemporaryDirectory(prefix="nvfp4ckpt-gsm8k-") as tmp:
        job_path, result_path, log_path = Path(tmp) / "job.json", Path(tmp) / "result.json", Path(tmp) / "stderr.txt"
        job_path.write_text(json.dumps(asdict(job)))
        cmd = [sys.executable, "-c", BOOT, str(Path(__file__).resolve().parents[2]), str(job_path), str(result_path)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, env=worker_env(), text=True, errors="replace"
            )
            try:
                for line in proc.stdout:
                    if line.startswith(TICK):
                        tick(*json.loads(line[len(TICK) :]))
                    elif line.startswith(TIMING) and on_timing is not None:
                        on_timing(*json.loads(line[len(TIMING) :]))
                code = proc.wait()
            except BaseException:  # Ctrl-C, SIGTERM: the worker must not outlive us
                proc.kill()
                proc.wait()
                raise
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
        if result is not None and "error" in result:
            raise _error(result["error"])
        if code != 0 or result is None or "crash" in result:
            detail = result["crash"] if result and "crash" in result else _tail(log_path)
            raise RuntimeError(f"the GSM8K {job.side} side's worker process failed (exit {code}):\n{detail}")
        top = None
        if job.top_logits > 0:
            with np.load(result_path.with_suffix(".npz")) as npz:
                top = npz["ids"], npz["logits"]
        gens = []
        for n, g in enumerate(result["generations"]):
            gen = Generation(g["text"], g["token_ids"], g["finish"], g["eos_token"])
            if top is not None:
                steps = len(gen.steps)
                gen.top_ids, gen.top_logits = top[0][n, :steps], top[1][n, :steps]
            gens.append(gen)
    return SideRun(
        job.side, result["path"], result["backend"], result["routing"], result["act"], gens, result["seconds"],
        result["load_seconds"], result["numerics"],
    )  # fmt: skip


# The worker imports the nvfp4ckpt this process runs (argv[1] is the folder holding that package): first on the path
# when nothing on it has that folder (a source checkout), else the path as it is without the current directory (an
# install, found where this process found it).
BOOT = (
    "import sys; root = sys.argv[1]; "
    "sys.path[:] = ([root] if root not in sys.path else []) + [p for p in sys.path if p != '']; "
    "from nvfp4ckpt.eval.fresh import main; sys.exit(main(sys.argv[2:]))"
)


def worker_env() -> dict[str, str]:
    """The parent's environment, plus the cuBLAS workspace setting that deterministic algorithms need (it must be
    set before CUDA starts)."""
    env = dict(os.environ)
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    return env


def pin_numerics(threads: int) -> dict:
    """The same numerics on both sides: a fixed number of CPU threads (how reductions are split), deterministic
    algorithms where torch has them (warn, not fail, where it has none), and full float32 matmuls (no TF32)."""
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return {
        "process": "fresh per side",
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def _error(info: dict) -> Exception:
    """The worker's ``Nvfp4CkptError`` as the same class (a one-line message the CLI maps to its exit code)."""
    cls = getattr(errors, info.get("class", ""), None)
    if isinstance(cls, type) and issubclass(cls, errors.Nvfp4CkptError):
        try:
            return cls(info["message"])
        except TypeError:  # a class with another constructor
            pass
    return errors.InputError(info["message"])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


# ----------------------------------------------------------------------------------------------
# The worker


def work(job: SideJob) -> dict:
    """Load one side's model and generate (runs in the worker process)."""
    numerics = pin_numerics(job.threads)
    from . import model_runner as mr

    def tick(stage: str, done: int, total: int) -> None:
        print(TICK + json.dumps([stage, done, total]), flush=True)

    if job.side == "converted":
        loaded = mr.load_converted_model(
            job.path, device=job.device, backend=job.backend, act=job.act, routing=job.routing, tokenizer=job.tokenizer
        )
    else:
        loaded = mr.load_source_model(job.path, device=job.device, act=job.act, routing=job.routing, tokenizer=job.tokenizer)
    texts = apply_template(loaded.tokenizer, job.prompts, job.chat_template)
    eos = mr.eos_ids(Path(job.eos_root), loaded.tokenizer)
    gens, seconds = mr.generate(
        loaded, texts, max_new_tokens=job.max_new_tokens, batch_size=job.batch_size, stop_strings=job.stop_strings,
        eos_token_ids=eos, progress=tick, stage=f"gsm8k {job.side}", top_logits=job.top_logits,
        on_timing=lambda *t: print(TIMING + json.dumps(t), flush=True),
    )  # fmt: skip
    return {"loaded": loaded, "generations": gens, "seconds": seconds, "numerics": numerics}


def apply_template(tok, texts: list[str], chat_template: bool) -> list[str]:
    """Each prompt as one user turn of the tokenizer's chat template (``--chat-template``), else as it is."""
    if not chat_template:
        return texts
    if not getattr(tok, "chat_template", None):
        raise errors.InputError("--chat-template: the tokenizer has no chat template")
    return [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True) for t in texts]


def main(argv: list[str]) -> int:
    job_path, result_path = Path(argv[0]), Path(argv[1])
    try:
        job = SideJob(**json.loads(job_path.read_text()))
        out = work(job)
    except errors.Nvfp4CkptError as exc:
        result_path.write_text(json.dumps({"error": {"class": type(exc).__name__, "message": str(exc)}}))
        return 0
    except Exception:  # noqa: BLE001 - a bug: the parent shows this traceback
        result_path.write_text(json.dumps({"crash": traceback.format_exc()}))
        return 1
    loaded, gens = out["loaded"], out["generations"]
    if job.top_logits > 0:  # padded to the longest completion: [questions, steps, k]
        steps = max((len(g.steps) for g in gens), default=0)
        ids = np.full((len(gens), steps, job.top_logits), -1, dtype=np.int64)
        logits = np.full((len(gens), steps, job.top_logits), np.nan, dtype=np.float32)
        for n, g in enumerate(gens):
            rows, k = g.top_ids.shape  # k < top_logits only for a vocabulary smaller than that
            ids[n, :rows, :k], logits[n, :rows, :k] = g.top_ids, g.top_logits
        np.savez(result_path.with_suffix(".npz"), ids=ids, logits=logits)
    result = {
        "path": str(loaded.path),
        "backend": loaded.backend,
        "routing": loaded.routing,
        "act": loaded.act,
        "load_seconds": loaded.load_seconds,
        "seconds": out["seconds"],
        "numerics": out["numerics"],
        "generations": [{"text": g.text, "token_ids": g.token_ids, "finish": g.finish, "eos_token": g.eos_token} for g in gens],
    }
    result_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
