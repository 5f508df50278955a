"""A caller's mask tensor in the sparse-attention kernels: its semantics, and its block summary.

A model may hand attention an additive float mask (ALiBi, T5 position bias, HF's ``finfo.min``
padding masks) or a boolean keep-mask (SDPA ``attn_mask``, DeepSeek-V3.2's indexer mask), of a
shape broadcastable to ``[B, Hq, Nq, Nkv]``. The kernels apply it to the (soft-capped) scores
``s = scale * q . k`` before their rule masks (causal, window, key ranges, block lists):

* ``"add"``: ``s + m`` (m in natural-log units, any float dtype); a value ``<= -1e30``
  (``MASKED_BELOW``) masks the pair like causality (-inf);
* ``"keep"``: bool, False masks the pair.

Rows whose every pair is masked give ``out = 0`` and ``lse = -inf`` (``lse = sinks[h]`` with
learned sinks). Eager PyTorch gives a finite but meaningless row there for additive masks (the
softmax of equal ``finfo.min`` values: the mean of V); a caller that needs it finds the rows by
``lse == -inf`` (or ``lse <= -1e30``) and fixes them up. With learned sinks such rows give
``out = 0`` and ``lse = sinks[h]`` as eager attention does (nothing to fix). float16's
``finfo.min`` (-65504) lies above -1e30: it is added like any bias (weight 0 next to any
unmasked pair; a row masked only by it gives the softmax of its shifted scores, as
``attention_reference`` does, with ``lse`` near -65504).

For the block-sparse kernel, as FlexAttention does it, ``mask_block_summary`` classifies each
``block x block`` tile of the mask as empty (every pair masked), full (nothing to apply) or
partial, and ``prune_block_lists`` drops the empty tiles from the block lists and flags the
entries whose tile is partial: the kernel reads the mask only for those.

Example::

    >>> bias = torch.zeros(1, 1, 100, 100).masked_fill(torch.ones(100, 100).triu(1).bool(),
    ...                                                torch.finfo(torch.float32).min)
    >>> cls = mask_block_summary(bias, "add", block=64, n_q=100, n_kv=100)   # [1, 1, 2, 2]
    >>> cls[0, 0].tolist()
    [[1, 0], [2, 1]]
    >>> num = torch.tensor([[[2, 2]]], dtype=torch.int32)                   # [1, 1, 2]
    >>> idx = torch.tensor([[[[0, 1], [1, 0]]]], dtype=torch.int32)         # [1, 1, 2, 2]
    >>> num, idx, flags = prune_block_lists(num, idx, cls)
    >>> num.tolist(), flags.tolist()
    ([[[1, 2]]], [[[[1, 0], [1, 0]]]])
"""
from __future__ import annotations

from typing import Optional

import torch

from codegen.attention.reference import MASKED_BELOW

MASK_KINDS = ("add", "keep")
BLOCK_EMPTY, BLOCK_PARTIAL, BLOCK_FULL = 0, 1, 2      # mask_block_summary's classes (int8)


def broadcast_mask(fn: str, mask, kind: str, shape: tuple, device) -> torch.Tensor:
    """``mask`` checked and viewed as ``[B, Hq, Nq, Nkv]`` (``shape``) without a copy: size-1
    (or missing leading) dimensions broadcast with stride 0. Raises naming what is wrong."""
    if kind not in MASK_KINDS:
        raise ValueError(f"{fn}: mask_kind must be one of {MASK_KINDS}, got {kind!r}")
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{fn}: mask must be a tensor, got {type(mask).__name__}")
    if kind == "add" and not mask.is_floating_point():
        raise ValueError(f"{fn}: mask_kind='add' needs a float mask, got {mask.dtype}")
    if kind == "keep" and mask.dtype != torch.bool:
        raise ValueError(f"{fn}: mask_kind='keep' needs a bool mask (False = masked), got "
                         f"{mask.dtype}")
    want = "[" + ", ".join(f"1 or {n}" for n in shape) + "]"
    if mask.dim() > 4 or any(a not in (1, n) for a, n in zip(mask.shape[::-1], shape[::-1])):
        raise ValueError(f"{fn}: mask must broadcast to [B, Hq, Nq, Nkv] = {list(shape)} "
                         f"(each dimension {want}), got {list(mask.shape)}")
    if mask.device != torch.device(device):
        raise ValueError(f"{fn}: mask is on {mask.device}, q is on {device}")
    return mask[(None,) * (4 - mask.dim())].expand(shape)


