"""Learned attention sinks (GPT-OSS) and per-batch key ranges (padded batches) in the attention
references and the block-sparse / token-sparse kernels.

Each kernel runs into NaN-poisoned outputs and is compared with its PyTorch reference and with
an independent float64 oracle written here the model's way (dense keep mask built block by
block or entry by entry, masked scores, the sink column appended, softmax, the column dropped).
``attention_reference`` is also checked against GPT-OSS's own eager attention from
transformers. Rows that keep no key must give out = 0 and lse = the head's sink (-inf without
sinks).

On a machine without CUDA the kernels run in Triton's interpreter, in float32 and float16.
"""
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from codegen.attention import attention_reference  # noqa: E402
from codegen.block_sparse import block_sparse_attention_ref, wgmma_kernel  # noqa: E402
from codegen.common import BlockSparseSpec, MaskMode, Schedule, TokenSparseSpec  # noqa: E402
from codegen.select.reference import block_keep_fn  # noqa: E402
from codegen.token_sparse import (token_sparse_attention_bwd_ref,  # noqa: E402
                                  token_sparse_attention_ref)
from runtime.kernels import block_sparse as bsk, launch, token_sparse as tsk  # noqa: E402
from kernel_checks import compile_for_sm90, poisoned_outputs, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 2e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 3e-3,
       torch.bfloat16: 1.2e-2}
LSE_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
hopper = pytest.mark.skipif(not (torch.cuda.is_available()
                                 and torch.cuda.get_device_capability()[0] == 9),
                            reason="needs a Hopper GPU")


@pytest.fixture(autouse=True)
def poison_workspace(monkeypatch):
    """Split-K partials and backward buffers start as NaN: anything unwritten shows."""
    monkeypatch.setattr(launch, "POISON_WORKSPACE", True)


def dtype_id(d):
    return str(d).split(".")[-1]


# ----------------------------------------------------------------------------- oracle

def oracle(q, k, v, keep, scale, sinks=None):
    """float64 attention over a dense keep mask ``[B, Hq, Nq, Nkv]`` as GPT-OSS writes it:
    masked scores, the sink column appended, softmax, the column dropped. Returns
    ``(out [B, Hq, Nq, Dv], lse [B, Hq, Nq])``; a row with neither key nor sink: 0 and -inf."""
    B, Hq, Nq, _ = q.shape
    G = Hq // k.shape[1]
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    s = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, Hq, 1, 1).expand(B, Hq, Nq, 1)], -1)
    has = torch.isfinite(s).any(-1, keepdim=True)
    s0 = torch.where(has, s, 0.0)
    p = torch.softmax(s0, -1) * has
    if sinks is not None:
        p = p[..., :-1]                                  # drop the sink column
    lse = torch.where(has[..., 0], torch.logsumexp(s0, -1), float("-inf"))
    return p @ vv, lse


def apply_ranges(keep, kv_start, kv_end):
    """keep ``[B, H, Nq, Nkv]`` with the keys outside each batch row's range cleared."""
    keep = keep.clone()
    for b in range(keep.shape[0]):
        if kv_start is not None:
            keep[b, ..., :max(int(kv_start[b]), 0)] = False
        if kv_end is not None:
            keep[b, ..., max(int(kv_end[b]), 0):] = False
    return keep


