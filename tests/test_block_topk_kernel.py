"""The block_topk Triton estimator + selection (CPU: Triton interpreter) against the PyTorch
definition (pooled_block_logits + select_topk_blocks), and end to end through planner.compile."""
import pytest
import torch
import torch.nn.functional as F

import planner
from codegen.select.reference import (_pool, allowed_blocks, pooled_block_logits,
                                      select_topk_blocks)
from runtime import estimators
from runtime.kernels import launch, select as sk
from runtime.spec import SiteSpec

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not launch.runs_triton(DEV), reason="needs CUDA or TRITON_INTERPRET=1")

LENGTHS = [(63, 63), (100, 100), (200, 200), (63, 200), (200, 100), (1, 100)]
BUDGETS = [(0, 1, 1), (1, 0, 0), (3, 2, 1), (3, 0, 2), (1, 2, 0), (0, 0, 2)]


def _reference(q, k, scale, causal, block, topk, sink, local):
    ok = allowed_blocks(q.shape, k.shape, (), (), causal, block, device=q.device)
    sc = pooled_block_logits(q, k, scale, block, ok)
    return select_topk_blocks(sc, q.shape[2], k.shape[2], causal, block, topk=topk,
                              sink_blocks=sink, local_blocks=local)


@pytest.mark.parametrize("causal", ["lower_right", "upper_left", None])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("nq,nkv", LENGTHS)
def test_selection_matches_reference(nq, nkv, block, causal):
    q = torch.randn(2, 3, nq, 24, device=DEV)
    k = torch.randn(2, 3, nkv, 24, device=DEV)
    dots = torch.matmul(_pool(q, block), _pool(k, block).transpose(-1, -2))
    for topk, sink, local in BUDGETS:
        want = _reference(q, k, 0.3, causal, block, topk, sink, local)
        got = sk.block_topk_select(dots, nq, nkv, causal, block, scale=0.3, topk=topk,
                                   sink_blocks=sink, local_blocks=local)
        assert got[1].shape == want[1].shape, (topk, sink, local)
        assert torch.equal(got[0], want[0]), (topk, sink, local)
        assert torch.equal(got[1], want[1]), (topk, sink, local)


@pytest.mark.parametrize("n,block", [(63, 16), (100, 32), (200, 16), (5, 32)])
def test_pooling_matches_reference(n, block):
    x = torch.randn(2, 3, n, 40, device=DEV).transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(sk.pool_blocks(x, block), _pool(x, block), rtol=1e-6, atol=1e-6)
    assert torch.equal(sk.pool_blocks(x, block, schedule=sk.SelectSchedule(blocks_per_program=3)), sk.pool_blocks(x, block))


@pytest.mark.parametrize("causal", ["lower_right", None])
@pytest.mark.parametrize("nq,nkv,block,topk", [(100, 100, 16, 3), (63, 200, 32, 1),
                                                (200, 200, 16, 0)])
def test_estimator_entry_uses_kernel_and_matches(nq, nkv, block, topk, causal, monkeypatch):
    pol = planner.policy("block_topk", block=block, topk=topk, sink_blocks=1, local_blocks=1)
    spec = SiteSpec(site="t.bt", owner="t", policy=pol, scale=0.25, causal=causal)
    q = torch.randn(1, 2, nq, 32, device=DEV)
    k = torch.randn(1, 2, nkv, 32, device=DEV)
    est = estimators.get("block_topk")
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    assert estimators._bt_kernels(q, k, spec)
    got = est.select(est.score(q, k, [], spec), q, k, spec)
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    assert not estimators._bt_kernels(q, k, spec)
    want = est.select(est.score(q, k, [], spec), q, k, spec)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # grouped heads: the group path (not the one-head path auto's kernels need)
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    assert not estimators._bt_kernels(q, k[:, :1], spec)
    assert estimators._bt_kernels(q, k[:, :1], spec, grouped=True)


@pytest.mark.parametrize("causal", ["lower_right", "upper_left", None])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 1), (9, 3)])
@pytest.mark.parametrize("nq,nkv,block,topk", [(100, 100, 16, 3), (63, 200, 32, 1),
                                                (200, 200, 16, 0), (1, 100, 16, 2)])
