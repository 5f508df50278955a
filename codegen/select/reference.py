"""Block scoring and selection references.

Block lists use FlexAttention's layout: ``counts`` int32 ``[B, Hs, NQB]`` and ``indices``
int32 ``[B, Hs, NQB, NKB]`` (ascending, -1 past ``counts``), NQB = ceil(Nq / block),
NKB = ceil(Nkv / block), Hs = key heads (one list per GQA group).

Example::

    >>> q = torch.randn(1, 4, 100, 16); k = torch.randn(1, 2, 100, 16)
    >>> ok = allowed_blocks(q.shape, k.shape, (), (), "lower_right", 32)
    >>> sc = pooled_block_scores(q, k, 0.25, 32, ok)
    >>> counts, idx = select_topk_blocks(sc, 100, 100, "lower_right", 32, topk=1,
    ...                                  sink_blocks=1, local_blocks=1)
    >>> counts.tolist()
    [[[1, 2, 3, 3], [1, 2, 3, 3]]]
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from codegen.attention.reference import MASKED_BELOW, apply_modifiers, positions_offset


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _block_any(x: torch.Tensor, block: int, dim: int) -> torch.Tensor:
    """Pad ``dim`` to a multiple of ``block`` with False and reduce each block with any()."""
    n = x.shape[dim]
    pad = _cdiv(n, block) * block - n
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    shape = list(x.shape)
    shape[dim:dim + 1] = [shape[dim] // block, block]
    return x.reshape(shape).any(dim=dim + 1)


def block_bounds(n_q: int, n_kv: int, causal, block: int, device=None):
    """(first_pos [NQB], last_pos [NQB]): positions of each query block's first and last row."""
    nqb = _cdiv(n_q, block)
    off = positions_offset(causal, n_q, n_kv)
    first = torch.arange(nqb, device=device) * block + off
    last = torch.clamp((torch.arange(nqb, device=device) + 1) * block, max=n_q) - 1 + off
    return first, last


def structural_blocks(n_q: int, n_kv: int, causal, block: int, device=None,
                      window: int = 0) -> torch.Tensor:
    """bool [NQB, NKB]: blocks with a pair the causal rule and the sliding ``window`` (keys
    j > pos - window) allow (all blocks if neither applies)."""
    nqb, nkb = _cdiv(n_q, block), _cdiv(n_kv, block)
    if causal is None and not window:
        return torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    first, last = block_bounds(n_q, n_kv, causal, block, device)
    k_lo = torch.arange(nkb, device=device) * block
    ok = torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    if causal is not None:
        ok &= k_lo[None, :] <= last[:, None]
    if window:
        k_hi = torch.clamp(k_lo + block, max=n_kv) - 1
        ok &= first[:, None] <= k_hi[None, :] + window - 1
    return ok


