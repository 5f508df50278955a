"""Current Hugging Face architectures (tiny random configs, ``hf_current.py``) under the planner.

* ``policy="dense"`` reproduces every one exactly (fp32, max |logit difference| <= 1e-5), with
  as many rewritten sites as attention computations: MLA, whose K is assembled in place;
  DeepSeek-V3.2 / GLM-MoE-DSA, whose own indexer mask stays a mask tensor; GPT-OSS, whose
  learned sink logit becomes the site's sink term; sliding windows, which become the kernels'
  window rule; padded batches, whose mask becomes per-row key lengths.
* ``generate()`` with the KV cache gives the same tokens and logits.
* GPT-OSS runs every catalogue policy; a budget that covers every key equals dense.
* The Triton kernels (through the interpreter on CPU, on a GPU where there is one) serve the
  window, sink and padded sites: the site's kernel is not the reference.
"""
import os

import pytest
import torch

import planner
from conftest import max_err
from hf_current import ARCHS, build, compiled_matches, generate_dense_matches, padded_batch

pytest.importorskip("transformers")

CASES = [pytest.param(name, impl, sites, id=f"{name}-{impl}")
         for name, impls, sites in ARCHS for impl in impls]


@pytest.mark.parametrize("name, impl, sites", CASES)
def test_dense_reproduces_the_model(name, impl, sites):
    m = build(name, impl)
    cm = compiled_matches(m)
    rep = planner.inspect(cm)
    assert [s.status for s in rep.sites] == ["rewritten"] * sites, rep


@pytest.mark.parametrize("name, impl", [("deepseek_v3", "sdpa"), ("gpt_oss", "eager"),
                                        ("gemma3", "eager"), ("deepseek_v32", "eager"),
                                        ("gemma4", "sdpa"), ("qwen4_exp", "sdpa"),
                                        ("granite_swa", "eager")])
def test_generate_with_the_kv_cache_matches(name, impl):
    m = build(name, impl)
    cm = generate_dense_matches(m)
    rep = planner.inspect(cm)
    assert all(s.calls >= 2 for s in rep.sites), rep       # the prefill and decode steps


@pytest.mark.parametrize("name, impl", [("gemma3", "sdpa"), ("deepseek_v3", "eager"),
                                        ("gpt_oss", "eager")])
@pytest.mark.parametrize("via", ["compile", "backend"])
def test_generate_with_a_static_cache_matches(name, impl, via):
    """``generate(cache_implementation="static")``: the cache is preallocated at its full length
    and written in place each step (``index_copy_``), the mask hides the slots not yet written;
    through ``planner.compile`` and through the ``torch.compile`` backend."""
    m = build(name, impl)
    got = generate_dense_matches(m, cache="static", via=via)
    rep = planner.inspect(got)
    assert rep.sites and all(s.status == "rewritten" for s in rep.sites), rep


@pytest.mark.parametrize("name, impl", [("gemma3", "sdpa"), ("deepseek_v3", "eager")])
@pytest.mark.parametrize("pol", [dict(name="block_topk", block=4, topk=2),
                                 dict(name="quest", page=4, budget=8),
                                 dict(name="sink_window", sink=4, window=8)],
                         ids=["block_topk", "quest", "sink_window"])
