"""The README's main job, ``python -m planner demo``, at a small size."""
import os
import re
import subprocess
import sys

from planner.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = ("dense", "block_topk", "sink_window", "dsa (untrained)")


def _table(out: str) -> dict:
    """policy -> {column: cell} of the demo's table (columns split on 2+ spaces)."""
    lines = out.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("policy "))
    cols = re.split(r"\s{2,}", lines[head].strip())
    rows = {}
    for line in lines[head + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = dict(zip(cols, cells))
    return rows


def test_demo_runs_every_policy(capsys):
    assert main(["demo", "--seq", "384", "--layers", "1", "--topk", "1", "--window", "64",
                 "--dsa-topk", "64", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert set(POLICIES) <= set(rows), rows.keys()
    assert "original model" in rows
    assert float(rows["dense"]["max|dlogit|"]) < 1e-4      # the identity check: logits
    for name in POLICIES:
        d = float(rows[name]["density"])
        assert 0.0 < d <= 1.0, (name, d)
        assert float(rows[name]["CPU ms"]) > 0
        assert rows[name][next(c for c in rows[name] if c.startswith("kernel of"))] != "-"
    for name in POLICIES[1:]:                                # 384 tokens: every budget is short
        assert float(rows[name]["density"]) < 0.9, (name, rows[name])
        assert float(rows[name]["max|dlogit|"]) > 1e-4      # they did drop keys
    assert "sparse.attend(" in out                           # the rewritten site is shown
    assert "eval --help" in out                              # and where to go next
    assert max(len(l) for l in out.splitlines()) <= 100


def test_demo_needs_neither_numpy_nor_transformers():
    """The base install has no transformers; the demo must not import the eval harness's
    dependencies (they are blocked here: importing them raises)."""
    code = ("import sys; sys.modules['numpy'] = None; sys.modules['transformers'] = None\n"
            "from planner.__main__ import main\n"
            "rc = main(['demo', '--seq', '96', '--layers', '1', '--reps', '1'])\n"
            "loaded = {m.split('.')[0] for m, mod in sys.modules.items() if mod is not None}\n"
            "assert 'transformers' not in loaded, 'the demo imported transformers'\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "original model" in r.stdout
