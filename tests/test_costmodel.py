"""Cost model: symbolic costs, crossover, and the per-call dense/sparse choice."""
import pytest
import sympy as sp
import torch
import torch.nn.functional as F

import planner
from runtime import costmodel as cm
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


def test_cpu_profile_plans_dense_where_the_gather_is_slower():
    """On 2 CPU cores the gathered blocks cost ~9x SDPA per kept pair: at short lengths the
    cost model runs a block_topk site densely (exactly), cost_model="off" follows the policy."""
    assert cm.profile_for("cpu").sparse_kernels is True
    attn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    q = torch.randn(1, 2, 256, 16)
    pol = planner.policy("block_topk", block=16, topk=1)
    f = planner.compile(attn, policy=pol, cost_model="auto")
    assert (f(q, q, q) - attn(q, q, q)).abs().max() < 1e-5
    s = planner.inspect(f).sites[0]
    assert s.density in (None, 1.0) and "dense" in s.schedule, s     # planned as SDPA
    g = planner.compile(attn, policy=pol, cost_model="off")
    g(q, q, q)
    assert planner.inspect(g).sites[0].density < 1
    d_long = cm.estimate("block_sparse", cm.profile_for("cpu"), B=1, Hq=8, Hkv=8, Nq=1 << 15,
                         Nkv=1 << 15, D=64, rho=0.05, block=64)
    d_dense = cm.estimate("dense_sdpa", cm.profile_for("cpu"), B=1, Hq=8, Hkv=8, Nq=1 << 15,
                          Nkv=1 << 15, D=64, rho=1.0, block=64)
    assert d_long < d_dense                 # long and sparse enough: the gather wins


def test_static_shape_below_crossover_is_planned_as_sdpa(monkeypatch):
    """Static shape, dense cheaper: the site is emitted as exact SDPA (no sparse ops run)."""
    monkeypatch.setattr(cm, "profile_for", lambda device: H100)
    plan._choose.cache_clear()

    def attn(q, k, v, m):
        s = q @ k.transpose(-2, -1) * 0.25
        s = s.masked_fill(m, float("-inf"))
        return torch.softmax(s, -1) @ v
    f = planner.compile(attn, cost_model="auto",
                        policy=planner.policy("block_topk", block=16, topk=1))
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
                        cost_model="auto", policy=pol, dynamic=True)
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


def _profile(*entries, dense=cm.KernelRates(0.76, 1.0, 13.5)):
    """An H100-sized profile with dense SDPA and the given (candidate, KernelRates)."""
    return cm.HardwareProfile("t", 788.0, 2966.0, 132, (("dense_sdpa", dense),) + entries)


def test_schedule_variants_are_candidates_where_the_site_fits_them():
    r = cm.KernelRates(0.5, 1.0, 15.0)
    prof = _profile(("block_sparse", r), *((v.name, r) for v in cm.VARIANTS))
    at128 = cm.candidates(prof, "block_sparse", block=128, head_dim=128, dtype="bfloat16")
    assert set(at128) == {v.name for v in cm.VARIANTS if v.family == "block_sparse"}
    at64 = cm.candidates(prof, "block_sparse", block=64, head_dim=64, dtype=torch.float16)
    assert at64 and all(cm.variant(c).block_m <= 64 and cm.variant(c).block_n <= 64
                        for c in at64)
    # no measured variant for fp32 or D > 128: the family's default schedule
    assert cm.candidates(prof, "block_sparse", block=128, head_dim=256) == ["block_sparse"]
    assert cm.candidates(prof, "block_sparse", block=128, dtype="float32") == ["block_sparse"]
    assert cm.candidates(H100, "block_sparse") == ["block_sparse"]        # nothing fitted
    with pytest.raises(ValueError, match="unknown candidate 'block_sparse@m7'"):
        cm.flops_bytes("block_sparse@m7")
    var = cm.variant("block_sparse@m128n64w8s3")
    sch = var.schedule()
    assert (sch.block_m, sch.block_n, sch.num_warps, sch.num_stages) == (128, 64, 8, 3)


