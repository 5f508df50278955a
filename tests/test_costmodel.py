"""Cost model: symbolic costs, crossover, and the per-call dense/sparse choice."""
import pytest
import sympy as sp
import torch
import torch.nn.functional as F

import planner
from planner import costmodel as cm
from runtime import plan

H100 = cm.PROFILES["h100"]


def test_costs_are_symbolic_and_sensible():
    fl, by, programs = cm.flops_bytes("block_sparse")
    assert {str(s) for s in fl.free_symbols} >= {"N_q", "N_kv", "D", "rho", "H_q", "B"}
    kw = dict(B=1, Hq=16, Hkv=16, D=128)
    d1 = cm.estimate("dense_sdpa", H100, Nq=4096, Nkv=4096, rho=1.0, **kw)
    d2 = cm.estimate("dense_sdpa", H100, Nq=8192, Nkv=8192, rho=1.0, **kw)
    assert 3.0 < d2 / d1 < 4.5                                  # quadratic, plus fixed costs
    s_lo = cm.estimate("block_sparse", H100, Nq=65536, Nkv=65536, rho=0.03, **kw)
    s_hi = cm.estimate("block_sparse", H100, Nq=65536, Nkv=65536, rho=0.5, **kw)
    assert s_lo < s_hi


def test_crossover_exists_for_low_density_and_not_for_full():
    n = cm.crossover(H100, Hq=16, Hkv=16, D=128, rho_of_n=0.05)
    assert n is not None and 128 <= n <= 65536
    kw = dict(B=1, Hq=16, Hkv=16, D=128, rho=0.05)
    below, above = int(n * 0.7), int(n * 1.5)
    assert cm.estimate("block_sparse", H100, Nq=below, Nkv=below, **kw) > \
        cm.estimate("dense_sdpa", H100, Nq=below, Nkv=below, **dict(kw, rho=1.0))
    assert cm.estimate("block_sparse", H100, Nq=above, Nkv=above, **kw) < \
        cm.estimate("dense_sdpa", H100, Nq=above, Nkv=above, **dict(kw, rho=1.0))
    assert cm.crossover(H100, Hq=16, Hkv=16, D=128, rho_of_n=1.0) is None


def test_cpu_profile_always_follows_the_policy():
    assert cm.profile_for("cpu").sparse_kernels is False
    f = planner.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                        policy=planner.policy("block_topk", block=16, topk=1))
    q = torch.randn(1, 2, 64, 16)
    f(q, q, q)
    s = planner.inspect(f).sites[0]
    assert s.density < 1 and "reference kernels" in s.schedule


def test_static_shape_below_crossover_is_planned_as_sdpa(monkeypatch):
    """Static shape, dense cheaper: the site is emitted as exact SDPA (no sparse ops run)."""
    monkeypatch.setattr(cm, "profile_for", lambda device: H100)
    plan._choose.cache_clear()

    def attn(q, k, v, m):
        s = q @ k.transpose(-2, -1) * 0.25
        s = s.masked_fill(m, float("-inf"))
        return torch.softmax(s, -1) @ v
    f = planner.compile(attn, policy=planner.policy("block_topk", block=16, topk=1))
    q, k, v = (torch.randn(1, 2, 96, 16) for _ in range(3))
    m = torch.ones(96, 96, dtype=torch.bool).triu(1)
    assert (f(q, k, v, m) - attn(q, k, v, m)).abs().max() < 1e-5
    rep = planner.inspect(f)
    s = rep.sites[0]
    assert s.schedule.startswith("dense SDPA (static") and s.kernel == "sdpa (in graph)"
    code = rep.graph_code()
    assert "scaled_dot_product_attention" in code and "sparse.attend" not in code
    plan._choose.cache_clear()


