"""benchmarks/eviction.py's CPU smoke path (``--device cpu --tiny``): the script the GPU runs
writes every row and table it promises."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_cpu_smoke_run_writes_rows(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "eviction.py"), "--device", "cpu",
           "--tiny", "--lengths", "48,96", "--budgets", "0.5,0.1", "--decode-tokens", "3",
           "--cap-steps", "1", "--max-batch", "8", "--cpu-cap-mb", "1", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "eviction_cpu.json"))
    rows = {(x["length"], x["budget"]): x for x in res["rows"]}
    assert set(rows) == {(n, b) for n in (48, 96) for b in (None, 0.5, 0.1)}
    for n in (48, 96):
        assert rows[(n, None)]["kept_tokens"] == n
        assert rows[(n, 0.5)]["kept_tokens"] == n // 2
        assert rows[(n, 0.1)]["kept_tokens"] == -(-n // 10)
        assert rows[(n, 0.1)]["kv_ratio"] <= 0.12
    caps = {c["budget"]: c for c in res["largest_batch"]}
    assert set(caps) == {None, 0.5, 0.1}
    assert caps[None]["max_batch"] <= caps[0.5]["max_batch"] <= caps[0.1]["max_batch"]
    assert caps[0.1]["max_batch"] == 8 and caps[0.1]["capped_at_max_batch"]
    assert not res["skipped"] and res["command"].startswith("python benchmarks/eviction.py")
    md = open(tmp_path / "eviction_cpu.md").read()
    assert "Largest batch at 96 tokens" in md and "| 96 | 10% | 10 |" in md