def test_grouped_heads_match_the_reference(nq, nkv, block, topk, hq, hkv, causal, monkeypatch):
    """GQA: the Triton pooling, pooled products and selection give the lists of the PyTorch
    definition (each head's block softmax averaged over its group: pooled_block_scores)."""
    pol = planner.policy("block_topk", block=block, topk=topk, sink_blocks=1, local_blocks=1)
    spec = SiteSpec(site="t.bt", owner="t", policy=pol, scale=0.25, causal=causal)
    q = torch.randn(2, hq, nq, 32, device=DEV)
    k = torch.randn(2, hkv, nkv, 32, device=DEV)
    est = estimators.get("block_topk")
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    sc = est.score(q, k, [], spec)
    got = est.select(sc, q, k, spec)
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    ref_sc = est.score(q, k, [], spec)
    want = est.select(ref_sc, q, k, spec)
    torch.testing.assert_close(sc, ref_sc, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _attn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_compiled_block_topk_matches_reference(monkeypatch):
    pol = planner.policy("block_topk", block=16, topk=2, sink_blocks=1, local_blocks=1)
    q, k, v = (torch.randn(1, 2, 90, 16, device=DEV) for _ in range(3))
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    f_ref = planner.compile(_attn, policy=pol, cost_model="off")
    ref = f_ref(q, k, v)
    calls = []
    real = sk.block_topk_select
    monkeypatch.setattr(sk, "block_topk_select", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    f = planner.compile(_attn, policy=pol, cost_model="off")
    out = f(q, k, v)
    assert calls, "the selection kernel did not run"
    site = planner.inspect(f).sites[0]
    assert site.kernel == "triton_block_sparse"
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    assert site.density == pytest.approx(planner.inspect(f_ref).sites[0].density)


@pytest.mark.skipif(not sk.has_tl_topk(), reason="this Triton has no tl.topk")
@pytest.mark.parametrize("nqb,nkb,topk,causal", [(5, 37, 5, "lower_right"), (8, 64, 32, "lower_right"),
                                                 (3, 100, 7, None), (4, 20, 30, "upper_left"),
                                                 (6, 50, 0, "lower_right")])
def test_sorted_selection_equals_rounds(nqb, nkb, topk, causal):
    """The one-sort threshold path and the rounds-of-max path pick the same blocks, ties too."""
    d = torch.randn(2, 3, nqb, nkb, device=DEV)
    d[0, 0, :, :10] = 1.0                                   # ties: the lower block id wins
    kw = dict(scale=0.3, topk=topk, sink_blocks=1, local_blocks=1)
    a = sk.block_topk_select(d, nqb * 16, nkb * 16, causal, 16,
                             schedule=sk.SelectSchedule(sorted_select=False), **kw)
    b = sk.block_topk_select(d, nqb * 16, nkb * 16, causal, 16,
                             schedule=sk.SelectSchedule(sorted_select=True, sort32=False),
                             **kw)                      # int64 keys: value and block id
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = sk.block_topk_select(d, nqb * 16, nkb * 16, causal, 16,
                             schedule=sk.SelectSchedule(sorted_select=True, rows_per_program=3),
                             **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    e = sk.block_topk_select(d, nqb * 16, nkb * 16, causal, 16,
                             schedule=sk.SelectSchedule(sorted_select=True, sort32=True),
                             **kw)                       # fp32 sort, ties by a running count
    assert all(torch.equal(x, y) for x, y in zip(a, e))
    f = sk.block_topk_select(d, nqb * 16, nkb * 16, causal, 16,
                             schedule=sk.SelectSchedule(bisect=True), **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, f))     # counting passes, no sort


@pytest.mark.parametrize("nkb,topk", [(300, 40), (1500, 128), (2100, 7), (64, 64)])
def test_bisect_selection_equals_torch_topk(nkb, topk):
    """The counting-pass threshold against torch.topk on rows of distinct values of both signs
    and magnitudes (the threshold's sign bit, exponent and mantissa are all decided), wide rows,
    rows with fewer allowed blocks than topk (-inf), and ties at the threshold."""
    g = torch.Generator().manual_seed(nkb + topk)
    d = (torch.randn(2, 2, 3, nkb, generator=g) * torch.logspace(-3, 3, nkb)[torch.randperm(nkb, generator=g)])
    d[0, 1, 0, topk // 2:] = float("-inf")                   # fewer allowed than topk
    d[1, 0, 1, :] = -2.5                                     # all tied
    d[1, 1, 2, ::3] = d[1, 1, 2].sort(descending=True).values[topk - 1]     # ties at the threshold
    d = d.to(DEV)
    kw = dict(scale=1.0, topk=topk, sink_blocks=0, local_blocks=0)
    c, i = sk.block_topk_select(d, 3 * 16, nkb * 16, None, 16,
                                schedule=sk.SelectSchedule(bisect=True), **kw)
    rounds = sk.SelectSchedule(bisect=False, sorted_select=False)   # ties to lower ids
    r, ri = sk.block_topk_select(d, 3 * 16, nkb * 16, None, 16, schedule=rounds, **kw)
    assert torch.equal(c, r) and torch.equal(i, ri)
    for b in range(2):
        for h in range(2):
            for qb in range(3):
                row = d[b, h, qb].cpu()
                fin = row > float("-inf")
                n = min(topk, int(fin.sum()))
                assert int(c[b, h, qb]) == n
                got = i[b, h, qb, :n].cpu()
                assert (got[1:] > got[:-1]).all()                  # ascending block ids
                assert row[got].min() >= row.topk(n).values.min()    # the n largest values


@pytest.mark.parametrize("causal", ["lower_right", "upper_left", None])
@pytest.mark.parametrize("nq,nkv,block", [(1000, 1000, 8), (300, 1100, 8), (70, 70, 16)])
def test_pooled_dots_match_matmul(nq, nkv, block, causal):
    """The tensor-core pooled product equals the fp32 matmul wherever a pair is allowed, and is
    -inf over whole tiles the causal rule rules out."""
    pq = sk.pool_blocks(torch.randn(1, 2, nq, 40, device=DEV), block)
    pk = sk.pool_blocks(torch.randn(1, 2, nkv, 40, device=DEV), block)
    got = sk.pooled_dots(pq, pk, n_q=nq, n_kv=nkv, causal=causal, block=block)
    want = torch.matmul(pq, pk.transpose(-1, -2))
    ok = allowed_blocks((1, 2, nq, 40), (1, 2, nkv, 40), (), (), causal, block, device=DEV)
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-5, atol=1e-5)
    assert not got.isnan().any()
    assert ((got == float("-inf")) <= ~ok).all()                # -inf only where not allowed
    if causal is not None and nq == nkv and nq // block > 64:
        assert (got == float("-inf")).any()                     # whole tiles skipped
    with pytest.raises(ValueError, match="fp32"):
        sk.pooled_dots(pq.half(), pk, n_q=nq, n_kv=nkv, causal=causal, block=block)
