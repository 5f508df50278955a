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
