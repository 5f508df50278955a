"""Every policy of the catalogue against an independent, loop-based computation of its
definition (tests/brute.py), and with a covering budget against dense attention."""
import pytest
import torch

import planner
from brute import (auto_keep, bigbird_keep, dense_with_keep, longformer_keep, quest_keep,
                   sink_window_keep, threshold_keep, vertical_slash_keep)
from conftest import max_err
from planner.models import GPTConfig, TinyGPT
from runtime import estimators
from runtime.spec import SiteSpec
from codegen.select.reference import block_keep_fn

SHAPES = [
    pytest.param(1, 4, 2, 45, 45, 8, "lower_right", id="B1-H4kv2-N45-causal"),
    pytest.param(2, 3, 3, 30, 30, 8, None, id="B2-H3-N30-noncausal"),
    pytest.param(1, 2, 1, 7, 50, 8, "lower_right", id="B1-H2kv1-Nq7-Nkv50-cache"),
]


def _keep(spec, q, k):
    est = estimators.get(spec.policy.name)
    sc = est.score(q, k, [], spec) if est.score else None
    counts, idx = est.select(sc, q, k, spec)
    Nq, Nkv = q.shape[2], k.shape[2]
    keep = block_keep_fn(counts, idx, estimators.block_of(spec), Nkv)(0, Nq)
    if est.token_keep:
        keep = keep & est.token_keep(spec, Nq, Nkv, q.device)(0, Nq)
    keep = keep.repeat_interleave(q.shape[1] // k.shape[1], dim=1) if keep.shape[1] != 1 else keep
    vis = sink_window_keep(q.shape[0], q.shape[1], Nq, Nkv, sink=10 ** 9, window=10 ** 9,
                           causal=spec.causal)
    return keep.expand_as(vis) & vis


CASES = [
    pytest.param(planner.policy("threshold", gamma=0.6, block=8, min_budget=0),
                 lambda q, k, c: threshold_keep(q, k, block=8, gamma=0.6, min_budget=0,
                                                max_budget=0, sink_blocks=1, local_blocks=1,
                                                scale=0.35, causal=c), id="threshold-g0.6"),
    pytest.param(planner.policy("threshold", gamma=0.95, block=5, min_budget=1, max_budget=3,
                                sink_blocks=0),
                 lambda q, k, c: threshold_keep(q, k, block=5, gamma=0.95, min_budget=1,
                                                max_budget=3, sink_blocks=0, local_blocks=1,
                                                scale=0.35, causal=c), id="threshold-g0.95-max3"),
    pytest.param(planner.policy("vertical_slash", last_q=6, n_vertical=3, n_slash=2, block=8,
                                sink_tokens=1, local_tokens=2),
                 lambda q, k, c: vertical_slash_keep(q, k, last_q=6, n_vertical=3, n_slash=2,
                                                     block=8, sink_tokens=1, local_tokens=2,
                                                     scale=0.35, causal=c), id="vslash"),
    pytest.param(planner.policy("quest", page=4, budget=12),
                 lambda q, k, c: quest_keep(q, k, page=4, budget=12, sink_pages=0, local_pages=1,
                                            causal=c), id="quest-p4-b12"),
    pytest.param(planner.policy("longformer", window=6, global_tokens=3, block=8),
                 lambda q, k, c: longformer_keep(q.shape[0], q.shape[1], q.shape[2], k.shape[2],
                                                 window=6, global_tokens=3, causal=c),
                 id="longformer"),
    pytest.param(planner.policy("bigbird", window=8, global_tokens=8, random_blocks=2, seed=7,
                                block=8),
                 lambda q, k, c: bigbird_keep(q.shape[0], q.shape[1], k.shape[1], q.shape[2],
                                              k.shape[2], block=8, window=8, global_tokens=8,
                                              random_blocks=2, seed=7, causal=c), id="bigbird"),
    pytest.param(planner.policy("auto", target_density=0.4, block=8, tau=0.05),
                 lambda q, k, c: auto_keep(q, k, target_density=0.4, block=8, tau=0.05,
                                           sink_blocks=1, local_blocks=1, scale=0.35, causal=c),
                 id="auto-d0.4-tau0.05"),
    pytest.param(planner.policy("auto", target_density=0.3, block=8, tau=0.69),
                 lambda q, k, c: auto_keep(q, k, target_density=0.3, block=8, tau=0.69,
                                           sink_blocks=1, local_blocks=1, scale=0.35, causal=c),
                 id="auto-query-aware"),
    pytest.param(planner.policy("auto", target_density=0.3, block=8, tau=0.0),
                 lambda q, k, c: auto_keep(q, k, target_density=0.3, block=8, tau=0.0,
                                           sink_blocks=1, local_blocks=1, scale=0.35, causal=c),
                 id="auto-lines"),
]


@pytest.mark.parametrize("B, Hq, Hkv, Nq, Nkv, D, causal", SHAPES)
@pytest.mark.parametrize("pol, brute", CASES)
def test_selection_equals_brute_force_definition(pol, brute, B, Hq, Hkv, Nq, Nkv, D, causal):
    q, k = torch.randn(B, Hq, Nq, D), torch.randn(B, Hkv, Nkv, D)
    spec = SiteSpec(site="t", owner="test", policy=pol, scale=0.35, causal=causal,
                    gqa_group=Hq // Hkv)
    got = _keep(spec, q, k)
    vis = sink_window_keep(B, Hq, Nq, Nkv, sink=10 ** 9, window=10 ** 9, causal=causal)
    exp = brute(q, k, causal) & vis
    assert torch.equal(got, exp), f"{int((got != exp).sum())} pairs differ"


@pytest.mark.parametrize("pol", [
    pytest.param(planner.policy("threshold", gamma=1.0, block=8, min_budget=64), id="threshold"),
    pytest.param(planner.policy("vertical_slash", last_q=8, n_vertical=512, n_slash=512, block=8),
                 id="vertical_slash"),
    pytest.param(planner.policy("quest", page=8, budget=1024), id="quest"),
    pytest.param(planner.policy("longformer", window=1024, global_tokens=1, block=8),
                 id="longformer"),
    pytest.param(planner.policy("bigbird", window=1024, global_tokens=0, random_blocks=0),
                 id="bigbird"),
    pytest.param(planner.policy("auto", target_density=1.0, block=8), id="auto"),
])
def test_covering_budget_reproduces_dense(pol):
    m = TinyGPT(GPTConfig(n_layer=2)).eval()
    x = torch.randint(0, 256, (2, 61))
    with torch.no_grad():
        ref = m(x)
        cm = planner.compile(m, policy=pol)
        assert max_err(cm(x), ref) <= 1e-5
    rep = planner.inspect(cm)
    assert len(rep.sites) == 2 and all(s.density == pytest.approx(1.0) for s in rep.sites)


def test_threshold_density_adapts_per_head_and_is_reported():
    import torch.nn.functional as F

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    B, H, N, D = 1, 2, 256, 16
    k = torch.randn(B, H, N, D)
    q = torch.randn(B, H, N, D) * 0.01          # head 1: nearly uniform attention
    q[:, 0] = k[:, 0] * 4.0                      # head 0: each query finds its own key
    f = planner.compile(attn, policy=planner.policy("threshold", gamma=0.8, block=16))
    f(q, k, torch.randn(B, H, N, D))
    rep = planner.inspect(f)
    s = rep.sites[0]
    assert 0 < s.density < 1
    d0, d1 = s.density_per_head
    assert d0 < d1, "a peaked head needs fewer blocks to reach gamma than a flat one"
    assert "[" in str(rep)        # the table shows the spread across heads


@pytest.mark.parametrize("name, params, msg", [
    ("threshold", {"gamma": 0.0}, "'gamma' must be in (0.0, 1.0]"),
    ("threshold", {"gamma": 1.5}, "'gamma' must be in (0.0, 1.0]"),
    ("threshold", {"min_budget": 5, "max_budget": 2}, "'min_budget'"),
    ("quest", {"page": 0}, "'page' must be >= 1"),
    ("quest", {"page": 16, "budget": 8}, "'budget'"),
    ("vertical_slash", {"n_vertical": -1}, "'n_vertical' must be >= 0"),
    ("bigbird", {"random_blocks": -2}, "'random_blocks' must be >= 0"),
    ("longformer", {"window": 0}, "'window' must be >= 1"),
    ("auto", {"target_density": 0}, "'target_density' must be in (0.0, 1.0]"),
])
def test_bad_parameters_name_the_parameter_and_range(name, params, msg):
    with pytest.raises(ValueError) as e:
        planner.policy(name, **params)
    assert msg in str(e.value)


def test_unknown_keys_are_rejected():
    with pytest.raises(TypeError, match="gama"):
        planner.policy("threshold", gama=0.9)
