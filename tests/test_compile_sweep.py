"""Many compiles of one model class in one process (a policy sweep): Dynamo keeps compiled
graphs per code object, so every compile of a class adds entries to the same ``forward``;
none of them may run eagerly for want of a recompile budget, and when Dynamo does refuse, the
error says how to proceed."""
import types

import pytest
import torch
import torch.nn.functional as F

import planner


def _forward(self, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _attn_class():
    """A fresh class per test whose ``forward`` has a code object of its own (Dynamo keeps
    its entries per code object), so other tests' compiles do not count here."""
    fwd = types.FunctionType(_forward.__code__.replace(), _forward.__globals__, "forward")
    return type("Attn", (torch.nn.Module,), {"forward": fwd})


def sink_window_reference(q, k, v, sink, window):
    """Softmax attention over keys j <= i with j < sink or i - j < window (fp64)."""
    n = q.shape[2]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    keep = (j <= i) & ((j < sink) | (i - j < window))
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v.double()


def test_a_sweep_of_80_compiles_of_one_class_captures_every_one():
    model = _attn_class()()
    q, k, v = (torch.randn(1, 2, 11, 8) for _ in range(3))
    compiled = []
    with torch.no_grad():
        for i in range(80):
            sink, window = i % 3, 1 + i % 13
            cm = planner.compile(model, policy=planner.policy("sink_window", sink=sink,
                                                              window=window))
            out = cm(q, k, v)
            ref = sink_window_reference(q, k, v, sink, window)
            assert (out.double() - ref).abs().max() < 1e-5, f"compile {i}"
            rep = planner.inspect(cm)
            assert [s.status for s in rep.sites] == ["rewritten"], f"compile {i}"
            assert rep.sites[0].calls == 1 and rep.sites[0].policy.startswith(
                f"sink_window(sink={sink}, window={window})")
            compiled.append((cm, sink, window))
        # the earlier compiled models still run their own graphs
        for cm, sink, window in compiled[:3]:
            assert (cm(q, k, v).double() - sink_window_reference(q, k, v, sink, window)
                    ).abs().max() < 1e-5
            assert planner.inspect(cm).sites[0].calls == 2


def test_string_backend_compiles_many_instances_of_one_class():
    cls = _attn_class()
    q = torch.randn(1, 2, 9, 8)
    with torch.no_grad():
        for i in range(12):                     # past Dynamo's default recompile_limit (8)
            cm = torch.compile(cls(), backend="sparse_planner")
            cm(q, q, q)
            rep = planner.inspect(cm)
            assert len(rep._graphs) == 1 and rep.sites[0].calls == 1, f"instance {i}"


def test_exhausted_recompile_limit_says_how_to_proceed(monkeypatch):
    import planner.api as api
    monkeypatch.setattr(api, "_isolation", lambda: {})       # one shared set of entries
    monkeypatch.setattr(api, "note_compile", lambda isolated: None)
    model = _attn_class()()
    q = torch.randn(1, 2, 9, 8)
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad():
        planner.compile(model, policy="dense")(q, q, q)
        with pytest.raises(RuntimeError) as e:
            planner.compile(model, policy="dense")(q, q, q)
    msg = str(e.value)
    assert "recompile_limit=1" in msg and "accumulated_recompile_limit" in msg
    assert "torch._dynamo.reset()" in msg and "raise" in msg