def test_tiles_trade_parallelism_against_efficiency():
    """128-row tiles run their MMAs more efficiently, but at a short causal length they leave
    SMs idle (half the programs, the last one twice the mean), so 64-row tiles win there; at a
    long length every tile shape fills the device and the efficient one wins."""
    big, small = "block_sparse@m128n64w8s3", "block_sparse@m64n64w4s3"
    prof = _profile((big, cm.KernelRates(0.9, 0.9, 10.0)), (small, cm.KernelRates(0.7, 0.9, 10.0)))
    kw = dict(B=1, Hq=16, Hkv=16, D=128, block=128)
    name, t = cm.best(prof, "block_sparse", Nq=1024, Nkv=1024, rho=0.5, **kw)
    assert name == small and t == cm.estimate(small, prof, Nq=1024, Nkv=1024, rho=0.5, **kw)
    assert cm.best(prof, "block_sparse", Nq=65536, Nkv=65536, rho=0.5, **kw)[0] == big
    sub = {cm.B: 1, cm.Hq: 16, cm.Hkv: 16, cm.Nq: 65536, cm.Nkv: 65536, cm.D: 128, cm.rho: 0.1}
    w_big, w_small = cm.work(big), cm.work(small)
    assert float(w_small["programs"].subs(sub)) == 2 * float(w_big["programs"].subs(sub))
    # 32-key steps: twice the loop steps of the longest program; same FLOPs and exponentials
    w32 = cm.work("block_sparse@m128n32w8s4")
    assert float(w32["steps"].subs(sub)) == 2 * float(w_big["steps"].subs(sub))
    assert w32["flops"] == w_big["flops"] and w32["scores"] == w_big["scores"]


def test_softmax_cost_makes_small_heads_dearer_per_flop():
    """Each score costs ``exp_ratio`` matrix FLOPs: halving D does not halve the time."""
    kw = dict(B=1, Hq=16, Hkv=16, Nq=65536, Nkv=65536, rho=1.0)
    t128 = cm.estimate("dense_sdpa", H100, D=128, **kw)
    t64 = cm.estimate("dense_sdpa", H100, D=64, **kw)
    assert t64 / t128 == pytest.approx((256 + 256) / (512 + 256), rel=0.01)


def test_fit_recovers_the_saturating_programs_of_a_decode_split():
    """Synthetic decode times with 4 programs per SM needed for full rates: the fit finds it."""
    true = cm.KernelRates(0.3, 0.8, 12.0, 0.0, 0.0, 4.0)
    cand = "token_sparse_decode@split0"
    fake = _profile((cand, true))
    pts = []
    for n in (1024, 4096, 16384, 65536):
        for rho_ in (0.03, 0.12, 0.5, 1.0):
            for b in (1, 8, 64):
                shape = dict(B=b, Hq=16, Hkv=16, Nq=1, Nkv=n, D=128, rho=rho_, block=128)
                pts.append(dict(shape, ms=cm.estimate(cand, fake, **shape) * 1e3))
    got = cm.fit_rates(cand, pts, fake.peak_tflops, fake.bandwidth_gbs, fake.n_sm)
    assert got.sat == 4.0 and got.bw_eff == pytest.approx(0.8, abs=0.03)
    # splitting the lists wins where rows alone cannot fill the device
    split = "token_sparse_decode@split16"
    prof = _profile((cand, true), (split, true))
    kw = dict(B=8, Hq=16, Hkv=16, Nq=1, Nkv=65536, D=128, rho=0.03)
    assert cm.best(prof, "token_sparse_decode", **kw)[0] == split
    assert cm.crossover(prof, B=8, Hq=16, Hkv=16, D=128, rho_of_n=0.03, decode=True) is not None


def test_runtime_launches_the_schedule_the_cost_model_picked(monkeypatch):
    """A site above its crossover runs the block-sparse kernel with the variant the profile
    makes cheapest; the report names it; the output equals the reference's."""
    from runtime.kernels import block_sparse as bsk, launch
    if not launch.runs_triton("cpu"):
        pytest.skip("needs TRITON_INTERPRET=1")
    cheap, dear = cm.KernelRates(0.9, 1.0, 1.0), cm.KernelRates(0.2, 0.2, 50.0)
    prof = _profile(("block_sparse", dear), ("block_sparse@m64n32w4s3", cheap),
                    ("block_sparse@m64n64w4s3", dear), dense=cm.KernelRates(0.01, 0.01, 500.0))
    monkeypatch.setattr(cm, "profile_for", lambda device: prof)
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    plan._choose.cache_clear()
    calls = []
    real = bsk.block_sparse_attention

    def spy(*a, **kw):
        calls.append(kw.get("schedule"))
        return real(*a, **kw)
    monkeypatch.setattr(bsk, "block_sparse_attention", spy)
    pol = planner.policy("block_topk", block=64, topk=1)
    f = planner.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                        cost_model="auto", policy=pol, dynamic=True)
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 200, 16, dtype=torch.float16) for _ in range(3))
    out = f(q, k, v)
    site = planner.inspect(f).sites[0]
    assert site.kernel == "triton_block_sparse[m64n32w4s3]", site.kernel
    assert calls and calls[-1] == cm.variant("block_sparse@m64n32w4s3").schedule()
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    ref = planner.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                          policy=pol, cost_model="off")(q.float(), k.float(), v.float())
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 3e-3, rel
    plan._choose.cache_clear()


