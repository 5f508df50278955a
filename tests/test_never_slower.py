"""The plan that keeps a compiled model from being slower than the original (the decisions;
the measured ratios are in benchmarks/results/model_speed_*.md): dense sites run the fused
SDPA (not the fp32 reference), and with the default cost model a sparse policy runs densely
where its sparse path is estimated slower (on 2 CPU cores: short lengths, high density)."""
import pytest
import torch
import torch.nn.functional as F

import planner
from conftest import max_err
from planner.models import GPTConfig, TinyGPT


@pytest.fixture
def gpt():
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=1024)).eval()


def test_dense_sites_run_sdpa_on_the_cpu(gpt):
    ids = torch.randint(0, 256, (1, 300))
    cm = planner.compile(gpt, policy="dense", cost_model="off")
    with torch.no_grad():
        assert max_err(cm(ids), gpt(ids)) <= 1e-5
    assert {s.kernel for s in planner.inspect(cm).sites} == {"cpu_gather"}


@pytest.mark.parametrize("pol", ["block_topk", "sink_window", "threshold", "quest", "auto",
                                 "vertical_slash", "longformer", "bigbird"])
def test_default_cost_model_runs_short_sparse_sites_densely(gpt, pol):
    """At 512 tokens every catalogue policy's default keeps most blocks: the cost model runs
    the sites densely and exactly (planned as SDPA in the graph, or dense at run time)."""
    ids = torch.randint(0, 256, (1, 512))
    cm = planner.compile(gpt, policy=pol, cost_model="auto")
    with torch.no_grad():
        assert max_err(cm(ids), gpt(ids)) <= 1e-5
    for s in planner.inspect(cm).sites:
        assert (s.kernel == "sdpa (in graph)" or "cost model: dense" in (s.kernel or "")
                or s.schedule.startswith("dense")), s


def test_long_sparse_calls_follow_the_policy_on_the_cpu():
    """Long and sparse enough, the gathered blocks beat SDPA on the CPU profile: the policy
    runs (dynamic shapes decide per call)."""
    from runtime import plan
    from runtime.spec import SiteSpec
    pol = planner.policy("block_topk", block=64, topk=8)
    spec = SiteSpec(site="s", owner="t", policy=pol, scale=0.125, causal="lower_right",
                    schedule="auto")
    short = torch.empty(1, 8, 1024, 64, device="meta")
    long = torch.empty(1, 8, 32768, 64, device="meta")
    plan._choose.cache_clear()
    assert plan.choose(spec, short, short) == "dense"
    assert plan.choose(spec, long, long) == "policy"    # meta tensors: decided on shapes


def test_sparse_cpu_path_is_the_gather_not_the_reference():
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    q = torch.randn(1, 4, 256, 32)
    cm = planner.compile(attn, policy=planner.policy("block_topk", block=32, topk=2),
                         cost_model="off")
    cm(q, q, q)
    site = planner.inspect(cm).sites[0]
    assert site.kernel == "cpu_gather" and site.density < 1


def test_dsa_runs_dense_where_its_indexer_would_cost_more(gpt):
    """A token-list site's sparse path is its indexer + top-k + the gather over the lists; on
    the CPU the lists are attended through a mask (every pair), so dense always wins there:
    the site runs exactly dense, its indexer is made (its parameters belong to the model) but
    not run."""
    from runtime import dsa
    ids = torch.randint(0, 256, (1, 300))
    pol = planner.policy("dsa", topk=64)
    cm = planner.compile(gpt, policy=pol, cost_model="auto")
    before = dsa.KEY_COUNTERS["rows"]
    with torch.no_grad():
        assert max_err(cm(ids), gpt(ids)) <= 1e-5
    assert dsa.KEY_COUNTERS["rows"] == before                   # no indexer keys projected
    assert any(k.startswith("sparse_indexers.") for k in cm.state_dict())
    for s in planner.inspect(cm).sites:
        assert "cost model: dense" in (s.kernel or ""), s
    # training the indexer follows the recording, not the cost model
    with dsa.recording("sparse") as rec, torch.no_grad():
        cm(ids)
    assert rec.records and all(r.indices is not None and (r.indices >= 0).any()
                               for r in rec.records)


