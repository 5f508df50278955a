"""Soft-capped scores (Gemma 2, Grok) and a caller's mask tensor (additive float bias / bool
keep-mask, broadcastable to [B, Hq, Nq, Nkv]) in the block-sparse and token-sparse kernels, and
the mask's block summary (empty / full / partial tiles) that prunes block lists.

Each kernel runs into NaN-poisoned outputs and is compared with its PyTorch reference, with
``attention_reference`` given the same modifiers (``("softcap", c)``, ``("add",)`` /
``("keep",)``) and with an independent float64 oracle written here (dense scores, tanh cap,
mask, rule masks, softmax). Rows whose every pair is masked must give out = 0 and lse = -inf
(the head's sink with sinks); ``attention_reference`` (eager semantics) gives a uniform row
there for ``finfo.min`` masks, so it is compared on the other rows. Block lists pruned by the
summary, with per-entry mask flags, must give the output of the unpruned lists.

On a machine without CUDA the kernels run in Triton's interpreter, in float32 and float16.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from codegen.attention import attention_reference  # noqa: E402
from codegen.block_sparse import (BLOCK_EMPTY, BLOCK_FULL, BLOCK_PARTIAL,  # noqa: E402
                                  block_sparse_attention_ref, mask_block_summary,
                                  prune_block_lists, wgmma_kernel)
from codegen.common import BlockSparseSpec, MaskMode, Schedule, TokenSparseSpec  # noqa: E402
from codegen.emit import emit  # noqa: E402
from codegen.select.reference import block_keep_fn  # noqa: E402
from codegen.token_sparse import token_sparse_attention_ref  # noqa: E402
from runtime.kernels import block_sparse as bsk, launch, token_sparse as tsk  # noqa: E402
from kernel_checks import compile_for_sm90, poisoned_outputs, rel_err  # noqa: E402
from test_kernels_block_sparse import random_block_lists  # noqa: E402
from test_kernels_sinks_ranges import (block_keep, make_ranges, make_sinks,  # noqa: E402
                                       token_keep)
from test_kernels_token_sparse import random_indices  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 2e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 3e-3,
       torch.bfloat16: 1.2e-2}
LSE_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
FMIN = torch.finfo(torch.float32).min
# The interpreter evaluates with numpy, which warns where the kernels overflow on purpose:
# exp2 of large |s / c| in the soft cap (tanh -> +-1) and finfo.min * log2(e) (-> -inf, masked).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def poison_workspace(monkeypatch):
    """Split-K partials start as NaN: anything unwritten shows."""
    monkeypatch.setattr(launch, "POISON_WORKSPACE", True)


def dtype_id(d):
    return str(d).split(".")[-1]


def fresh_gen():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return seed, torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- inputs

def make_mask(gen, style, shape, block):
    """A mask of ``shape`` (``[b, h, n, m]``) in one of the styles models hand to attention:
    "keep" (bool, random with whole False / True tiles of ``block``), "finfo" (additive: 0 or
    float32 ``finfo.min``, with whole masked / zero tiles), "alibi" (additive finite
    ALiBi-like bias: a slope per head times minus the distance, plus noise)."""
    b, h, n, m = shape
    if style == "alibi":
        slope = 2.0 ** -torch.arange(1, h + 1, dtype=torch.float32)          # [h]
        dist = (torch.arange(n)[:, None] + (m - n) - torch.arange(m)[None, :]).abs().float()
        bias = -slope.view(1, h, 1, 1) * dist + 0.1 * torch.randn(b, h, n, m, generator=gen)
        return bias
    keep = torch.rand(shape, generator=gen) < 0.7
    tiles = (-(-n // block), -(-m // block))
    pick = torch.rand((b, h) + tiles, generator=gen)                        # per tile
    whole = pick.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :n, :m]
    keep = torch.where(whole < 0.25, False, torch.where(whole > 0.75, True, keep))
    if style == "keep":
        return keep
    return torch.zeros(shape).masked_fill(~keep, FMIN)


def shaped_mask(gen, style, layout, B, Hq, Nq, Nkv, block):
    """The mask in one of the layouts a model passes: "1x1" [1, 1, Nq, Nkv], "Bx1"
    [B, 1, Nq, Nkv], "BxH" [B, Hq, Nq, Nkv], "expand" ([1, 1, Nq, Nkv] expanded to
    [B, Hq, Nq, Nkv]: stride 0), "pad" ([B, 1, 1, Nkv] padding mask expanded over queries),
    "strided" ([B, Hq, Nq, Nkv] viewed from a [B, Nq, Hq, Nkv] tensor: non-contiguous)."""
    if layout == "1x1":
        return make_mask(gen, style, (1, 1, Nq, Nkv), block)
    if layout == "Bx1":
        return make_mask(gen, style, (B, 1, Nq, Nkv), block)
    if layout == "BxH":
        return make_mask(gen, style, (B, Hq, Nq, Nkv), block)
    if layout == "expand":
        return make_mask(gen, style, (1, 1, Nq, Nkv), block).expand(B, Hq, Nq, Nkv)
    if layout == "pad":
        return make_mask(gen, style, (B, 1, 1, Nkv), block).expand(B, 1, Nq, Nkv)
    if layout == "strided":
        return make_mask(gen, style, (B, Nq, Hq, Nkv), block).transpose(1, 2)
    raise ValueError(layout)


def kind_of(mask):
    return "keep" if mask.dtype == torch.bool else "add"


# ----------------------------------------------------------------------------- oracle

def oracle(q, k, v, keep, scale, *, softcap=0.0, mask=None, sinks=None):
    """float64 attention written out: s = scale q.k, s = c tanh(s / c), the mask (added, values
    <= -1e30 masked; or bool), the rule/list keep mask ``[B, Hq, Nq, Nkv]``, the sink column,
    softmax, the column dropped. Returns ``(out, lse, empty [B, Hq, Nq])``, ``empty`` = rows
    with no unmasked pair (out 0, lse -inf or the sink)."""
    B, Hq, Nq, _ = q.shape
    G = Hq // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    allowed = keep.clone()
    if mask is not None:
        m = mask.cpu().expand(B, Hq, Nq, -1)
        if m.dtype == torch.bool:
            allowed &= m
        else:
            allowed &= m.double() > -1e30
            s = s + torch.where(m.double() > -1e30, m.double(), 0.0)
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().cpu().view(1, Hq, 1, 1).expand(B, Hq, Nq, 1)], -1)
    has = torch.isfinite(s).any(-1, keepdim=True)
    s0 = torch.where(has, s, 0.0)
    p = torch.softmax(s0, -1) * has
    if sinks is not None:
        p = p[..., :-1]
    lse = torch.where(has[..., 0], torch.logsumexp(s0, -1), float("-inf"))
    return p @ vv, lse, ~allowed.any(-1)


def check(out, lse, want, ref, model, dtype, sinks, what):
    """Kernel output vs the oracle ``want`` (out, lse, empty), the family reference ``ref`` and
    ``attention_reference``'s ``model`` (compared on the rows with a pair, unless sinks)."""
    assert not out.isnan().any(), f"{what}: output elements unwritten (NaN poison)"
    assert not lse.isnan().any(), f"{what}: lse elements unwritten (NaN poison)"
    w_out, w_lse, empty = want
    empty = empty.to(out.device)
    assert (~empty).any(), f"{what}: the case must have rows with keys"
    assert (out[empty] == 0).all(), f"{what}: rows with every pair masked must be 0"
    if sinks is None:
        assert (lse[empty] == float("-inf")).all(), f"{what}: fully masked rows need lse -inf"
    else:
        row = sinks.float().view(1, -1, 1).expand_as(lse)
        assert torch.allclose(lse[empty], row[empty]), f"{what}: fully masked rows need lse = sink"
    rows = ~empty if sinks is None else torch.ones_like(empty)
    for name, (o, l) in (("oracle", (w_out, w_lse)), ("reference", ref),
                         ("attention_reference", model)):
        o, l = o.to(out.device), l.to(out.device)
        err = rel_err(out[rows], o[rows])
        assert err <= TOL[dtype], f"{what}: relative error {err:.2e} vs the {name}"
        lerr = (lse[rows].double() - l[rows].double()).abs().max().item()
        assert lerr <= LSE_TOL[dtype], f"{what}: lse error {lerr:.2e} vs the {name}"