def block_keep(num, idx, *, Hq, Nq, Nkv, block, causal, sink=0, window=0, kv_start=None,
               kv_end=None):
    """bool ``[B, Hq, Nq, Nkv]``: the listed blocks set one by one, then the rules by position."""
    B, hs = num.shape[:2]
    keep = torch.zeros(B, Hq, Nq, Nkv, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            row = h // (Hq // hs)
            for qb in range(num.shape[2]):
                for t in range(int(num[b, row, qb])):
                    kb = int(idx[b, row, qb, t])
                    keep[b, h, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block] = True
    pos = torch.arange(Nq)[:, None] + (Nkv - Nq)
    j = torch.arange(Nkv)[None, :]
    if causal:
        keep &= j <= pos
    if window:
        keep &= (j > pos - window) | (j < sink)
    return apply_ranges(keep, kv_start, kv_end)


def token_keep(idx, *, Hq, Nkv, kv_start=None, kv_end=None):
    """bool ``[B, Hq, Nq, Nkv]``: each listed entry set (negatives are padding)."""
    B, hs, Nq, _ = idx.shape
    lists = idx.long().cpu().repeat_interleave(Hq // hs, 1)
    keep = torch.zeros(B, Hq, Nq, Nkv + 1, dtype=torch.bool)
    keep.scatter_(-1, torch.where(lists < 0, Nkv, lists), True)   # padding -> spare column
    return apply_ranges(keep[..., :Nkv], kv_start, kv_end)


def make_ranges(kind, B, Nkv):
    """``(kv_start, kv_end)`` int32 ``[B]`` or None: "left" (start only), "right" (end only),
    "both", "empty" (row 0 fully padded, row 1 bounds outside [0, Nkv]: nothing clipped)."""
    if kind is None:
        return None, None
    if kind == "left":
        start, end = [(Nkv // 3) * (b % 2) + 2 * b for b in range(B)], None
    elif kind == "right":
        start, end = None, [Nkv - 1 - (Nkv // 4) * (b % 2) - b for b in range(B)]
    elif kind == "both":
        start, end = [3 + 5 * b for b in range(B)], [Nkv - 2 - 9 * b for b in range(B)]
    elif kind == "empty":
        start, end = [Nkv // 2, -5] + [1] * (B - 2), [Nkv // 2, Nkv + 11] + [Nkv - 1] * (B - 2)
    else:
        raise ValueError(kind)
    return tuple(None if x is None else torch.tensor(x, dtype=torch.int32, device=DEVICE)
                 for x in (start, end))


def make_sinks(gen, Hq, on):
    """fp32 ``[Hq]`` logits in the range of the rows' lse (so the sink takes a real share)."""
    return (torch.randn(Hq, generator=gen) * 2 + 3).to(DEVICE) if on else None


def check(out, lse, keep, sinks, ref, want, dtype, what):
    """The kernel's (out, lse) against the reference ``ref`` and the oracle ``want``."""
    assert not out.isnan().any(), f"{what}: output elements unwritten (NaN poison)"
    assert not lse.isnan().any(), f"{what}: lse elements unwritten (NaN poison)"
    keep = keep.to(out.device)
    empty = ~keep.any(-1)                                                  # [B, Hq, Nq]
    assert (out[empty] == 0).all(), f"{what}: rows without a key must be 0"
    if sinks is None:
        assert (lse[empty] == float("-inf")).all(), f"{what}: rows without a key need lse -inf"
    else:
        row_sink = sinks.float().view(1, -1, 1).expand_as(lse)
        err = (lse[empty] - row_sink[empty]).abs().max().item() if empty.any() else 0.0
        assert err <= 1e-5, f"{what}: rows without a key need lse = sink (error {err:.1e})"
    assert torch.isfinite(lse[~empty]).all(), f"{what}: rows with keys need a finite lse"
    assert (~empty).any(), f"{what}: the case must have rows with keys"
    for name, (o, lse_ref) in (("reference", ref), ("oracle", want)):
        err = rel_err(out, o.to(out.device))
        assert err <= TOL[dtype], f"{what}: relative error {err:.2e} vs the {name}"
        lse_err = (lse.double() - lse_ref.double().to(lse.device))[~empty].abs().max().item()
        assert lse_err <= LSE_TOL[dtype], f"{what}: lse error {lse_err:.2e} vs the {name}"


# ----------------------------------------------------------------------------- references

@pytest.mark.parametrize("ranges", [None, "left", "right", "empty"])
@pytest.mark.parametrize("causal", ["lower_right", "upper_left"])
def test_attention_reference_matches_gpt_oss_eager(causal, ranges):
    """``attention_reference`` with sinks and ranges against transformers' GPT-OSS eager
    attention given the equivalent additive mask (float64; GQA group 3)."""
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    B, Hq, Hkv, Nq, Nkv, D = 2, 6, 2, 11, 29, 16
    q = torch.randn(B, Hq, Nq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, Nkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, Nkv, D, generator=gen, dtype=torch.float64)
    sinks = torch.randn(Hq, generator=gen, dtype=torch.float64) + 2
    kv_start, kv_end = (None if t is None else t.cpu() for t in make_ranges(ranges, B, Nkv))
    off = 0 if causal == "upper_left" else Nkv - Nq
    visible = torch.arange(Nkv)[None, :] <= torch.arange(Nq)[:, None] + off
    keep = apply_ranges(visible.expand(B, 1, Nq, Nkv), kv_start, kv_end)
    mask = torch.zeros(B, 1, Nq, Nkv, dtype=torch.float64).masked_fill(
        ~keep, torch.finfo(torch.float64).min)
    module = SimpleNamespace(num_key_value_groups=Hq // Hkv, sinks=sinks, training=False)
    want, _ = gpt_oss.eager_attention_forward(module, q, k, v, mask, 0.3)  # [B, Nq, Hq, D]
    stats = {}
    out, lse = attention_reference(q, k, v, scale=0.3, causal=causal, sinks=sinks,
                                   kv_start=kv_start, kv_end=kv_end, chunk=4, stats=stats)
    assert rel_err(out, want.transpose(1, 2)) < 1e-10
    empty = ~keep.expand(B, Hq, Nq, Nkv).any(-1)
    assert (out[empty] == 0).all()
    assert torch.equal(lse[empty], sinks.float().view(1, Hq, 1).expand(B, Hq, Nq)[empty])
    _, want_lse = oracle(q, k, v, keep.expand(B, Hq, Nq, Nkv), 0.3, sinks)
    assert (lse.double() - want_lse).abs().max().item() < 1e-5
    # keys outside the ranges count as not attended to, like the causal rule
    assert torch.equal(stats["allowed"], keep.expand(B, Hq, Nq, Nkv).sum((0, 2, 3)).double())


def test_attention_reference_without_extras_is_unchanged():
    """None for the new arguments is the old call; the ranges act exactly like an equivalent
    boolean "keep" modifier (same outputs and stats)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    B, Hq, Hkv, Nq, Nkv, D = 2, 4, 2, 9, 23, 8
    q = torch.randn(B, Hq, Nq, D, generator=gen)
    k, v = torch.randn(B, Hkv, Nkv, D, generator=gen), torch.randn(B, Hkv, Nkv, D, generator=gen)
    base, base_stats = {}, {}
    o1, l1 = attention_reference(q, k, v, scale=0.4, causal="lower_right", stats=base)
    o2, l2 = attention_reference(q, k, v, scale=0.4, causal="lower_right", stats=base_stats,
                                 sinks=None, kv_start=None, kv_end=None)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    assert all(torch.equal(base[n], base_stats[n]) for n in ("allowed", "kept"))
    kv_start, kv_end = (t.cpu() for t in make_ranges("both", B, Nkv))
    keep = apply_ranges(torch.ones(B, 1, Nq, Nkv, dtype=torch.bool), kv_start, kv_end)
    s1, s2 = {}, {}
    o1, l1 = attention_reference(q, k, v, scale=0.4, causal="lower_right", kv_start=kv_start,
                                 kv_end=kv_end, stats=s1)
    o2, l2 = attention_reference(q, k, v, scale=0.4, causal="lower_right", mods=[("keep",)],
                                 mod_tensors=[keep], stats=s2)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    assert all(torch.equal(s1[n], s2[n]) for n in ("allowed", "kept"))


@pytest.mark.parametrize("lists", ["group", "head"])
def test_block_sparse_reference_matches_attention_reference(lists):
    """The two references agree with sinks, ranges, causal and block lists (as ``keep``)."""
    from test_kernels_block_sparse import random_block_lists
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    B, Hq, Hkv, Nq, Nkv, block = 2, 6, 2, 37, 50, 16
    q, k, v = (torch.randn(B, h, n, 8, generator=gen) for h, n in ((Hq, Nq), (Hkv, Nkv), (Hkv, Nkv)))
    num, idx = random_block_lists(gen, B, Hkv if lists == "group" else Hq, -(-Nq // block),
                                  -(-Nkv // block))
    sinks = torch.randn(Hq, generator=gen)
    kv_start, kv_end = (t.cpu() for t in make_ranges("both", B, Nkv))
    a, la = block_sparse_attention_ref(q, k, v, num, idx, block=block, scale=0.3, causal=True,
                                       sinks=sinks, kv_start=kv_start, kv_end=kv_end)
    b, lb = attention_reference(q, k, v, scale=0.3, causal="lower_right",
                                keep=block_keep_fn(num, idx, block, Nkv), sinks=sinks,
                                kv_start=kv_start, kv_end=kv_end)
    assert rel_err(a, b) < 1e-6 and (la - lb).abs().max().item() < 1e-5


@pytest.mark.parametrize("lists", ["shared", "group", "head"])
def test_token_sparse_reference_and_backward(lists):
    """Reference vs the oracle, and its explicit backward vs autograd with sinks and ranges
    (float64): the sink enters the gradients only through lse."""
    from test_kernels_token_sparse import random_indices
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    B, Hq, Hkv, Nq, Nkv, K = 2, 4, 2, 9, 40, 12
    q, k, v = (torch.randn(B, h, n, 8, generator=gen, dtype=torch.float64)
               for h, n in ((Hq, Nq), (Hkv, Nkv), (Hkv, Nkv)))
    idx = random_indices(gen, B, {"shared": 1, "group": Hkv, "head": Hq}[lists], Nq, K, Nkv)
    sinks = torch.randn(Hq, generator=gen, dtype=torch.float64) + 1
    kv_start, kv_end = (t.cpu() for t in make_ranges("empty", B, Nkv))
    args = [t.requires_grad_() for t in (q, k, v)]
    out, lse = token_sparse_attention_ref(*args, idx, scale=0.3, sinks=sinks, kv_start=kv_start,
                                          kv_end=kv_end)
    want, want_lse = oracle(q.detach(), k.detach(), v.detach(),
                            token_keep(idx, Hq=Hq, Nkv=Nkv, kv_start=kv_start, kv_end=kv_end),
                            0.3, sinks)
    assert rel_err(out.detach(), want) < 1e-10 and (lse - want_lse).abs().max().item() < 1e-5
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, args, dout)
    got = token_sparse_attention_bwd_ref(q, k, v, idx, out.detach(), lse, dout, scale=0.3,
                                         kv_start=kv_start, kv_end=kv_end)
    for name, g, w in zip("qkv", got, grads):
        assert rel_err(g, w) < 1e-10, f"d{name}: {rel_err(g, w):.1e}"


@pytest.mark.parametrize("call", ["attention_reference", "block_sparse_attention",
                                  "token_sparse_attention"])
@pytest.mark.parametrize("change, match", [
    pytest.param(dict(sinks=torch.zeros(3)), r"sinks must be a float tensor \[4\]", id="sinks-3"),
    pytest.param(dict(sinks=torch.zeros(4, dtype=torch.int32)), "sinks must be a float tensor",
                 id="sinks-int"),
    pytest.param(dict(kv_start=torch.zeros(3, dtype=torch.int32)), r"kv_start must .*\[2\]",
                 id="start-3"),
    pytest.param(dict(kv_end=torch.zeros(2)), "kv_end must be an int", id="end-float"),
])
def test_invalid_extras(call, change, match):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 20, 16, generator=gen).to(DEVICE)
    k = v = torch.randn(2, 2, 20, 16, generator=gen).to(DEVICE)
    change = {n: t.to(DEVICE) for n, t in change.items()}
    with pytest.raises(ValueError, match=match):
        if call == "attention_reference":
            attention_reference(q, k, v, scale=0.25, **change)
        elif call == "block_sparse_attention":
            num = torch.ones(2, 2, 2, dtype=torch.int32, device=DEVICE)
            idx = torch.zeros(2, 2, 2, 1, dtype=torch.int32, device=DEVICE)
            bsk.block_sparse_attention(q, k, v, num, idx, block=16, scale=0.25, causal=True,
                                      **change)
        else:
            idx = torch.zeros(2, 1, 20, 4, dtype=torch.int32, device=DEVICE)
            tsk.token_sparse_attention(q, k, v, idx, scale=0.25, **change)


# ----------------------------------------------------------------------------- block-sparse

#        B, Hq, Hkv, lists, Nq, Nkv, D, block, causal, sink, window, ranges, sinks
BS_CASES = [
    pytest.param(2, 4, 2, "group", 100, 100, 64, 32, True, 0, 0, "left", True,
                 id="B2-H4-KV2-N100-D64-b32-causal-left-sinks"),
    pytest.param(2, 6, 2, "group", 63, 63, 60, 16, True, 0, 0, "right", False,
                 id="B2-H6-KV2-N63-D60-b16-causal-right"),
    pytest.param(2, 6, 2, "group", 63, 131, 16, 64, False, 0, 0, "empty", True,
                 id="B2-H6-KV2-Nq63-Nkv131-D16-b64-empty-row-sinks"),
    pytest.param(2, 4, 2, "head", 131, 131, 64, 64, True, 4, 24, "both", True,
                 id="B2-H4-KV2-head-N131-b64-causal-window24-sink4-both-sinks"),
    pytest.param(1, 4, 4, "group", 100, 100, 60, 32, True, 0, 0, None, True,
                 id="B1-H4-N100-D60-b32-causal-sinks-only"),
    pytest.param(3, 4, 2, "group", 1, 131, 64, 32, True, 0, 0, "empty", True,
                 id="B3-H4-KV2-Nq1-Nkv131-decode-empty-row-sinks"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B, Hq, Hkv, lists, Nq, Nkv, D, block, causal, sink, window, ranges, "
                         "sinks", BS_CASES)
def test_block_sparse_kernel(B, Hq, Hkv, lists, Nq, Nkv, D, block, causal, sink, window, ranges,
                             sinks, dtype):
    from test_kernels_block_sparse import random_block_lists
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(DEVICE, dtype)      # [B, Hq, Nq, D]
    k = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE, dtype)    # [B, Hkv, Nkv, D]
    v = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE, dtype)    # [B, Hkv, Nkv, D]
    num, idx = random_block_lists(gen, B, Hkv if lists == "group" else Hq, -(-Nq // block),
                                  -(-Nkv // block), p_empty=0.15)
    logits = make_sinks(gen, Hq, sinks)
    kv_start, kv_end = make_ranges(ranges, B, Nkv)
    keep = block_keep(num, idx, Hq=Hq, Nq=Nq, Nkv=Nkv, block=block, causal=causal, sink=sink,
                      window=window, kv_start=kv_start, kv_end=kv_end)
    scale = D ** -0.5
    want = oracle(q.cpu(), k.cpu(), v.cpu(), keep, scale, None if logits is None else logits.cpu())
    num, idx = num.to(DEVICE), idx.to(DEVICE)
    ref = block_sparse_attention_ref(q, k, v, num, idx, block=block, scale=scale, causal=causal,
                                     sink=sink, window=window, sinks=logits, kv_start=kv_start,
                                     kv_end=kv_end)
    for pack in ([False, True] if lists == "group" and Hq > Hkv else [None]):
        out, lse = poisoned_outputs(q, v)
        bsk.block_sparse_attention(q, k, v, num, idx, block=block, scale=scale, causal=causal,
                                  sink=sink, window=window, pack_gqa=pack, out=out, lse=lse,
                                  sinks=logits, kv_start=kv_start, kv_end=kv_end)
        check(out, lse, keep, logits, ref, want, dtype, f"seed {seed} pack {pack}")


SCHEDULES = [
    pytest.param(Schedule(block_m=32, block_n=16, num_warps=4, num_stages=1), id="m32-n16-branch"),
    pytest.param(Schedule(block_m=32, block_n=16, num_warps=4, num_stages=1,
                          mask_mode=MaskMode.ALWAYS), id="m32-n16-always"),
    pytest.param(Schedule(block_m=16, block_n=64, num_warps=4, num_stages=2), id="m16-n64-branch"),
    pytest.param(Schedule(block_m=32, block_n=32, num_warps=4, num_stages=2, persistent=2),
                 id="m32-n32-persistent"),
    pytest.param(Schedule(block_m=64, block_n=32, num_warps=4, num_stages=2, tma=True),
                 id="m64-n32-tma"),
]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_block_sparse_schedules(schedule):
    """Key tiles smaller than the block and ranges crossing them at odd offsets: the range
    mask must bite in BRANCH mode exactly where a tile crosses kv_start or kv_end."""
    from test_kernels_block_sparse import random_block_lists
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, N, D, block = 3, 6, 2, 131, 64, 64
    q = torch.randn(B, Hq, N, D, generator=gen).to(DEVICE)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(DEVICE)
    v = torch.randn(B, Hkv, N, D, generator=gen).to(DEVICE)
    num, idx = random_block_lists(gen, B, Hkv, -(-N // block), -(-N // block), p_empty=0.1)
    logits = make_sinks(gen, Hq, True)
    kv_start = torch.tensor([17, 0, 70], dtype=torch.int32, device=DEVICE)
    kv_end = torch.tensor([131, 45, 120], dtype=torch.int32, device=DEVICE)
    keep = block_keep(num, idx, Hq=Hq, Nq=N, Nkv=N, block=block, causal=True,
                      kv_start=kv_start, kv_end=kv_end)
    want = oracle(q.cpu(), k.cpu(), v.cpu(), keep, 0.125, logits.cpu())
    num, idx = num.to(DEVICE), idx.to(DEVICE)
    ref = block_sparse_attention_ref(q, k, v, num, idx, block=block, scale=0.125, causal=True,
                                     sinks=logits, kv_start=kv_start, kv_end=kv_end)
    out, lse = poisoned_outputs(q, v)
    bsk.block_sparse_attention(q, k, v, num, idx, block=block, scale=0.125, causal=True,
                              schedule=schedule, pack_gqa=True, out=out, lse=lse, sinks=logits,
                              kv_start=kv_start, kv_end=kv_end)
    check(out, lse, keep, logits, ref, want, torch.float32, f"seed {seed}")


def test_block_sparse_sinks_in_any_float_dtype_and_no_sinks_unchanged():
    """fp16 sink logits are read as fp32; without the new arguments the plan's spec and the
    result are the old ones (the extras are not part of that kernel)."""
    from test_kernels_block_sparse import make_inputs
    q, k, v, num, idx = make_inputs(3, 1, 4, 2, "group", 70, 70, 16, 16, 32, torch.float32)
    logits = torch.tensor([0.5, 1.5, -1.0, 3.0], device=DEVICE)
    a, la = bsk.block_sparse_attention(q, k, v, num, idx, block=32, scale=0.25, causal=True,
                                      sinks=logits.half())
    b, lb = bsk.block_sparse_attention(q, k, v, num, idx, block=32, scale=0.25, causal=True,
                                      sinks=logits.half().float())
    assert torch.equal(a, b) and torch.equal(la, lb)
    plan = bsk._plan_block_sparse(q, k, v, num, idx, 32, True, False, None, None)
    assert not plan.spec.sinks and not plan.spec.kv_ranges
    plain, _ = bsk.block_sparse_attention(q, k, v, num, idx, block=32, scale=0.25, causal=True)
    ref, _ = block_sparse_attention_ref(q, k, v, num, idx, block=32, scale=0.25, causal=True)
    assert rel_err(plain, ref) <= TOL[torch.float32] and rel_err(a, plain) > 1e-2


# ----------------------------------------------------------------------------- token-sparse

#        B, Hq, Hkv, lists, Nq, Nkv, K, D, ranges, sinks
TS_CASES = [
    pytest.param(2, 4, 2, "group", 63, 100, 40, 64, "left", True,
                 id="prefill-B2-H4-KV2-N63-K40-D64-group-left-sinks"),
    pytest.param(2, 6, 2, "shared", 20, 131, 33, 60, "both", False,
                 id="prefill-B2-H6-KV2-N20-K33-D60-shared-both"),
    pytest.param(2, 6, 2, "head", 17, 100, 24, 16, "empty", True,
                 id="prefill-B2-H6-KV2-N17-K24-D16-head-empty-row-sinks"),
    pytest.param(2, 3, 1, "shared", 9, 63, 63, 64, "right", True,
                 id="prefill-B2-H3-KV1-N9-K63-shared-right-sinks"),
    pytest.param(2, 4, 1, "group", 1, 500, 300, 64, "right", True,
                 id="decode-B2-H4-KV1-K300-mqa-split-right-sinks"),
    pytest.param(3, 2, 2, "group", 1, 400, 250, 60, "empty", True,
                 id="decode-B3-H2-K250-D60-split-empty-row-sinks"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B, Hq, Hkv, lists, Nq, Nkv, K, D, ranges, sinks", TS_CASES)
def test_token_sparse_kernel(B, Hq, Hkv, lists, Nq, Nkv, K, D, ranges, sinks, dtype):
    from test_kernels_token_sparse import random_indices
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(DEVICE, dtype)      # [B, Hq, Nq, D]
    k = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE, dtype)    # [B, Hkv, Nkv, D]
    v = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE, dtype)    # [B, Hkv, Nkv, D]
    hs = {"shared": 1, "group": Hkv, "head": Hq}[lists]
    idx = random_indices(gen, B, hs, Nq, K, Nkv).to(DEVICE)            # [B, Hs, Nq, K]
    logits = make_sinks(gen, Hq, sinks)
    kv_start, kv_end = make_ranges(ranges, B, Nkv)
    keep = token_keep(idx, Hq=Hq, Nkv=Nkv, kv_start=kv_start, kv_end=kv_end)
    scale = D ** -0.5
    want = oracle(q.cpu(), k.cpu(), v.cpu(), keep, scale, None if logits is None else logits.cpu())
    ref = token_sparse_attention_ref(q, k, v, idx, scale=scale, sinks=logits, kv_start=kv_start,
                                     kv_end=kv_end)
    plan = tsk._plan_token_sparse(q, k, v, idx, None, sinks=sinks, kv_ranges=ranges is not None)
    assert (plan.n_split > 1) == (Nq == 1), plan.n_split      # decode cases run split-K
    out, lse = poisoned_outputs(q, v)
    tsk.token_sparse_attention(q, k, v, idx, scale=scale, out=out, lse=lse, sinks=logits,
                              kv_start=kv_start, kv_end=kv_end)
    check(out, lse, keep, logits, ref, want, dtype, f"seed {seed}")


@pytest.mark.parametrize("split", [0, 32, 64, 256], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("Hq, Hkv", [(4, 1), (2, 2)], ids=["mqa-packed", "mha"])
def test_token_sparse_split_adds_the_sink_once(split, Hq, Hkv):
    """Any split of the list (incl. splits of padding or of keys outside the range, and a
    batch row with no key at all) gives the result of one program walking the whole list."""
    from test_kernels_token_sparse import random_indices
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)
    B, Nkv, K, D = 3, 600, 520, 64
    q = torch.randn(B, Hq, 1, D, generator=gen).to(DEVICE)
    k = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE)
    v = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE)
    idx = random_indices(gen, B, Hkv, 1, K, Nkv, p_pad=0.0, p_empty_row=0.0).to(DEVICE)
    idx[0, :, :, 64:192] = -1                                   # whole splits of padding
    logits = make_sinks(gen, Hq, True)
    kv_start = torch.tensor([0, 300, 250], dtype=torch.int32, device=DEVICE)
    kv_end = torch.tensor([450, 600, 250], dtype=torch.int32, device=DEVICE)   # row 2: none
    keep = token_keep(idx, Hq=Hq, Nkv=Nkv, kv_start=kv_start, kv_end=kv_end)
    want = oracle(q.cpu(), k.cpu(), v.cpu(), keep, 0.125, logits.cpu())
    ref = token_sparse_attention_ref(q, k, v, idx, scale=0.125, sinks=logits, kv_start=kv_start,
                                     kv_end=kv_end)
    out, lse = poisoned_outputs(q, v)
    tsk.token_sparse_attention(q, k, v, idx, scale=0.125, out=out, lse=lse, sinks=logits,
                              kv_start=kv_start, kv_end=kv_end,
                              schedule=Schedule(block_m=16, block_n=32, num_warps=4,
                                                num_stages=1, split=split))
    check(out, lse, keep, logits, ref, want, torch.float32, f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("Hq, Hkv, lists, split", [
    pytest.param(4, 2, "group", 0, id="gqa2-group-packed"),
    pytest.param(6, 2, "head", 0, id="gqa3-head"),
    pytest.param(4, 1, "shared", 16, id="mqa4-shared-split16"),
])
def test_token_sparse_backward_with_sinks_and_ranges(Hq, Hkv, lists, split, dtype):
    """The kernels' forward with sinks and ranges, then their backward (ranges; the sink comes
    in through lse) against autograd of the reference in float64."""
    from test_kernels_token_sparse import random_indices
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)
    B, Nq, Nkv, K, D = 2, 13, 37, 24, 16
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE, dtype)
    dout = torch.randn(B, Hq, Nq, D, generator=gen).to(DEVICE, dtype)
    idx = random_indices(gen, B, {"shared": 1, "group": Hkv, "head": Hq}[lists], Nq, K,
                         Nkv).to(DEVICE)
    logits = make_sinks(gen, Hq, True)
    kv_start, kv_end = make_ranges("both", B, Nkv)
    sch = Schedule(block_m=16, block_n=16, num_warps=4, num_stages=1, split=split)
    out, lse = tsk.token_sparse_attention(q, k, v, idx, scale=0.25, sinks=logits,
                                         kv_start=kv_start, kv_end=kv_end)
    got = tsk.token_sparse_attention_bwd(q, k, v, idx, out, lse, dout, scale=0.25, schedule=sch,
                                        kv_start=kv_start, kv_end=kv_end)
    args = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64, _ = token_sparse_attention_ref(*args, idx, scale=0.25, sinks=logits.double(),
                                        kv_start=kv_start, kv_end=kv_end)
    want = torch.autograd.grad(o64, args, dout.double())
    tol = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 2e-3}[dtype]
    for name, g, w, t in zip("qkv", got, want, (q, k, v)):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert not g.isnan().any(), f"seed {seed}: d{name} holds NaN"
        assert rel_err(g, w) <= tol, f"seed {seed}: d{name} relative error {rel_err(g, w):.2e}"


# ----------------------------------------------------------------------------- Hopper kernel

def test_hopper_kernel_covers_neither():
    """The Gluon kernel names sinks / ranges as not covered, so the launcher never picks it."""
    base = dict(head_dim=128, v_head_dim=128, gqa_group=1, pack_gqa=False, lists_per_group=True,
                causal=True, dtype="bfloat16", block=128, stride_align=8)
    ws = Schedule(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True, wgmma=True)
    assert wgmma_kernel.supported(BlockSparseSpec(**base), ws)
    assert wgmma_kernel.unsupported_reason(BlockSparseSpec(**base), ws) == ""
    for extra in (dict(sinks=True), dict(kv_ranges=True)):
        spec = BlockSparseSpec(**base, **extra)
        assert not wgmma_kernel.supported(spec, ws)
        assert "learned sinks or per-batch key ranges" in wgmma_kernel.unsupported_reason(spec, ws)
        assert not bsk._wgmma_ok(spec, ws, torch.device(DEVICE))
        assert not bsk.default_block_sparse_schedule(spec, torch.device(DEVICE), 4).wgmma


@pytest.mark.parametrize("spec, sch, fns", [
    pytest.param(BlockSparseSpec(head_dim=64, v_head_dim=64, gqa_group=4, pack_gqa=True,
                                 lists_per_group=True, causal=True, dtype="float16", block=64,
                                 windowed=True, sinks=True, kv_ranges=True),
                 Schedule(block_m=64, block_n=32, num_warps=4, num_stages=2),
                 "block_sparse_fwd", id="block-sparse-branch"),
    pytest.param(BlockSparseSpec(head_dim=128, v_head_dim=128, gqa_group=1, pack_gqa=False,
                                 lists_per_group=True, causal=False, dtype="float16", block=128,
                                 sinks=True),
                 Schedule(block_m=128, block_n=64, num_warps=8, num_stages=3,
                          mask_mode=MaskMode.ALWAYS, persistent=1),
                 "block_sparse_fwd", id="block-sparse-always-persistent-sinks"),
    pytest.param(TokenSparseSpec(head_dim=60, v_head_dim=60, gqa_group=1, pack_gqa=False,
                                 lists_per_group=True, dtype="float16", sinks=True,
                                 kv_ranges=True),
                 Schedule(block_m=16, block_n=64, num_warps=2, num_stages=3, split=128),
                 "token_sparse_fwd,token_sparse_combine", id="token-sparse-row"),
    pytest.param(TokenSparseSpec(head_dim=64, v_head_dim=64, gqa_group=4, pack_gqa=True,
                                 lists_per_group=True, dtype="float16", sinks=True,
                                 kv_ranges=True),
                 Schedule(block_m=16, block_n=64, num_warps=4, num_stages=2),
                 "token_sparse_fwd,token_sparse_combine", id="token-sparse-packed"),
])
def test_compiles_for_sm90(spec, sch, fns):
    """The Triton kernels with sinks and ranges compile for a GPU (offline sm_90 target, no
    GPU needed), not only run in the interpreter. In a fresh process without the
    interpreter flag."""
    compile_for_sm90(spec, sch, fns)


@pytest.mark.gpu
@hopper
def test_hopper_runs_the_triton_kernel_with_sinks():
    """On Hopper, a call the Gluon kernel would serve runs the Triton kernel once sinks or
    ranges are given, and matches the reference."""
    from test_kernels_block_sparse import make_inputs
    q, k, v, num, idx = make_inputs(7, 1, 4, 4, "group", 1000, 1000, 128, 128, 128,
                                    torch.bfloat16)
    _, _, ran = bsk.block_sparse_attention(q, k, v, num, idx, block=128, scale=128 ** -0.5,
                                          causal=True, return_schedule=True)
    assert ran.wgmma
    logits = torch.randn(4, device=DEVICE) + 3
    kv_start, kv_end = make_ranges("both", 1, 1000)
    out, lse, ran = bsk.block_sparse_attention(q, k, v, num, idx, block=128, scale=128 ** -0.5,
                                              causal=True, return_schedule=True, sinks=logits,
                                              kv_start=kv_start, kv_end=kv_end, hopper_first=True)
    assert not ran.wgmma
    ref, ref_lse = block_sparse_attention_ref(q, k, v, num, idx, block=128, scale=128 ** -0.5,
                                              causal=True, sinks=logits, kv_start=kv_start,
                                              kv_end=kv_end)
    assert rel_err(out, ref) <= TOL[torch.bfloat16]
    assert (lse - ref_lse).abs().max().item() <= LSE_TOL[torch.bfloat16]
