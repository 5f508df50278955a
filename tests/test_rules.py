"""The model's own rules, proved from the graph: a padding mask becomes per-row key lengths only
when it is exactly ``pad[b, kv] != 0`` of a [B, N] input (with the causal/window rule); any other
use of an input tensor in a mask keeps the mask as a tensor. Outputs are exact either way, with
rows that see no key included."""
import pytest
import torch
import torch.nn.functional as F

import planner
from conftest import max_err
from runtime.spec import lookup

N, D = 19, 8


def _spec(cm):
    for gm in planner.inspect(cm)._graphs:
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is torch.ops.sparse.attend.default:
                return lookup(n.args[-1])
    raise AssertionError("no site")


def causal_and_key_padding(q, k, v, am):          # am: long [B, N]
    keep = torch.ones(N, N, dtype=torch.bool).tril()[None, None] & (am != 0)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def key_padding_additive_min(q, k, v, am):        # bool [B, N], eager style
    m = torch.where(am[:, None, None, :], 0.0, torch.finfo(torch.float32).min)
    return torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5 + m, -1) @ v


def padding_on_queries_too(q, k, v, am):          # pad[b, q] & pad[b, kv]: not key padding
    a = am != 0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=a[:, None, :, None] & a[:, None, None, :])


def causal_or_padding(q, k, v, am):               # OR: padded keys are not simply excluded
    keep = torch.ones(N, N, dtype=torch.bool).tril()[None, None] | (am != 0)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def padding_compared_to_one(q, k, v, am):         # am == 1: a comparison this does not read
    keep = torch.ones(N, N, dtype=torch.bool).tril()[None, None] & (am == 1)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def square_input_mask(q, k, v, m):                # a [N, N] call argument: never a padding
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def _inputs(dtype=torch.long, left=4, right=3):
    qkv = [torch.randn(3, 2, N, D) for _ in range(3)]
    am = torch.ones(3, N, dtype=dtype)
    am[1, :left] = 0
    am[2, N - right:] = 0
    return qkv, am


@pytest.mark.parametrize("fn, dtype, causal, empty", [
    (causal_and_key_padding, torch.long, "lower_right", "zero"),
    (key_padding_additive_min, torch.bool, None, "mean"),
])
def test_key_padding_becomes_per_row_lengths(fn, dtype, causal, empty):
    qkv, am = _inputs(dtype)
    cm = planner.compile(fn, policy="dense")
    assert max_err(cm(*qkv, am), fn(*qkv, am)) <= 1e-5
    spec = _spec(cm)
    assert spec.kv_valid and spec.mods == () and spec.causal == causal
    assert spec.empty_rows == empty
    assert planner.inspect(cm).sites[0].rules == "lengths [19, 15, 16]"
    # another call with other lengths: read at run time, still exact
    am2 = am.clone()
    am2[0, :7] = 0
    assert max_err(cm(*qkv, am2), fn(*qkv, am2)) <= 1e-5


def test_rows_that_see_no_key_give_what_the_model_gives():
    # left padding on a key-padding-only (bidirectional) mask: fine; with causal, the left-
    # padded row's first queries see no key: SDPA's boolean mask gives 0 there
    qkv, am = _inputs(left=6)
    cm = planner.compile(causal_and_key_padding, policy="dense")
    out, ref = cm(*qkv, am), causal_and_key_padding(*qkv, am)
    assert torch.equal(ref[1, :, :6] == 0, torch.ones_like(ref[1, :, :6], dtype=torch.bool))
    assert max_err(out, ref) <= 1e-5


@pytest.mark.parametrize("fn", [padding_on_queries_too, causal_or_padding,
                                padding_compared_to_one])
def test_other_uses_of_an_input_keep_the_mask(fn):
    qkv, am = _inputs()
    cm = planner.compile(fn, policy="dense")
    out, ref = cm(*qkv, am), fn(*qkv, am)
    assert max_err(torch.nan_to_num(out), torch.nan_to_num(ref)) <= 1e-5
    spec = _spec(cm)
    assert not spec.kv_valid and spec.mods == (("keep",),), spec


def test_a_square_input_mask_is_never_read_as_padding():
    qkv = [torch.randn(1, 2, N, D) for _ in range(3)]
    m = torch.rand(N, N) > 0.3
    m[:, 0] = True
    cm = planner.compile(square_input_mask, policy="dense")
    assert max_err(cm(*qkv, m), square_input_mask(*qkv, m)) <= 1e-5
    spec = _spec(cm)
    assert not spec.kv_valid and spec.mods == (("keep",),)


def test_sliding_window_sites_report_their_window():
    def f(q, k, v):
        i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - 5))
    qkv = [torch.randn(2, 2, N, D) for _ in range(3)]
    cm = planner.compile(f, policy="dense")
    assert max_err(cm(*qkv), f(*qkv)) <= 1e-5
    spec = _spec(cm)
    assert (spec.window, spec.causal, spec.mods) == (5, "lower_right", ())
    assert planner.inspect(cm).sites[0].rules == "window 5"


def test_one_arange_on_two_axes_is_two_indices():
    # ``i[None, :] <= i[:, None]`` compares two positions of one arange (a causal mask), not a
    # position with itself
    def f(q, k, v):
        i = torch.arange(q.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=i[None, :] <= i[:, None])
    qkv = [torch.randn(1, 2, N, D) for _ in range(3)]
    cm = planner.compile(f, policy="dense")
    assert max_err(cm(*qkv), f(*qkv)) <= 1e-5
    assert _spec(cm).causal == "lower_right"


