"""DeepSeek Sparse Attention as the models compute it (DeepSeek-V3.2, GLM-MoE-DSA; tiny random
configs of ``hf_current.py``): the planner recognises the model's own indexer, top-k and index
mask, and runs them as the site's score / select with the model's weights.

* ``policy="dense"`` (the model's meaning: its output is the sparse one) reproduces the model
  (fp32, <= 1e-5) with every site shown as ``dsa (native) top-<K>`` and MLA in its absorbed form.
* The selected sets are the model's, row for row, ties included: the reference path scores with
  the model's own operations (bit-identical scores), and ``torch.topk`` then breaks ties as the
  model's call does (among 23 equal scores the CPU keeps an unsorted set such as [7, 3, 5, ...];
  the rule is the same function on the same values, not a documented order).
* Left / right padding, the KV cache (decode steps read the indexer keys the cache holds),
  GLM's layers that share the previous layer's top-k, lengths Dynamo traces symbolically.
* A chain the recogniser does not know stays a mask tensor (exact), with the reason shown.
"""
import pytest
import torch

import planner
from conftest import max_err
from hf_current import CONFIGS, build, compiled_matches, generate_dense_matches, padded_batch
from runtime import native_dsa

pytest.importorskip("transformers")

MODELS = [pytest.param(n, i, id=f"{n}-{i}") for n in ("deepseek_v32", "glm_moe_dsa")
          for i in ("eager", "sdpa")]


def _caches_latent(m) -> bool:
    """Whether the model's MLA layers cache the compressed latent (transformers 5.2x: the
    absorbed form applies) or the decompressed per-head K/V (e.g. 5.17: the cache holds what
    absorbing would remove, so the site keeps per-head K/V with the reason)."""
    import inspect as _inspect
    attn = type(m.model.layers[0].self_attn)
    return "cache.update(k_pass" in _inspect.getsource(attn.forward)


def _model_topk(m):
    """Hooks that keep each layer's own top-k (the indexer's int32 [B, S, K] output)."""
    got, hooks = {}, []
    for i, layer in enumerate(m.model.layers):
        ix = layer.self_attn.indexer
        if ix is not None:
            hooks.append(ix.register_forward_hook(
                lambda mod, a, out, i=i: got.setdefault(i, []).append(out.clone())))
    return got, hooks


def _visible_sets(idx, visible):
    """Per row, the set of selected keys the row may see (the model selects hidden keys where a
    row sees fewer than K, and its mask hides them again)."""
    out = []
    for b in range(idx.shape[0]):
        for t in range(idx.shape[1]):
            out.append(sorted(x for x in idx[b, t].tolist() if x >= 0 and visible[b, t, x]))
    return out


def _causal_visible(ids, am=None):
    B, n = ids.shape
    vis = torch.ones(n, n).tril().bool()[None].expand(B, n, n)
    if am is not None:
        vis = vis & am.bool()[:, None, :]
    return vis


@pytest.mark.parametrize("name, impl", MODELS)
@pytest.mark.parametrize("pol, tol, form", [
    ("dense", 1e-5, "per-head K/V (as the model computes them)"),
    ("dsa", 1e-4, "absorbed MLA (latent 16 + rope 4, 4 heads share it)")])
def test_native_site_reproduces_the_model(name, impl, pol, tol, form):
    """``dense``: the model's selection over its own per-head K/V (the identity check, fp32
    1e-5); ``dsa``: MLA absorbed (the products reassociated: fp32 rounding apart)."""
    m = build(name, impl)
    cm = compiled_matches(m, pol, tol, batch=2)
    rep = planner.inspect(cm)
    assert [s.status for s in rep.sites] == ["rewritten"] * 2, rep
    assert all(s.policy == "dsa (native) top-8" for s in rep.sites), rep
    if pol == "dsa" and not _caches_latent(m):
        form = "per-head K/V (v is not the second part of a split)"
    assert all(s.rules == f"model indexer (2x8), mask causal, {form}" for s in rep.sites), rep
    assert all(s.density is not None and s.density < 1 for s in rep.sites), rep