def test_a_static_cache_gives_what_a_dynamic_cache_gives_under_a_sparse_policy(name, impl, pol):
    """A static cache is longer than what is written; its mask hides the rest. A sparse policy
    must not see those slots: a window would fall on unwritten (masked) slots, a selection
    would spend its budget on them. Greedy tokens and scores equal the dynamic cache's."""
    m = build(name, impl)
    ids = torch.randint(0, 128, (1, 29), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    policy = planner.policy(**pol)
    with torch.no_grad():
        a = planner.compile(m, policy=policy, cost_model="off").generate(ids, **kw)
        cm = planner.compile(m, policy=policy, cost_model="off")
        b = cm.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    assert any(s.density is not None and s.density < 1 for s in planner.inspect(cm).sites)


def test_qwen4_exp_eager_returns_its_weights_and_stays_dense_with_the_reason():
    """Qwen4-Exp's eager attention returns the attention weights: the site would have to
    materialise them, so it stays dense (exact) and inspect says why."""
    m = build("qwen4_exp", "eager")
    cm = compiled_matches(m, n=40)
    (site,) = planner.inspect(cm).sites
    assert site.status == "dense-fallback" and "would have to be materialised" in site.reason


def _spec_rules(cm) -> dict:
    from runtime.spec import lookup
    out = {}
    for gm in planner.inspect(cm)._graphs:
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is torch.ops.sparse.attend.default:
                s = lookup(n.args[-1])
                out[s.site] = (s.window, s.sinks, s.kv_valid, s.mods)
    return out


def test_gpt_oss_sinks_and_window_are_the_sites_rules():
    m = build("gpt_oss", "eager")
    cm = planner.compile(m, policy="dense")
    with torch.no_grad():
        cm(torch.randint(0, 128, (1, 23)))
    rules = _spec_rules(cm)
    assert rules == {"model.layers.0.self_attn": (8, True, False, ()),
                     "model.layers.1.self_attn": (0, True, False, ())}, rules
    assert [s.rules for s in planner.inspect(cm).sites] == ["window 8, sinks", "sinks"]


def test_granite_swa_sink_after_attention_is_the_sites_sink():
    """Granite-SWA scales the attention output by sigmoid(logsumexp(scores) - sink_h), which is
    a softmax with one more logit sink_h (the GPT-OSS sink): the sites carry its sinks (drawn
    at random here, so they matter) and window; dense is exact, a sparse policy runs."""
    m = build("granite_swa", "eager")
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.sinks.normal_(0, 2)
    cm = compiled_matches(m, n=40, batch=2)
    rep = planner.inspect(cm)
    assert all(s.pattern.endswith("+lse_sink") for s in rep.sites), rep
    assert [s.rules for s in rep.sites] == ["window 8, sinks", "sinks"], rep
    rules = _spec_rules(cm)
    assert rules["model.layers.0.self_attn"][:2] == (8, True), rules
    ids = torch.randint(0, 128, (1, 120))
    with torch.no_grad():
        out = planner.compile(m, policy=planner.policy("block_topk", block=16, topk=2),
                              cost_model="off")(ids).logits
    assert torch.isfinite(out).all()


def test_a_logsumexp_used_elsewhere_keeps_the_site_dense():
    """The scores' logsumexp also returned (not only the sink's scale): the weights would have
    to be materialised, so the site stays dense with the reason, and the output is exact."""
    def f(q, k, v, sink):
        s = q @ k.transpose(-1, -2) * 0.25
        lse = torch.logsumexp(s, dim=-1)
        o = torch.softmax(s, dim=-1) @ v
        return o * torch.sigmoid(lse - sink.view(1, -1, 1)).unsqueeze(-1), lse

    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    sink = torch.randn(2)
    cf = planner.compile(f, policy="dense")
    for a, b in zip(cf(q, k, v, sink), f(q, k, v, sink)):
        assert max_err(a, b) <= 1e-5
    (site,) = planner.inspect(cf).sites
    assert site.status == "dense-fallback" and "materialised" in site.reason


POLICIES_FULL = [
    planner.policy("block_topk", block=16, topk=64),
    planner.policy("threshold", gamma=1.0, block=16),
    planner.policy("auto", target_density=1.0, block=16),
    planner.policy("quest", page=16, budget=1024),
    planner.policy("vertical_slash", n_vertical=1000, n_slash=1000, block=16),
    planner.policy("dsa", topk=256, index_heads=2, index_dim=8),
]
POLICIES_SPARSE = [
    planner.policy("block_topk", block=16, topk=2),
    planner.policy("sink_window", sink=4, window=24),
    planner.policy("quest", page=16, budget=32),
    planner.policy("longformer", window=24, global_tokens=4, block=16),
    planner.policy("bigbird", window=24, global_tokens=4, block=16, random_blocks=1),
    planner.policy("dsa", topk=24, index_heads=2, index_dim=8),
]


@pytest.mark.slow
def test_gpt_oss_every_policy_runs_and_a_full_budget_equals_dense():
    m = build("gpt_oss", "eager")
    ids = torch.randint(0, 128, (2, 120))
    with torch.no_grad():
        ref = m(ids).logits
        for pol in POLICIES_FULL:
            cm = planner.compile(m, policy=pol)
            assert max_err(cm(ids).logits, ref) <= 1e-4, pol
        for pol in POLICIES_SPARSE:
            cm = planner.compile(m, policy=pol)
            out = cm(ids).logits
            assert torch.isfinite(out).all(), pol
            dens = [s.density for s in planner.inspect(cm).sites]
            # the sliding layer's window (8 keys) fits in the kept blocks: density 1 there
            assert all(d is not None and 0 < d <= 1 for d in dens) and dens[1] < 1, (pol, dens)


@pytest.mark.parametrize("name, impl", [("mistral", "eager"), ("mistral", "sdpa"),
                                        ("gpt_oss", "eager"), ("llama", "eager"),
                                        ("llama", "sdpa")])
def test_padded_batch_is_exact_with_per_row_lengths(name, impl):
    """Left and right padding; the left-padded row's first queries see no key: they give what
    the model gave (the mean of v for an additive finfo.min mask, 0 for SDPA's boolean one)."""
    m = build(name, impl)
    ids, am = padded_batch()
    with torch.no_grad():
        ref = m(ids, attention_mask=am).logits
        cm = planner.compile(m, policy="dense")
        out = cm(ids, attention_mask=am).logits
    assert max_err(out, ref) <= 1e-5
    rep = planner.inspect(cm)
    assert all("lengths [23, 18, 17]" in s.rules for s in rep.sites), rep
    assert all(kv for *_, kv, _ in _spec_rules(cm).values())


@pytest.mark.parametrize("name, impl, ids_of", [
    ("gemma3", "eager", None), ("mistral", "sdpa", "padded"), ("gpt_oss", "eager", "padded"),
    ("llama", "sdpa", "padded"), ("granite_swa", "eager", None)])
def test_rule_sites_run_the_triton_kernels(monkeypatch, name, impl, ids_of):
    """Window, sink and padded sites are served by the block-sparse kernel (dense policy:
    every visible block; block_topk: its lists), not by the reference (Triton interpreter)."""
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    m = build(name, impl)
    ids, am = padded_batch(n=40) if ids_of else (torch.randint(0, 128, (1, 40)), None)
    kw = {"attention_mask": am} if am is not None else {}
    with torch.no_grad():
        ref = m(ids, **kw).logits
        for pol in ("dense", planner.policy("block_topk", block=16, topk=1)):
            cm = planner.compile(m, policy=pol)
            out = cm(ids, **kw).logits
            rep = planner.inspect(cm)
            kernels = [s.kernel for s in rep.sites if s.rules]
            assert kernels and all(k.startswith("triton_block_sparse") for k in kernels), rep
            if pol == "dense":
                assert max_err(out, ref) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name, impl, padded", [("gemma3", "eager", False),
                                                ("mistral", "sdpa", True),
                                                ("gpt_oss", "eager", True)])
