"""benchmarks/kernels.py on the CPU: it imports without a GPU, derives FlexAttention's best
configuration per case from measured rows, and its committed results are what its report renders."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import kernels as kb  # noqa: E402

META = {"card": "test card", "torch": "t", "triton": "tr", "command": "cmd", "copy_GBps": 1.0}


def _rows(split=True):
    rows = [{"case": "prefill_causal", "N": 1024, "density": 1.0, "impl": "sdpa", "ms": 10.0,
             "tflops": 1.0}]
    for dens, ours, flex, fs in ((0.031, 1.0, 1.6, 1.5), (0.121, 4.0, 5.0, 6.0)):
        rows += [dict(case="prefill_blocksparse", N=1024, density=dens, impl="ours", ms=ours,
                      tflops=100.0),
                 dict(case="prefill_blocksparse", N=1024, density=dens, impl="ideal", ms=ours / 2),
                 dict(case="prefill_blocksparse", N=1024, density=dens, impl="flex", ms=flex)]
        if split:
            rows.append(dict(case="prefill_blocksparse", N=1024, density=dens,
                             impl="flex_full_split", ms=fs))
    rows.append(dict(case="prefill_blocksparse", N=1024, density=0.121, impl="flex_opts",
                     error="RuntimeError: no TMA here"))
    return rows


def test_flex_best_is_the_fastest_measured_configuration():
    out = kb.with_flex_best(_rows())
    best = {r["density"]: r for r in out if r["impl"] == "flex_best"}
    assert best[0.031]["ms"] == 1.5 and best[0.031]["of"] == "flex_full_split"
    assert best[0.121]["ms"] == 5.0 and best[0.121]["of"] == "flex"      # split slower here
    assert best[0.121]["compared"] == ["flex", "flex_full_split"]       # errors are not times
    assert all(r["derived"] for r in best.values())
    assert kb.with_flex_best(out) == out                                 # idempotent
    assert [r for r in out if not r.get("derived")] == _rows()           # measured rows kept


def test_markdown_reports_both_columns_and_the_best():
    rows = kb.with_flex_best(_rows())
    md = kb.markdown(META, rows)
    assert "| 1024 | 3.1% | 1.000 | 100 | 1.600 | 1.500 | 1.500 (flex_full_split) |" in md
    assert "| 1.60x | 1.50x | 200% |" in md                # flex / ours, flex best / ours, ideal
    assert "| 1024 | 12.1% | 4.000 | 100 | 5.000 | 6.000 | 5.000 (flex) |" in md
    md = kb.markdown(META, kb.with_flex_best(_rows(split=False)))
    assert "| 1.600 | not measured | 1.600 (flex) |" in md


def test_flex_variants():
    assert [v[0] for v in kb.flex_variants(False, True)] == list(kb.FLEX_NAMES)
    assert [v[0] for v in kb.flex_variants(False, False)] == ["flex", "flex_full_split"]
    assert kb.flex_variants(True, False) == [("flex", True, None)]
    assert all(v[2] is None or set(v[2]) <= {"ROWS_GUARANTEED_SAFE", "USE_TMA"}
               for v in kb.FLEX_VARIANTS)


@pytest.mark.parametrize("stem", ["kernels_h100"])
def test_committed_results_are_what_the_report_renders(stem, tmp_path):
    """The committed .md is the report of the committed .json (derived rows included)."""
    src = os.path.join(ROOT, "benchmarks", "results", stem)
    for ext in (".json", ".md"):
        with open(src + ext) as f:
            (tmp_path / (stem + ext)).write_text(f.read())
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernels.py"),
                        "--report-only", str(tmp_path / (stem + ".json"))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for ext in (".json", ".md"):
        with open(src + ext) as f:
            assert (tmp_path / (stem + ext)).read_text() == f.read(), ext
    data = json.loads((tmp_path / (stem + ".json")).read_text())
    assert any(r["impl"] == "flex_best" for r in data["rows"])


def test_script_help_runs_on_the_cpu():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernels.py"), "--help"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--report-only" in r.stdout, r.stderr[-2000:]
