"""The quality harness's retrieval-failure pictures (``eval --explain-failures N``): the needle
map of up to N failed prompts per row, linked from the Markdown report, on a tiny random-weight
Llama with a byte tokenizer (no downloads)."""
import os

import pytest

from planner.quality import harness, report

pytest.importorskip("matplotlib")


def test_eval_draws_its_retrieval_failures(tiny_lm_corpus, tmp_path):
    lm, codec, hay, heldout = tiny_lm_corpus
    cfg = harness.EvalConfig(lengths=(768,), policies=("sink_window@0.25",), tasks=("passkey",),
                             depths=(0.5,), trials=2, ppl_windows=1, explain_failures=1)
    out = tmp_path / "toy.json"
    res = harness.evaluate(lm, codec, hay, heldout, cfg, out_path=str(out), log=lambda s: None)
    failed = [t for t in res["trials"] if not t["exact"]]
    assert failed, "a random-weight model answers no passkey"
    drawn = [t for t in res["trials"] if t.get("explain_png")]
    assert len(drawn) == 1                                          # at most N per row
    t = drawn[0]
    assert not t["exact"]
    assert os.path.getsize(tmp_path / t["explain_png"]) > 1000
    assert t["explain_png"].startswith("toy_explain/")
    assert t["needle_kept"] == 0.0 and len(t["needle_dropped_by"]) == 2
    md = report.markdown(res)
    assert "which layer lost the needle" in md
    assert f"[needle map]({t['explain_png']})" in md
    row = next(line for line in md.splitlines() if t["explain_png"] in line)
    assert "| 0, 1 " in row                                         # both layers dropped it


def test_eval_draws_nothing_unless_asked(tiny_lm_corpus, tmp_path):
    lm, codec, hay, heldout = tiny_lm_corpus
    cfg = harness.EvalConfig(lengths=(768,), policies=("sink_window@0.25",), tasks=("passkey",),
                             depths=(0.5,), trials=1, ppl_windows=1)
    res = harness.evaluate(lm, codec, hay, heldout, cfg, out_path=str(tmp_path / "toy.json"),
                           log=lambda s: None)
    assert not any(t.get("explain_png") for t in res["trials"])
    assert not os.path.exists(tmp_path / "toy_explain")
    assert "which layer lost the needle" not in report.markdown(res)
