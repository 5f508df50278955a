"""Matched-density solvers of the adaptive policies (threshold, vertical_slash): the exact pair
count of vertical_slash's lines, the calibration on held-out text of a tiny random model, its
cache, and the errors for targets out of range."""
import random

import pytest
import torch

from planner.quality import harness
from planner.quality.policies import (CALIBRATED, CALIBRATION_RTOL, PolicySpec, _causal_pairs,
                                      block_topk_pairs, vertical_slash_floor, vertical_slash_pairs)
from planner.quality.toy import tiny_llama_lm, toy_corpus


@pytest.fixture(scope="module")
def toy():
    lm, codec = tiny_llama_lm(layers=1)
    hay, heldout = toy_corpus(codec)
    return lm, codec, hay, heldout


def _calibrator(toy, n, **kw):
    lm, _, _, heldout = toy
    cfg = harness.EvalConfig(lengths=(n,), ppl_windows=1, **kw)
    return harness.Calibrator(lm, heldout, cfg, log=lambda s: None)


def _measured(lm, pol, ids) -> float:
    """Density planner.inspect reports for ``pol`` after one prefill of ``ids`` (as a row)."""
    from runtime import cpu_attend
    r = harness.Runner(lm, pol)
    with cpu_attend.enabled(), torch.no_grad():
        r._prefill(ids)
    torch._dynamo.reset()
    return r.last_density["mean"]


# ------------------------------------------------------------------ vertical_slash's pair count
def _block_mask_pairs(sel: torch.Tensor, n: int, block: int) -> int:
    """Causal pairs inside the kept blocks of ``sel`` bool [NQB, NKB] (counted pair by pair)."""
    q = torch.arange(n)
    causal = (q[None, :] <= q[:, None]).to(torch.int64)
    nb = sel.shape[-1]
    pad = nb * block - n
    per_block = torch.nn.functional.pad(causal, (0, pad, 0, pad)).reshape(
        nb, block, nb, block).sum(dim=(1, 3))
    return int((sel.to(torch.int64) * per_block).sum())