def test_decode_split_variants_agree_and_split_differently():
    from runtime.kernels import launch, token_sparse as tsk
    if not launch.runs_triton("cpu"):
        pytest.skip("needs TRITON_INTERPRET=1")
    from codegen.token_sparse import token_sparse_attention_ref
    torch.manual_seed(2)
    q = torch.randn(2, 2, 1, 16)
    k, v = torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    idx = torch.rand(2, 2, 1, 300).topk(200, dim=-1).indices.to(torch.int32)
    ref, _ = token_sparse_attention_ref(q, k, v, idx, scale=0.25)
    splits = set()
    for per_sm in (0, 4, 16):
        out, _ = tsk.token_sparse_attention(q, k, v, idx, scale=0.25, split_per_sm=per_sm)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5
        p = tsk._token_sparse_plan("token_sparse_attention", (q, k, v, idx), 0.25, None,
                                  backward=False, split_per_sm=per_sm)
        splits.add(p.n_split)
        if per_sm == 0:
            assert p.n_split == 1
    assert len(splits) >= 2
    with pytest.raises(ValueError, match="split_per_sm must be None or an int >= 0, got -1"):
        tsk.token_sparse_attention(q, k, v, idx, scale=0.25, split_per_sm=-1)


def _site_overhead_file(tmp_path, rows):
    import json
    (tmp_path / "site_overhead_h100.json").write_text(json.dumps({
        "meta": {}, "fit": {"sink_window": {"fixed_us": 20.0, "pair_ps": 0.0}},
        "rows": [{"shape": "32/8x128", "policy": "sink_window", "N": n, "sdpa_ms": sd,
                  "site_wall_ms": wall, "site_host_ms": host} for n, sd, wall, host in rows]}))
    return cm.load_profile.__wrapped__("h100", str(tmp_path))


def test_measured_sites_correct_the_choice_where_the_kernel_was_slow(tmp_path):
    from runtime import policies
    shape = dict(B=1, Hq=32, Hkv=8, D=128)
    base = cm.PROFILES["h100"]
    # the analytic model runs sink_window sparse at 4096 on this shape ...
    assert plan.decide(policies.SinkWindow(), base, Nq=4096, Nkv=4096, **shape).choice == "policy"
    # ... a card that measured the whole site slower than SDPA there (device-bound: wall >>
    # host) plans it dense; at 65536, where it measured faster, it stays sparse
    prof = _site_overhead_file(tmp_path, [(4096, 0.28, 0.50, 0.14), (16384, 3.3, 1.7, 0.15)])
    assert len(prof.calibration.rows) == 2
    at = lambda n: plan.decide(policies.SinkWindow(), prof, Nq=n, Nkv=n, **shape)  # noqa: E731
    assert at(4096).choice == "dense"
    assert at(4096).dense_s == pytest.approx(0.28e-3)
    assert at(4096).sparse_s == pytest.approx(0.50e-3)
    assert at(65536).choice == "policy"
    # a decode call (Nq != Nkv) is not what was measured: the analytic estimate stands
    dec = plan.decide(policies.SinkWindow(), prof, Nq=1, Nkv=4096, **shape)
    assert dec.dense_s == plan.decide(policies.SinkWindow(), base, Nq=1, Nkv=4096, **shape).dense_s


def test_a_host_bound_measurement_only_lowers_the_sparse_estimate(tmp_path):
    from runtime import policies
    shape = dict(B=1, Hq=32, Hkv=8, D=128, Nq=4096, Nkv=4096)
    import dataclasses
    # wall == host: host-bound alone, the device time under it unknown -> no increase
    slow_host = _site_overhead_file(tmp_path, [(4096, 0.28, 5.0, 5.0)])
    base = plan.decide(policies.SinkWindow(),
                       dataclasses.replace(slow_host, calibration=cm.SiteCalibration()), **shape)
    assert plan.decide(policies.SinkWindow(), slow_host, **shape).sparse_s == pytest.approx(
        base.sparse_s)


def test_sparse_is_taken_only_with_a_margin():
    from runtime import policies
    prof = cm.PROFILES["h100"]
    shape = dict(B=1, Hq=16, Hkv=16, D=128)
    for n in (2048, 4096, 8192, 16384, 32768):
        d = plan.decide(policies.BlockTopK(), prof, Nq=n, Nkv=n, **shape)
        assert (d.choice == "policy") == (d.sparse_s * (1 + plan.SPARSE_MARGIN) < d.dense_s)
