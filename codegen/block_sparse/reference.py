"""Block-sparse attention in plain PyTorch (fp32): the reference the Triton kernel is checked against.

Shapes: q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nkv, D]``, v ``[B, Hkv, Nkv, Dv]``,
``kv_num_blocks`` int32 ``[B, Hs, NQB]``, ``kv_indices`` int32 ``[B, Hs, NQB, MAXB]`` with
``NQB = ceil(Nq / block)`` and ``Hs`` = ``Hkv`` (one list per GQA group) or ``Hq`` (per head).
Query block ``i`` attends to key blocks ``kv_indices[..., i, :kv_num_blocks[..., i]]`` (distinct,
in any order); later entries are ignored. Query row ``i`` sits at position ``i + Nkv - Nq``
(bottom-right alignment). On top of the block lists:

* ``causal``: key ``j`` is visible iff ``j <= pos``;
* ``window > 0``: key ``j`` is kept iff ``pos - window < j`` or ``j < sink``;
* ``kv_start`` / ``kv_end`` (int ``[B]``): batch row ``b`` keeps only keys
  ``kv_start[b] <= j < kv_end[b]`` (padded batches; either bound may be given alone).

``softcap`` (c > 0; 0 = none) and ``mask`` / ``mask_kind`` (a tensor broadcastable to
``[B, Hq, Nq, Nkv]``: "add" float added to the scores, values <= -1e30 masked; "keep" bool,
False masked) modify the scores ``s = scale * q . k`` first: ``s = c * tanh(s / c)``, then the
mask (``mask_blocks.apply_mask_and_cap``), then the rules above.

``sinks`` (float ``[Hq]``): a learned logit per query head taking part in the softmax as one
more key of value 0 (GPT-OSS), in the units of the modified scores: ``lse = log(sum_j exp(s_j)
+ exp(sinks[h]))``. Rows that keep no key give out = 0 and lse = -inf (lse = ``sinks[h]`` with
sinks).

Example::

    >>> q = k = v = torch.randn(1, 2, 100, 16)
    >>> num = torch.tensor([[[1, 2]] * 2], dtype=torch.int32)          # [1, 2, 2]
    >>> idx = torch.tensor([[[[0, -1], [1, 0]]] * 2], dtype=torch.int32)  # [1, 2, 2, 2]
    >>> out, lse = block_sparse_attention_ref(q, k, v, num, idx, block=64, scale=0.25, causal=True)
    >>> out.shape, lse.shape
    (torch.Size([1, 2, 100, 16]), torch.Size([1, 2, 100]))
"""
from __future__ import annotations

import torch

from codegen.attention.reference import check_sinks, key_range_mask
from codegen.block_sparse.mask_blocks import apply_mask_and_cap, broadcast_mask


def block_lists_to_dense(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                         num_kv_blocks: int) -> torch.Tensor:
    """Block lists -> bool ``[B, Hs, NQB, num_kv_blocks]`` (True = the key block is listed)."""
    maxb = kv_indices.shape[-1]
    used = torch.arange(maxb, device=kv_indices.device) < kv_num_blocks[..., None].long()
    idx = kv_indices.long()
    if bool(((idx < 0) | (idx >= num_kv_blocks))[used].any()):
        raise ValueError(f"kv_indices holds a listed entry outside [0, {num_kv_blocks})")
    dense = torch.zeros(*kv_indices.shape[:-1], num_kv_blocks + 1, dtype=torch.bool,
                        device=kv_indices.device)
    dense.scatter_(-1, torch.where(used, idx, num_kv_blocks), True)  # unused -> spare column
    return dense[..., :num_kv_blocks]


def block_sparse_keep_mask(kv_num_blocks, kv_indices, *, block: int, n_q: int, n_kv: int,
                           causal: bool, sink: int = 0, window: int = 0,
                           kv_start=None, kv_end=None) -> torch.Tensor:
    """Token-level keep mask ``[B, Hs, Nq, Nkv]`` (bool) of the block lists plus causal,
    sink/window and the per-batch key ranges ``kv_start`` / ``kv_end`` (int ``[B]`` or None)."""
    dense = block_lists_to_dense(kv_num_blocks, kv_indices, -(-n_kv // block))
    keep = dense.repeat_interleave(block, dim=-2)[..., :n_q, :]
    keep = keep.repeat_interleave(block, dim=-1)[..., :n_kv]
    pos = torch.arange(n_q, device=keep.device)[:, None] + (n_kv - n_q)
    key = torch.arange(n_kv, device=keep.device)[None, :]
    if causal:
        keep = keep & (key <= pos)
    if window > 0:
        keep = keep & ((key > pos - window) | (key < sink))
    outside = key_range_mask("block_sparse_keep_mask", kv_start, kv_end, keep.shape[0], n_kv,
                             keep.device)
    if outside is not None:
        keep = keep & ~outside                                          # [B, 1, 1, Nkv]
    return keep


def block_sparse_attention_ref(q, k, v, kv_num_blocks, kv_indices, *, block: int, scale: float,
                               causal: bool, sink: int = 0, window: int = 0, sinks=None,
                               kv_start=None, kv_end=None, softcap: float = 0.0, mask=None,
                               mask_kind: str = "add"):
    """Returns ``(out [B, Hq, Nq, Dv] in q.dtype, lse [B, Hq, Nq] fp32, natural log)``."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    keep = block_sparse_keep_mask(kv_num_blocks, kv_indices, block=block, n_q=Nq, n_kv=Nkv,
                                  causal=causal, sink=sink, window=window, kv_start=kv_start,
                                  kv_end=kv_end)
    keep = keep.repeat_interleave(Hq // keep.shape[1], dim=1)          # [B, Hq, Nq, Nkv]
    kf = k.float().repeat_interleave(Hq // Hkv, dim=1)                  # [B, Hq, Nkv, D]
    vf = v.float().repeat_interleave(Hq // Hkv, dim=1)                  # [B, Hq, Nkv, Dv]
    s = (q.float() @ kf.transpose(-1, -2)) * scale                      # [B, Hq, Nq, Nkv]
    if mask is not None:
        mask = broadcast_mask("block_sparse_attention_ref", mask, mask_kind, s.shape, q.device)
    s = apply_mask_and_cap(s, softcap=softcap, mask=mask, mask_kind=mask_kind)
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is None:
        lse = torch.logsumexp(s, dim=-1)                                # -inf on empty rows
    else:                                                               # sink column appended
        col = check_sinks("block_sparse_attention_ref", sinks, Hq, q.device).float()
        lse = torch.logsumexp(torch.cat([s, col[:, None, None].expand(B, Hq, Nq, 1)], -1), -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = p @ vf                                                        # empty rows: p == 0
    return out.to(q.dtype), lse
