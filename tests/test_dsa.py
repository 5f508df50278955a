"""DeepSeek Sparse Attention (policy ``dsa``): indexers registered in the compiled model,
selection and attention against loop-based definitions, gradients, the training losses,
state_dict round trips and decoding."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import planner
from planner import train
from planner.models import TinyGPT
from runtime import dsa

from conftest import max_err, tiny_llama


class Attn(nn.Module):
    """One causal attention call on given q, k, v (GQA by repeating keys)."""

    def __init__(self, group: int = 1):
        super().__init__()
        self.group = group

    def forward(self, q, k, v):
        if self.group > 1:
            k = k.repeat_interleave(self.group, dim=1)
            v = v.repeat_interleave(self.group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def brute_dsa(q, k, v, indexer, topk, group):
    """Loop definition: index scores, each query's top-k visible keys (ties to the more recent
    key), softmax attention over exactly those keys."""
    B, Hq, N, D = q.shape
    with torch.no_grad():
        I = indexer.scores(q, k, 0)                                    # [B, N, N]
    out = torch.zeros_like(q, dtype=torch.float64)
    chosen = []
    for b in range(B):
        rows = []
        for t in range(N):
            cand = sorted(range(t + 1), key=lambda s: (float(I[b, t, s]), s), reverse=True)[:topk]
            rows.append(sorted(cand))
            for h in range(Hq):
                kk = k[b, h // group, cand].double()
                vv = v[b, h // group, cand].double()
                p = torch.softmax(kk @ q[b, h, t].double() / math.sqrt(D), 0)
                out[b, h, t] = p @ vv
        chosen.append(rows)
    return out, chosen


def qkv(B=2, Hq=4, Hkv=2, N=37, D=16, dtype=torch.float32):
    return (torch.randn(B, Hq, N, D, dtype=dtype), torch.randn(B, Hkv, N, D, dtype=dtype),
            torch.randn(B, Hkv, N, D, dtype=dtype))


def test_policy_parameters_and_errors():
    p = planner.policy("dsa")
    assert (p.topk, p.index_heads, p.index_dim, p.rope, p.attend_kind) == (2048, 4, 64, 0, "token")
    with pytest.raises(ValueError, match="rope"):
        planner.policy("dsa", index_dim=16, rope=3)
    with pytest.raises(ValueError, match="topk"):
        planner.policy("dsa", topk=0)
    with pytest.raises(TypeError, match="index_heads"):
        planner.policy("dsa", heads=2)


@pytest.mark.parametrize("group", [1, 2])
def test_selection_and_attention_match_loop_definition(group):
    q, k, v = qkv(Hq=4, Hkv=4 // group)
    pol = planner.policy("dsa", topk=5, index_heads=2, index_dim=8)
    cm = planner.compile(Attn(group), policy=pol)
    out = cm(q, k, v)
    bank = cm.sparse_indexers
    assert len(bank.sites) == 1
    indexer = next(iter(bank.sites.values()))
    ref, _ = brute_dsa(q, k, v, indexer, 5, group)
    assert max_err(out.double(), ref) < 1e-5
    rep = planner.inspect(cm)
    site = rep.sites[0]
    assert site.status == "rewritten" and site.policy.startswith("dsa(")
    assert site.density < 0.5                    # 5 of up to 37 keys per query


def test_ties_go_to_recent_keys():
    """With w = 0 every index score is 0: each query keeps its most recent keys (a window)."""
    q, k, v = qkv(B=1, Hq=2, Hkv=2, N=20)
    cm = planner.compile(Attn(), policy=planner.policy("dsa", topk=4, index_heads=1, index_dim=8))
    cm(q, k, v)
    ix = next(iter(cm.sparse_indexers.sites.values()))
    with torch.no_grad():
        ix.bw.zero_()
    with dsa.recording("sparse") as rec:
        cm(q, k, v)
    idx = rec.records[0].indices[0, 0]                                  # [N, topk]
    for t in range(20):
        got = sorted(x for x in idx[t].tolist() if x >= 0)
        assert got == list(range(max(0, t - 3), t + 1))


def test_full_budget_equals_dense_and_parameters_are_registered():
    torch.manual_seed(0)
    m = TinyGPT().eval()
    x = torch.randint(0, 256, (2, 40))
    cm = planner.compile(m, policy=planner.policy("dsa", topk=64, index_heads=2, index_dim=16))
    assert max_err(cm(x), m(x)) < 1e-5
    n_model = len(list(m.parameters()))
    names = [n for n, _ in cm.named_parameters()]
    assert len(names) == n_model + 4 * len(cm.sparse_indexers.sites)
    assert all(n.startswith("sparse_indexers.sites.") for n in names[n_model:])
    assert not any("sparse_indexers" in n for n, _ in m.named_parameters())


def test_state_dict_round_trip():
    m = TinyGPT().eval()
    x = torch.randint(0, 256, (1, 50))
    pol = planner.policy("dsa", topk=8, index_heads=2, index_dim=16, rope=4)
    a = planner.compile(m, policy=pol)
    a(x)
    with torch.no_grad():
        for p in a.sparse_indexers.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sd = a.state_dict()
    b = planner.compile(m, policy=pol)                # no indexers yet: load creates them
    b.load_state_dict(sd, strict=True)
    assert torch.equal(a(x), b(x))
    assert set(b.state_dict()) == set(sd)


def test_gradients_through_sparse_attention_match_reference():
    q, k, v = (t.double().requires_grad_() for t in qkv(B=1, Hq=2, Hkv=2, N=23, D=8))
    cm = planner.compile(Attn(), policy=planner.policy("dsa", topk=6, index_heads=2, index_dim=8))
    out = cm(q, k, v)
    with dsa.recording("sparse") as rec:
        cm(q, k, v)
    idx = rec.records[0].indices                                        # [1, 1, N, topk]
    keep = dsa.keep_from_indices(idx, 23)(0, 23)                        # [1, 1, N, N]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    ref = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        assert max_err(a, b) < 1e-9


def test_gradcheck_sparse_attend_token_lists():
    """``sparse.attend`` over fixed token lists (GQA, shared lists, padding, an empty row)."""
    import runtime.ops  # noqa: F401
    from runtime.spec import SiteSpec, register
    q, k, v = (t.double().requires_grad_() for t in qkv(B=1, Hq=2, Hkv=1, N=9, D=4))
    key = register(SiteSpec(site="gradcheck", owner="t", policy=planner.policy("dsa", topk=3),
                            scale=0.5, causal="lower_right", gqa_group=2))
    idx = torch.tensor([[[[0, -1, -1], [1, 0, -1]] + [[t, t - 1, 0] for t in range(2, 8)]
                         + [[-1, -1, -1]]]],
                       dtype=torch.int32)                              # [1, 1, 9, 3]
    e = torch.empty(0, dtype=torch.int32)
    fn = lambda a, b, c: torch.ops.sparse.attend(a, b, c, [], e, idx, key)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


def test_warmup_loss_trains_only_the_indexers():
    torch.manual_seed(1)
    m = TinyGPT().eval()
    x = torch.randint(0, 256, (1, 64))
    cm = planner.compile(m, policy=planner.policy("dsa", topk=8, index_heads=2, index_dim=16))
    with pytest.raises(RuntimeError, match="first call"):
        train.indexer_parameters(cm)
    cm(x)
    params = train.indexer_parameters(cm)
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(12):
        loss = train.indexer_distillation_loss(cm, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is None for p in m.parameters())
    assert all(p.grad is not None for p in params)


def test_warmup_kl_is_the_definition():
    """KL(p || softmax I) with p the head-averaged attention, against a direct computation."""
    q, k, v = qkv(B=1, Hq=4, Hkv=2, N=12, D=8)
    cm = planner.compile(Attn(group=2), policy=planner.policy("dsa", topk=4, index_heads=2,
                                                                 index_dim=8))
    cm(q, k, v)
    loss = train.indexer_distillation_loss(cm, q, k, v)
    ix = next(iter(cm.sparse_indexers.sites.values()))
    kr = k.repeat_interleave(2, 1)
    mask = torch.ones(12, 12, dtype=torch.bool).triu(1)
    p = torch.softmax((q @ kr.transpose(-1, -2) / math.sqrt(8)).masked_fill(mask, -math.inf),
                      -1).mean(1)[0]
    logq = torch.log_softmax(ix.scores(q, k, 0)[0].masked_fill(mask, -math.inf), -1)
    kl = torch.where(p > 0, p * (p.log() - logq), 0.0).sum(-1).mean()
    assert abs(loss.item() - kl.item()) < 1e-5


def test_sparse_stage_trains_model_and_indexers():
    torch.manual_seed(2)
    m = TinyGPT().eval()
    x = torch.randint(0, 256, (1, 48))
    cm = planner.compile(m, policy=planner.policy("dsa", topk=8, index_heads=2, index_dim=16))
    cm(x)
    res = train.sparse_stage(cm, x, loss_fn=lambda logits: F.cross_entropy(
        logits[0, :-1].float(), x[0, 1:]))
    assert abs(res.total.item() - (res.lm + res.kl).item()) < 1e-6
    res.total.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in train.indexer_parameters(cm))
    # the LM loss alone does not reach the indexers (they read detached q / k)
    for p in list(m.parameters()) + train.indexer_parameters(cm):
        p.grad = None
    train.sparse_stage(cm, x, loss_fn=lambda logits: logits.float().pow(2).mean(),
                       kl_weight=0.0).total.backward()
    assert all(p.grad is None or not p.grad.any() for p in train.indexer_parameters(cm))
    assert any(p.grad is not None and p.grad.any() for p in m.parameters())


def test_evaluate_reports_recall_and_kl():
    m = TinyGPT().eval()
    x = torch.randint(0, 256, (1, 40))
    cm = planner.compile(m, policy=planner.policy("dsa", topk=40, index_heads=2, index_dim=16))
    res = train.evaluate_indexers(cm, x)
    assert res["sites"] == 4 and abs(res["recall"] - 1.0) < 1e-5 and res["kl"] >= 0


def test_decode_runs_through_token_lists():
    lm = tiny_llama("sdpa")
    ids = torch.randint(0, 128, (1, 30))
    ref = lm.generate(ids, max_new_tokens=6, do_sample=False)
    full = planner.compile(lm, policy=planner.policy("dsa", topk=64, index_heads=2, index_dim=8))
    assert torch.equal(full.generate(ids, max_new_tokens=6, do_sample=False), ref)
    cm = planner.compile(lm, policy=planner.policy("dsa", topk=8, index_heads=2, index_dim=8))
    with dsa.recording("sparse") as rec:
        out = cm.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 36)
    decode = [r for r in rec.records if r.q.shape[2] == 1]
    assert len(decode) == 5 * 2                     # 5 decode steps x 2 layers
    for r in decode:
        assert r.indices.shape[-1] == 8 and int((r.indices >= 0).sum()) == 8
    assert planner.inspect(cm).sites[0].calls >= 6


def test_errors_name_the_problem():
    m = TinyGPT().eval()
    with pytest.raises(TypeError, match="no DSA indexers"):
        train.indexer_parameters(planner.compile(m, policy="dense"))
    ix = dsa.LightningIndexer(4, 2, 8, 2, 8)
    with pytest.raises(ValueError, match="built for q heads 4"):
        ix(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))


def test_export_and_preload_into_a_wrapped_model():
    """Indexers exported from one compiled model load into another whose site names carry a
    prefix (the same model inside a wrapper); mismatched dimensions are refused."""
    m = TinyGPT().eval()
    x = torch.randint(0, 256, (1, 40))
    pol = planner.policy("dsa", topk=8, index_heads=2, index_dim=16)
    a = planner.compile(m, policy=pol)
    a(x)
    with torch.no_grad():
        for p in a.sparse_indexers.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    states = a.sparse_indexers.export()

    class Wrap(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids)

    b = planner.compile(Wrap(m), policy=pol)
    b.sparse_indexers.preload(states)
    assert torch.equal(a(x), b(x))
    c = planner.compile(Wrap(m), policy=planner.policy("dsa", topk=8, index_heads=4,
                                                         index_dim=16))
    c.sparse_indexers.preload(states)
    with pytest.raises(ValueError, match="preloaded indexer"):
        c(x)


def test_sparse_attend_backward_reuses_the_forward_lse(monkeypatch):
    """Token lists through the gather kernel: the backward kernel starts from the forward's
    output and log-sum-exp (no second forward), with the reference's gradients; without
    gradients nothing is kept."""
    import runtime.ops  # noqa: F401
    from runtime import dispatch, providers
    from runtime.kernels import launch
    from runtime.spec import SiteSpec, register
    if not launch.runs_triton("cpu") and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(3)
    n = 37
    q = torch.randn(1, 4, n, 16, device=dev, requires_grad=True)
    k = torch.randn(1, 2, n, 16, device=dev, requires_grad=True)
    v = torch.randn(1, 2, n, 16, device=dev, requires_grad=True)
    rows = [torch.randperm(t + 1)[:6].tolist() for t in range(n)]
    idx = torch.tensor([r + [-1] * (6 - len(r)) for r in rows], dtype=torch.int32,
                       device=dev)[None, None]                          # [1, 1, N, 6]
    key = register(SiteSpec(site="lse", owner="t", policy=planner.policy("dsa", topk=6),
                            scale=0.25, causal="lower_right", gqa_group=2))
    e = torch.empty(0, dtype=torch.int32, device=dev)
    reruns = []
    real = dispatch.attend_differentiable
    monkeypatch.setattr(dispatch, "attend_differentiable",
                        lambda *a, **kw: reruns.append(1) or real(*a, **kw))
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    out = torch.ops.sparse.attend(q, k, v, [], e, idx, key)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    assert not reruns and not providers._LSE
    with torch.no_grad():
        torch.ops.sparse.attend(q, k, v, [], e, idx, key)
    assert not providers._LSE
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    ref = torch.ops.sparse.attend(q, k, v, [], e, idx, key)
    want = torch.autograd.grad(ref, (q, k, v), g)
    assert reruns                                      # the reference path re-runs
    for a, b in zip(got, want):
        assert max_err(a, b) < 1e-5


def test_kept_index_keys_extend_by_the_new_tokens_only():
    """sparse.append extends the indexer keys kept with a cache by the new tokens' projections
    (positions included: rope on), equal to projecting the whole cache; a changed indexer or
    another keys tensor gets them recomputed."""
    import runtime.ops  # noqa: F401
    torch.manual_seed(0)
    ix = dsa.LightningIndexer(4, 2, 8, 2, 8, rope=4)
    k = torch.randn(2, 2, 5, 8)
    dsa.KEY_COUNTERS.clear()
    kept = dsa.index_keys(ix, k)
    assert dsa.KEY_COUNTERS["rows"] == 2 * 5
    assert torch.allclose(kept, ix.keys(k), atol=1e-6, rtol=0)
    for step, n_new in enumerate((1, 3, 1, 17, 2)):
        before = dsa.KEY_COUNTERS["rows"]
        k = torch.ops.sparse.append(k, torch.randn(2, 2, n_new, 8), 0)
        assert dsa.KEY_COUNTERS["extensions"] == step + 1
        assert dsa.KEY_COUNTERS["rows"] - before == 2 * n_new        # the new tokens only
        got = dsa.index_keys(ix, k)
        assert dsa.KEY_COUNTERS["rows"] - before == 2 * n_new        # found, not recomputed
        assert got.shape == (2, k.shape[2], 8)
        assert torch.allclose(got, ix.keys(k), atol=1e-5, rtol=0), f"step {step}"
    with torch.no_grad():
        ix.wk.add_(0.5)                                              # e.g. a training step
    before = dsa.KEY_COUNTERS["rows"]
    assert torch.allclose(dsa.index_keys(ix, k), ix.keys(k), atol=1e-6, rtol=0)
    assert dsa.KEY_COUNTERS["rows"] - before == 2 * k.shape[2]        # recomputed in full
    other = dsa.LightningIndexer(4, 2, 8, 2, 8)
    assert torch.allclose(dsa.index_keys(other, k), other.keys(k), atol=1e-6, rtol=0)
    assert torch.allclose(dsa.index_keys(ix, k.clone()), ix.keys(k), atol=1e-6, rtol=0)


def test_decoding_keeps_index_keys_with_the_cache(monkeypatch):
    """Greedy decoding of a tiny Llama with dsa: the cache's key append becomes sparse.append,
    each decode step extends the kept indexer keys instead of projecting the whole cache, and
    the tokens equal those of the same model projecting every step."""
    lm = tiny_llama("sdpa", layers=2)
    ids = torch.randint(0, 128, (1, 30))
    pol = planner.policy("dsa", topk=8, index_heads=2, index_dim=8)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    cm = planner.compile(lm, policy=pol)
    dsa.KEY_COUNTERS.clear()
    out = cm.generate(ids, **gen)
    assert "torch.ops.sparse.append.default" in planner.inspect(cm).graph_code()
    assert dsa.KEY_COUNTERS["extensions"] == 5 * 2                  # 5 decode steps x 2 layers
    assert dsa.KEY_COUNTERS["rows"] == 2 * (30 + 5)                 # each key projected once
    monkeypatch.setattr(dsa, "_kept_for", lambda *a, **kw: None)    # project the cache every step
    dsa.KEY_COUNTERS.clear()
    ref = cm.generate(ids, **gen)
    assert dsa.KEY_COUNTERS["extensions"] == 0
    assert torch.equal(out, ref)


def test_decode_logits_equal_a_full_sequence_run_without_a_cache():
    """Greedy decoding with dsa (indexer keys kept with the cache and extended per step)
    against one run over the whole generated sequence from an empty cache, where every
    query's top-k comes from keys projected afresh: dsa selects per query row, so the logits
    of each decode step equal the full run's row at that position."""
    lm = tiny_llama("sdpa", layers=2)
    n0, n_new = 20, 7
    ids = torch.randint(0, 128, (2, n0))
    cm = planner.compile(lm, policy=planner.policy("dsa", topk=6, index_heads=2, index_dim=8))
    dsa.KEY_COUNTERS.clear()
    with torch.no_grad():
        gen = cm.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
        assert dsa.KEY_COUNTERS["extensions"] == (n_new - 1) * 2      # the kept path ran
        full = cm(gen.sequences).logits
        dense = lm(gen.sequences).logits
    for step, logits in enumerate(gen.logits):
        row = n0 - 1 + step
        assert max_err(logits, full[:, row]) <= 1e-4, f"step {step}"
    assert max_err(full[:, n0:], dense[:, n0:]) > 1e-3, "top-6 of 20+ keys must change the output"
