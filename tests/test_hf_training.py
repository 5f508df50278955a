"""Training through Hugging Face models with their KV cache on (the defaults) and gradients on:
transformers 5 starts each DynamicCache layer with a 1-D empty tensor, so the rewritten key
append (``sparse.append``) sees a 1-D ``past`` and must treat it as ``torch.cat`` does."""
import pytest
import torch

import planner
import runtime.ops  # noqa: F401
from planner import train

from conftest import max_err, tiny_llama


def tiny_gpt2(layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


MODELS = [pytest.param(lambda: tiny_llama("sdpa"), id="llama"),
          pytest.param(tiny_gpt2, id="gpt2")]


@pytest.mark.parametrize("past", [
    pytest.param(lambda new: torch.tensor([], requires_grad=True), id="1d-empty"),
    pytest.param(lambda new: torch.randn(2, 3, 0, 5, requires_grad=True), id="4d-empty"),
    pytest.param(lambda new: torch.randn(2, 3, 4, 5, requires_grad=True), id="4d"),
])
@pytest.mark.parametrize("page", [0, 4])
def test_append_matches_cat_forward_and_backward(past, page):
    new = torch.randn(2, 3, 6, 5, requires_grad=True)
    p = past(new)
    out = torch.ops.sparse.append(p, new, page)
    ref = torch.cat([p, new], dim=-2)
    assert out.shape == ref.shape and torch.equal(out, ref)
    w = torch.randn_like(ref)
    g_out = torch.autograd.grad((out * w).sum(), [p, new])
    g_ref = torch.autograd.grad((ref * w).sum(), [p, new])
    for a, b in zip(g_out, g_ref):
        assert a.shape == b.shape and torch.equal(a, b)


def test_append_skips_a_1d_empty_new_as_cat_does():
    past = torch.randn(1, 2, 3, 4, requires_grad=True)
    new = torch.tensor([], requires_grad=True)
    out = torch.ops.sparse.append(past, new, 0)
    assert torch.equal(out, past)
    g_past, g_new = torch.autograd.grad(out.sum() * 2, [past, new])
    assert torch.equal(g_past, torch.full_like(past, 2.0)) and g_new.shape == (0,)


def test_append_under_compile_with_a_1d_empty_past():
    def f(past, new):
        return torch.ops.sparse.append(past, new, 0) * 2
    new = torch.randn(1, 2, 5, 4, requires_grad=True)
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(torch.tensor([]), new)
    (g,) = torch.autograd.grad(out.sum(), [new])
    assert torch.equal(out, new * 2) and torch.equal(g, torch.full_like(new, 2.0))


@pytest.mark.parametrize("make", MODELS)
def test_readme_dsa_training_snippet_runs_with_grad_and_cache(make):
    """The README's "Training DSA indexers" snippet, line by line, on a Hugging Face model
    called with its defaults (KV cache on) and gradients enabled."""
    model = make()
    ids = torch.randint(0, 128, (1, 40))
    cm = planner.compile(model, policy=planner.policy("dsa", topk=8, index_heads=2,
                                                      index_dim=8))
    assert torch.is_grad_enabled()
    first = cm(ids)                                              # creates the indexers
    with torch.no_grad():
        ref = model(ids).logits
    assert first.logits.shape == ref.shape and torch.isfinite(first.logits).all()
    opt = torch.optim.AdamW(train.indexer_parameters(cm), lr=1e-2)
    loss = train.indexer_distillation_loss(cm, input_ids=ids)
    assert loss.requires_grad and torch.isfinite(loss) and loss.item() >= 0
    loss.backward()
    assert all(p.grad is not None for p in train.indexer_parameters(cm))
    opt.step()
    opt.zero_grad()
    res = train.sparse_stage(cm, input_ids=ids, labels=ids)
    res.total.backward()
    assert torch.isfinite(res.total) and abs(res.total.item() - (res.lm + res.kl).item()) < 1e-5
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())
    assert all(p.grad is not None for p in train.indexer_parameters(cm))
    ev = train.evaluate_indexers(cm, input_ids=ids)
    assert ev["sites"] == 2 and 0 < ev["recall"] <= 1 + 1e-6 and ev["kl"] >= 0


@pytest.mark.parametrize("make", MODELS)
def test_quest_trains_through_the_cache_append(make):
    """quest with gradients on: a budget covering every page gives the eager model's loss and
    gradients; a sparse budget runs and yields finite gradients."""
    model = make()
    ids = torch.randint(0, 128, (1, 37))
    ref = model(input_ids=ids, labels=ids)
    ref.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = planner.compile(model, policy=planner.policy("quest", page=4, budget=64))
    out = full(input_ids=ids, labels=ids)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    for n, p in model.named_parameters():
        assert max_err(p.grad, want[n]) < 1e-5, n
    model.zero_grad()
    sparse = planner.compile(model, policy=planner.policy("quest", page=4, budget=8))
    out = sparse(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    rep = planner.inspect(sparse)
    assert all(s.density < 1 for s in rep.sites)