@pytest.mark.parametrize("name, impl", MODELS)
@pytest.mark.parametrize("ties", [False, True], ids=["random", "all-tied"])
def test_selected_sets_are_the_models(name, impl, ties):
    """Row for row the planner keeps the model's keys; with every index score equal (the
    indexer's weights zeroed) the choice is torch.topk's tie rule on both sides."""
    m = build(name, impl)
    if ties:
        for layer in m.model.layers:
            torch.nn.init.zeros_(layer.self_attn.indexer.weights_proj.weight)
    ids = torch.randint(0, 128, (2, 23))
    got, hooks = _model_topk(m)
    with torch.no_grad():
        m(ids)
        for h in hooks:
            h.remove()
        cm = planner.compile(m, policy="dense")
        with native_dsa.recording() as rec:
            cm(ids)
    vis = _causal_visible(ids)
    for i in range(2):
        mine = rec[f"model.layers.{i}.self_attn"][0]
        assert mine.shape == (2, 23, 8) and mine.dtype == torch.int32
        assert _visible_sets(mine, vis) == _visible_sets(got[i][0], vis), i
        if ties:       # the same function on the same values: the very same lists
            theirs = got[i][0]
            seen = torch.where(vis.gather(-1, theirs.long()), theirs, -1)
            assert torch.equal(mine, seen)


@pytest.mark.parametrize("name, impl", MODELS)
def test_padded_batch_and_symbolic_lengths(name, impl):
    """Left / right padding (a left-padded row's first queries see no key: eager's additive
    finfo.min mask makes them the mean of v, SDPA's boolean one 0), then lengths Dynamo traces
    symbolically (the model's min(index_topk, T) becomes a sym_min node)."""
    m = build(name, impl)
    cm = planner.compile(m, policy="dense")
    ids, am = padded_batch()
    got, hooks = _model_topk(m)
    with torch.no_grad():
        ref = m(ids, attention_mask=am).logits
        for h in hooks:
            h.remove()
        with native_dsa.recording() as rec:
            out = cm(ids, attention_mask=am).logits
        assert max_err(out, ref) <= 1e-5
        vis = _causal_visible(ids, am)
        assert _visible_sets(rec["model.layers.0.self_attn"][0], vis) == \
            _visible_sets(got[0][0], vis)
        for n in (5, 31, 40):
            x = torch.randint(0, 128, (2, n))
            assert max_err(cm(x).logits, m(x).logits) <= 1e-5, n
    rep = planner.inspect(cm)
    assert all(s.policy == "dsa (native) top-8" for s in rep.sites), rep


@pytest.mark.parametrize("name, impl", [("deepseek_v32", "eager"), ("glm_moe_dsa", "sdpa")])
def test_generate_reads_the_models_indexer_cache(name, impl):
    m = build(name, impl)
    cm = generate_dense_matches(m)
    rep = planner.inspect(cm)
    assert all(s.calls >= 2 and s.policy == "dsa (native) top-8" for s in rep.sites), rep


def test_glm_layers_sharing_the_previous_top_k(monkeypatch):
    """GLM-MoE-DSA's "shared" layers reuse the previous full layer's top-k: the chain is read
    back to that layer's indexer."""
    monkeypatch.setitem(CONFIGS["glm_moe_dsa"][2], "indexer_types", ["full", "shared"])
    m = build("glm_moe_dsa", "eager")
    assert m.model.layers[1].self_attn.indexer is None
    ids = torch.randint(0, 128, (1, 23))
    with torch.no_grad():
        ref = m(ids).logits
        cm = planner.compile(m, policy="dense")
        with native_dsa.recording() as rec:
            out = cm(ids).logits
    assert max_err(out, ref) <= 1e-5
    a, b = (rec[f"model.layers.{i}.self_attn"][0] for i in (0, 1))
    assert torch.equal(a, b)
    assert all(s.policy == "dsa (native) top-8" for s in planner.inspect(cm).sites)


def test_native_policy_sets_the_top_k():
    """``NativeDSA(topk=4)`` on the top-8 model computes what the top-4 model computes."""
    m8 = build("deepseek_v32", "eager")
    CONFIGS["deepseek_v32"][2]["index_topk"] = 4
    try:
        m4 = build("deepseek_v32", "eager")
    finally:
        CONFIGS["deepseek_v32"][2]["index_topk"] = 8
    m4.load_state_dict(m8.state_dict())
    ids = torch.randint(0, 128, (1, 23))
    with torch.no_grad():
        ref = m4(ids).logits
        cm = planner.compile(m8, policy=planner.NativeDSA(topk=4))
        out = cm(ids).logits
    assert max_err(out, ref) <= 1e-5
    assert all(s.policy == "dsa (native) top-4" for s in planner.inspect(cm).sites)


def test_native_policy_where_the_model_has_no_indexer_stays_dense():
    m = build("deepseek_v3", "eager")
    cm = compiled_matches(m, planner.NativeDSA())
    rep = planner.inspect(cm)
    assert all("computes no DSA selection" in s.reason for s in rep.sites), rep


