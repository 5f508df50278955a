"""``scripts/arch_sweep.py``: every causal-LM class of the installed transformers under
``policy="dense"``; here two of them (attention and none) through the script as a user runs it."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_reports_each_architecture(tmp_path):
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "arch_sweep.py"),
                        "--only", "llama,mamba", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(x) for x in open(str(out) + ".jsonl")]
    assert "transformers" in rows[0]["meta"]
    by = {x["model_type"]: x for x in rows[1:]}
    assert by["llama"]["err"] <= 1e-5
    assert [s["status"] for s in by["llama"]["sites"]] == ["rewritten", "rewritten"]
    assert by["mamba"]["sites"] == [] and by["mamba"]["err"] <= 1e-5
    md = open(str(out) + ".md").read()
    assert "| llama | LlamaForCausalLM | exact, rewritten |" in md
