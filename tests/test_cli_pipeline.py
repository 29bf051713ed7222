"""The command line in a CI conversion pipeline (issue 25): progress lines in a log, one JSON document on stdout
whatever the exit, short log lines with the reason beside the failing check, and the small things a pipeline
engineer trips over (plurals, --help placeholders, --revision on a folder, option names in library errors, Ctrl-C
messages, unknown families, model_type aliases)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.progress import Progress

from nvfp4ckpt import __version__, convert_checkpoint, write_example
from nvfp4ckpt.cli import main
from nvfp4ckpt.cli._output import LOG_LINE, CountColumn, LogProgress, Output, plain_table
from nvfp4ckpt.errors import InputError, OutputExistsError
from nvfp4ckpt.io import count, format_duration

REPO = Path(__file__).resolve().parents[1]
VERIFY_CLI = sys.modules["nvfp4ckpt.cli.verify"]  # the module (nvfp4ckpt.cli.verify is the command function)


def piped(*args: str, interval: str = "0", cwd: Path = REPO) -> subprocess.CompletedProcess:
    """A real process with stdout and stderr piped, as in a CI log (progress lines every update unless told)."""
    env = {**os.environ, "NVFP4CKPT_PROGRESS_INTERVAL": interval, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "nvfp4ckpt", *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


# ---- progress lines in a log -------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_log_progress_is_throttled_with_rate_and_eta():
    clock, lines = Clock(), []
    log = LogProgress("convert", lines.append, interval=5.0, clock=clock)
    log.update("written", 0, 10_000_000, "B")
    assert lines == []  # nothing before the interval has passed
    for second in range(1, 12):
        clock.now = 100.0 + second
        log.update("written", second * 500_000, 10_000_000, "B")
    assert len(lines) == 2  # at 5 s and at 10 s, not at every update
    assert lines[0] == "convert: written 2.50 MB/10.00 MB (25%), 500.00 KB/s, ETA 15 s"
    clock.now = 130.0
    log.update("written", 10_000_000, 10_000_000, "B")
    log.close()
    assert lines[-1] == "convert: done in 30 s: written 10.00 MB/10.00 MB"


def test_log_progress_counts_questions_and_stays_silent_when_short():
    clock, lines = Clock(), []
    log = LogProgress("verify", lines.append, interval=5.0, clock=clock)
    log.update("gsm8k converted", 0, 200, "questions")
    clock.now += 10
    log.update("gsm8k converted", 8, 200, "questions")
    assert lines == ["verify: gsm8k converted 8/200 questions (4%), 0.80 questions/s, ETA 4 min 00 s"]
    quick: list[str] = []
    short = LogProgress("verify", quick.append, interval=5.0, clock=Clock())
    short.update("layout", 2, 2, "layers")
    short.close()
    assert quick == []  # a run shorter than the interval prints nothing, not even a last line


def test_piped_convert_prints_progress_lines_and_quiet_silences_them(example_factory, tmp_path):
    src = example_factory()
    proc = piped("convert", str(src), str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(l.startswith("convert: ") for l in lines), proc.stderr
    assert any("MoE layers 2/2" in l for l in lines) and any(re.search(r"written [\d.]+ [KM]B/1\.\d\d MB", l) for l in lines)
    assert lines[-1].startswith("convert: done in ")
    assert all(len(l) <= LOG_LINE for l in lines)
    quiet = piped("convert", str(src), str(tmp_path / "b"), "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""
    # --json keeps stdout to the one document; progress stays on stderr
    js = piped("revert", str(tmp_path / "a"), str(tmp_path / "c"), "--json")
    assert js.returncode == 0 and json.loads(js.stdout)["command"] == "revert"
    assert any(l.startswith("revert: ") for l in js.stderr.splitlines()), js.stderr


def test_piped_verify_progress_in_human_sizes(example_factory, tmp_path):
    dst = tmp_path / "dst"
    convert_checkpoint(example_factory(), dst)
    proc = piped("verify", str(dst), "--source", str(example_factory()))
    assert proc.returncode == 0, proc.stderr
    reads = [l for l in proc.stderr.splitlines() if l.startswith("verify: read and hash")]
    assert reads and all(re.search(r"read and hash [\d.]+ (B|KB|MB)/1\.\d\d MB", l) for l in reads), proc.stderr
    assert any("layout 2/2 layers" in l for l in proc.stderr.splitlines())


def test_bad_progress_interval_is_one_line(example_factory, tmp_path):
    proc = piped("convert", str(example_factory()), str(tmp_path / "x"), interval="soon")
    assert proc.returncode == 2
    assert proc.stderr.startswith("Error: NVFP4CKPT_PROGRESS_INTERVAL='soon'") and proc.stderr.count("\n") == 1


def test_terminal_bar_counts_bytes_of_verify_in_sizes():
    """The bar's ``8992/1669033``: verify's read-and-hash stage now counts bytes as sizes."""
    bar = Progress(CountColumn())
    task = bar.add_task("read and hash", total=1_669_033, unit=VERIFY_CLI._unit("read and hash"))
    bar.update(task, completed=8992)
    assert str(CountColumn().render(bar.tasks[0])).startswith("8.99 KB/1.67 MB")
    assert VERIFY_CLI._unit("gsm8k source") == "questions" and VERIFY_CLI._unit("numerics") == "layers"


# ---- one JSON document on every exit -----------------------------------------------------------------------------


def _document(text: str) -> dict:
    doc = json.loads(text)
    assert doc["schema_version"] == 1 and doc["tool"] == "nvfp4ckpt" and doc["version"] == __version__
    return doc


@pytest.mark.parametrize(
    "args, code, needle, file",
    [
        (["convert", "{src}", "{dst}"], 2, "exists and is not empty; pass --overwrite", "{dst}"),
        (["revert", "{src}", "{tmp}/r"], 2, "not a converted checkpoint", None),
        (["inspect", "{tmp}/missing/x"], 2, "no such folder", None),
        (["verify", "{src}"], 2, "", None),
        (["example", "{dst}"], 2, "pass --overwrite", "{dst}"),
        (["convert", "{src}", "{tmp}/y", "--tokens", "3"], 2, "No such option: --tokens", None),
        (["verify", "{dst}", "--tokens", "0"], 2, "--tokens '0' is not a whole number", None),
    ],
)
def test_error_exit_prints_a_json_error_object(example_factory, tmp_path, capsys, args, code, needle, file):
    src, dst = example_factory(), tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("x")
    fill = {"{src}": str(src), "{dst}": str(dst), "{tmp}": str(tmp_path)}
    argv = [fill.get(a, a.replace("{tmp}", str(tmp_path))) for a in args] + ["--json"]
    assert main(argv) == code
    out, err = capsys.readouterr()
    doc = _document(out)
    assert doc["command"] == args[0] and doc["exit_code"] == code
    assert set(doc["error"]) >= {"message", "type", "file", "tensor"}
    assert needle in doc["error"]["message"] and err.startswith("Error: ")
    if file is not None:
        assert doc["error"]["file"] == fill[file] and os.path.isabs(doc["error"]["file"])


def test_error_object_names_the_file_and_the_tensor(example_factory, tmp_path, capsys):
    from nvfp4ckpt.cli._errors import error_details

    msg = "/x/model-00001.safetensors: model.layers.0.mlp.experts.3.up_proj.weight: is float16; expected uint8"
    assert error_details(InputError(msg), msg) == {
        "type": "InputError", "file": "/x/model-00001.safetensors", "tensor": "model.layers.0.mlp.experts.3.up_proj.weight",
    }  # fmt: skip
    msg = "/x/model.safetensors: tensor 'model.norm.weight' already exists next to per-expert tensors"
    assert error_details(InputError(msg), msg)["tensor"] == "model.norm.weight"
    err = PermissionError(13, "Permission denied", "rel/file.json")
    assert error_details(err, "...")["file"] == os.path.abspath("rel/file.json")


def test_reports_carry_version_schema_and_absolute_paths(example_factory, tmp_path, capsys, monkeypatch):
    shutil.copytree(example_factory(), tmp_path / "src")
    monkeypatch.chdir(tmp_path)  # relative paths on the line; absolute ones in the reports
    docs = {}
    for argv in (["convert", "src", "dst"], ["inspect", "src"], ["verify", "dst", "--source", "src", "--skip", "numerics"],
                 ["revert", "dst", "back"], ["example", "ex"]):  # fmt: skip
        assert main([*argv, "--json"]) == 0
        docs[argv[0]] = _document(capsys.readouterr().out)
        assert docs[argv[0]]["command"] == argv[0] and docs[argv[0]]["exit_code"] == 0 and docs[argv[0]]["error"] is None
    assert docs["convert"]["source"] == str(tmp_path / "src") and docs["convert"]["destination"] == str(tmp_path / "dst")
    assert docs["revert"]["source"] == str(tmp_path / "dst") and docs["revert"]["destination"] == str(tmp_path / "back")
    assert docs["verify"]["path"] == str(tmp_path / "dst") and docs["verify"]["source"] == str(tmp_path / "src")
    assert docs["inspect"]["path"] == str(tmp_path / "src") and docs["example"]["path"] == str(tmp_path / "ex")
    # a failed check: the report, exit code 1, and no second (error) document after it
    assert main(["verify", "dst", "--source", str(example_factory("qwen3_moe", "modelopt", seed=1)), "--skip", "numerics", "--json", "--json-out", "r.json"]) == 1
    out = capsys.readouterr().out
    doc = _document(out)
    assert doc["exit_code"] == 1 and doc["passed"] is False and doc["error"] is None
    assert json.loads((tmp_path / "r.json").read_text()) == doc


# ---- readable logs -----------------------------------------------------------------------------------------------


def test_piped_verify_lines_are_short_and_the_reason_sits_with_its_check(example_factory, tmp_path):
    dst = tmp_path / "dst"
    convert_checkpoint(example_factory(), dst)
    ok = piped("verify", str(dst), interval="3600")
    assert ok.returncode == 0, ok.stderr
    assert max(len(l) for l in ok.stdout.splitlines()) <= LOG_LINE, ok.stdout
    assert "layers.*.source_scalar_shape" in ok.stdout  # wrapped at spaces, never cut
    bad = piped("verify", str(dst), "--source", str(example_factory("qwen3_moe", "modelopt", seed=1)), "--skip", "numerics", interval="3600")
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert max(len(l) for l in lines) <= LOG_LINE, bad.stdout
    row = next(i for i, l in enumerate(lines) if l.startswith("layout ") and " fail " in l)
    assert "differences found" in lines[row] and "differs after" in lines[row + 1], bad.stdout  # the reason, right under
    assert lines[row + 1].startswith(" " * 19 + "model.layers.0.mlp.experts.w13_weight: expert 0")
    assert any("... and 27 more (see --json)" in l for l in lines)
    assert not any(l.startswith("layout:") for l in lines)  # no reason printed apart, below the table


def test_plain_table_wraps_the_last_column_and_keeps_names_whole():
    from rich.table import Table

    table = Table("check", "status", "details", title="verify /x")
    long_name = "model.layers.12.mlp.experts.w13_weight_scale" * 4  # longer than a line: printed whole
    table.add_row("structure", "[green]pass[/]", "word " * 60)
    table.add_row("layout", "[red]fail[/]", "summary\n" + long_name)
    lines = plain_table(table)
    assert lines[0] == "verify /x" and lines[1].split() == ["check", "status", "details"]
    assert all(len(l) <= LOG_LINE for l in lines if long_name not in l)
    assert any(l.strip() == long_name for l in lines)
    assert lines[2].startswith("structure  pass    word") and lines[3].startswith(" " * 19 + "word")
    # leading cells wider than half a line: a last cell that fits stays beside them, one that does not goes below
    wide = Table("MoE layer", "backend", "ok")
    wide.add_row("model.layers.0.mlp.experts" * 3, "torch/nvfp4", "yes")
    wide.add_row("m", "torch/nvfp4", "no " * 40)
    lines = plain_table(wide)
    assert lines[1].endswith("torch/nvfp4  yes") and lines[2].startswith("m ") and lines[2].endswith("torch/nvfp4")
    assert lines[3].startswith("    no no") and lines[4] == "    no" and all(len(l) <= LOG_LINE for l in lines)


# ---- small things ------------------------------------------------------------------------------------------------


def test_plurals(example_factory, tmp_path, capsys):
    assert [count(1, "file"), count(2, "file"), count(0, "MoE layer")] == ["1 file", "2 files", "0 MoE layers"]
    assert format_duration(42) == "42 s" and format_duration(425) == "7 min 05 s" and format_duration(3720) == "1 h 02 min"
    src = tmp_path / "src"
    write_example(src, shards=1, config_overrides={"num_hidden_layers": 1})
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 0
    out = capsys.readouterr().out
    assert "converted 1 MoE layer (" in out, out
    assert main(["inspect", str(tmp_path / "dst")]) == 0
    assert " in 1 file, " in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "dst"), "--check", "structure"]) == 0
    assert "1 MoE layer, 1 shard;" in " ".join(capsys.readouterr().out.split())


def test_help_has_no_bool_placeholders_and_no_mid_word_wraps():
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO)}
    for command in ("inspect", "example", "convert", "verify", "revert", None):
        argv = [sys.executable, "-m", "nvfp4ckpt", *([command] if command else []), "--help"]
        text = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, check=True).stdout
        assert "<bool>" not in text and "list[" not in text and "9223372036854775807" not in text, text
        for placeholder in re.findall(r"<[a-z0-9_]+(?: \| [a-z0-9_-]+)*", text):
            for word in placeholder.strip("<").split(" | "):  # each choice whole on some line
                assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text), (command, word)
    verify_help = subprocess.run([sys.executable, "-m", "nvfp4ckpt", "verify", "--help"], capture_output=True, text=True, env=env, cwd=REPO).stdout
    for word in ("structure", "layout", "numerics", "gsm8k>", "trtllm", "triton"):  # wrapped between choices only
        assert re.search(rf"(?<![\w-]){word}(?: \||>|$| )", verify_help, re.M), word


def test_revision_with_a_local_folder_is_refused(example_factory, tmp_path, capsys):
    assert main(["convert", str(example_factory()), str(tmp_path / "d"), "--revision", "v1"]) == 2
    err = capsys.readouterr().err
    assert "a local folder, so revision 'v1' cannot apply" in err and not (tmp_path / "d").exists()
    assert main(["inspect", str(example_factory()), "--revision", "main"]) == 2


def test_library_errors_name_arguments_and_the_cli_names_options(example_factory, tmp_path, capsys):
    dst = tmp_path / "dst"
    convert_checkpoint(example_factory(), dst)
    with pytest.raises(OutputExistsError) as info:
        convert_checkpoint(example_factory(), dst)
    assert "overwrite=True" in str(info.value) and "--overwrite" not in str(info.value)
    assert main(["convert", str(example_factory()), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace it" in err and "overwrite=True" not in err


def test_verify_ctrl_c_speaks_of_verify(example_factory, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(VERIFY_CLI, "verify_checkpoint", interrupted)
    assert main(["verify", str(example_factory()), "--json"]) == 130
    out, err = capsys.readouterr()
    assert "verify stopped before its report" in err and "convert" not in err and "revert" not in err
    assert _document(out)["exit_code"] == 130


def test_inspect_describes_an_unknown_model_type(example_factory, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(example_factory(), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "qwen9_moe"
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(src)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "unknown (model_type 'qwen9_moe')" in text and "modelopt" in text and "model.layers.1.mlp.experts" in text
    assert "unsupported family" in text
    assert main(["inspect", str(src), "--json"]) == 0
    doc = _document(capsys.readouterr().out)
    assert doc["architecture"] == "unknown" and doc["family_known"] is False and doc["model_type"] == "qwen9_moe"
    assert doc["routing"] == {} and len(doc["moe_layers"]) == 2 and doc["num_tensors"] > 0
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 2  # convert still refuses it


@pytest.mark.parametrize("model_type, family", [("qwen3_5_moe", "qwen3_next"), ("llama4_text", "llama4")])
def test_example_arch_takes_model_types(tmp_path, capsys, model_type, family):
    assert main(["example", str(tmp_path / "ex"), "--arch", model_type, "--json"]) == 0
    assert _document(capsys.readouterr().out)["architecture"] == family
    assert main(["example", str(tmp_path / "no"), "--arch", "llama"]) == 2
    assert "choose a family or model_type" in capsys.readouterr().err


def test_output_object_prints_one_json_document_per_run(capsys):
    from nvfp4ckpt.cli._output import reset_run_state

    reset_run_state()
    out = Output(json_mode=True, command="verify")
    out.result({"passed": False}, exit_code=1)
    out.failure("structure check failed", 1)  # after the report: stderr only
    stdout, stderr = capsys.readouterr()
    assert json.loads(stdout)["exit_code"] == 1 and stderr.startswith("Error: structure check failed")


def test_terminal_keeps_the_bar_and_quiet_prints_nothing():
    from io import StringIO

    from rich.console import Console

    from nvfp4ckpt.cli._output import BarProgress, NoProgress

    screen = StringIO()
    out = Output(err=Console(file=screen, force_terminal=True, width=100))
    with out.progress() as view:
        assert isinstance(view, BarProgress)
        view.update("written", 1_500_000, 3_000_000, "B")
        view.update("MoE layers", 1, 2)
    with Output(quiet=True, err=Console(file=StringIO(), force_terminal=True)).progress() as view:
        assert isinstance(view, NoProgress)
