"""Passes keep in-place writes: none is dropped, none is moved across a read, a site whose
inputs are written between its reads and its output stays dense with the reason, and the
verifier rejects a graph that breaks this. Property: random attention programs with in-place
writes (``mutation_programs.py``) give the eager result under ``policy="dense"``."""
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import planner
from conftest import max_err
from mutation_programs import program
from passes import mutation
from passes.verify import IRVerificationError, verify_ir
from planner.backend import Backend


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    # a failing pass must fail the test, not fall back to the captured graph
    monkeypatch.setenv("PLANNER_STRICT", "1")


class MlaK(torch.nn.Module):
    """Hugging Face DeepSeek-V3 ``expand_kv``: K assembled in place from two parts."""

    def forward(self, q, kn, kr, v):            # q, v [1, 4, 40, 16]; kn [1, 4, 40, 8]; kr [1, 1, 40, 8]
        kr = kr.expand(-1, kn.shape[1], -1, -1)
        k = kn.new_empty(*kn.shape[:-1], 16)
        k[..., :8].copy_(kn)
        k[..., 8:].copy_(kr)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _mla_inputs():
    return (torch.randn(1, 4, 40, 16), torch.randn(1, 4, 40, 8), torch.randn(1, 1, 40, 8),
            torch.randn(1, 4, 40, 16))


@pytest.mark.parametrize("policy", ["dense", planner.policy("block_topk", block=16, topk=8)])
def test_k_assembled_in_place_is_read_after_its_writes(policy):
    m, x = MlaK(), _mla_inputs()
    cm = planner.compile(m, policy=policy)
    assert max_err(cm(*x), m(*x)) <= 1e-5
    rep = planner.inspect(cm)
    assert [s.status for s in rep.sites] == ["rewritten"]
    assert rep.graph_code().count(".copy_(") == 2


def _trace(fn, *example):
    gm = fx.symbolic_trace(fn)
    from passes.meta import propagate_meta
    from passes.context import PassContext
    return propagate_meta(gm, PassContext(policies=None, owner="t", example_inputs=example))


def test_mutation_info_writes_groups_and_readers():
    def f(x, y):
        a = x * 2.0                     # fresh
        b = a[:, :3]                    # view of a
        b.copy_(y[:, :3])               # writes a's storage
        c = a.transpose(0, 1)           # view of a
        d = c + 1.0                     # reads a
        x.add_(1.0)                     # writes the graph input
        return d
    gm = _trace(f, torch.randn(4, 5), torch.randn(4, 5))
    info = mutation.MutationInfo(gm.graph)
    by = {n.name: n for n in gm.graph.nodes}
    assert [w.target for w in info.writes] == ["copy_", "add_"]
    assert info.group(by["getitem"]) is info.group(by["mul"]) is info.group(by["transpose"])
    assert info.group(by["add"]) is not info.group(by["mul"])
    assert info.external(info.group(by["x"])) and not info.external(info.group(by["mul"]))
    assert info.readers(info.group(by["mul"])) == [by["copy_"], by["add"]]
    assert info.is_view(by["transpose"]) and not info.is_view(by["add"])


@pytest.mark.parametrize("spelling", ["setitem", "iadd", "relu_inplace", "out_kwarg",
                                      "index_put_"])
def test_write_spellings_are_seen(spelling):
    def f(x, y):
        z = x * 1.0
        if spelling == "setitem":
            z[0] = y[0]
        elif spelling == "iadd":
            z += y
        elif spelling == "relu_inplace":
            F.relu(z, inplace=True)
        elif spelling == "out_kwarg":
            torch.add(x, y, out=z)
        else:
            torch.ops.aten.index_put_.default(z, [torch.tensor([1])], y[1])
        return z
    if spelling in ("setitem", "iadd"):        # as Dynamo records them (fx tracing cannot)
        gm = torch.fx.GraphModule(torch.nn.Module(), _dynamo_style_graph(spelling))
    else:
        gm = _trace(f, torch.randn(3, 4), torch.randn(3, 4))
    info = mutation.MutationInfo(gm.graph)
    assert len(info.writes) == 1, gm.code
    w = info.writes[0]
    assert info.group(info.written(w)[0]).op == "call_function"          # z = x * 1.0


def test_pure_operators_named_with_an_underscore_are_not_writes():
    # operator.and_ / or_ / not_ (Dynamo's ``a & b``) name pure operators: DeepSeek-V3.2 combines
    # its causal and index masks with ``&`` and reuses the causal mask in the next layer
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    c = g.call_function(operator.and_, (a, b))
    d = g.call_function(operator.or_, (a, c))
    g.output(g.call_function(operator.not_, (d,)))
    info = mutation.MutationInfo(g)
    assert info.writes == []