def _random_mask_program(seed: int) -> str:
    """Source of ``f(q, k, v)`` applying a random index-arithmetic mask (the shapes of masks
    models build: comparisons of aranges with offsets, windows, and/or/not, either orientation,
    one arange reused on both axes or two)."""
    import random
    rnd = random.Random(seed)
    n = rnd.randint(5, 21)
    lines = [f"i = torch.arange({n})", f"j = torch.arange({n})" if rnd.random() < 0.5
             else "j = i"]
    rows, cols = ("i[:, None]", "j[None, :]") if rnd.random() < 0.5 else ("j[:, None]",
                                                                           "i[None, :]")

    def atom():
        c = rnd.randint(-3, 3)
        w = rnd.randint(1, 6)
        return rnd.choice([f"({cols} <= {rows} + {c})", f"({cols} > {rows} - {w})",
                           f"({cols} < {abs(c) + 1})", f"({rows} >= {abs(c)})",
                           f"({cols} == {rows})", f"({cols} >= {rows})"])
    expr = atom()
    for _ in range(rnd.randint(0, 3)):
        op = rnd.choice(["&", "|", "& ~"])
        expr = f"({expr} {op} {atom()})"
    lines.append(f"m = {expr} | ({cols} == 0)")           # every row keeps a key
    style = rnd.choice(["sdpa", "where", "fill"])
    if style == "sdpa":
        lines.append("return F.scaled_dot_product_attention(q, k, v, attn_mask=m)")
    elif style == "where":
        lines.append("s = torch.where(m, q @ k.transpose(-2, -1) * 0.5, "
                     "torch.finfo(torch.float32).min)")
        lines.append("return torch.softmax(s, -1) @ v")
    else:
        lines.append("s = (q @ k.transpose(-2, -1) * 0.5).masked_fill(~m, float('-inf'))")
        lines.append("return torch.softmax(s, -1) @ v")
    return n, "def f(q, k, v):\n" + "\n".join("    " + ln for ln in lines) + "\n"


@pytest.mark.parametrize("chunk", range(3))
def test_random_index_masks_are_proved_or_kept_never_wrong(chunk):
    """60 random masks built from index arithmetic: whatever the prover concludes (causal,
    window, every pair, or keep the tensor), ``dense`` equals eager."""
    import math
    for seed in range(chunk * 20, chunk * 20 + 20):
        n, src = _random_mask_program(seed)
        scope = {"torch": torch, "F": F, "math": math}
        exec(compile(src, f"<mask {seed}>", "exec"), scope)
        f = scope["f"]
        qkv = [torch.randn(1, 2, n, D) for _ in range(3)]
        cm = planner.compile(f, policy="dense")
        assert max_err(cm(*qkv), f(*qkv)) <= 1e-5, src


def test_hf_without_cache_packed_sequence_mask_is_proved_causal():
    """Hugging Face (transformers 5.x) builds a packed-sequence mask from the positions on every
    compiled call without a cache: (diff(positions) != 1).cumsum(-1) compared at (b, q) and
    (b, kv). From positions the graph makes itself (an arange) it is all zeros: causal."""
    from conftest import tiny_llama
    m = tiny_llama("sdpa")
    ids = torch.randint(0, 128, (2, 37))
    cm = planner.compile(m, policy="dense")
    with torch.no_grad():
        assert max_err(cm(ids, use_cache=False).logits, m(ids, use_cache=False).logits) <= 1e-5
    spec = _spec(cm)
    assert spec.causal is not None and spec.mods == (), spec


def test_packed_sequences_from_given_positions_keep_the_mask():
    """Positions passed in (two sequences packed in one row): the packed mask depends on the
    input's values, so it stays a mask tensor, and the output is exact."""
    from conftest import tiny_llama
    m = tiny_llama("sdpa")
    ids = torch.randint(0, 128, (1, 30))
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    cm = planner.compile(m, policy="dense")
    with torch.no_grad():
        ref = m(ids, position_ids=pos, use_cache=False).logits
        assert max_err(cm(ids, position_ids=pos, use_cache=False).logits, ref) <= 1e-5
    spec = _spec(cm)
    assert spec.mods != () and not spec.kv_valid, spec


def test_operators_recorded_as_method_calls_are_index_arithmetic():
    """torch 2.11's Dynamo records ``a == b`` on tensors inside Hugging Face's mask functions as
    ``call_method __eq__`` (torch 2.13 as ``operator.eq``): both spellings are the same index
    arithmetic, so the mask is proved either way; reflected forms (``__rsub__``: operands
    swapped) are not read as their plain operator."""
    import operator

    import torch.fx as fx

    from passes.graph import label

    def f(a, b):
        return (a == b) & (a <= b + 1) & ~(a > b * 2) ^ (a != -b)
    gm = fx.symbolic_trace(f)
    seen = {}
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in (operator.eq, operator.le, operator.gt,
                                                    operator.ne, operator.add, operator.mul,
                                                    operator.xor, operator.neg):
            want = label(n)
            n.op, n.target = "call_method", f"__{n.target.__name__.rstrip('_')}__"
            seen[n.target] = (label(n), want)
    assert seen and all(got == want for got, want in seen.values()), seen
    r = next(iter(gm.graph.nodes))
    r.op, r.target = "call_method", "__rsub__"
    assert label(r) != "sub"
