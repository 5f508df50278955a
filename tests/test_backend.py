"""torch.compile backends and HuggingFace generate() with a KV cache."""
import pytest
import torch

import planner
from conftest import max_err, tiny_llama, tiny_qwen2


def test_registered_backend_equals_planner_compile():
    assert "sparse_planner" in torch._dynamo.list_backends(exclude_tags=())
    m = tiny_llama("sdpa")
    x = torch.randint(0, 128, (2, 150))
    with torch.no_grad():
        a = torch.compile(m, backend="sparse_planner")(x).logits
        b = planner.compile(m)(x).logits
    assert max_err(a, b) == 0.0


def test_entry_point_names_the_backend():
    from importlib.metadata import entry_points
    eps = {e.name: e.value for e in entry_points(group="torch_dynamo_backends")}
    assert eps.get("sparse_planner") == "planner.backend:sparse_planner_backend"


def test_backend_object_with_policy_and_inspect():
    m = tiny_qwen2("eager")
    x = torch.randint(0, 128, (1, 30))
    be = planner.backend(policy=planner.policy("sink_window", sink=1, window=4))
    tm = torch.compile(m, backend=be)
    with torch.no_grad():
        tm(x)
    for rep in (planner.inspect(tm), planner.inspect(be)):
        assert len(rep.sites) == 2
        assert all(s.policy.startswith("sink_window") and s.density < 0.5 for s in rep.sites)


def test_inspect_rejects_uncompiled_model():
    with pytest.raises(TypeError, match="not compiled"):
        planner.inspect(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_generate_dense_same_tokens_and_decode_goes_through_sites(impl):
    m = tiny_llama(impl)
    x = torch.randint(0, 128, (1, 19))
    n_new = 12
    with torch.no_grad():
        ref = m.generate(x, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        cm = planner.compile(m, policy="dense")
        got = cm.generate(x, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    assert torch.equal(ref, got)
    rep = planner.inspect(cm)
    assert len(rep.sites) == 2
    for s in rep.sites:
        assert s.status == "rewritten"
        assert s.calls == n_new, f"prefill + {n_new - 1} decode steps expected, got {s.calls}"
        assert "q[1, 4, 1, 16]" in s.shapes and f"k[1, 2, {19 + n_new - 1}, 16]" in s.shapes
    assert len(rep._graphs) <= 3, "decode steps must not recompile per step"


def test_generate_with_sparse_policy_runs_decode_sparse():
    m = tiny_llama("eager")
    x = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        cm = planner.compile(m, policy=planner.policy("block_topk", block=8, topk=1))
        out = cm.generate(x, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 45)
    rep = planner.inspect(cm)
    assert all(s.calls == 5 and s.density < 1 for s in rep.sites)


def test_string_backend_keeps_each_compiled_models_sites_apart():
    from planner.models import GPTConfig, TinyGPT
    a = TinyGPT(GPTConfig(n_layer=2)).eval()
    b = tiny_llama("eager", layers=3)
    ca = torch.compile(a, backend="sparse_planner")
    cb = torch.compile(b, backend="sparse_planner")
    with torch.no_grad():
        ca(torch.randint(0, 256, (1, 20)))
        cb(torch.randint(0, 128, (1, 24)))
        cb(torch.randint(0, 128, (1, 24)))
    ra, rb = planner.inspect(ca), planner.inspect(cb)
    assert [s.name for s in ra.sites] == ["h.0.attn", "h.1.attn"]
    assert [s.name for s in rb.sites] == [f"model.layers.{i}.self_attn" for i in range(3)]
    assert all(s.calls == 1 for s in ra.sites) and all(s.calls == 2 for s in rb.sites)
    assert "model.layers" not in ra.graph_code() and "model.layers" not in str(ra)


def test_string_backend_keeps_two_instances_of_one_class_apart():
    from planner.models import GPTConfig, TinyGPT
    a, b = TinyGPT(GPTConfig(n_layer=2)).eval(), TinyGPT(GPTConfig(n_layer=2)).eval()
    ca = torch.compile(a, backend="sparse_planner")
    cb = torch.compile(b, backend="sparse_planner")
    with torch.no_grad():
        ca(torch.randint(0, 256, (1, 20)))
        cb(torch.randint(0, 256, (1, 33)))
        cb(torch.randint(0, 256, (1, 33)))
    sa, sb = planner.inspect(ca).sites, planner.inspect(cb).sites
    assert [(s.calls, "q[1, 4, 20, 32]" in s.shapes) for s in sa] == [(1, True)] * 2
    assert [(s.calls, "q[1, 4, 33, 32]" in s.shapes) for s in sb] == [(2, True)] * 2


def test_inspect_rejects_a_model_compiled_with_another_backend():
    with pytest.raises(TypeError, match="not compiled"):
        planner.inspect(torch.compile(torch.nn.Linear(2, 2), backend="eager"))


# ---------------------------------------------------------------- values against eager
@pytest.mark.parametrize("make", [
    pytest.param(lambda: tiny_llama("sdpa"), id="llama-sdpa"),
    pytest.param(lambda: tiny_llama("eager"), id="llama-eager"),
    pytest.param(lambda: tiny_qwen2("eager"), id="qwen2-eager"),
])
def test_dense_backend_output_equals_eager(make):
    m = make()
    x = torch.randint(0, 128, (2, 45))
    with torch.no_grad():
        ref = m(x).logits
        got = torch.compile(m, backend=planner.backend(policy="dense"))(x).logits
    assert max_err(got, ref) <= 1e-5


@pytest.mark.parametrize("backend", [
    pytest.param(lambda: "sparse_planner", id="registered-default"),     # defaults cover N=70
    pytest.param(lambda: planner.backend(policy=planner.policy("block_topk", block=16, topk=8)),
                 id="block_topk-16x8"),
    pytest.param(lambda: planner.backend(policy=planner.policy("quest", page=8, budget=128)),
                 id="quest-128"),
])
def test_full_budget_sparse_backend_equals_eager(backend):
    m = tiny_llama("sdpa")
    x = torch.randint(0, 128, (1, 70))
    with torch.no_grad():
        ref = m(x).logits
        tm = torch.compile(m, backend=backend())
        got = tm(x).logits
    assert max_err(got, ref) <= 1e-5
    assert all(s.status == "rewritten" and s.density == pytest.approx(1.0)
               for s in planner.inspect(tm).sites)


def _sink_window_mask(n, sink, window):
    """Additive float mask [1, 1, N, N]: causal, keys j < sink or within i - j < window."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = (j <= i) & ((j < sink) | (i - j < window))
    return torch.zeros(n, n).masked_fill(~keep, torch.finfo(torch.float32).min)[None, None]


@pytest.mark.parametrize("make", [pytest.param(lambda: tiny_qwen2("eager"), id="qwen2-eager"),
                                  pytest.param(lambda: tiny_llama("sdpa"), id="llama-sdpa")])
def test_sparse_backend_equals_the_model_run_with_the_policys_mask(make):
    """sink_window through the backend against the eager model given the same keep-set as a
    4-D additive attention mask (the model's own softmax: an independent reference)."""
    m = make()
    n, sink, window = 37, 2, 5
    x = torch.randint(0, 128, (2, n))
    with torch.no_grad():
        ref = m(x, attention_mask=_sink_window_mask(n, sink, window).expand(2, 1, n, n)).logits
        tm = torch.compile(m, backend=planner.backend(
            policy=planner.policy("sink_window", sink=sink, window=window)))
        got = tm(x).logits
        dense = m(x).logits
    assert max_err(got, ref) <= 1e-5
    assert max_err(got, dense) > 1e-2, "the policy must change the output at this length"
    assert all(s.density < 0.5 for s in planner.inspect(tm).sites)


@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (4, 2)])
def test_block_topk_backend_equals_loop_definition(Hq, Hkv):
    """A data-dependent policy through torch.compile(backend=...): the output equals softmax
    attention over the blocks the loop-based definition of block_topk selects."""
    from brute import block_topk_keep, dense_with_keep

    def attn(q, k, v):
        g = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)
    q, k, v = torch.randn(2, Hq, 75, 16), torch.randn(2, Hkv, 75, 16), torch.randn(2, Hkv, 75, 8)
    pol = planner.policy("block_topk", block=16, topk=1, sink_blocks=1, local_blocks=1)
    be = planner.backend(policy=pol)
    # static shapes: the parametrizations share attn's code, and Dynamo's automatic dynamic
    # shapes would make the head count symbolic on the second one (the site then stays dense)
    got = torch.compile(attn, backend=be, dynamic=False)(q, k, v)
    assert [s.status for s in planner.inspect(be).sites] == ["rewritten"]
    keep = block_topk_keep(q, k, block=16, topk=1, sink_blocks=1, local_blocks=1,
                           scale=16 ** -0.5, causal="upper_left")
    ref = dense_with_keep(q, k, v, keep, 16 ** -0.5)
    assert max_err(got.double(), ref) <= 1e-5
    assert keep.float().mean() < 0.5 and max_err(got, attn(q, k, v)) > 1e-2


# ---------------------------------------------------------------- fully masked rows
def _sdpa_bool(q, k, v, m):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)