def apply_mask_and_cap(s: torch.Tensor, *, softcap: float = 0.0,
                       mask: Optional[torch.Tensor] = None, mask_kind: str = "add") -> torch.Tensor:
    """The kernels' score modifiers on float scores ``s`` [..., Nq, Nkv] (natural units): the soft
    cap ``c * tanh(s / c)`` (``softcap`` c > 0; 0 = none), then ``mask`` (broadcastable to
    ``s``): "add" adds it and masks values <= -1e30, "keep" masks where False (-inf)."""
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if mask is None:
        return s
    if mask_kind == "add":
        m = mask.to(s.dtype)
        return torch.where(m > MASKED_BELOW, s + m, float("-inf"))
    return s.masked_fill(~mask, float("-inf"))


def _spans(n: int, block: int) -> list:
    """``[(start, stop, tiles)]``: the whole blocks of ``range(n)``, then the short tail."""
    whole = n // block * block
    return ([(0, whole, n // block)] if whole else []) + ([(whole, n, 1)] if whole < n else [])


def _tile_reduce(x: torch.Tensor, block: int, reduce) -> torch.Tensor:
    """``reduce(tiles, dims)`` of every ``block x block`` tile of ``x [..., R, C]`` (short tiles
    at the ends): ``[..., ceil(R / block), ceil(C / block)]``. Views only (no copy of x)."""
    rows = []
    for r0, r1, nr in _spans(x.shape[-2], block):
        cols = []
        for c0, c1, nc in _spans(x.shape[-1], block):
            t = x[..., r0:r1, c0:c1]
            t = t.unflatten(-1, (nc, (c1 - c0) // nc)).unflatten(-3, (nr, (r1 - r0) // nr))
            cols.append(reduce(t, (-3, -1)))                   # [..., nr, nc]
        rows.append(torch.cat(cols, -1))
    return torch.cat(rows, -2)


def mask_block_summary(mask: torch.Tensor, kind: str, *, block: int, n_q: int,
                       n_kv: int) -> torch.Tensor:
    """Class of each ``block x block`` tile of ``mask``: int8 ``[Bm, Hm, NQB, NKB]`` with
    ``NQB = ceil(n_q / block)``, ``NKB = ceil(n_kv / block)``, ``Bm`` / ``Hm`` 1 where the mask
    broadcasts over batch / heads (else B / Hq). ``BLOCK_EMPTY``: every pair masked ("add":
    every value <= -1e30; "keep": all False); ``BLOCK_FULL``: nothing to apply ("add": all
    exactly 0; "keep": all True); else ``BLOCK_PARTIAL``. Tiles at the sequence ends cover only
    the real rows and keys. Dimensions of size 1 or stride 0 (``expand``) are reduced once and
    the result expanded (a view); besides the output, no memory in proportion to the mask."""
    if block < 1:
        raise ValueError(f"mask_block_summary: block must be >= 1, got {block}")
    m = broadcast_mask("mask_block_summary", mask, kind, (
        mask.shape[0] if mask.dim() == 4 else 1, mask.shape[1] if mask.dim() >= 3 else 1,
        n_q, n_kv), mask.device)
    for d in range(4):                          # broadcast dimensions: one slice is enough
        if m.shape[d] > 1 and m.stride(d) == 0:
            m = m.narrow(d, 0, 1)
    if kind == "keep":
        empty = ~_tile_reduce(m, block, lambda t, d: t.any(dim=d))
        full = _tile_reduce(m, block, lambda t, d: t.all(dim=d))
    else:
        hi = _tile_reduce(m, block, lambda t, d: t.amax(dim=d)).float()
        lo = _tile_reduce(m, block, lambda t, d: t.amin(dim=d)).float()
        empty = hi <= MASKED_BELOW
        full = (hi == 0) & (lo == 0)
    cls = torch.full(empty.shape, BLOCK_PARTIAL, dtype=torch.int8, device=mask.device)
    cls = cls.masked_fill(empty, BLOCK_EMPTY).masked_fill(full, BLOCK_FULL)
    nqb, nkb = -(-n_q // block), -(-n_kv // block)
    return cls.expand(*cls.shape[:2], nqb, nkb)


def prune_block_lists(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                      summary: torch.Tensor):
    """Block lists without the tiles ``summary`` classes empty, and which entries need the mask.

    ``kv_num_blocks`` int32 ``[B, Hs, NQB]``, ``kv_indices`` int32 ``[B, Hs, NQB, MAXB]``
    (FlexAttention layout), ``summary`` int8 ``[Bm, Hm, NQB, NKB]`` from ``mask_block_summary``
    with ``Bm`` in ``{1, B}`` and ``Hm`` in ``{1, Hs}`` or a multiple of ``Hs`` (query heads
    ``h`` of list row ``h // (Hm // Hs)``, as with lists per GQA group: an entry is empty only
    if empty for every head of its group, full only if full for every one).

    Returns ``(kv_num_blocks int32 [B, Hs, NQB], kv_indices int32 [B, Hs, NQB, MAXB],
    mask_flags int8 [B, Hs, NQB, MAXB])``: the kept entries in their order, entries after the
    count 0; ``mask_flags`` 1 where the entry's tile is partial for some head (the kernel
    reads the mask there), 0 where it is full and past the count."""
    B, hs, nqb = kv_num_blocks.shape
    maxb = kv_indices.shape[-1]
    bm, hm, sq, nkb = summary.shape
    if (kv_indices.shape[:3] != kv_num_blocks.shape or bm not in (1, B) or sq != nqb
            or not (hm in (1, hs) or hm % hs == 0)):
        raise ValueError(f"prune_block_lists: lists {list(kv_num_blocks.shape)} / "
                         f"{list(kv_indices.shape)} and summary {list(summary.shape)} do not "
                         f"match (summary [1 or B, 1 or Hs or a multiple of Hs, NQB, NKB])")
    if hm not in (1, hs):                       # per query head -> per list row (GQA group)
        grouped = summary.reshape(bm, hs, hm // hs, nqb, nkb)
        empty = (grouped == BLOCK_EMPTY).all(2)
        full = (grouped == BLOCK_FULL).all(2)
        summary = torch.full_like(empty, BLOCK_PARTIAL, dtype=torch.int8)
        summary = summary.masked_fill(empty, BLOCK_EMPTY).masked_fill(full, BLOCK_FULL)
    summary = summary.expand(B, hs, nqb, nkb)
    used = torch.arange(maxb, device=kv_indices.device) < kv_num_blocks[..., None].long()
    idx = kv_indices.long()
    if bool(((idx < 0) | (idx >= nkb))[used].any()):
        raise ValueError(f"prune_block_lists: kv_indices holds a listed entry outside [0, {nkb})")
    cls = torch.gather(summary, -1, idx.clamp(0, max(nkb - 1, 0)))     # [B, Hs, NQB, MAXB]
    kept = used & (cls != BLOCK_EMPTY)
    order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True)  # kept entries first
    num = kept.sum(-1, dtype=torch.int32)
    live = torch.arange(maxb, device=kv_indices.device) < num[..., None].long()
    new_idx = torch.where(live, torch.gather(kv_indices, -1, order), 0).to(torch.int32)
    flags = (live & (torch.gather(cls, -1, order) == BLOCK_PARTIAL)).to(torch.int8)
    return num, new_idx, flags
