"""The Triton estimators of the adaptive policies (CPU: Triton interpreter) against the PyTorch
definitions in codegen.select.policies and loop-based brute force: the line statistics
(vertical / slash of the last query rows), the ``auto`` block scores, the per-query-block
budget selection, Quest's page bounds; and the estimator entries that use them."""
import pytest
import torch

import planner
from codegen.select.policies import (auto_criterion, quest_estimate, select_budget_fraction,
                                     vslash_block_scores, vslash_estimate)
from codegen.select.reference import _pool, allowed_blocks, select_topk_blocks
from runtime import estimators
from runtime.kernels import launch, select as sk
from runtime.spec import SiteSpec

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not launch.runs_triton(DEV), reason="needs CUDA or TRITON_INTERPRET=1")


def _brute_lines(q, k, scale, causal, last_q):
    """Loop definition: softmax of each of the last rows, added to its column and its offset."""
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    L = min(last_q, Nq)
    base = 0 if causal == "upper_left" else Nkv - Nq
    out = torch.zeros(B, Hkv, 2, Nkv, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for r in range(Nq - L, Nq):
                pos = base + r
                s = (k[b, h // G].double() @ q[b, h, r].double()) * scale
                s[pos + 1:] = float("-inf")
                p = torch.softmax(s, 0)
                for j in range(min(pos + 1, Nkv)):
                    out[b, h // G, 0, j] += p[j]
                    out[b, h // G, 1, pos - j] += p[j]
    return out.float()


@pytest.mark.parametrize("shape", [(1, 2, 1, 70, 70, 32, 16, "lower_right"),
                                   (2, 4, 2, 37, 90, 24, 16, "lower_right"),
                                   (1, 1, 1, 150, 150, 16, 100, "upper_left"),
                                   (1, 2, 2, 40, 95, 16, 5, "upper_left"),
                                   (1, 3, 3, 33, 33, 8, 64, "lower_right")])
def test_last_rows_lines_matches_definitions(shape, monkeypatch):
    B, Hq, Hkv, Nq, Nkv, D, L, causal = shape
    monkeypatch.setattr(launch, "POISON_WORKSPACE", True)      # partial statistics start as NaN
    g = torch.Generator().manual_seed(hash(shape) % 10_000)
    q = torch.randn(B, Hq, Nq, D, generator=g).to(DEV) * 2
    k = torch.randn(B, Hkv, Nkv, D, generator=g).to(DEV)
    sc = D ** -0.5
    got = sk.last_rows_lines(q, k, scale=sc, causal=causal, last_q=L)
    want = vslash_estimate(q, k, sc, (), [], causal, L)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    several = sk.last_rows_lines(q, k, scale=sc, causal=causal, last_q=L,
                                 schedule=sk.SelectSchedule(tiles_per_program=3))
    assert torch.equal(several, got)                         # tiles per program: a launch knob
    if Nq * Hq <= 150:
        torch.testing.assert_close(got.cpu(), _brute_lines(q.cpu(), k.cpu(), sc, causal, L),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 2, 2, 130, 130, 16, "lower_right", True),
                                   (1, 3, 3, 64, 200, 32, "lower_right", True),
                                   (1, 2, 2, 100, 90, 16, "upper_left", True),
                                   (1, 2, 2, 40, 95, 16, "upper_left", True),     # keys past reach
                                   (1, 4, 2, 70, 70, 16, "lower_right", False),   # grouped heads
                                   (1, 2, 2, 10, 70, 32, "lower_right", False)])  # rows < a block
def test_last_rows_lines_pool_the_keys(shape, monkeypatch):
    """With ``pool_block``, the keys' block means come with the lines (made by the lines' first
    pass where it can, else by pool_blocks) and equal pool_blocks'; the lines are unchanged."""
    B, Hq, Hkv, Nq, Nkv, blk, causal, fused = shape
    monkeypatch.setattr(launch, "POISON_WORKSPACE", True)
    g = torch.Generator().manual_seed(Nq * 31 + Nkv)
    q = torch.randn(B, Hq, Nq, 24, generator=g).to(DEV)
    k = (torch.randn(B, Hkv, Nkv, 24, generator=g) * 3 + 1).to(DEV)
    calls = []
    real = sk.pool_blocks
    monkeypatch.setattr(sk, "pool_blocks", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    lines, pk = sk.last_rows_lines(q, k, scale=0.2, causal=causal, last_q=blk, pool_block=blk)
    assert bool(calls) != fused
    torch.testing.assert_close(pk, real(k, blk), rtol=1e-6, atol=1e-6)
    assert torch.equal(lines, sk.last_rows_lines(q, k, scale=0.2, causal=causal, last_q=blk))


def test_last_rows_lines_rejects_what_it_cannot_do():
    q = torch.randn(1, 2, 40, 16, device=DEV)
    with pytest.raises(ValueError, match="causal"):
        sk.last_rows_lines(q, q, scale=0.25, causal=None, last_q=16)
    with pytest.raises(ValueError, match="rows"):
        sk.last_rows_lines(q, q, scale=0.25, causal="lower_right", last_q=0)
    with pytest.raises(ValueError, match="do not match"):
        sk.last_rows_lines(q, q[..., :8], scale=0.25, causal="lower_right", last_q=16)


@pytest.mark.parametrize("shape", [(1, 2, 2, 70), (3, 1), (2, 4096), (1, 9000), (2, 0)])
def test_line_prefix_sums_match_cumsum(shape):
    x = torch.rand(*shape, dtype=torch.float64).float().to(DEV)
    got = sk.line_prefix_sums(x)
    want = torch.nn.functional.pad(x.double().cumsum(-1), (1, 0))
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)    # fp32 running sums
    with pytest.raises(ValueError, match="fp32"):
        sk.line_prefix_sums(x.double())


@pytest.mark.parametrize("nq,nkv,block", [(100, 100, 16), (60, 130, 16), (200, 200, 32),
                                          (1500, 1500, 16)])
def test_auto_block_scores_rank_like_reference(nq, nkv, block, monkeypatch):
    """Line heads: the unnormalised line mass, -inf outside the causal rule, is the reference's
    normalised score times a positive per-row constant; aware heads: the scaled pooled
    logits."""
    causal = "lower_right"
    q = torch.randn(1, 3, nq, 16, device=DEV)
    k = torch.randn(1, 3, nkv, 16, device=DEV)
    lines = sk.last_rows_lines(q, k, scale=0.25, causal=causal, last_q=block)
    pq, pk = _pool(q, block), _pool(k, block)
    dots = torch.matmul(pq, pk.transpose(-1, -2))
    aware = torch.tensor([[True, False, False]], device=DEV)
    got = sk.auto_block_scores(pq, pk, lines, aware, n_q=nq, causal=causal, block=block,
                               scale=0.25)
    ok = allowed_blocks(q.shape, k.shape, (), (), causal, block, device=q.device)
    ref = vslash_block_scores(lines, nq, nkv, causal, block, ok)
    assert not got.isnan().any()
    assert torch.equal(got > float("-inf"), ok)
    torch.testing.assert_close(got[:, 0], (dots[:, 0] * 0.25).masked_fill(~ok[:, 0], float("-inf")),
                               rtol=1e-5, atol=1e-5)
    tot = got[:, 1:].clamp_min(0).sum(-1, keepdim=True)          # -inf -> 0
    torch.testing.assert_close((got[:, 1:] / tot).masked_fill(~ok[:, 1:], float("-inf")),
                               ref[:, 1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nq,nkv,block", [(100, 100, 16), (60, 130, 16), (200, 200, 32),
                                          (40, 40, 64)])
def test_auto_criterion_kernel_matches_reference(nq, nkv, block):
    causal = "lower_right"
    g = torch.Generator().manual_seed(nq * 7 + block)
    q = torch.randn(1, 6, nq, 16, generator=g).to(DEV)
    k = torch.randn(1, 6, nkv, 16, generator=g).to(DEV)
    q[:, :3] *= torch.tensor([0.3, 3.0, 6.0], device=DEV)[:, None, None]   # flat to peaked heads
    lines = sk.last_rows_lines(q, k, scale=0.25, causal=causal, last_q=block)
    dots = torch.matmul(_pool(q, block), _pool(k, block).transpose(-1, -2))
    ok = allowed_blocks(q.shape, k.shape, (), (), causal, block, device=q.device)[:, :, -1]
    est = torch.softmax((dots[:, :, -1] * 0.25).masked_fill(~ok, float("-inf")), -1)
    from codegen.select.policies import _js
    true = (torch.nn.functional.pad(lines[:, :, 0] / min(block, nq),
                                    (0, ok.shape[-1] * block - nkv))
            .reshape(1, 6, -1, block).sum(-1) * ok)
    js = _js(est, true / true.sum(-1, keepdim=True))
    for tau in (0.0, float(js.median()), 0.69):
        want = auto_criterion(est, lines, ok, nq, block, tau, group=1)
        got = sk.auto_criterion(dots, lines, n_q=nq, causal=causal, block=block, scale=0.25,
                                tau=tau)
        near = (js - tau).abs() < 1e-6                       # a divergence at tau: either way
        assert torch.equal(got | near, want | near), (tau, js)
        as_int = sk.auto_criterion(dots, lines, n_q=nq, causal=causal, block=block, scale=0.25,
                                   tau=tau, as_int32=True)
        assert as_int.dtype == torch.int32 and torch.equal(as_int.bool(), got)


@pytest.mark.skipif(not sk.has_tl_topk(), reason="this Triton has no tl.topk")
@pytest.mark.parametrize("sorted_select", [True, False])
@pytest.mark.parametrize("density,sink,local,nq", [(0.1, 1, 1, 300), (0.3, 0, 2, 300),
                                                (0.02, 2, 0, 300), (1.0, 1, 1, 300),
                                                (0.1, 1, 1, 700)])   # rows of 3 widths
def test_budget_selection_matches_select_budget_fraction(density, sink, local, nq, sorted_select):
    nkv = nq
    block = 16
    nqb = nkb = -(-nq // block)
    causal = "lower_right"
    ok = allowed_blocks((2, 3, nq, 8), (2, 3, nkv, 8), (), (), causal, block, device=DEV)
    sc = torch.randn(2, 3, nqb, nkb, device=DEV).masked_fill(~ok, float("-inf"))
    sc[0, 0, :, :6] = torch.where(ok[0, 0, :, :6], 0.5, float("-inf"))    # ties: lower id wins
    want = select_budget_fraction(sc, nq, nkv, causal, block, density=density,
                                  sink_blocks=sink, local_blocks=local)
    n_allowed = ok[0, 0].sum(-1).to(torch.float64)
    budget = torch.ceil(density * n_allowed).to(torch.int32)
    variants = ((1, False, False), (4, False, False), (1, True, False), (1, False, True))
    for rpp, s32, bis in (variants if nq <= 300 else variants[-1:]):
        got = sk.block_topk_select(sc, nq, nkv, causal, block, scale=1.0, topk=nkb,
                                   sink_blocks=sink, local_blocks=local, budget=budget,
                                   budget_max=int(budget.max()),
                                   schedule=sk.SelectSchedule(
                                       sorted_select=sorted_select, rows_per_program=rpp,
                                       sort32=s32, bisect=bis))
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1], want[1])


def _spec(name, causal="lower_right", **kw):
    return SiteSpec(site="t.x", owner="t", policy=planner.policy(name, **kw), scale=0.25,
                    causal=causal)


@pytest.mark.parametrize("name,kw", [("auto", dict(block=16, target_density=0.2, tau=0.1)),
                                     ("auto", dict(block=16, target_density=0.3, tau=0.6)),
                                     ("auto", dict(block=32, target_density=0.5, tau=0.0)),
                                     ("vertical_slash", dict(block=16, last_q=32, n_vertical=20,
                                                             n_slash=10)),
                                     ("threshold", dict(block=16, gamma=0.8)),
                                     ("quest", dict(page=16, budget=48, local_pages=1)),
                                     ("quest", dict(page=8, budget=40, sink_pages=1))])
@pytest.mark.parametrize("nq,nkv", [(150, 150), (90, 170)])
def test_estimator_entries_use_kernels_and_match(name, kw, nq, nkv, monkeypatch):
    spec = _spec(name, **kw)
    g = torch.Generator().manual_seed(nq + len(name))
    q = torch.randn(1, 4, nq, 16, generator=g).to(DEV)
    k = torch.randn(1, 4, nkv, 16, generator=g).to(DEV)
    q[:, 1:3] *= 4                                              # peaked heads next to flat ones
    est = estimators.get(name)
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    calls = []
    kernel = "quest_page_bounds" if name == "quest" else "last_rows_lines"
    real = getattr(sk, kernel)
    monkeypatch.setattr(sk, kernel, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = est.select(est.score(q, k, [], spec), q, k, spec)
    assert calls, f"{kernel} did not run"
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    want = est.select(est.score(q, k, [], spec), q, k, spec)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    if est.select_width is not None:          # lists as wide as the op declares, no wider
        assert got[1].shape[-1] == est.select_width(q, k, spec) >= int(got[0].max())
        if name == "auto":
            assert got[1].shape[-1] < -(-nkv // kw["block"]) or kw["target_density"] >= 0.5


@pytest.mark.parametrize("hq,hkv,nq,nkv,causal", [(6, 2, 150, 150, "lower_right"),
                                                 (9, 3, 90, 170, "lower_right"),
                                                 (4, 1, 120, 120, "upper_left")])
def test_threshold_on_groups_pools_with_the_kernels(hq, hkv, nq, nkv, causal, monkeypatch):
    """GQA: threshold's pooled part comes from the Triton pooled products (with the line
    statistics in Triton too) and the estimate and lists equal the PyTorch definition's."""
    spec = _spec("threshold", causal=causal, block=16, gamma=0.8)
    g = torch.Generator().manual_seed(hq * nq)
    q = torch.randn(1, hq, nq, 16, generator=g).to(DEV) * 2
    k = torch.randn(1, hkv, nkv, 16, generator=g).to(DEV)
    est = estimators.get("threshold")
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    calls = []
    real = sk.pooled_dots
    monkeypatch.setattr(sk, "pooled_dots", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    sc = est.score(q, k, [], spec)
    got = est.select(sc, q, k, spec)
    assert calls, "the pooled products did not run"
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    ref_sc = est.score(q, k, [], spec)
    want = est.select(ref_sc, q, k, spec)
    torch.testing.assert_close(sc, ref_sc, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("hq,hkv,nq,nkv,causal,tau", [(6, 2, 150, 150, "lower_right", 0.1),
                                                     (9, 3, 90, 170, "lower_right", 0.3),
                                                     (4, 1, 120, 120, "upper_left", 0.05),
                                                     (8, 2, 130, 130, "lower_right", 0.0),
                                                     (8, 2, 130, 130, "lower_right", 0.69)])
def test_auto_on_groups_runs_the_kernels_and_selects_like_the_reference(hq, hkv, nq, nkv, causal,
                                                                        tau, monkeypatch):
    """GQA: auto's group path (mean block probabilities, line statistics, criterion and block
    scores in Triton) keeps exactly the blocks the PyTorch definition keeps, with peaked
    (query-aware) and flat heads side by side."""
    spec = _spec("auto", causal=causal, block=16, target_density=0.3, tau=tau)
    g = torch.Generator().manual_seed(hq * nq + int(tau * 100))
    q = torch.randn(1, hq, nq, 16, generator=g).to(DEV)
    k = torch.randn(1, hkv, nkv, 16, generator=g).to(DEV)
    q[:, : hq // 2] *= 4
    est = estimators.get("auto")
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    calls = []
    real = sk.auto_block_scores
    monkeypatch.setattr(sk, "auto_block_scores", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = est.select(est.score(q, k, [], spec), q, k, spec)
    assert calls, "auto's block-score kernel did not run"
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    want = est.select(est.score(q, k, [], spec), q, k, spec)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("gamma,min_b,max_b,sink,local,causal", [
    (0.9, 0, None, 1, 1, "lower_right"), (0.9, 0, None, 1, 1, None), (0.5, 2, 4, 0, 2, "upper_left"),
    (1.0, 0, None, 0, 0, "lower_right"), (1.0, 0, None, 0, 0, None), (0.05, 0, 1, 2, 0, None),
    (0.7, 30, None, 1, 1, "lower_right")])
def test_threshold_select_kernel_matches_select_threshold(gamma, min_b, max_b, sink, local,
                                                          causal):
    """The Triton threshold selection equals the PyTorch definition: peaked and flat rows,
    ties at the smallest kept value, rows with nothing but forced blocks, budgets."""
    from codegen.select.policies import select_threshold
    nq, nkv, block = 200, 230, 8
    nqb, nkb = -(-nq // block), -(-nkv // block)
    g = torch.Generator().manual_seed(int(gamma * 100) + min_b)
    est = torch.rand(2, 3, nqb, nkb, generator=g) ** torch.tensor([1.0, 8.0, 0.2])[:, None, None]
    est[1, 2, :, ::2] = 0.25                                    # ties
    est[0, 1, 3] = 0.0                                          # a row of zeros
    ok = allowed_blocks((2, 3, nq, 8), (2, 3, nkv, 8), (), (), causal, block, device="cpu")
    est = est.masked_fill(~ok, float("-inf")).to(DEV)
    kw = dict(gamma=gamma, min_budget=min_b, max_budget=max_b, sink_blocks=sink,
              local_blocks=local)
    got = sk.threshold_select(est, nq, nkv, causal, block, **kw)
    want = select_threshold(est, nq, nkv, causal, block, **kw)
    # Rows may differ only where the kept mass meets gamma within fp32 rounding (the two sum in
    # different orders; at gamma 1 that decides whether the tiniest blocks join): there the
    # kernel's row is still the forced blocks plus its count of largest further blocks (ties
    # to the lower id), and the two rows' masses differ by at most 1e-6 of the row's mass.
    from codegen.select.reference import _forced_blocks
    diff = (got[1] != want[1]).any(-1).cpu()
    if gamma < 1.0:
        assert int(diff.sum()) <= max(1, diff.numel() // 50), int(diff.sum())
    forced = _forced_blocks(nqb, nkb, nq, nkv, causal, block, sink, local, "cpu")
    e = est.cpu().double().clamp_min(0)
    for b, h, i in diff.nonzero().tolist():
        row = e[b, h, i]
        mine = got[1][b, h, i, :int(got[0][b, h, i])].cpu().long()
        ref = want[1][b, h, i, :int(want[0][b, h, i])].cpu().long()
        allowed = (est[b, h, i] > float("-inf")).cpu()
        rest = sorted((j for j in range(nkb) if allowed[j] and not forced[i, j]),
                      key=lambda j: (-float(row[j]), j))
        n_rest = len(mine) - int((forced[i] & allowed).sum())
        assert sorted(mine.tolist()) == sorted(
            [j for j in range(nkb) if allowed[j] and forced[i, j]] + rest[:n_rest])
        assert abs(float(row[mine].sum()) - float(row[ref].sum())) <= 1e-6 * float(row.sum())


def test_quest_decode_selects_wide_rows_with_the_program(monkeypatch):
    """Few rows wider than the sorted selection handles (decode): the selection program picks
    the same pages as the PyTorch selection (``select_topk_blocks``) on the same bounds."""
    spec = _spec("quest", page=4, budget=24, sink_pages=1, local_pages=1)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 1, 16, generator=g).to(DEV)
    k = torch.randn(2, 2, 203, 16, generator=g).to(DEV)
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    monkeypatch.setattr(sk, "SORTED_SELECT_MAX_NKB", 16)        # 51 pages count as wide
    calls = []
    real = sk.block_topk_select
    monkeypatch.setattr(sk, "block_topk_select", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    est = estimators.get("quest")
    sc = est.score(q, k, [], spec)
    got = est.select(sc, q, k, spec)
    assert calls, "the selection program did not run"
    p = spec.policy
    want = select_topk_blocks(sc, q.shape[2], k.shape[2], spec.causal, p.page,   # PyTorch's
                              topk=-(-p.budget // p.page), sink_blocks=p.sink_pages,
                              local_blocks=p.local_pages)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert int(got[0].min()) == 8               # 24 / 4 pages by bound, plus a sink and a local page


def test_auto_kernel_conditions(monkeypatch):
    q = torch.randn(1, 4, 64, 16, device=DEV)
    spec = _spec("auto", block=16)
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    assert estimators._auto_kernels(q, q, spec)
    assert not estimators._auto_kernels(q, q[:, :2], spec)              # grouped heads
    assert estimators._auto_kernels(q, q[:, :2], spec, grouped=True)    # ... on the group path
    assert not estimators._auto_kernels(q, q, _spec("auto", causal=None, block=16))
    assert estimators._lines_kernels(q, q[:, :2], spec, 16)             # lines handle groups
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    assert not estimators._lines_kernels(q, q, spec, 16)


def _brute_quest(q, k, page, causal):
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nqb, n_p = -(-Nq // page), -(-Nkv // page)
    base = 0 if causal in (None, "upper_left") else Nkv - Nq
    out = torch.full((B, Hkv, nqb, n_p), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for hk in range(Hkv):
            for p in range(n_p):
                kp = k[b, hk, p * page:(p + 1) * page].double()
                hi, lo = kp.amax(0), kp.amin(0)
                for i in range(nqb):
                    last = min((i + 1) * page, Nq) - 1 + base
                    if causal is not None and p * page > last:
                        continue
                    for g in range(G):
                        qi = q[b, hk * G + g, i * page:(i + 1) * page].double()
                        bound = torch.maximum(qi * hi, qi * lo).sum(-1).max()
                        out[b, hk, i, p] = max(out[b, hk, i, p], bound)
    return out.float()


@pytest.mark.parametrize("shape", [(1, 2, 1, 100, 100, 32, 16, "lower_right"),
                                   (2, 4, 2, 37, 90, 24, 16, "lower_right"),
                                   (1, 1, 1, 130, 130, 64, 32, "upper_left"),
                                   (1, 2, 2, 70, 150, 16, 8, None),
                                   (2, 2, 1, 1, 300, 16, 16, "lower_right"),
                                   (1, 4, 2, 1, 1000, 32, 8, "lower_right"),   # decode split
                                   (1, 2, 2, 3, 777, 16, 4, "lower_right"),
                                   (1, 1, 1, 90, 90, 16, 64, "lower_right"),
                                   (1, 1, 1, 50, 50, 16, 1, "lower_right")])
def test_quest_bounds_match_definitions(shape, monkeypatch):
    B, Hq, Hkv, Nq, Nkv, D, page, causal = shape
    g = torch.Generator().manual_seed(hash(shape) % 10_000)
    q = torch.randn(B, Hq, Nq, D, generator=g).to(DEV)
    k = torch.randn(B, Hkv, Nkv, D, generator=g).to(DEV)
    monkeypatch.setattr(launch, "POISON_WORKSPACE", True)      # the output starts as NaN
    got = sk.quest_page_bounds(q, k, page=page, causal=causal,
                                schedule=sk.SelectSchedule(pages_per_tile=16))
    assert not got.isnan().any()                           # every entry written
    ok = allowed_blocks(q.shape, k.shape, (), (), causal, page, device=q.device)
    want = quest_estimate(q, k, page, ok)
    assert torch.equal(got > float("-inf"), want > float("-inf"))
    fin = want > float("-inf")
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-4)
    if Nq * Nkv * Hq <= 40_000:
        brute = _brute_quest(q.cpu(), k.cpu(), page, causal)
        torch.testing.assert_close(got.cpu()[fin.cpu()], brute[fin.cpu()], rtol=1e-5, atol=1e-4)


def test_quest_bounds_reject_bad_pages():
    q = torch.randn(1, 2, 40, 16, device=DEV)
    for page in (0, 12, 128):
        with pytest.raises(ValueError, match="page"):
            sk.quest_page_bounds(q, q, page=page, causal="lower_right")