def _dynamo_style_graph(spelling: str) -> fx.Graph:
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    for n, t in ((x, torch.randn(3, 4)), (y, torch.randn(3, 4))):
        n.meta["val"] = t
    z = g.call_function(operator.mul, (x, 1.0))
    z.meta["val"] = torch.randn(3, 4)
    if spelling == "setitem":
        y0 = g.call_function(operator.getitem, (y, 0))
        g.call_function(operator.setitem, (z, 0, y0))
    else:
        z = g.call_function(operator.iadd, (z, y))
    g.output(z)
    return g


def test_dead_code_elimination_keeps_observed_writes_only():
    def f(x, y):
        k = x.new_empty(3, 4)
        k[:, :2].copy_(y[:, :2])         # observed: k is returned
        k[:, 2:].copy_(y[:, 2:])
        s = x * 3.0
        s.mul_(2.0)                      # dead: nothing reads s
        x.mul_(1.0)                      # a graph input: always kept
        return k
    gm = _trace(f, torch.randn(3, 4), torch.randn(3, 4))
    mutation.eliminate_dead_code(gm)
    gm.recompile()
    kept = [n.target for n in gm.graph.nodes if n.op == "call_method" and n.target.endswith("_")]
    assert kept == ["copy_", "copy_", "mul_"], gm.code
    assert next(n for n in gm.graph.nodes if n.target == "mul_").args[0].name == "x"
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    a2 = a.clone()
    assert torch.equal(gm(a, b), f(a2, b.clone())) and torch.equal(a, a2)