def test_runtime_picks_dense_below_the_crossover(monkeypatch):
    """With a GPU profile the planner runs dense where dense is estimated cheaper."""
    monkeypatch.setattr(cm, "profile_for", lambda device: H100)
    plan._choose.cache_clear()
    pol = planner.policy("block_topk", block=16, topk=1)
    f = planner.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                        policy=pol, dynamic=True)
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    out = f(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - ref).abs().max() < 1e-5, "dense chosen at N=128: exact output"
    s = planner.inspect(f).sites[0]
    assert "cost model: dense" in s.kernel and s.density == pytest.approx(1.0)
    assert s.crossover is not None and s.crossover > 128 and s.schedule.startswith("dense")
    # the same site above its crossover follows the policy (decided on shapes alone)
    from runtime.spec import lookup
    gm = planner.inspect(f)._graphs[0]
    key = [n for n in gm.graph.nodes if n.target is torch.ops.sparse.attend.default][0].args[-1]
    spec = lookup(key)
    assert spec.schedule == "auto"
    n = int(s.crossover * 1.3) + 16
    big = torch.empty(1, 2, n, 16, device="meta")
    assert plan.choose(spec, big, big) == "policy"
    small = torch.empty(1, 2, int(s.crossover * 0.7), 16, device="meta")
    assert plan.choose(spec, small, small) == "dense"
    plan._choose.cache_clear()


def test_cost_model_off_always_follows_policy(monkeypatch):
    monkeypatch.setattr(cm, "profile_for", lambda device: H100)
    plan._choose.cache_clear()
    f = planner.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                        policy=planner.policy("block_topk", block=16, topk=1), cost_model="off")
    q = torch.randn(1, 2, 128, 16)
    f(q, q, q)
    assert planner.inspect(f).sites[0].density < 1
    plan._choose.cache_clear()
    with pytest.raises(ValueError, match="cost_model"):
        planner.compile(lambda x: x, cost_model="sometimes")


def test_adaptive_policy_falls_back_to_dense_at_high_measured_density(monkeypatch):
    """A threshold selection that kept almost every block runs dense; a sparse one does not."""
    from runtime.spec import SiteSpec
    monkeypatch.setattr(cm, "profile_for", lambda device: H100)
    spec = SiteSpec(site="t", owner="test", policy=planner.policy("threshold", block=64),
                    scale=0.1, causal="lower_right", schedule="auto")
    n, b = 65536, 64
    q = k = torch.empty(1, 16, n, 128, device="meta")
    nqb = n // b
    full = torch.arange(1, nqb + 1, dtype=torch.int32).expand(1, 16, nqb)   # every visible block
    go, rho = plan.dense_at_measured_density(spec, q, k, full, b)
    assert go and rho == pytest.approx(1.0)
    few = torch.full((1, 16, nqb), 3, dtype=torch.int32)
    go, rho = plan.dense_at_measured_density(spec, q, k, few, b)
    assert not go and rho < 0.01
    off = SiteSpec(site="t", owner="test", policy=planner.policy("threshold", block=64),
                   scale=0.1, causal="lower_right")                       # cost model off
    assert plan.dense_at_measured_density(off, q, k, full, b) == (False, None)


def test_fit_finds_the_host_issue_floor():
    """Short calls cannot run faster than the host issues them: the fit recovers a floor from
    synthetic times that follow max(device time, 40 us), and estimates respect it."""
    prof = cm.load_profile("h100")
    true = cm.KernelRates(0.5, 0.9, 10.0, 0.0, 40.0)
    fake = cm.HardwareProfile("t", prof.peak_tflops, prof.bandwidth_gbs, prof.n_sm,
                              (("block_sparse", true),))
    pts = []
    for n in (512, 1024, 4096, 16384, 65536):
        for rho in (0.03, 0.12, 0.5):
            shape = dict(B=1, Hq=16, Hkv=16, Nq=n, Nkv=n, D=128, rho=rho, block=128)
            pts.append(dict(shape, ms=cm.estimate("block_sparse", fake, **shape) * 1e3))
    got = cm.fit_rates("block_sparse", pts, prof.peak_tflops, prof.bandwidth_gbs, prof.n_sm)
    assert 35.0 <= got.floor_us <= 45.0
    tiny = dict(B=1, Hq=1, Hkv=1, Nq=16, Nkv=16, D=64, rho=1.0, block=128)
    assert cm.estimate("block_sparse", fake, **tiny) >= 40e-6
