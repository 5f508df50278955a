"""The executed graph (passes.lower): each site's score -> select -> attend chain runs as one
``runtime.ops.site`` call, with the results of the three ops, gradients included; the
inspected graph keeps the IR; chains of any other shape run as they are."""
import operator

import pytest
import torch
import torch.nn.functional as F

import planner
from passes.lower import _chain, lower_for_eager
from runtime import ops


def _attn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _captured(policy, n=200, cost_model="off"):
    be = planner.backend(policy=policy, cost_model=cost_model)
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 4, n, 32, generator=g) for _ in range(3))
    torch.compile(_attn, backend=be, dynamic=False)(q, k, v)
    return be.graphs[-1], (q, k, v)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("policy", [planner.policy("block_topk", block=16, topk=3),
                                    planner.policy("threshold", block=16, gamma=0.7),
                                    planner.policy("sink_window", sink=4, window=40),
                                    "dense"])
def test_lowered_chain_equals_the_ops(policy):
    gm, (q, k, v) = _captured(policy)
    low = lower_for_eager(gm)
    if torch.ops.sparse.attend.default not in _targets(gm):
        assert low is gm                             # planned as SDPA in the graph: nothing to fuse
        return
    assert ops.site in _targets(low) and torch.ops.sparse.attend.default not in _targets(low)
    assert torch.ops.sparse.attend.default in _targets(gm)       # the IR is left as it was
    with torch.no_grad():
        assert torch.equal(low(q, k, v)[0], gm(q, k, v)[0])
    # with inputs that require grad the ops themselves run: the same gradients
    grads = []
    for mod in (gm, low):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        mod(*leaves)[0].square().sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_cost_model_dense_calls_skip_the_estimator(monkeypatch):
    """A call the cost model runs densely goes straight to dense attention: no score or
    select runs, and the result is the dense one."""
    from runtime import dispatch
    gm, (q, k, v) = _captured(planner.policy("block_topk", block=16, topk=3))
    low = lower_for_eager(gm)
    monkeypatch.setattr(dispatch, "runs_dense", lambda spec, q, k: True)
    called = []
    monkeypatch.setattr(ops, "score", lambda *a: called.append("score"))
    with torch.no_grad():
        out = low(q, k, v)[0]
    assert not called
    torch.testing.assert_close(out, _attn(q, k, v), rtol=1e-5, atol=1e-5)


def test_a_chain_read_elsewhere_is_not_fused():
    gm, _ = _captured(planner.policy("block_topk", block=16, topk=3))
    attend = next(n for n in gm.graph.nodes if n.target is torch.ops.sparse.attend.default)
    assert _chain(attend) is not None
    counts = attend.args[4]
    with gm.graph.inserting_after(attend):
        extra = gm.graph.call_function(operator.getitem, (counts.args[0], 0))
    assert _chain(attend) is None                    # the lists have a second reader
    gm.graph.erase_node(extra)
    assert _chain(attend) is not None


def test_compiled_model_runs_the_fused_sites(monkeypatch):
    calls = []
    real = ops.site
    monkeypatch.setattr(ops, "site", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    from planner.models import GPTConfig, TinyGPT
    m = TinyGPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=512)).eval()
    cm = planner.compile(m, policy=planner.policy("block_topk", block=16, topk=2),
                         cost_model="off")
    ids = torch.randint(0, 256, (1, 130))
    with torch.no_grad():
        cm(ids)
    assert len(calls) == 2                           # one call per layer
    assert planner.inspect(cm).sites[0].density < 1.0


def test_decode_shaped_sdpa_calls_leave_cudnn_out(monkeypatch):
    """``rules.sdpa``: on CUDA a call of at most DECODE_ROWS query rows runs without cuDNN
    attention (a plan per new key length); on the CPU, and for longer calls, PyTorch chooses."""
    import torch.nn.functional as F
    from runtime import rules
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*a, **kw):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*a, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = (torch.randn(1, 2, n, 16) for n in (1, 9, 9))
    torch.testing.assert_close(rules.sdpa(q, k, v, scale=0.25), real(q, k, v, scale=0.25))
    if not torch.cuda.is_available():
        return
    before = torch.backends.cuda.cudnn_sdp_enabled()
    dev = [t.cuda().half() for t in (q, k, v)]
    rules.sdpa(*dev)
    long_q = torch.randn(1, 2, rules.DECODE_ROWS + 1, 16, device="cuda", dtype=torch.half)
    rules.sdpa(long_q, dev[1], dev[2])
    assert seen[-2:] == [False, before]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
