"""``sparse.attend`` is differentiable for every block policy: the q/k/v gradients of a
compiled attention function equal those of a softmax attention written here, masked to the
blocks the policy selected on that call (first with a budget covering every block, then a
sparse one), on the reference path and with the Triton forward (interpreter)."""
import pytest
import torch
import torch.nn.functional as F

import planner
from brute import longformer_keep, sink_window_keep
from runtime import dispatch
from runtime.kernels import launch

B, HQ, HKV, N, D, DV = 2, 4, 2, 80, 16, 8

# (full budget, sparse budget) per block policy of the catalogue
POLICIES = {
    "block_topk": (dict(block=16, topk=64), dict(block=16, topk=1)),
    "threshold": (dict(gamma=1.0, block=16, min_budget=64), dict(gamma=0.5, block=16,
                                                                 min_budget=0)),
    "vertical_slash": (dict(last_q=16, n_vertical=512, n_slash=512, block=16),
                       dict(last_q=16, n_vertical=2, n_slash=1, block=8, sink_tokens=1,
                            local_tokens=2)),
    "quest": (dict(page=16, budget=1024), dict(page=16, budget=16)),
    "auto": (dict(target_density=1.0, block=16), dict(target_density=0.2, block=16)),
    "sink_window": (dict(sink=4, window=1024), dict(sink=3, window=9)),
    "longformer": (dict(window=1024, global_tokens=1, block=16),
                   dict(window=7, global_tokens=3, block=16)),
    "bigbird": (dict(window=1024, global_tokens=0, random_blocks=0, block=16),
                dict(window=8, global_tokens=8, random_blocks=1, seed=5, block=8)),
}


def attention(q, k, v):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),
                                          v.repeat_interleave(g, 1), is_causal=True)


def keep_from_lists(counts, indices, block, n_q, n_kv):
    """bool [B, Hq, Nq, Nkv]: the pairs inside the listed blocks (one list per key head)."""
    keep = torch.zeros(counts.shape[0], counts.shape[1], n_q, n_kv, dtype=torch.bool)
    for b in range(counts.shape[0]):
        for h in range(counts.shape[1]):
            for qb in range(counts.shape[2]):
                for c in range(int(counts[b, h, qb])):
                    kb = int(indices[b, h, qb, c])
                    keep[b, h, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block] = True
    return keep.repeat_interleave(HQ // counts.shape[1], dim=1)


def masked_attention(q, k, v, keep):
    """fp64 softmax attention over ``keep`` & causal pairs (rows keeping nothing give 0)."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    s = s.masked_fill(~(keep & causal), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vv


def token_rule(name, params):
    if name == "sink_window":
        return sink_window_keep(B, HQ, N, N, sink=params["sink"], window=params["window"],
                                causal="upper_left")
    if name == "longformer":
        return longformer_keep(B, HQ, N, N, window=params["window"],
                               global_tokens=params["global_tokens"], causal="upper_left")
    return None


def _run(name, params, mode, monkeypatch):
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", mode)
    lists = []
    real = dispatch.attend
    monkeypatch.setattr(dispatch, "attend", lambda q, k, v, m, counts, indices, spec: (
        lists.append((counts.clone(), indices.clone(), spec)) or
        real(q, k, v, m, counts, indices, spec)))
    q = torch.randn(B, HQ, N, D, requires_grad=True)
    k = torch.randn(B, HKV, N, D, requires_grad=True)
    v = torch.randn(B, HKV, N, DV, requires_grad=True)
    f = planner.compile(attention, policy=planner.policy(name, **params), dynamic=False)
    out = f(q, k, v)
    assert len(lists) == 1, "one attend call expected"
    counts, indices, spec = lists[0]
    block = params.get("block", params.get("page", 64))
    keep = keep_from_lists(counts, indices, block, N, N)
    rule = token_rule(name, params)
    if rule is not None:
        keep = keep & rule
    ref = masked_attention(q, k, v, keep)
    w = torch.randn_like(ref)
    g_out = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    return out, ref, g_out, g_ref, keep, planner.inspect(f).sites[0]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_full_budget_gradients_equal_dense_masked_softmax(name, monkeypatch):
    out, ref, g_out, g_ref, keep, site = _run(name, POLICIES[name][0], "auto", monkeypatch)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    assert bool((keep | ~causal).all()), "a covering budget lists every causal block"
    assert site.density == pytest.approx(1.0)
    assert (out.double() - ref).abs().max() <= 1e-5
    for nm, a, b in zip("qkv", g_out, g_ref):
        assert a.shape == b.shape and (a.double() - b).abs().max() <= 2e-5, nm


MODES = ["auto"] + (["triton"] if launch.runs_triton("cpu") else [])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_sparse_gradients_equal_masked_softmax_over_the_selected_blocks(name, mode,
                                                                         monkeypatch):
    out, ref, g_out, g_ref, keep, site = _run(name, POLICIES[name][1], mode, monkeypatch)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    frac = (keep & causal).sum().item() / (causal.sum().item() * B * HQ)
    assert 0 < frac < 0.8, f"not sparse: {frac:.2f} of the causal pairs kept"
    assert site.density == pytest.approx(frac, abs=1e-6)
    assert (out.double() - ref).abs().max() <= 1e-5
    for nm, a, b in zip("qkv", g_out, g_ref):
        assert a.shape == b.shape and (a.double() - b).abs().max() <= 2e-5, nm
        assert b.abs().max() > 1e-3, f"{nm}: a vanishing gradient tests nothing"
