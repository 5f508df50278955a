"""Quest page summaries kept with the KV cache (``sparse.append``, ``runtime.page_summaries``):
extended by the new tokens only, equal to a full recomputation, found by tensor identity, and
used by decoding through a compiled Hugging Face model with the same tokens as without them."""
import gc

import pytest
import torch

import planner
import runtime.ops  # noqa: F401
from runtime import page_summaries as ps
from runtime.kernels import launch, select as sk

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not launch.runs_triton(DEV), reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    ps.COUNTERS.clear()


def _full(k, page):
    from codegen.common import next_pow2
    B, H, n, D = k.shape
    n_p = -(-n // page)
    mx = torch.zeros(B * H, n_p, next_pow2(max(D, 16)), dtype=k.dtype, device=k.device)
    mn = torch.zeros_like(mx)
    sk.quest_page_summaries(k, page, mx, mn)
    return mx, mn


def test_summaries_extend_by_the_new_pages_only(kernels):
    torch.manual_seed(0)
    page = 4
    k = torch.randn(2, 3, 5, 24, device=DEV)
    k = torch.ops.sparse.append(k[:, :, :0], k, page)          # a prefill from an empty cache
    assert ps.COUNTERS["pages"] == 2 * 3 * 2
    for step, n_new in enumerate((1, 3, 2, 9, 1)):
        before = ps.COUNTERS["pages"]
        first = k.shape[2] // page
        k = torch.ops.sparse.append(k, torch.randn(2, 3, n_new, 24, device=DEV), page)
        got = ps.lookup(k, page)
        assert got is not None, f"step {step}: no summaries kept"
        n_p = -(-k.shape[2] // page)
        want = _full(k, page)
        assert torch.equal(got[0][:, :n_p], want[0]) and torch.equal(got[1][:, :n_p], want[1])
        assert ps.COUNTERS["pages"] - before == (n_p - first) * 2 * 3   # the touched pages only
    assert ps.COUNTERS["extensions"] == 5


def test_summaries_are_found_by_identity_only(kernels):
    k = torch.ops.sparse.append(torch.zeros(1, 2, 0, 16, device=DEV),
                                torch.randn(1, 2, 12, 16, device=DEV), 4)
    assert ps.lookup(k, 4) is not None
    assert ps.lookup(k.clone(), 4) is None                   # same values, another tensor
    assert ps.lookup(k, 8) is None                           # another page size
    n = len(ps._STATE)
    del k
    gc.collect()
    assert len(ps._STATE) == n - 1                           # gone with the tensor


def test_bounds_from_kept_summaries_equal_recomputed(kernels):
    torch.manual_seed(1)
    k = torch.ops.sparse.append(torch.zeros(1, 2, 0, 16, device=DEV),
                                torch.randn(1, 2, 30, 16, device=DEV), 4)
    k = torch.ops.sparse.append(k, torch.randn(1, 2, 3, 16, device=DEV), 4)
    q = torch.randn(1, 4, 1, 16, device=DEV)
    kept = sk.quest_page_bounds(q, k, page=4, causal="lower_right", summaries=ps.lookup(k, 4))
    fresh = sk.quest_page_bounds(q, k, page=4, causal="lower_right")
    assert torch.equal(kept, fresh)


def test_append_is_a_differentiable_cat():
    a = torch.randn(1, 2, 3, 4, dtype=torch.double, requires_grad=True)
    b = torch.randn(1, 2, 2, 4, dtype=torch.double, requires_grad=True)
    assert torch.equal(torch.ops.sparse.append(a, b, 4), torch.cat([a, b], -2))
    assert torch.autograd.gradcheck(lambda x, y: torch.ops.sparse.append(x, y, 4), (a, b))


def test_quest_decoding_keeps_summaries_with_the_cache(kernels, monkeypatch):
    """Greedy decoding of a tiny Llama with quest: the cache's key append becomes
    sparse.append, each decode step extends the summaries, the bounds use them, and the
    tokens equal those of the same model recomputing the summaries every step."""
    from conftest import tiny_llama
    torch.manual_seed(0)
    lm = tiny_llama("sdpa", layers=2).to(DEV)
    ids = torch.randint(0, 128, (1, 37), device=DEV)
    pol = planner.policy("quest", page=4, budget=8)
    used = []
    real = sk.quest_page_bounds
    monkeypatch.setattr(sk, "quest_page_bounds", lambda *a, **kw: used.append(
        kw.get("summaries") is not None) or real(*a, **kw))
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    cm = planner.compile(lm, policy=pol, dynamic=True)
    out = cm.generate(ids, **gen)
    code = planner.inspect(cm).graph_code()
    assert "torch.ops.sparse.append.default" in code
    assert ps.COUNTERS["extensions"] == 4 * 2                      # 4 decode steps x 2 layers
    masked = "[attention_mask" in code          # sites with a mask tensor: reference estimator
    assert masked or (used and all(used))
    monkeypatch.setattr(ps, "lookup", lambda k, page: None)        # recompute every step
    used.clear()
    ref = planner.compile(lm, policy=pol, dynamic=True).generate(ids, **gen)
    assert not any(used) and torch.equal(out, ref)


def _cache_step(q, k_past, k_new, v_past, v_new, causal: bool):
    """One attention call over a cache grown by this step's keys (GQA by repeating keys)."""
    import torch.nn.functional as F
    k = torch.cat([k_past, k_new], dim=2)
    v = torch.cat([v_past, v_new], dim=2)
    g = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                         is_causal=causal)
    return out, k, v


@pytest.mark.parametrize("page, budget, sink_pages, local_pages", [(4, 8, 0, 1), (8, 16, 1, 1)])
def test_quest_decode_steps_equal_the_definition_on_the_full_cache(kernels, page, budget,
                                                                   sink_pages, local_pages):
    """Prefill, then decode steps through a compiled cache append (summaries kept with the
    cache and extended per step): each step's output equals softmax attention over the pages
    the loop definition of quest picks from the full keys (page bounds recomputed from K)."""
    from brute import dense_with_keep, quest_keep
    B, Hq, Hkv, D, n0, steps = 2, 4, 2, 16, 21, 9
    pol = planner.policy("quest", page=page, budget=budget, sink_pages=sink_pages,
                         local_pages=local_pages)
    f = planner.compile(_cache_step, policy=pol)
    scale = D ** -0.5
    k_all = v_all = None
    for t in range(steps + 1):
        n_new = n0 if t == 0 else 1
        q = torch.randn(B, Hq, n_new, D, device=DEV)
        k_new = torch.randn(B, Hkv, n_new, D, device=DEV)
        v_new = torch.randn(B, Hkv, n_new, D, device=DEV)
        if t == 0:
            k_all = torch.zeros(B, Hkv, 0, D, device=DEV)
            v_all = torch.zeros(B, Hkv, 0, D, device=DEV)
        ext = ps.COUNTERS["extensions"]
        with torch.no_grad():
            out, k_all, v_all = f(q, k_all, k_new, v_all, v_new, t == 0)
        if t > 0:
            assert ps.COUNTERS["extensions"] == ext + 1, f"step {t}: summaries not extended"
        assert ps.lookup(k_all, page) is not None
        causal = "upper_left" if t == 0 else None
        keep = quest_keep(q.cpu(), k_all.cpu(), page=page, budget=budget, sink_pages=sink_pages,
                          local_pages=local_pages, causal=causal)
        if t == 0:
            keep &= torch.ones(n0, n0, dtype=torch.bool).tril()
        ref = dense_with_keep(q.cpu(), k_all.cpu(), v_all.cpu(), keep, scale)
        assert (out.cpu().double() - ref).abs().max() <= 1e-5, f"step {t}"
        if t > 0 and k_all.shape[2] > budget + 2 * page:
            assert not keep.all(), "the budget must leave pages out"
    rep = planner.inspect(f)
    assert "torch.ops.sparse.append.default" in rep.graph_code()
    assert all(s.status == "rewritten" for s in rep.sites)
