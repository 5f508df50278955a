"""Zero- and one-token sequences: every policy returns what eager attention returns (an empty
output of the right shape for N = 0, zeros when there is no key), with gradients, on the
reference path and through the Triton kernels (interpreter)."""
import pytest
import torch
import torch.nn.functional as F

import planner
from codegen.select.reference import allowed_blocks, pooled_block_logits, pooled_block_scores
from planner.models import GPTConfig, TinyGPT

POLICIES = sorted(planner.PRESETS)


def _err(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def _gqa_attention(causal: bool):
    def attn(q, k, v):
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),
                                              v.repeat_interleave(g, 1), is_causal=causal)
    return attn


@pytest.mark.parametrize("mode", ["auto", "triton"])
@pytest.mark.parametrize("n_q, n_kv, causal", [
    pytest.param(0, 0, True, id="N0-causal"),
    pytest.param(1, 1, True, id="N1-causal"),
    pytest.param(0, 5, False, id="Nq0-Nkv5"),
    pytest.param(3, 0, False, id="Nq3-Nkv0"),
])
@pytest.mark.parametrize("name", POLICIES)
def test_policy_matches_eager_on_empty_and_single_token_calls(name, n_q, n_kv, causal, mode,
                                                              monkeypatch):
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", mode)
    attn = _gqa_attention(causal)
    q = torch.randn(2, 4, n_q, 16, requires_grad=True)
    k = torch.randn(2, 2, n_kv, 16, requires_grad=True)
    v = torch.randn(2, 2, n_kv, 8, requires_grad=True)
    ref = attn(q, k, v)
    out = planner.compile(attn, policy=name, dynamic=False)(q, k, v)
    assert out.shape == ref.shape == (2, 4, n_q, 8)
    assert torch.isfinite(out).all() and _err(out, ref) <= 1e-5
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v), allow_unused=True)
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v), allow_unused=True)
    for t, a, b in zip((q, k, v), g_out, g_ref):
        a = torch.zeros_like(t) if a is None else a           # unused: a zero gradient
        b = torch.zeros_like(t) if b is None else b
        assert a.shape == b.shape == t.shape and _err(a, b) <= 1e-5


@pytest.mark.parametrize("name", POLICIES)
def test_model_with_empty_and_single_token_input(name):
    m = TinyGPT(GPTConfig(n_layer=1)).eval()
    cm = planner.compile(m, policy=name)
    with torch.no_grad():
        for n in (0, 1):
            x = torch.randint(0, 256, (2, n))
            ref, out = m(x), cm(x)
            assert out.shape == ref.shape == (2, n, 256)
            assert _err(out, ref) <= 1e-5
    site = planner.inspect(cm).sites[0]
    assert site.status == "rewritten" and site.calls == 2


def test_pooled_estimates_of_an_empty_sequence_are_empty():
    q, k = torch.randn(1, 4, 0, 8), torch.randn(1, 2, 0, 8)
    ok = allowed_blocks(q.shape, k.shape, (), (), "lower_right", 16)
    assert pooled_block_scores(q, k, 0.3, 16, ok).shape == (1, 2, 0, 0)
    q1 = torch.randn(1, 2, 0, 8)
    assert pooled_block_logits(q1, k, 0.3, 16, ok).shape == (1, 2, 0, 0)