def test_thread_writes_makes_later_users_read_the_write():
    def f(q, k, v):
        s = q @ k.transpose(-2, -1)
        s.masked_fill_(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ v
    qkv = [torch.randn(1, 2, 6, 4) for _ in range(3)]
    gm = _trace(f, *qkv)
    mutation.thread_writes(gm)
    sm = next(n for n in gm.graph.nodes if n.target == "softmax")
    assert sm.args[0].target == "masked_fill_"
    assert torch.allclose(gm(*qkv), f(*qkv))


def test_in_place_causal_mask_is_recognised_and_proved():
    def f(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.5
        s.masked_fill_(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ v
    qkv = [torch.randn(1, 2, 6, 4) for _ in range(3)]
    cm = planner.compile(f, policy="dense")
    assert max_err(cm(*qkv), f(*qkv)) <= 1e-5
    site, = planner.inspect(cm).sites
    assert site.status == "rewritten"
    spec = _spec_of(cm)
    assert spec.causal == "lower_right" and spec.mods == ()


def _spec_of(cm):
    from runtime.spec import lookup
    rep = planner.inspect(cm)
    for gm in rep._graphs:
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is torch.ops.sparse.attend.default:
                return lookup(n.args[-1])
    raise AssertionError("no attend node")


def test_mask_written_in_place_is_not_proved_from_its_construction():
    # a causal mask with a hole punched in by slice assignment: the construction alone says
    # "causal"; the write makes it something else, so it must stay a tensor
    def f(q, k, v):
        m = torch.ones(8, 8, dtype=torch.bool).tril()
        m[2:, 1] = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    qkv = [torch.randn(1, 2, 8, 4) for _ in range(3)]
    cm = planner.compile(f, policy="dense")
    assert max_err(cm(*qkv), f(*qkv)) <= 1e-5
    spec = _spec_of(cm)
    assert spec.causal is None and [m[0] for m in spec.mods] == ["keep"]


def test_input_written_inside_the_site_stays_dense_with_the_reason():
    def f(q, k, v):
        k = k.clone()
        s = (q @ k.transpose(-2, -1)) * 0.5
        k.mul_(2.0)                      # after the scores read k, before the output
        return s.softmax(-1) @ v, k
    qkv = [torch.randn(1, 2, 6, 4) for _ in range(3)]
    cm = planner.compile(f, policy="dense")
    out, ref = cm(*qkv), f(*qkv)
    assert max_err(out[0], ref[0]) <= 1e-5 and max_err(out[1], ref[1]) == 0
    site, = planner.inspect(cm).sites
    assert site.status == "dense-fallback"
    assert "written in place" in site.reason and "mul_" in site.reason


def test_output_written_into_a_given_tensor_stays_dense():
    def f(q, k, v, buf):
        p = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1)
        torch.matmul(p, v, out=buf)
        return buf + 1.0
    qkv = [torch.randn(1, 2, 6, 4) for _ in range(3)]
    gm = fx.symbolic_trace(f)
    be = Backend("dense")
    fwd = be(gm, qkv + [torch.empty(1, 2, 6, 4)])
    buf = torch.zeros(1, 2, 6, 4)
    assert max_err(fwd(*qkv, buf), f(*qkv, torch.zeros(1, 2, 6, 4))) <= 1e-5
    site, = be.report().sites
    assert site.status == "dense-fallback" and "existing tensor" in site.reason


def _graph_with_write():
    def f(x, y):
        k = x.new_empty(3, 4)
        k.copy_(y)
        return k * 2.0
    return _trace(f, torch.randn(3, 4), torch.randn(3, 4))


def test_verifier_rejects_a_removed_write():
    gm = _graph_with_write()
    snap = mutation.snapshot(gm.graph)
    w, = [n for n in gm.graph.nodes if n.target == "copy_"]
    gm.graph.erase_node(w)
    assert "was removed" in mutation.check(gm.graph, snap)
    ctx = type("Ctx", (), {"mutation_baseline": snap})()
    with pytest.raises(IRVerificationError, match="in-place writes not preserved"):
        verify_ir(gm, ctx)


def test_verifier_rejects_a_read_moved_across_a_write():
    gm = _graph_with_write()
    snap = mutation.snapshot(gm.graph)
    mul, = [n for n in gm.graph.nodes if n.target is operator.mul]
    w, = [n for n in gm.graph.nodes if n.target == "copy_"]
    w.prepend(mul)                       # the read now happens before the write
    assert "reads" in mutation.check(gm.graph, snap)
    w.append(mul)                        # restored
    assert mutation.check(gm.graph, snap) is None
    with gm.graph.inserting_before(w):   # a new node standing for the read after the write
        new = gm.graph.call_function(operator.add, (mul.args[0], 1.0))
    new.meta[mutation.READS_AS] = mul
    assert "reads" in mutation.check(gm.graph, snap)
    new.meta[mutation.READS_AS] = w      # it stands for a read before the write: fine
    assert mutation.check(gm.graph, snap) is None


def _run_traced(p, policy):
    """(eager result, compiled result, eager inputs after, compiled inputs after, report)."""
    m = p.module()
    ins_e, ins_c = p.fresh_inputs(), p.fresh_inputs()
    ref = m(*ins_e)
    be = Backend(policy)
    fwd = be(fx.symbolic_trace(m), p.fresh_inputs())
    return ref, fwd(*ins_c), ins_e, ins_c, be.report()


def _check_program(p, ref, out, ins_e, ins_c, rep):
    assert max_err(out, ref) <= 1e-5, p.source
    for a, b in zip(ins_e, ins_c):                       # inputs written in place alike
        assert max_err(a, b) <= 1e-6, p.source
    assert len(rep.sites) == p.sites, (p.source, rep)
    dense = [s for s in rep.sites if s.status != "rewritten"]
    assert len(dense) <= p.must_stay_dense, (p.source, rep)
    assert all("written in place" in s.reason for s in dense), (p.source, rep)


@pytest.mark.parametrize("chunk", range(6))
def test_random_programs_with_writes_match_eager(chunk):
    """300 seeded programs through ``torch.fx.symbolic_trace`` and the pass pipeline."""
    for seed in range(chunk * 50, chunk * 50 + 50):
        p = program(seed, setitem=False)
        _check_program(p, *_run_traced(p, "dense"))


def test_random_programs_full_budget_sparse_policy_matches_eager():
    pol = planner.policy("block_topk", block=16, topk=64)
    for seed in range(1000, 1040):
        p = program(seed, setitem=False)
        ref, out, ins_e, ins_c, rep = _run_traced(p, pol)
        assert max_err(out, ref) <= 1e-5, p.source
        assert all(max_err(a, b) <= 1e-6 for a, b in zip(ins_e, ins_c)), p.source


@pytest.mark.parametrize("chunk", range(2))
def test_random_programs_through_dynamo_match_eager(chunk):
    """40 seeded programs (slice assignment included) through ``planner.compile``."""
    for seed in range(2000 + chunk * 20, 2000 + chunk * 20 + 20):
        p = program(seed)
        m = p.module()
        ins_e, ins_c = p.fresh_inputs(), p.fresh_inputs()
        ref = m(*ins_e)
        cm = planner.compile(m, policy="dense")
        _check_program(p, ref, cm(*ins_c), ins_e, ins_c, planner.inspect(cm))