@pytest.mark.parametrize("grad", [False, True])
def test_dense_dsa_call_builds_no_lists(gpt, monkeypatch, grad):
    """A dsa call the cost model runs densely goes straight to dense attention: no indexer, no
    selection, no placeholder lists ([B, 1, N, topk] int32: 0.5 GB a site at 65536 tokens and
    top-2048, measured 0.95x of the original on SmolLM2 at 16k on an H100 when they were
    built), with or without autograd; the gradients are dense attention's."""
    from runtime import dsa

    def refused(*a, **kw):
        raise AssertionError("placeholder lists built for a dense call")
    monkeypatch.setattr(dsa, "no_lists", refused)
    monkeypatch.setattr(dsa, "select", refused)
    ids = torch.randint(0, 256, (1, 300))
    cm = planner.compile(gpt, policy=planner.policy("dsa", topk=64), cost_model="auto")
    with torch.set_grad_enabled(grad):
        out, ref = cm(ids), gpt(ids)
        assert max_err(out, ref) <= 1e-5
        if grad:
            g1 = torch.autograd.grad(out.square().sum(), gpt.lm_head.weight)[0]
            g2 = torch.autograd.grad(ref.square().sum(), gpt.lm_head.weight)[0]
            assert max_err(g1, g2) <= 1e-5 * g2.abs().max()
    assert any(k.startswith("sparse_indexers.") for k in cm.state_dict())
    assert all("cost model: dense" in (s.kernel or "") for s in planner.inspect(cm).sites)


def test_token_site_costs_on_the_h100_profile():
    """The H100 numbers the token-site costs come from (benchmarks/results/dsa_h100.md): with
    one KV head at 65536 tokens DSA measured 1.15x faster than dense (it runs), at 16384
    0.24x, and with 16 KV heads 0.04-0.15x (dense runs)."""
    from runtime import costmodel as cm
    prof = cm.PROFILES["h100"]
    for n, hkv, want in [(65536, 1, "policy"), (16384, 1, "dense"), (65536, 16, "dense"),
                         (16384, 16, "dense")]:
        dense = cm.estimate("dense_sdpa", prof, B=1, Hq=16, Hkv=hkv, Nq=n, Nkv=n, D=128, rho=1)
        _, sparse = cm.token_site_seconds(prof, B=1, Hq=16, Hkv=hkv, Nq=n, Nkv=n, D=128,
                                          topk=2048)
        assert ("dense" if dense <= sparse else "policy") == want, (n, hkv, dense, sparse)


def test_keys_no_query_can_see_are_dropped_before_the_policy():
    """Top-left causality (a prefill into a longer static cache) hides every key past the
    queries' count: cut by shape, per-key rules cut with them, per-head sinks kept. A mask
    tensor that hides the trailing keys from every query: cut after reading its columns. No
    cut where the last key is visible, or with as many queries as keys."""
    from runtime.ops import unwritten_keys_dropped
    from runtime.spec import SiteSpec
    pol = planner.policy("block_topk", block=4, topk=2)
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 10, 8)
    spec = SiteSpec(site="s", owner="t", policy=pol, scale=0.3, causal="upper_left", sinks=True,
                    kv_valid=True)
    sinks, valid = torch.randn(2), torch.ones(1, 12)
    k2, v2, mods = unwritten_keys_dropped(q, k, k, [sinks, valid], spec)
    assert k2.shape[2] == v2.shape[2] == 6 and mods[0] is sinks and mods[1].shape == (1, 6)
    masked = SiteSpec(site="s", owner="t", policy=pol, scale=0.3, causal=None, mods=(("keep",),))
    keep = torch.zeros(1, 1, 6, 10, dtype=torch.bool)
    keep[..., :7] = True
    k3, _, (m3,) = unwritten_keys_dropped(q, k, k, [keep], masked)
    assert k3.shape[2] == 7 and m3.shape[-1] == 7 and torch.equal(k3, k[:, :, :7])
    keep[..., 9] = True
    assert unwritten_keys_dropped(q, k, k, [keep], masked)[0] is k
    assert unwritten_keys_dropped(q, q, q, [keep[..., :6]], masked)[0] is q
