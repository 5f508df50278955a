"""``benchmarks/dsa_native.py`` runs end to end on the CPU (``--device cpu --tiny``: the kernels
through Triton's interpreter) and writes every kind of row: the check of (c) against the Hugging
Face layer (same sets, fp32 error), prefill rows of the three implementations, decode rows."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smoke_run_writes_every_row(tmp_path):
    pytest.importorskip("transformers")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "dsa_native.py"), "--device", "cpu",
           "--tiny", "--out", str(tmp_path), "--lengths", "40", "--decode", "64", "--batches",
           "1", "--layers", "1"]
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "dsa_native_tiny.json").read_text())
    rows = data["rows"]
    check = [r for r in rows if r["case"] == "check"]
    assert check and check[0]["recall"] == 1.0 and check[0]["rel_err"] < 1e-4, check
    assert 0.5 < check[0]["fp8_recall"] <= 1.0, check
    impls = {r["impl"] for r in rows if r["case"] == "prefill" and "ms" in r}
    assert impls == {"hf", "dense", "planner"}, rows
    planner = next(r for r in rows if r["case"] == "prefill" and r["impl"] == "planner")
    assert {"indexer_topk_ms", "attention_ms", "sparse_mla_tflops"} <= set(planner)
    assert {r["impl"] for r in rows if r["case"] == "decode" and "ms" in r} == {"planner", "dense"}
    md = (tmp_path / "dsa_native_tiny.md").read_text()
    assert "| 40 | planner |" in md and "recall of the model's selected sets 1.0000" in md
    assert data["meta"]["command"].startswith("PYTHONPATH=. python benchmarks/dsa_native.py")


@pytest.mark.slow
def test_schedule_sweep_smoke_checks_every_config(tmp_path):
    """``benchmarks/dsa_sweep.py --smoke``: every schedule of every section runs through the
    interpreter and agrees with the PyTorch reference / the first schedule."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "dsa_sweep.py"), "--smoke", "--out",
           str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "dsa_sweep_cpu.json").read_text())["rows"]
    assert not [r for r in rows if "error" in r], rows
    for section in ("mla_prefill", "mla_decode"):
        got = [r for r in rows if r["section"] == section]
        assert got and all(r["rel_err_ref"] < 1e-5 and r["rel_err_first"] < 1e-5 for r in got)
    idx = [r for r in rows if r["section"] == "indexer_prefill"]
    assert idx and all(r["agreement"] == 1.0 for r in idx), idx
    few = {r["config"]: r for r in rows if r["section"] == "few_rows"}
    assert {"mma", "loop"} <= set(few), few