def model_mods(softcap, mask):
    """``attention_reference``'s ``mods`` / ``mod_tensors`` for the same modifiers."""
    mods, tensors = [], []
    if softcap:
        mods.append(("softcap", softcap))
    if mask is not None:
        mods.append((kind_of(mask),))
        tensors.append(mask)
    return mods, tensors


# ----------------------------------------------------------------------------- block summary

def brute_force_classes(mask, kind, block, n_q, n_kv):
    """int8 [B', H', NQB, NKB] tile by tile with Python loops (the expanded mask)."""
    m = mask.expand(mask.shape[0], mask.shape[1], n_q, n_kv)
    nqb, nkb = -(-n_q // block), -(-n_kv // block)
    out = torch.empty(m.shape[0], m.shape[1], nqb, nkb, dtype=torch.int8)
    for b in range(m.shape[0]):
        for h in range(m.shape[1]):
            for i in range(nqb):
                for j in range(nkb):
                    t = m[b, h, i * block:(i + 1) * block, j * block:(j + 1) * block]
                    if kind == "keep":
                        masked, free = ~t, t
                    else:
                        masked, free = t.float() <= -1e30, t == 0
                    out[b, h, i, j] = (BLOCK_EMPTY if bool(masked.all()) else
                                       BLOCK_FULL if bool(free.all()) else BLOCK_PARTIAL)
    return out


@pytest.mark.parametrize("n_q, n_kv, block", [(63, 63, 16), (100, 131, 32), (131, 100, 64),
                                              (1, 131, 32), (64, 128, 64)])
@pytest.mark.parametrize("style", ["keep", "finfo", "alibi", "zeros-fp16"])
@pytest.mark.parametrize("layout", ["Bx1", "BxH", "expand", "pad", "strided"])
def test_mask_block_summary_matches_brute_force(layout, style, n_q, n_kv, block):
    seed, gen = fresh_gen()
    B, Hq = 2, 3
    if style == "zeros-fp16":                     # full tiles of an fp16 mask, a few nonzeros
        mask = shaped_mask(gen, "finfo", layout, B, Hq, n_q, n_kv, block)
        mask = torch.where(mask < 0, torch.finfo(torch.float16).min, 0.0).to(torch.float16)
        kind = "add"
    else:
        mask = shaped_mask(gen, style, layout, B, Hq, n_q, n_kv, block)
        kind = kind_of(mask)
    got = mask_block_summary(mask, kind, block=block, n_q=n_q, n_kv=n_kv)
    want = brute_force_classes(mask, kind, block, n_q, n_kv)
    assert got.dtype == torch.int8
    assert torch.equal(got.expand(want.shape), want), f"seed {seed}"
    if layout == "expand" and style != "zeros-fp16":   # stride-0 dimensions: summarized once
        assert got.shape[:2] == (1, 1)
    if style == "zeros-fp16":                     # fp16 finfo.min (-65504) is not "masked"
        assert not (got == BLOCK_EMPTY).any()


def test_mask_block_summary_classes_each_kind():
    """A hand-made 2x3-tile mask: one tile of each class, for both kinds, and 2-d masks."""
    keep = torch.ones(32, 48, dtype=torch.bool)
    keep[:16, 16:32] = False                      # tile (0, 1) empty
    keep[20, 40] = False                          # tile (1, 2) partial
    add = torch.zeros(32, 48).masked_fill(~keep, FMIN)
    add[3, 3] = -2.5                              # tile (0, 0) partial (a finite bias)
    want_keep = [[BLOCK_FULL, BLOCK_EMPTY, BLOCK_FULL], [BLOCK_FULL] * 2 + [BLOCK_PARTIAL]]
    want_add = [[BLOCK_PARTIAL, BLOCK_EMPTY, BLOCK_FULL], [BLOCK_FULL] * 2 + [BLOCK_PARTIAL]]
    for mask, kind, want in ((keep, "keep", want_keep), (add, "add", want_add)):
        got = mask_block_summary(mask, kind, block=16, n_q=32, n_kv=48)
        assert got.shape == (1, 1, 2, 3) and got[0, 0].tolist() == want


@pytest.mark.parametrize("lists, mask_heads", [("group", "per-head"), ("group", "one"),
                                               ("head", "per-head"), ("head", "one")])
def test_prune_block_lists_brute_force(lists, mask_heads):
    """Pruned lists keep exactly the listed tiles some head of the list row needs, in order;
    flags mark the entries partial for some head (per-head masks under per-group lists)."""
    seed, gen = fresh_gen()
    B, Hq, Hkv, N, block = 2, 4, 2, 100, 16
    nb = -(-N // block)
    hs = Hkv if lists == "group" else Hq
    num, idx = random_block_lists(gen, B, hs, nb, nb)
    mask = make_mask(gen, "keep", (B, Hq if mask_heads == "per-head" else 1, N, N), block)
    cls = mask_block_summary(mask, "keep", block=block, n_q=N, n_kv=N)
    n2, i2, f2 = prune_block_lists(num, idx, cls)
    assert n2.dtype == i2.dtype == torch.int32 and f2.dtype == torch.int8
    assert i2.shape == idx.shape == f2.shape
    G = cls.shape[1] // hs if cls.shape[1] > 1 else 0
    for b in range(B):
        for h in range(hs):
            heads = range(h * G, (h + 1) * G) if G else [0]
            for i in range(nb):
                want, flags = [], []
                for t in range(int(num[b, h, i])):
                    kb = int(idx[b, h, i, t])
                    c = {int(cls[b, g, i, kb]) for g in heads}
                    if c != {BLOCK_EMPTY}:
                        want.append(kb)
                        flags.append(int(c != {BLOCK_FULL}))
                n = int(n2[b, h, i])
                assert i2[b, h, i, :n].tolist() == want, f"seed {seed}"
                assert f2[b, h, i, :n].tolist() == flags, f"seed {seed}"
                assert (f2[b, h, i, n:] == 0).all()


@pytest.mark.parametrize("lists", ["group", "head"])
@pytest.mark.parametrize("style", ["keep", "finfo", "alibi"])
def test_references_match_attention_reference(style, lists):
    """Both family references with cap and mask agree with ``attention_reference``'s
    modifiers (float64) on every row with a pair; fully masked rows give 0 / -inf."""
    seed, gen = fresh_gen()
    B, Hq, Hkv, Nq, Nkv, block, K = 2, 6, 2, 37, 50, 16, 20
    q, k, v = (torch.randn(B, h, n, 8, generator=gen, dtype=torch.float64)
               for h, n in ((Hq, Nq), (Hkv, Nkv), (Hkv, Nkv)))
    mask = shaped_mask(gen, style, "Bx1", B, Hq, Nq, Nkv, block)
    if mask.is_floating_point():
        mask = mask.double()
    num, idx = random_block_lists(gen, B, Hkv if lists == "group" else Hq, -(-Nq // block),
                                  -(-Nkv // block))
    mods, tensors = model_mods(1.5, mask)
    a, la = block_sparse_attention_ref(q, k, v, num, idx, block=block, scale=0.9, causal=True,
                                       softcap=1.5, mask=mask, mask_kind=kind_of(mask))
    b, lb = attention_reference(q, k, v, scale=0.9, causal="lower_right", mods=mods,
                                mod_tensors=tensors, keep=block_keep_fn(num, idx, block, Nkv))
    rows = torch.isfinite(la)
    assert rows.any() and (a[~rows] == 0).all()
    assert rel_err(a[rows], b[rows]) < 1e-6 and (la - lb)[rows].abs().max().item() < 1e-5
    tidx = random_indices(gen, B, Hkv if lists == "group" else Hq, Nq, K, Nkv)
    a, la = token_sparse_attention_ref(q, k, v, tidx, scale=0.9, softcap=1.5, mask=mask,
                                       mask_kind=kind_of(mask))
    keep = token_keep(tidx, Hq=Hq, Nkv=Nkv)
    b, lb = attention_reference(q, k, v, scale=0.9, mods=mods, mod_tensors=tensors,
                                keep=lambda r0, r1: keep[:, :, r0:r1])
    rows = torch.isfinite(la)
    assert rows.any() and (a[~rows] == 0).all()
    assert rel_err(a[rows], b[rows]) < 1e-10 and (la - lb)[rows].abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- block-sparse

#   B, Hq, Hkv, lists, pack, Nq, Nkv, block, causal, sink, window, ranges, sinks, mask, softcap
BS_CASES = [
    pytest.param(2, 4, 2, "group", False, 100, 100, 32, True, 0, 0, None, False, ("keep", "1x1"),
                 0.0, id="B2-H4-KV2-N100-b32-causal-keep-1x1"),
    pytest.param(2, 4, 2, "group", True, 100, 100, 32, True, 0, 0, None, False,
                 ("finfo", "Bx1"), 5.0, id="B2-H4-KV2-packed-N100-b32-causal-finfo-Bx1-cap5"),
    pytest.param(2, 4, 2, "group", False, 63, 131, 16, False, 0, 0, "both", True,
                 ("finfo", "BxH"), 0.0, id="B2-H4-KV2-Nq63-Nkv131-b16-finfo-BxH-ranges-sinks"),
    pytest.param(1, 4, 2, "head", False, 131, 131, 64, True, 4, 24, "left", True,
                 ("alibi", "BxH", torch.float16), 2.0,
                 id="B1-H4-KV2-head-N131-b64-causal-window24-sink4-left-sinks-alibi16-cap2"),
    pytest.param(2, 4, 2, "group", True, 100, 100, 32, True, 0, 0, None, False,
                 ("keep", "expand"), 0.3, id="B2-H4-KV2-packed-N100-keep-expand-cap-large"),
    pytest.param(2, 2, 2, "group", False, 131, 100, 32, False, 0, 0, "empty", True,
                 ("finfo", "strided"), 0.0, id="B2-H2-Nq131-Nkv100-finfo-strided-empty-sinks"),
    pytest.param(2, 4, 1, "group", True, 1, 131, 32, True, 0, 0, None, False, ("keep", "pad"),
                 1.0, id="B2-H4-KV1-packed-decode-Nkv131-keep-pad-cap1"),
    pytest.param(1, 2, 2, "group", False, 100, 100, 32, True, 0, 0, None, False, None, 0.5,
                 id="B1-H2-N100-cap-only-large"),
]


def _block_case(gen, B, Hq, Hkv, lists, Nq, Nkv, block, causal, sink, window, ranges, sinks,
                mask, softcap, dtype):
    D = 16
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(DEVICE, dtype)      # [B, Hq, Nq, D]
    k = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE, dtype)    # [B, Hkv, Nkv, D]
    v = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE, dtype)    # [B, Hkv, Nkv, D]
    # scale 1 with a small cap: |s / c| reaches ~50 (tanh saturates in the kernel's form)
    scale = 1.0 if softcap and softcap < 1 else D ** -0.5
    num, idx = random_block_lists(gen, B, Hkv if lists == "group" else Hq, -(-Nq // block),
                                  -(-Nkv // block), p_empty=0.1)
    m = None if mask is None else shaped_mask(gen, mask[0], mask[1], B, Hq, Nq, Nkv, block)
    if mask is not None and len(mask) > 2:        # an additive mask in the model's dtype
        m = m.to(mask[2])
    logits = make_sinks(gen, Hq, sinks)
    kv_start, kv_end = make_ranges(ranges, B, Nkv)
    return q, k, v, num.to(DEVICE), idx.to(DEVICE), scale, m, logits, kv_start, kv_end


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B, Hq, Hkv, lists, pack, Nq, Nkv, block, causal, sink, window, ranges, "
                         "sinks, mask, softcap", BS_CASES)
def test_block_sparse_kernel(B, Hq, Hkv, lists, pack, Nq, Nkv, block, causal, sink, window,
                             ranges, sinks, mask, softcap, dtype):
    """Unpruned lists (the mask read on every tile), then lists pruned by the mask's block
    summary with per-entry flags: both against the oracle, the reference and
    ``attention_reference``, and bitwise equal to each other in the interpreter."""
    seed, gen = fresh_gen()
    q, k, v, num, idx, scale, m, logits, kv_start, kv_end = _block_case(
        gen, B, Hq, Hkv, lists, Nq, Nkv, block, causal, sink, window, ranges, sinks, mask,
        softcap, dtype)
    kind = "add" if m is None else kind_of(m)
    m_dev = None if m is None else m.to(DEVICE)
    keep = block_keep(num.cpu(), idx.cpu(), Hq=Hq, Nq=Nq, Nkv=Nkv, block=block, causal=causal,
                      sink=sink, window=window, kv_start=kv_start, kv_end=kv_end)
    want = oracle(q.cpu(), k.cpu(), v.cpu(), keep, scale, softcap=softcap, mask=m,
                  sinks=None if logits is None else logits.cpu())
    extras = dict(sink=sink, window=window, sinks=logits, kv_start=kv_start, kv_end=kv_end)
    ref = block_sparse_attention_ref(q, k, v, num, idx, block=block, scale=scale, causal=causal,
                                     softcap=softcap, mask=m_dev, mask_kind=kind, **extras)
    mods, tensors = model_mods(softcap, m_dev)
    win = torch.ones(Nq, Nkv, dtype=torch.bool, device=DEVICE)
    if window:
        pos = torch.arange(Nq, device=DEVICE)[:, None] + (Nkv - Nq)
        j = torch.arange(Nkv, device=DEVICE)[None, :]
        win = (j > pos - window) | (j < sink)
    lists_keep = block_keep_fn(num, idx, block, Nkv)
    model = attention_reference(q, k, v, scale=scale, causal="lower_right" if causal else None,
                                mods=mods, mod_tensors=tensors, sinks=logits, kv_start=kv_start,
                                kv_end=kv_end, keep=lambda r0, r1: lists_keep(r0, r1) & win[r0:r1])
    what = f"seed {seed}"
    out, lse = poisoned_outputs(q, v)
    bsk.block_sparse_attention(q, k, v, num, idx, block=block, scale=scale, causal=causal,
                              pack_gqa=pack, out=out, lse=lse, softcap=softcap, mask=m_dev,
                              mask_kind=kind, **extras)
    check(out, lse, want, ref, model, dtype, logits, what + " (unpruned)")
    if m is None:
        return
    cls = mask_block_summary(m_dev, kind, block=block, n_q=Nq, n_kv=Nkv)
    n2, i2, flags = prune_block_lists(num, idx, cls)
    assert n2.sum() <= num.clamp(max=idx.shape[-1]).sum()
    out2, lse2 = poisoned_outputs(q, v)
    bsk.block_sparse_attention(q, k, v, n2, i2, block=block, scale=scale, causal=causal,
                              pack_gqa=pack, out=out2, lse=lse2, softcap=softcap, mask=m_dev,
                              mask_kind=kind, mask_flags=flags, **extras)
    check(out2, lse2, want, ref, model, dtype, logits, what + " (pruned, flags)")
    if DEVICE == "cpu":
        assert torch.equal(out2, out) and torch.equal(lse2, lse), f"{what}: pruned != unpruned"


@pytest.mark.parametrize("mode", [MaskMode.BRANCH, MaskMode.ALWAYS], ids=lambda m: m.value)
@pytest.mark.parametrize("flags_dtype", [torch.int8, torch.int32], ids=dtype_id)
def test_block_sparse_flags_schedules(mode, flags_dtype):
    """Flags read under a branch or a predicated load, key tiles narrower than the block
    (several tiles per flag), int8 or int32 flags; an all-ones flag tensor (every tile reads
    the mask) and the unflagged kernel agree with the pruned run."""
    seed, gen = fresh_gen()
    B, Hq, Hkv, N, block = 1, 4, 2, 100, 32
    q, k, v, num, idx, scale, m, _, _, _ = _block_case(
        gen, B, Hq, Hkv, "group", N, N, block, True, 0, 0, None, False, ("finfo", "BxH"), 3.0,
        torch.float32)
    m = m.to(DEVICE)
    sch = Schedule(block_m=16, block_n=16, num_warps=4, num_stages=1, mask_mode=mode)
    keep = block_keep(num.cpu(), idx.cpu(), Hq=Hq, Nq=N, Nkv=N, block=block, causal=True)
    want = oracle(q.cpu(), k.cpu(), v.cpu(), keep, scale, softcap=3.0, mask=m.cpu())
    runs = []
    n2, i2, flags = prune_block_lists(num, idx, mask_block_summary(m, "add", block=block,
                                                                   n_q=N, n_kv=N))
    for lists in ((num, idx, None), (num, idx, torch.ones_like(idx, dtype=flags_dtype)),
                  (n2, i2, flags.to(flags_dtype))):
        out, lse = poisoned_outputs(q, v)
        bsk.block_sparse_attention(q, k, v, *lists[:2], block=block, scale=scale, causal=True,
                                  schedule=sch, out=out, lse=lse, softcap=3.0, mask=m,
                                  mask_flags=lists[2])
        empty = want[2]
        assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()
        assert rel_err(out, want[0]) <= TOL[torch.float32], f"seed {seed}"
        runs.append((out, lse))
    for out, lse in runs[1:]:
        assert torch.allclose(out, runs[0][0], atol=1e-6) and torch.equal(
            torch.isinf(lse), torch.isinf(runs[0][1]))


# ----------------------------------------------------------------------------- token-sparse

#   B, Hq, Hkv, lists, Nq, Nkv, K, ranges, sinks, mask, softcap
TS_CASES = [
    pytest.param(2, 4, 2, "shared", 100, 131, 24, None, False, ("keep", "Bx1"), 0.0,
                 id="B2-H4-KV2-shared-Nq100-Nkv131-keep-Bx1"),
    pytest.param(2, 4, 2, "group", 63, 100, 20, "both", True, ("finfo", "BxH"), 2.0,
                 id="B2-H4-KV2-group-Nq63-finfo-BxH-ranges-sinks-cap2"),
    pytest.param(1, 4, 2, "head", 63, 131, 20, None, False, ("alibi", "expand"), 0.3,
                 id="B1-H4-KV2-head-alibi-expand-cap-large"),
    pytest.param(2, 2, 2, "group", 63, 63, 16, "left", False, ("finfo", "strided"), 0.0,
                 id="B2-H2-N63-finfo-strided-left"),
    pytest.param(3, 4, 1, "shared", 1, 600, 520, "empty", True, ("keep", "pad"), 1.0,
                 id="B3-H4-KV1-decode-split-keep-pad-empty-sinks-cap1"),
    pytest.param(1, 2, 1, "group", 63, 100, 20, None, False, None, 0.5,
                 id="B1-H2-KV1-cap-only-large"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B, Hq, Hkv, lists, Nq, Nkv, K, ranges, sinks, mask, softcap", TS_CASES)
def test_token_sparse_kernel(B, Hq, Hkv, lists, Nq, Nkv, K, ranges, sinks, mask, softcap, dtype):
    seed, gen = fresh_gen()
    D = 16
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(DEVICE, dtype)      # [B, Hq, Nq, D]
    k = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE, dtype)    # [B, Hkv, Nkv, D]
    v = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE, dtype)    # [B, Hkv, Nkv, D]
    scale = 1.0 if softcap and softcap < 1 else D ** -0.5
    hs = {"shared": 1, "group": Hkv, "head": Hq}[lists]
    idx = random_indices(gen, B, hs, Nq, K, Nkv).to(DEVICE)            # [B, Hs, Nq, K]
    m = None if mask is None else shaped_mask(gen, mask[0], mask[1], B, Hq, Nq, Nkv, 32)
    kind = "add" if m is None else kind_of(m)
    m_dev = None if m is None else m.to(DEVICE)
    logits = make_sinks(gen, Hq, sinks)
    kv_start, kv_end = make_ranges(ranges, B, Nkv)
    keep = token_keep(idx, Hq=Hq, Nkv=Nkv, kv_start=kv_start, kv_end=kv_end)
    want = oracle(q.cpu(), k.cpu(), v.cpu(), keep, scale, softcap=softcap, mask=m,
                  sinks=None if logits is None else logits.cpu())
    extras = dict(sinks=logits, kv_start=kv_start, kv_end=kv_end)
    ref = token_sparse_attention_ref(q, k, v, idx, scale=scale, softcap=softcap, mask=m_dev,
                                     mask_kind=kind, **extras)
    mods, tensors = model_mods(softcap, m_dev)
    keep_dev = keep.to(DEVICE)
    model = attention_reference(q, k, v, scale=scale, mods=mods, mod_tensors=tensors,
                                keep=lambda r0, r1: keep_dev[:, :, r0:r1], **extras)
    plan = tsk._plan_token_sparse(q, k, v, idx, None, sinks=sinks, kv_ranges=ranges is not None,
                                 softcap=bool(softcap), mask="" if m is None else kind)
    assert (plan.n_split > 1) == (Nq == 1), plan.n_split      # decode runs split-K
    out, lse = poisoned_outputs(q, v)
    tsk.token_sparse_attention(q, k, v, idx, scale=scale, out=out, lse=lse, softcap=softcap,
                              mask=m_dev, mask_kind=kind, **extras)
    check(out, lse, want, ref, model, dtype, logits, f"seed {seed}")


# ----------------------------------------------------------------------------- specs, errors

def test_specs_print_new_fields_only_when_set():
    base = dict(head_dim=64, v_head_dim=64, gqa_group=1, pack_gqa=False, lists_per_group=True,
                dtype="float16")
    bs = BlockSparseSpec(**base, causal=True, block=64)
    assert "softcap" not in repr(bs) and "mask" not in repr(bs)
    bs2 = BlockSparseSpec(**base, causal=True, block=64, softcap=True, mask="keep",
                          mask_flags=True)
    assert "softcap=True, mask='keep', mask_flags=True" in repr(bs2)
    assert "mask='add'" in repr(TokenSparseSpec(**base, mask="add"))
    with pytest.raises(ValueError, match="mask_flags needs a mask"):
        BlockSparseSpec(**base, causal=True, block=64, mask_flags=True)
    with pytest.raises(ValueError, match=r"mask must be one of \('', 'add', 'keep'\), got 'mul'"):
        TokenSparseSpec(**base, mask="mul")
    src = emit(bs2, Schedule(block_m=64, block_n=32))
    assert '"smb", "smh", "smn"])' in src and "MASK_FLAGS" in src


def test_hopper_kernel_covers_neither():
    """The Gluon kernel names the soft cap / mask as not covered: the launcher never picks it."""
    base = dict(head_dim=128, v_head_dim=128, gqa_group=1, pack_gqa=False, lists_per_group=True,
                causal=True, dtype="bfloat16", block=128, stride_align=8)
    ws = Schedule(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True, wgmma=True)
    assert wgmma_kernel.supported(BlockSparseSpec(**base), ws)
    assert wgmma_kernel.unsupported_reason(BlockSparseSpec(**base), ws) == ""
    for extra in (dict(softcap=True), dict(mask="add"), dict(mask="keep", mask_flags=True)):
        spec = BlockSparseSpec(**base, **extra)
        assert not wgmma_kernel.supported(spec, ws)
        assert "soft-capped scores or a mask tensor" in wgmma_kernel.unsupported_reason(spec, ws)
        assert not bsk._wgmma_ok(spec, ws, torch.device(DEVICE))
        with pytest.raises(ValueError, match="does not cover"):
            wgmma_kernel.render(spec, ws)


@pytest.mark.parametrize("call", ["block_sparse_attention", "token_sparse_attention"])
@pytest.mark.parametrize("change, match", [
    pytest.param(dict(softcap=-1.0), "softcap must be a finite float >= 0", id="cap-negative"),
    pytest.param(dict(softcap=float("inf")), "softcap must be a finite", id="cap-inf"),
    pytest.param(dict(mask=torch.zeros(2, 3, 20, 20)), r"mask must broadcast to "
                 r"\[B, Hq, Nq, Nkv\] = \[2, 4, 20, 20\]", id="mask-heads-3"),
    pytest.param(dict(mask=torch.zeros(2, 4, 20, 19)), r"got \[2, 4, 20, 19\]", id="mask-keys"),
    pytest.param(dict(mask=torch.zeros(1, 2, 4, 20, 20)), "mask must broadcast", id="mask-5d"),
    pytest.param(dict(mask=torch.zeros(20, 20, dtype=torch.bool)), "'add' needs a float mask",
                 id="add-bool"),
    pytest.param(dict(mask=torch.zeros(20, 20), mask_kind="keep"), "'keep' needs a bool mask",
                 id="keep-float"),
    pytest.param(dict(mask=torch.zeros(20, 20), mask_kind="mul"), "mask_kind must be one of",
                 id="kind-mul"),
])
def test_invalid_modifiers(call, change, match):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 20, 16, generator=gen).to(DEVICE)
    k = v = torch.randn(2, 2, 20, 16, generator=gen).to(DEVICE)
    change = {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in change.items()}
    with pytest.raises(ValueError, match=match):
        if call == "block_sparse_attention":
            num = torch.ones(2, 2, 2, dtype=torch.int32, device=DEVICE)
            idx = torch.zeros(2, 2, 2, 1, dtype=torch.int32, device=DEVICE)
            bsk.block_sparse_attention(q, k, v, num, idx, block=16, scale=0.25, causal=True,
                                      **change)
        else:
            idx = torch.zeros(2, 1, 20, 4, dtype=torch.int32, device=DEVICE)
            tsk.token_sparse_attention(q, k, v, idx, scale=0.25, **change)


@pytest.mark.parametrize("flags, match", [
    pytest.param("no-mask", "mask_flags given without a mask", id="no-mask"),
    pytest.param(torch.zeros(2, 2, 2, 2, dtype=torch.int8), r"mask_flags must be an int8 or "
                 r"int32 tensor \[2, 2, 2, 1\]", id="shape"),
    pytest.param(torch.zeros(2, 2, 2, 1), "got torch.float32", id="float"),
])
def test_invalid_mask_flags(flags, match):
    q = torch.randn(2, 4, 20, 16, device=DEVICE)
    k = v = torch.randn(2, 2, 20, 16, device=DEVICE)
    num = torch.ones(2, 2, 2, dtype=torch.int32, device=DEVICE)
    idx = torch.zeros(2, 2, 2, 1, dtype=torch.int32, device=DEVICE)
    mask = None if flags == "no-mask" else torch.zeros(20, 20, device=DEVICE)
    flags = torch.ones_like(idx, dtype=torch.int8) if flags == "no-mask" else flags.to(DEVICE)
    with pytest.raises(ValueError, match=match):
        bsk.block_sparse_attention(q, k, v, num, idx, block=16, scale=0.25, causal=True,
                                  mask=mask, mask_flags=flags)


@pytest.mark.parametrize("spec, sch, fns", [
    pytest.param(BlockSparseSpec(head_dim=64, v_head_dim=64, gqa_group=4, pack_gqa=True,
                                 lists_per_group=True, causal=True, dtype="float16", block=64,
                                 softcap=True, mask="add", mask_flags=True),
                 Schedule(block_m=64, block_n=32, num_warps=4, num_stages=2),
                 "block_sparse_fwd", id="block-sparse-branch-cap-add-flags"),
    pytest.param(BlockSparseSpec(head_dim=128, v_head_dim=128, gqa_group=1, pack_gqa=False,
                                 lists_per_group=True, causal=False, dtype="float16", block=128,
                                 mask="keep", mask_flags=True, sinks=True),
                 Schedule(block_m=128, block_n=64, num_warps=8, num_stages=3,
                          mask_mode=MaskMode.ALWAYS, tma=True),
                 "block_sparse_fwd", id="block-sparse-always-tma-keep-flags"),
    pytest.param(TokenSparseSpec(head_dim=64, v_head_dim=64, gqa_group=4, pack_gqa=True,
                                 lists_per_group=True, dtype="float16", softcap=True,
                                 mask="keep", kv_ranges=True),
                 Schedule(block_m=16, block_n=64, num_warps=4, num_stages=2, split=128),
                 "token_sparse_fwd,token_sparse_combine", id="token-sparse-packed-cap-keep"),
])
def test_compiles_for_sm90(spec, sch, fns):
    """The kernels with cap and mask compile for a GPU (offline sm_90 target, no GPU needed),
    in a fresh process without the interpreter flag."""
    compile_for_sm90(spec, sch, fns)