def last_key_blocks(n_q: int, n_kv: int, causal, block: int, device=None) -> torch.Tensor:
    """[NQB]: the key block holding each query block's last position (clamped to the keys)."""
    _, last = block_bounds(n_q, n_kv, causal, block, device)
    return torch.clamp(last // block, 0, _cdiv(n_kv, block) - 1)


def allowed_blocks(q_shape, k_shape, mods: Sequence[tuple], mod_tensors: Sequence[torch.Tensor],
                   causal: Optional[str], block: int, device=None, *, window: int = 0,
                   kv_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool [B, Hkv, NQB, NKB]: blocks holding at least one pair the model attends to (its
    modifiers, the causal rule, its sliding ``window``, its key validity ``kv_valid``
    [B, >= Nkv], nonzero = a real token)."""
    B, Hq, Nq, _ = q_shape
    Hkv, Nkv = k_shape[1], k_shape[2]
    if device is None:
        device = mod_tensors[0].device if mod_tensors else "cpu"
    if not mods:
        # no mask tensors: only the rules, decided per block without an N x N map
        ok = structural_blocks(Nq, Nkv, causal, block, device, window=window)
        ok = ok.expand(B, Hkv, *ok.shape)
        if kv_valid is not None:                          # key blocks holding a real token
            real = _block_any(kv_valid[:, :Nkv].to(device) != 0, block, 1)    # [B, NKB]
            ok = ok & real[:, None, None, :]
        return ok
    zero = torch.zeros(1, 1, Nq, Nkv, device=device)
    s = apply_modifiers(zero, mods, mod_tensors, slice(0, Nq))
    q_pos = torch.arange(Nq, device=device) + positions_offset(causal, Nq, Nkv)
    kv_pos = torch.arange(Nkv, device=device)
    if causal is not None:
        s = s.masked_fill(kv_pos[None, :] > q_pos[:, None], float("-inf"))
    if window:
        s = s.masked_fill(kv_pos[None, :] <= q_pos[:, None] - window, float("-inf"))
    if kv_valid is not None:
        s = s.masked_fill(kv_valid[:, None, None, :Nkv].to(device) == 0, float("-inf"))
    ok = s > MASKED_BELOW                                  # [b, h, Nq, Nkv], b in {1,B}, h in {1,Hq}
    ok = ok.expand(B, ok.shape[1], Nq, Nkv)
    if ok.shape[1] == Hq and Hq != Hkv:
        ok = ok.reshape(B, Hkv, Hq // Hkv, Nq, Nkv).any(dim=2)
    ok = ok.expand(B, Hkv, Nq, Nkv)
    return _block_any(_block_any(ok, block, 2), block, 3)


def _pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of rows (the last block may be short): [B, H, N, D] -> [B, H, NB, D]
    in fp32, accumulated without an fp32 copy of ``x``."""
    B, H, N, D = x.shape
    if N == 0:
        return x.new_zeros((B, H, 0, D), dtype=torch.float32)
    full = N // block
    parts = []
    if full:
        parts.append(x[:, :, :full * block].reshape(B, H, full, block, D).sum(3, dtype=torch.float32)
                     / block)
    if N % block:
        parts.append(x[:, :, full * block:].sum(2, keepdim=True, dtype=torch.float32) / (N % block))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def pooled_block_logits(q: torch.Tensor, k: torch.Tensor, scale: float, block: int,
                        allowed: torch.Tensor) -> torch.Tensor:
    """Pooled-q x pooled-k logits [B, Hkv, NQB, NKB] (-inf where not allowed), for MHA/MQA
    groups of one head, where ranking by logit equals ranking by ``pooled_block_scores``."""
    B, Hq, _, _ = q.shape
    if Hq != k.shape[1]:
        raise ValueError("pooled_block_logits ranks like pooled_block_scores only when Hq == Hkv")
    s = torch.matmul(_pool(q, block), _pool(k, block).transpose(-1, -2)) * scale
    return s.masked_fill(~allowed, float("-inf"))


def pooled_block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block: int,
                        allowed: torch.Tensor) -> torch.Tensor:
    """Estimated attention mass of each key block for each query block, per GQA group.

    Mean-pooled queries times mean-pooled keys, softmax over the allowed key blocks of each
    query head, averaged over the heads of a group: fp32 [B, Hkv, NQB, NKB], -inf where the
    block is not allowed.
    """
    B, Hq, _, _ = q.shape
    Hkv = k.shape[1]
    pq = _pool(q, block).reshape(B, Hkv, Hq // Hkv, -1, q.shape[-1])  # [B, Hkv, G, NQB, D]
    pk = _pool(k, block)                                               # [B, Hkv, NKB, D]
    return group_block_probs(torch.einsum("bhgqd,bhkd->bhgqk", pq, pk).mul_(scale), ~allowed)


def group_block_probs(logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Each head's softmax of its block ``logits`` [B, Hkv, G, NQB, NKB] over the blocks not
    ``hidden`` (bool, broadcastable to [B, Hkv, NQB, NKB]), averaged over the G heads of each
    group: fp32 [B, Hkv, NQB, NKB], -inf where hidden, 0 on rows with no block. ``logits`` is
    overwritten."""
    p = torch.softmax(logits.masked_fill_(hidden.unsqueeze(-3), float("-inf")), dim=-1)
    return p.nan_to_num_(0.0).mean(dim=2).masked_fill_(hidden, float("-inf"))


def _forced_blocks(nqb: int, nkb: int, n_q: int, n_kv: int, causal, block: int,
                   sink_blocks: int, local_blocks: int, device) -> torch.Tensor:
    """bool [NQB, NKB]: the sink blocks and the ``local_blocks`` blocks ending at each query
    block's last position."""
    forced = torch.zeros(nqb, nkb, dtype=torch.bool, device=device)
    forced[:, :min(sink_blocks, nkb)] = True
    last_blk = last_key_blocks(n_q, n_kv, causal, block, device)
    j = torch.arange(nkb, device=device)
    forced |= (j[None, :] <= last_blk[:, None]) & (j[None, :] > last_blk[:, None] - local_blocks)
    return forced


def blocks_from_mask(sel: torch.Tensor):
    """bool [B, H, NQB, NKB] -> (counts int32 [B, H, NQB], indices int32 [B, H, NQB, NKB]).

    Selected block ids ascending, -1 after ``counts`` (a scatter by running count, no sort)."""
    nkb = sel.shape[-1]
    counts = sel.sum(dim=-1, dtype=torch.int32)
    pos = torch.cumsum(sel, dim=-1, dtype=torch.int32) - 1                # slot of each selected id
    pos = torch.where(sel, pos, torch.full_like(pos, nkb))                 # unselected -> spare slot
    j = torch.arange(nkb, device=sel.device, dtype=torch.int32).expand_as(pos)
    idx = torch.full((*sel.shape[:-1], nkb + 1), -1, dtype=torch.int32, device=sel.device)
    idx.scatter_(-1, pos.long(), j)
    return counts, idx[..., :nkb].contiguous()


def mask_from_blocks(counts: torch.Tensor, indices: torch.Tensor, nkb: int) -> torch.Tensor:
    """Inverse of ``blocks_from_mask``: bool [B, H, NQB, NKB]."""
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None].long()
    sel = torch.zeros(*indices.shape[:-1], nkb + 1, dtype=torch.bool, device=indices.device)
    tgt = torch.where(valid, indices.long(), torch.full_like(indices, nkb, dtype=torch.long))
    sel.scatter_(-1, tgt, True)
    return sel[..., :nkb]


def topk_width(nkb: int, topk: int, sink_blocks: int, local_blocks: int) -> int:
    """Width of the index lists ``select_topk_blocks`` returns (at most NKB)."""
    return max(1, min(nkb, topk + sink_blocks + local_blocks))


def select_topk_blocks(scores: torch.Tensor, n_q: int, n_kv: int, causal, block: int, *,
                       topk: int, sink_blocks: int, local_blocks: int):
    """Top-``topk`` allowed key blocks by score plus the forced sink/local blocks.

    Returns block lists of width ``topk_width(...)`` (FlexAttention allows lists narrower than
    NKB): ascending ids, -1 after ``counts``. No [NQB, NKB] selection map is built."""
    B, H, nqb, nkb = scores.shape
    dev = scores.device
    width = topk_width(nkb, topk, sink_blocks, local_blocks)
    allowed = scores > float("-inf")
    forced = _forced_blocks(nqb, nkb, n_q, n_kv, causal, block, sink_blocks, local_blocks, dev)
    big = torch.iinfo(torch.int32).max
    parts = []
    k = min(topk, nkb)
    if k > 0:
        rank = scores.masked_fill(forced, float("-inf"))
        vals, idx = rank.topk(k, dim=-1, sorted=False)          # ids are sorted below
        parts.append(torch.where(vals > float("-inf"), idx.to(torch.int32), big))
    # forced ids: sink blocks, then local blocks that are not sink blocks
    last_blk = last_key_blocks(n_q, n_kv, causal, block, dev)                      # [NQB]
    f_ids = []
    if sink_blocks:
        f_ids.append(torch.arange(min(sink_blocks, nkb), device=dev).expand(nqb, -1))
    if local_blocks:
        loc = last_blk[:, None] - torch.arange(local_blocks, device=dev)[None, :]
        f_ids.append(torch.where(loc >= sink_blocks, loc, torch.full_like(loc, -1)))
    if f_ids:
        fid = torch.cat(f_ids, dim=1)                                                # [NQB, F]
        ok = (fid >= 0) & allowed.gather(-1, fid.clamp_min(0).expand(B, H, nqb, -1))
        parts.append(torch.where(ok, fid.to(torch.int32).expand(B, H, nqb, -1), big))
    ids = torch.cat(parts, dim=-1) if parts else torch.full((B, H, nqb, 1), big, dtype=torch.int32,
                                                            device=dev)
    ids, _ = ids.sort(dim=-1)
    ids = ids[..., :width]
    counts = (ids != big).sum(-1, dtype=torch.int32)
    if ids.shape[-1] < width:
        ids = torch.cat([ids, ids.new_full((B, H, nqb, width - ids.shape[-1]), big)], -1)
    return counts, torch.where(ids == big, torch.full_like(ids, -1), ids).contiguous()


def window_blocks(B: int, H: int, n_q: int, n_kv: int, causal, block: int, *, sink: int,
                  window: int, device=None):
    """Key blocks that hold any (query, key) pair with ``key < sink`` or ``|pos_q - key| < window``."""
    nqb, nkb = _cdiv(n_q, block), _cdiv(n_kv, block)
    first, last = block_bounds(n_q, n_kv, causal, block, device)
    k_lo = torch.arange(nkb, device=device) * block
    k_hi = torch.clamp(k_lo + block, max=n_kv) - 1
    sel = (k_lo[None, :] < sink).expand(nqb, nkb).clone()
    sel |= (k_hi[None, :] > first[:, None] - window) & (k_lo[None, :] < last[:, None] + window)
    return blocks_from_mask(sel.expand(B, H, nqb, nkb))


def block_keep_fn(counts: torch.Tensor, indices: torch.Tensor, block: int, n_kv: int):
    """Row-chunk callback for ``attention_reference``: bool [B, Hs, rows, Nkv] from block lists."""
    nkb = _cdiv(n_kv, block)
    blk = mask_from_blocks(counts, indices, nkb)                          # [B, Hs, NQB, NKB]

    def keep(r0: int, r1: int) -> torch.Tensor:
        rows = torch.arange(r0, r1, device=blk.device) // block
        m = blk[:, :, rows]                                               # [B, Hs, rows, NKB]
        return m.repeat_interleave(block, dim=-1)[..., :n_kv]
    return keep


def window_keep_fn(n_q: int, n_kv: int, causal, *, sink: int, window: int, device=None):
    """Row-chunk callback: bool [1, 1, rows, Nkv], key < sink or |pos_q - key| < window."""
    off = positions_offset(causal, n_q, n_kv)
    j = torch.arange(n_kv, device=device)

    def keep(r0: int, r1: int) -> torch.Tensor:
        pos = torch.arange(r0, r1, device=device)[:, None] + off
        return ((j[None, :] < sink) | ((pos - j[None, :]).abs() < window))[None, None]
    return keep


@functools.lru_cache(maxsize=256)
def window_pairs(n_q: int, n_kv: int, causal, *, sink: int, window: int) -> tuple:
    """(kept, visible) causal pairs of one (batch, head) under ``window_keep_fn``'s rule, in
    closed form: the query at position ``p`` keeps ``min(window, p + 1)`` window keys plus
    ``min(sink, p - window + 1)`` sink keys left of the window (ints; cached per shape)."""
    p = torch.arange(n_q, dtype=torch.int64) + positions_offset(causal, n_q, n_kv)
    vis = (p + 1).clamp(0, n_kv)
    kept = torch.minimum(vis, torch.tensor(window)) + (p - window + 1).clamp(0, sink)
    return int(torch.minimum(kept, vis).sum()), int(vis.sum())