@pytest.mark.parametrize("n, block, n_cols, n_offs, seed", [
    (300, 16, 5, 3, 0), (257, 32, 0, 7, 1), (513, 16, 12, 0, 2), (1000, 64, 9, 9, 3),
    (100, 16, 40, 40, 4), (129, 8, 3, 2, 5),
])
def test_vertical_slash_pairs_counts_the_block_cover_of_select_vslash(n, block, n_cols, n_offs,
                                                                      seed):
    """The closed-form count against select_vslash's block map for random line masses."""
    from codegen.select.policies import select_vslash
    from codegen.select.reference import _cdiv
    g = torch.Generator().manual_seed(seed)
    est = torch.rand(1, 1, 2, n, generator=g)
    counts, idx = select_vslash(est, n, n, "lower_right", block, n_vertical=n_cols,
                                n_slash=n_offs, sink_tokens=4, local_tokens=block // 2)
    nb = _cdiv(n, block)
    idx = idx[0, 0, :, :nb].long()
    sel = torch.zeros(nb, nb + 1, dtype=torch.bool).scatter_(
        -1, torch.where(idx >= 0, idx, nb), True)[:, :nb]
    # the chosen lines, as top_lines picks them: forced first, then the top by mass
    cols = set(range(4)) | set(est[0, 0, 0, 4:].argsort(descending=True)[:n_cols].add(4).tolist())
    lo = block // 2
    offs = set(range(lo)) | set(est[0, 0, 1, lo:].argsort(descending=True)[:n_offs]
                                .add(lo).tolist())
    assert vertical_slash_pairs(n, block, cols, offs) == _block_mask_pairs(sel, n, block)


def test_vertical_slash_floor_is_what_inspect_measures(toy):
    """With no chosen lines, the forced ones are kept whatever the input: exact."""
    import planner
    lm, _, _, heldout = toy
    n = 400
    pol = planner.policy("vertical_slash", n_vertical=0, n_slash=0, block=16, sink_tokens=4,
                         local_tokens=16)
    assert _measured(lm, pol, heldout[:n]) == pytest.approx(vertical_slash_floor(n, 16, 4, 16),
                                                            abs=1e-9)


# ------------------------------------------------------------------ calibration
def test_vertical_slash_calibration_picks_the_closest_count(toy):
    lm, _, hay, _ = toy
    n, target = 1024, 0.25
    cal = _calibrator(toy, n)
    spec = PolicySpec.parse(f"vertical_slash@{target}:block=16")
    pol = spec.resolve(n, cal)
    rec = cal.record(spec, n)
    assert pol.n_vertical == pol.n_slash == rec["value"] and pol.local_tokens == 16
    assert rec["solved"] == "n_vertical=n_slash" and rec["density"] == pytest.approx(target,
                                                                                     rel=0.15)
    # the chosen count is the closest integer: its neighbours, measured the same way, are not
    # closer to the target
    k = pol.n_vertical
    import dataclasses
    near = [cal.measure(dataclasses.replace(pol, n_vertical=x, n_slash=x), n)
            for x in (k - 1, k + 1)]
    assert all(abs(rec["density"] - target) <= abs(d - target) + 1e-12 for d in near)
    # on text it was not calibrated on, the density stays near the target
    ids = hay.slice(random.Random(3), n)
    assert _measured(lm, pol, ids) == pytest.approx(target, rel=0.25)


def test_threshold_calibration_reaches_the_target(toy):
    lm, _, hay, _ = toy
    n = 1024
    for target in (0.3, 0.15):
        cal = _calibrator(toy, n)
        spec = PolicySpec.parse(f"threshold@{target}")
        pol = spec.resolve(n, cal)
        rec = cal.record(spec, n)
        assert pol.block == 16 and pol.gamma == rec["value"] and rec["solved"] == "gamma"
        assert abs(rec["density"] - target) <= CALIBRATION_RTOL * target + 1e-9
        assert len(rec["steps"]) <= 10
        ids = hay.slice(random.Random(5), n)
        assert _measured(lm, pol, ids) == pytest.approx(target, rel=0.25)


def test_threshold_with_gamma_given_solves_max_budget(toy):
    n, target = 512, 0.35
    cal = _calibrator(toy, n)
    spec = PolicySpec.parse(f"threshold@{target}:gamma=0.5,block=16")
    pol = spec.resolve(n, cal)
    rec = cal.record(spec, n)
    assert pol.gamma == 0.5 and rec["solved"] == "max_budget" and pol.max_budget >= 1
    assert rec["density"] == pytest.approx(target, rel=0.1)


def test_calibration_is_cached_and_reused(toy, monkeypatch):
    n = 512
    cal = _calibrator(toy, n)
    spec = PolicySpec.parse("threshold@0.3")
    first = spec.resolve(n, cal)
    assert len(cal.records) == 1
    again = harness.Calibrator(toy[0], toy[3], cal.cfg, records=list(cal.records))
    monkeypatch.setattr(again, "measure", lambda *a: pytest.fail("measured again"))
    assert spec.resolve(n, again) == first
    assert "gamma calibrated: density" in again.note(spec, n)
    # every free parameter given: nothing to calibrate, nothing measured
    fixed = PolicySpec.parse("vertical_slash@0.3:n_vertical=3,n_slash=2")
    pol = fixed.resolve(n, again)
    assert (pol.n_vertical, pol.n_slash) == (3, 2) and again.note(fixed, n) == ""


def test_calibration_windows_avoid_the_perplexity_windows():
    text = list(range(12000))                       # every token distinct: windows are positions
    for n, count, lead in ((512, 3, ()), (1024, 1, ()), (700, 4, (99999,))):
        ppl = harness._ppl_windows(text, n, count, 0, lead)
        cal = harness.calibration_windows(text, n, 2, 0, count, lead)
        assert len(cal) == 2 and all(len(w) == n and w[:len(lead)] == list(lead) for w in cal)
        used = {t for w in ppl for t in w[len(lead):]}
        assert not used & {t for w in cal for t in w[len(lead):]}
        assert cal == harness.calibration_windows(text, n, 2, 0, count, lead)   # deterministic
    with pytest.raises(ValueError, match="calibration needs 2 windows"):
        harness.calibration_windows(text[:2048], 1024, 2, 0, 1)


def test_harness_row_records_the_calibration(toy, tmp_path):
    lm, codec, hay, heldout = toy
    cfg = harness.EvalConfig(lengths=(512,), policies=("threshold@0.3",), tasks=("passkey",),
                             depths=(1.0,), trials=1, ppl_windows=1)
    out = str(tmp_path / "t.json")
    res = harness.evaluate(lm, codec, hay, heldout, cfg, out_path=out, log=lambda s: None,
                           meta={"notes": ["first run"]})
    (row,) = res["rows"]
    assert "gamma calibrated: density" in row["params"] and row["calibration"][0]["solved"]
    assert len(res["calibration"]) == 1
    from planner.quality import report
    assert "## Calibrated densities" in report.markdown(res)
    cfg2 = harness.EvalConfig(lengths=(512,), policies=("threshold@0.3", "dense"),
                              tasks=("passkey",), depths=(1.0,), trials=1, ppl_windows=1)
    logs: list = []
    again = harness.evaluate(lm, codec, hay, heldout, cfg2, out_path=out, resume=True,
                             log=logs.append)
    assert len(again["rows"]) == 2 and len(again["calibration"]) == 1
    assert not any("calibrat" in line for line in logs)
    assert again["meta"]["notes"] == ["first run"]              # notes of earlier runs are kept


# ------------------------------------------------------------------ errors
def test_targets_out_of_range_name_the_value_and_the_range():
    for bad in ("threshold@0", "threshold@1.5", "vertical_slash@-0.1"):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
            PolicySpec.parse(bad)
    for name, fn in CALIBRATED.items():
        with pytest.raises(ValueError, match=r"1\.5 is outside \(0, 1\]"):
            fn(2048, 1.5, {}, lambda p: pytest.fail("measured"), lambda s: None)
    n = 2048
    floor = block_topk_pairs(n, 16, 1, 1, 1) / _causal_pairs(n)
    with pytest.raises(ValueError, match=rf"0\.02 is not reachable.*\[{floor:.4f}, 1\.0000\]"):
        CALIBRATED["threshold"](n, 0.02, {}, lambda p: pytest.fail("measured"), lambda s: None)
    with pytest.raises(ValueError, match=r"0\.3 is not reachable.*max_budget=2"):
        CALIBRATED["threshold"](n, 0.3, {"max_budget": 2}, lambda p: pytest.fail("measured"),
                                lambda s: None)
    vfloor = vertical_slash_floor(n, 16, 4, 16)
    with pytest.raises(ValueError, match=rf"0\.01 is not reachable.*\[{vfloor:.4f}, 1\.0000\]"):
        CALIBRATED["vertical_slash"](n, 0.01, {}, lambda p: pytest.fail("measured"),
                                     lambda s: None)
    with pytest.raises(ValueError, match="needs calibration prefills"):
        PolicySpec.parse("threshold@0.1:block=16").resolve(n)


def test_calibrated_specs_parse_with_fixed_parameters():
    s = PolicySpec.parse("threshold@0.1:block=16")
    assert (s.label, s.name, s.density, s.params) == ("threshold@10%:block=16", "threshold", 0.1,
                                                      (("block", 16),))
    assert s.needs_calibration and s.series() == "threshold:block=16"
    assert PolicySpec.parse("vertical_slash@25%").needs_calibration
    assert not PolicySpec.parse("threshold:gamma=0.8").needs_calibration
    assert PolicySpec.parse('{"model.layers.0.*": "dense", "*": "threshold@0.1"}') \
        .needs_calibration