def _softmax_fill(q, k, v, m):
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1) @ v


def _softmax_add(q, k, v, m):
    bias = torch.zeros(m.shape, dtype=q.dtype).masked_fill(~m, float("-inf"))
    return torch.softmax((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + bias, dim=-1) @ v


@pytest.mark.parametrize("fn", [_sdpa_bool, _softmax_fill, _softmax_add])
@pytest.mark.parametrize("policy", ["dense", "block_topk"])
def test_fully_masked_row_gives_zero(fn, policy):
    """A query whose keys are all masked: compiled, its row is 0 (the reference's rule). In
    eager torch 2.13 on the CPU, SDPA with a boolean mask returns 0 too, and a softmax over
    an all -inf row returns NaN; every other row equals eager."""
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    m = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    m[..., 2, :] = False                                   # row 2 sees no key
    m[..., 4, 3:] = False
    eager = fn(q, k, v, m)
    got = planner.compile(fn, policy=policy)(q, k, v, m)
    assert torch.equal(got[:, :, 2], torch.zeros_like(got[:, :, 2]))
    if fn is _sdpa_bool:
        assert torch.equal(eager[:, :, 2], torch.zeros_like(eager[:, :, 2]))
    else:
        assert torch.isnan(eager[:, :, 2]).all()
    rows = [0, 1, 3, 4, 5]
    assert max_err(got[:, :, rows], eager[:, :, rows]) <= 1e-5
