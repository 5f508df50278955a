"""planner.compile end to end on CPU: identity under `dense`, exact sparse semantics."""
import math

import pytest
import torch
import torch.nn.functional as F

import planner
from brute import block_topk_keep, dense_with_keep, sink_window_keep
from conftest import max_err, tiny_bert, tiny_llama, tiny_qwen2
from planner.models import GPTConfig, TinyGPT
from planner.models.gpt import CausalSelfAttention


def _sites_ok(cm, n_layers):
    rep = planner.inspect(cm)
    assert len(rep.sites) == n_layers, rep
    assert all(s.status == "rewritten" for s in rep.sites), rep
    assert all(s.calls >= 1 for s in rep.sites), rep
    return rep


@pytest.mark.parametrize("use_sdpa", [False, True], ids=["gpt-eager", "gpt-sdpa"])
def test_builtin_gpt_dense_identity(use_sdpa):
    m = TinyGPT(GPTConfig(n_layer=3, use_sdpa=use_sdpa)).eval()
    x = torch.randint(0, 256, (2, 45))
    with torch.no_grad():
        ref = m(x)
        cm = planner.compile(m, policy="dense")
        assert max_err(cm(x), ref) <= 1e-5
    rep = _sites_ok(cm, 3)
    assert all(s.density == pytest.approx(1.0) for s in rep.sites)
    assert "torch.ops.sparse.attend" in rep.graph_code()


@pytest.mark.parametrize("builder, impl, kw", [
    pytest.param(tiny_llama, "eager", {}, id="llama-gqa-eager"),
    pytest.param(tiny_llama, "sdpa", {}, id="llama-gqa-sdpa"),
    pytest.param(tiny_qwen2, "eager", {}, id="qwen2-eager"),
    pytest.param(tiny_qwen2, "sdpa", {}, id="qwen2-sdpa"),
])
def test_hf_causal_lm_dense_identity(builder, impl, kw):
    m = builder(impl, layers=3, **kw)
    x = torch.randint(0, 128, (2, 37))
    with torch.no_grad():
        ref = m(x).logits
        cm = planner.compile(m, policy="dense")
        assert max_err(cm(x).logits, ref) <= 1e-5
    rep = _sites_ok(cm, 3)
    assert all("k[2, 2, 37, 16]" in s.shapes for s in rep.sites), "GQA keys must stay un-repeated"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_with_padding_mask_dense_identity(impl):
    m = tiny_bert(impl, layers=3)
    x = torch.randint(0, 100, (3, 21))
    am = torch.ones(3, 21, dtype=torch.long)
    am[1, 15:] = 0
    am[2, 4:] = 0
    with torch.no_grad():
        ref = m(input_ids=x, attention_mask=am).last_hidden_state
        cm = planner.compile(m, policy="dense")
        out = cm(input_ids=x, attention_mask=am).last_hidden_state
    assert max_err(out, ref) <= 1e-5
    _sites_ok(cm, 3)


@pytest.mark.parametrize("pol", [
    pytest.param(planner.policy("block_topk", block=16, topk=8), id="block_topk-covers-all"),
    pytest.param(planner.policy("sink_window", sink=0, window=200), id="sink_window-covers-all"),
])
@pytest.mark.parametrize("model", ["gpt", "llama-eager", "llama-sdpa"])
def test_full_budget_sparse_policies_reproduce_dense(pol, model):
    if model == "gpt":
        m, x = TinyGPT(GPTConfig(n_layer=2)).eval(), torch.randint(0, 256, (2, 77))
        run = lambda mod: mod(x)  # noqa: E731
    else:
        m, x = tiny_llama(model.split("-")[1]), torch.randint(0, 128, (2, 77))
        run = lambda mod: mod(x).logits  # noqa: E731
    with torch.no_grad():
        ref = run(m)
        cm = planner.compile(m, policy=pol)
        assert max_err(run(cm), ref) <= 1e-5
    rep = _sites_ok(cm, 2)
    assert all(s.density == pytest.approx(1.0) for s in rep.sites)