def test_an_unknown_chain_stays_a_mask_with_the_reason(monkeypatch):
    """An indexer the recogniser does not know (here: GELU where the model has its ReLU) keeps
    the model's mask as a mask tensor: exact, and the site says why."""
    import types

    import torch.nn.functional as F
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as mod
    monkeypatch.setattr(mod, "F", types.SimpleNamespace(**{**vars(F), "relu": F.gelu}))
    m = build("deepseek_v32", "eager")
    cm = compiled_matches(m)
    rep = planner.inspect(cm)
    assert [s.status for s in rep.sites] == ["rewritten"] * 2, rep
    assert all(s.policy == "dense" and "not recognised" in s.reason and "top-k reads" in s.reason
               for s in rep.sites), rep


def test_fp8_rows_round_to_e4m3_with_one_scale_per_row():
    x = torch.randn(3, 5, 64) * torch.logspace(-3, 3, 5)[None, :, None]
    y = native_dsa.fp8_rows(x)
    rel = ((y - x).abs().amax(-1) / x.abs().amax(-1))
    assert rel.max() <= 2 ** -4 + 1e-6              # e4m3: 3 mantissa bits, half-ulp rounding
    assert torch.equal(native_dsa.fp8_rows(y), y)   # idempotent


def test_fp8_option_runs_and_keeps_most_of_the_sets():
    m = build("deepseek_v32", "eager")
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        cm = planner.compile(m, policy="dense")
        with native_dsa.recording() as a:
            cm(ids)
        cf = planner.compile(m, policy=planner.NativeDSA(fp8=True))
        with native_dsa.recording() as b:
            out = cf(ids).logits
    assert torch.isfinite(out).all()
    assert all(s.policy == "dsa (native) top-8, fp8" for s in planner.inspect(cf).sites)
    x, y = a["model.layers.0.self_attn"][0], b["model.layers.0.self_attn"][0]
    hit = sum(len(set(r.tolist()) & set(s.tolist()) - {-1}) for r, s in zip(x[0], y[0]))
    assert hit / (x >= 0).sum().item() >= 0.8


def test_kernel_path_runs_the_fused_indexer_and_the_sparse_mla_kernel(monkeypatch):
    """``dsa`` with the Triton kernels (the interpreter on CPU): the fused indexer + top-k (no
    [B, S, T] tensor) and the token-sparse MLA kernel over the latent rows serve every site.
    16 indexer heads make exact ties (keys every head scores <= 0) unlikely, where the kernel's
    rule (the newer key) and torch.topk's may pick different keys of equal score."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    monkeypatch.setitem(CONFIGS["deepseek_v32"][2], "index_n_heads", 16)
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    m = build("deepseek_v32", "eager")
    if not _caches_latent(m):
        pytest.skip("this transformers caches per-head K/V: no absorbed form, no MLA kernel")
    ids = torch.randint(0, 128, (1, 29))
    got, hooks = _model_topk(m)
    with torch.no_grad():
        ref = m(ids).logits
        for h in hooks:
            h.remove()
        cm = planner.compile(m, policy="dsa")
        with native_dsa.recording() as rec:
            out = cm(ids).logits
    assert max_err(out, ref) <= 1e-4
    vis = _causal_visible(ids)
    assert _visible_sets(rec["model.layers.0.self_attn"][0], vis) == _visible_sets(got[0][0], vis)
    rep = planner.inspect(cm)
    assert all(s.kernel == "triton_sparse_mla" for s in rep.sites), rep


def test_kernel_path_keeps_the_newest_keys_among_tied_scores(monkeypatch):
    """The fused indexer's tie rule, through the model: with the indexer's weights zeroed every
    index score is 0, so each row's K keys are all ties; the kernel keeps the K newest keys the
    row may see (the model's ``torch.topk`` keeps some K of them, order not documented), and
    attention runs over exactly those."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    m = build("deepseek_v32", "eager")
    for layer in m.model.layers:
        torch.nn.init.zeros_(layer.self_attn.indexer.weights_proj.weight)
    n, k = 21, 8
    ids = torch.randint(0, 128, (1, n))
    cm = planner.compile(m, policy="dsa")
    with torch.no_grad(), native_dsa.recording() as rec:
        out = cm(ids).logits
    assert torch.isfinite(out).all()
    vis = _causal_visible(ids)
    for i in range(2):
        got = _visible_sets(rec[f"model.layers.{i}.self_attn"][0], vis)
        assert got == [list(range(max(0, t - k + 1), t + 1)) for t in range(n)], i
