"""What discovery must leave alone, and the reasons it gives."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import planner


def _compile_fn(fn, *args, policy="dense"):
    f = planner.compile(fn, policy=policy)
    out = f(*args)
    return f, out, planner.inspect(f)


def test_softmax_over_query_axis_is_not_rewritten():
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v
    q = torch.randn(1, 2, 8, 4)
    cf, out, rep = _compile_fn(f, q, q, q)
    assert rep.sites == []
    assert torch.allclose(out, f(q, q, q))
    (u,) = rep.unmatched()
    assert "not the key axis" in u.reason


def test_classifier_softmax_is_not_rewritten():
    lin = nn.Linear(8, 3)

    def f(x):
        return torch.softmax(lin(x), dim=-1)
    x = torch.randn(4, 8)
    cf, out, rep = _compile_fn(f, x)
    assert rep.sites == [] and torch.allclose(out, f(x))
    (u,) = rep.unmatched()
    assert "matmul" in u.reason


def test_returned_attention_weights_stay_dense_with_reason():
    def f(q, k, v):
        w = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        return w @ v, w
    q = torch.randn(1, 2, 8, 4)
    cf, (out, w), rep = _compile_fn(f, q, q, q)
    (s,) = rep.sites
    assert s.status == "dense-fallback" and "also used" in s.reason
    assert "sparse.attend" not in rep.graph_code()


def test_matmul_softmax_with_additive_mask_and_scale():
    def f(q, k, v, mask):
        s = torch.matmul(q, k.transpose(2, 3)) / 2.0 + mask
        return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)
    q, k, v = torch.randn(2, 3, 9, 4), torch.randn(2, 3, 11, 4), torch.randn(2, 3, 11, 4)
    mask = torch.zeros(2, 1, 9, 11)
    mask[0, :, :, 7:] = torch.finfo(torch.float32).min
    cf, out, rep = _compile_fn(f, q, k, v, mask)
    (s,) = rep.sites
    assert s.status == "rewritten" and s.pattern == "matmul_softmax"
    assert torch.allclose(out, f(q, k, v, mask), atol=1e-6)


def test_debug_env_explains_matches(monkeypatch, capsys):
    monkeypatch.setenv("PLANNER_DEBUG", "match")

    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=1) @ v
    q = torch.randn(1, 2, 8, 4)
    _compile_fn(f, q, q, q)
    assert "not the key axis" in capsys.readouterr().out


def test_graph_break_between_sites_keeps_both():
    def f(q, k, v):
        a = F.scaled_dot_product_attention(q, k, v)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(a, k, v, is_causal=True)
    q = torch.randn(1, 2, 8, 4)
    cf, out, rep = _compile_fn(f, q, q, q)
    assert torch.allclose(out, f(q, q, q), atol=1e-6)
    assert len(rep._graphs) == 2
    assert sorted(s.status for s in rep.sites) == ["rewritten", "rewritten"]


def test_call_argument_mask_is_never_proved_causal():
    """A mask passed in by the caller may differ next call: it stays a modifier."""
    from runtime.spec import lookup

    def attn(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    q = torch.randn(1, 2, 24, 8)
    tril = torch.ones(24, 24, dtype=torch.bool).tril()
    f, out, rep = _compile_fn(attn, q, q, q, tril)
    gm = rep._graphs[0]
    (spec,) = [lookup(n.args[-1]) for n in gm.graph.nodes
               if n.target is torch.ops.sparse.attend.default]
    assert spec.causal is None and spec.mods == (("keep",),)
    other = torch.rand(24, 24) > 0.5
    other[:, 0] = True
    assert torch.allclose(f(q, q, q, other), attn(q, q, q, other), atol=1e-6)


def test_a_failing_pass_leaves_the_model_running(monkeypatch):
    import passes

    def broken(gm, ctx):
        raise RuntimeError("boom")
    monkeypatch.setattr(passes, "PIPELINE", [broken])
    q = torch.randn(1, 2, 8, 4)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)
    with pytest.warns(UserWarning, match="boom"):
        cf, out, rep = _compile_fn(f, q, q, q)
    assert torch.allclose(out, f(q, q, q))
    assert any("boom" in u.reason for u in rep.unmatched())
    monkeypatch.setenv("PLANNER_STRICT", "1")
    with pytest.raises(Exception, match="boom"):
        planner.compile(lambda x: torch.softmax(x, -1) * 2, policy="dense")(torch.randn(3, 3))
