"""README.md's measured figures are the ones in the result files they cite
(scripts/readme_figures.py), and the check fails when one drifts or goes unchecked."""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "readme_figures", os.path.join(ROOT, "scripts", "readme_figures.py"))
rf = importlib.util.module_from_spec(_spec)
sys.modules["readme_figures"] = rf               # dataclasses look their module up there
_spec.loader.exec_module(rf)


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_every_readme_figure_is_in_its_file():
    problems = rf.check()
    assert not problems, "\n".join(problems)


def _check_edited(tmp_path, old: str, new: str) -> list:
    text = _readme()
    assert old in text, old
    p = tmp_path / "README.md"
    p.write_text(text.replace(old, new, 1), encoding="utf-8")
    return rf.check(str(p))


def test_a_drifted_figure_fails(tmp_path):
    problems = _check_edited(tmp_path, "1.31x faster than FlexAttention at its best",
                             "1.49x faster than FlexAttention at its best")
    assert any(p.startswith("kernels_h100.json: README.md does not say") and "1.31x" in p
               for p in problems), problems


def test_a_drifted_quality_figure_fails(tmp_path):
    problems = _check_edited(tmp_path, "vertical_slash 0.62 (+2.3%)", "vertical_slash 0.62 (+2.4%)")
    assert any("quality/smollm2_135m_h100.json" in p for p in problems), problems


def test_an_unchecked_figure_fails(tmp_path):
    problems = _check_edited(tmp_path, "dense planned, 0.95-1.00x |",
                             "dense planned, 0.95-1.00x; 7.7x faster than anything |")
    assert any("figure '7.7' is checked against no file" in p for p in problems), problems


def test_a_figure_from_a_file_the_row_does_not_cite_fails(tmp_path):
    problems = _check_edited(tmp_path, "| `e2e_h100.md` |", "| `e2e_h200.md` |")
    assert any(p.startswith("e2e_h100.json: quoted in a README row that does not cite it")
               for p in problems), problems


@pytest.mark.parametrize("x,want", [(8.61, "+8.6"), (17.72, "+18"), (9.96, "+10"),
                                    (2.96, "+3.0"), (2.345, "+2.3"), (51.95, "+52"),
                                    (-3.46, "-3.5")])
def test_sig2(x, want):
    assert rf.sig2(x) == want


def test_select_paths():
    doc = {"rows": [{"case": "a", "N": 8, "density": 0.1206, "ms": 2.0},
                    {"case": "a", "N": 8, "density": 0.031, "ms": 1.0},
                    {"case": "b", "N": 16, "ms": 3.0, "of": "x y"}]}
    assert rf.select(doc, "rows[case=a&N=8&density~0.121].ms") == 2.0
    assert rf.select(doc, "rows[N=16].of") == "x y"
    assert [r["ms"] for r in rf.select(doc, "rows[case=a]", many=True)] == [2.0, 1.0]
    with pytest.raises(LookupError, match="matches 2 elements"):
        rf.select(doc, "rows[case=a].ms")
    with pytest.raises(LookupError, match="matches 0 elements"):
        rf.select(doc, "rows[case=c].ms")


def test_markdown_tables_read_as_rows():
    rows = rf._md_tables("# t\n\n| policy | run | GPU ms |\n|---|---|---|\n"
                         "| `threshold` | before | **36.6** |\n\ntext\n"
                         "| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert rows == [{"policy": "threshold", "run": "before", "GPU ms": "36.6"},
                    {"a": "1", "b": "2"}]