def test_rule_sites_run_kernels_on_the_gpu(name, impl, padded):
    """On a GPU (bf16): window, sink and padded sites run Triton kernels, never the reference,
    and dense stays within bf16 tolerance of the model."""
    m = build(name, impl).to("cuda", torch.bfloat16)
    ids, am = padded_batch(n=300) if padded else (torch.randint(0, 128, (1, 300)), None)
    ids = ids.cuda()
    kw = {"attention_mask": am.cuda()} if am is not None else {}
    with torch.no_grad():
        ref = m(ids, **kw).logits.float()
        for pol in ("dense", planner.policy("block_topk", block=64, topk=2)):
            cm = planner.compile(m, policy=pol, cost_model="off")
            out = cm(ids, **kw).logits.float()
            rep = planner.inspect(cm)
            assert all(not s.kernel.startswith("reference") for s in rep.sites), rep
            if pol == "dense":
                rel = (out - ref).norm() / ref.norm()
                assert rel < 2e-2, rel


class _VmappedScaleThenAttention(torch.nn.Module):
    """``torch.vmap`` in the forward (Dynamo writes the vmap levels out as calls whose results
    go unused), then causal attention."""

    def forward(self, q, k, v):
        q = torch.vmap(lambda x: x * x.sigmoid())(q)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_vmap_in_the_forward_keeps_its_levels():
    """The planner's dead-code pass keeps the vmap level calls (FX counts them pure): the
    site is rewritten and the output equals the module's."""
    m = _VmappedScaleThenAttention()
    q, k, v = (torch.randn(2, 3, 17, 8) for _ in range(3))
    cm = planner.compile(m, policy="dense")
    assert max_err(cm(q, k, v), m(q, k, v)) <= 1e-5
    assert [s.status for s in planner.inspect(cm).sites] == ["rewritten"]


def test_a_model_without_attention_runs_as_written():
    """Mamba (a selective scan under ``torch.vmap``, no attention): no site, the same logits."""
    import transformers as T
    torch.manual_seed(0)
    m = T.MambaForCausalLM(T.MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                         state_size=8)).eval()
    ids = torch.randint(0, 128, (1, 23))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        cm = planner.compile(m, policy="dense")
        out = cm(input_ids=ids).logits
    assert max_err(out, ref) <= 1e-5
    assert planner.inspect(cm).sites == []