# --------------------------------------------------------------------------- exact sparse semantics

def _patched_gpt_forward(keep_fn):
    """CausalSelfAttention.forward computing attention independently through tests/brute.py."""
    def forward(self, x):
        B, T, C = x.shape
        H = self.cfg.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        scale = 1.0 / math.sqrt(C // H)
        keep = keep_fn(q, k, scale)
        y = dense_with_keep(q, k, v, keep, scale).to(x.dtype)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))
    return forward


@pytest.mark.parametrize("pol, keep_fn", [
    pytest.param(planner.policy("block_topk", block=8, topk=2),
                 lambda q, k, s: block_topk_keep(q, k, block=8, topk=2, sink_blocks=1,
                                                 local_blocks=1, scale=s, causal="lower_right"),
                 id="block_topk-blk8-top2"),
    pytest.param(planner.policy("block_topk", block=16, topk=1, sink_blocks=0, local_blocks=2),
                 lambda q, k, s: block_topk_keep(q, k, block=16, topk=1, sink_blocks=0,
                                                 local_blocks=2, scale=s, causal="lower_right"),
                 id="block_topk-blk16-top1-local2"),
    pytest.param(planner.policy("sink_window", sink=3, window=9),
                 lambda q, k, s: sink_window_keep(q.shape[0], q.shape[1], q.shape[2], k.shape[2],
                                                  sink=3, window=9, causal="lower_right"),
                 id="sink_window-3-9"),
])
def test_small_budget_gpt_equals_independent_sparse_attention(pol, keep_fn, monkeypatch):
    m = TinyGPT(GPTConfig(n_layer=2)).eval()
    x = torch.randint(0, 256, (2, 53))
    with torch.no_grad():
        dense = m(x)
        cm = planner.compile(m, policy=pol)
        got = cm(x)
        monkeypatch.setattr(CausalSelfAttention, "forward", _patched_gpt_forward(keep_fn))
        exp = m(x)
    assert max_err(got, exp) <= 1e-4
    assert max_err(got, dense) > 1e-3, "the budget is small enough to change the output"
    rep = planner.inspect(cm)
    assert all(0 < s.density < 1 for s in rep.sites)


def test_small_budget_gqa_function_equals_independent_sparse_attention():
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q, k, v = torch.randn(2, 6, 50, 16), torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    f = planner.compile(attn, policy=planner.policy("block_topk", block=8, topk=2))
    got = f(q, k, v)
    keep = block_topk_keep(q, k, block=8, topk=2, sink_blocks=1, local_blocks=1, scale=0.25,
                           causal="upper_left")
    assert max_err(got.double(), dense_with_keep(q, k, v, keep, 0.25)) <= 1e-5
    rep = planner.inspect(f)
    assert rep.sites[0].pattern == "sdpa+enable_gqa"
    assert 0 < rep.sites[0].density < 1 and len(rep.sites[0].density_per_head) == 6


def test_sequence_length_changes_between_calls():
    m = TinyGPT(GPTConfig(n_layer=2)).eval()
    pol = planner.policy("block_topk", block=8, topk=1)
    cm = planner.compile(m, policy=pol)
    keep_fn = lambda q, k, s: block_topk_keep(q, k, block=8, topk=1, sink_blocks=1,  # noqa: E731
                                              local_blocks=1, scale=s, causal="lower_right")
    fwd = CausalSelfAttention.forward
    for n in (40, 23, 71, 40):
        x = torch.randint(0, 256, (1, n))
        with torch.no_grad():
            got = cm(x)
            CausalSelfAttention.forward = _patched_gpt_forward(keep_fn)
            try:
                exp = m(x)
            finally:
                CausalSelfAttention.forward = fwd
        assert got.shape == (1, n, 256)
        assert max_err(got, exp) <= 1e-4, f"N={n}"
        assert f"q[1, 4, {n}, 32]" in planner.inspect(cm).sites[0].shapes
