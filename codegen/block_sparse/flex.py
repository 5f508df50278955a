"""Convert block lists to and from a FlexAttention ``BlockMask``.

Both use the same layout: ``kv_num_blocks`` int32 ``[B, H, NQB]`` and ``kv_indices`` int32
``[B, H, NQB, MAXB]``. A FlexAttention mask keeps two lists, "partial" blocks (mask_mod is
evaluated) and "full" blocks (no mask_mod); ours is one list with the token masks implied by
``causal``. ``to_flex_block_mask`` can put the blocks that need no token mask in the full list
(the fastest form for FlexAttention) or keep everything partial.

FlexAttention defines the result by ``mask_mod``; its compiled kernel skips unlisted blocks,
its eager path does not. ``exact_mask_mod=True`` makes ``mask_mod`` also test block
membership (same result on both paths); ``False`` gives the cheaper mask_mod that is exact
only for the compiled kernel.

Example::

    >>> num = torch.tensor([[[1, 2]]], dtype=torch.int32)              # [1, 1, 2]
    >>> idx = torch.tensor([[[[0, 0], [0, 1]]]], dtype=torch.int32)     # [1, 1, 2, 2]
    >>> bm = to_flex_block_mask(num, idx, block=128, n_q=256, n_kv=256, causal=True)
    >>> [t.tolist() for t in from_flex_block_mask(bm)][0]
    [[[1, 2]]]
"""
from __future__ import annotations

import torch

from .reference import block_lists_to_dense


def _dense_to_lists(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[..., NQB, NKB]`` -> (num int32 ``[..., NQB]``, ascending indices ``[..., NQB, NKB]``)."""
    d = dense.to(torch.int32)
    num = d.sum(-1, dtype=torch.int32)
    nkb = d.shape[-1]
    # listed blocks first, in ascending order: sort key = column, +nkb for unlisted ones
    key = torch.arange(nkb, device=d.device, dtype=torch.int32) + (1 - d) * nkb
    idx = torch.sort(key, dim=-1).values % nkb
    return num.contiguous(), idx.to(torch.int32).contiguous()


def needs_token_mask(nqb: int, nkb: int, *, block: int, n_q: int, n_kv: int, causal: bool,
                     device=None) -> torch.Tensor:
    """bool ``[NQB, NKB]``: True where some query/key pair of the block pair is masked out."""
    qb = torch.arange(nqb, device=device)[:, None]
    kb = torch.arange(nkb, device=device)[None, :]
    partial = ((kb + 1) * block > n_kv).expand(nqb, nkb)
    if causal:
        first_pos = qb * block + (n_kv - n_q)
        partial = partial | ((kb + 1) * block - 1 > first_pos)
    return partial


def to_flex_block_mask(kv_num_blocks, kv_indices, *, block: int, n_q: int, n_kv: int,
                       causal: bool, num_q_heads: int | None = None, split_full: bool = True,
                       exact_mask_mod: bool = True):
    """A FlexAttention ``BlockMask`` selecting the same (query block, key block) pairs.

    ``num_q_heads``: expand per-group lists (``Hs = Hkv``) to this many query heads.
    ``split_full``: put blocks that need no token mask in FlexAttention's full-block list.
    """
    from torch.nn.attention.flex_attention import BlockMask

    nkb = -(-n_kv // block)
    dense = block_lists_to_dense(kv_num_blocks, kv_indices, nkb)        # [B, Hs, NQB, NKB]
    if num_q_heads is not None and num_q_heads != dense.shape[1]:
        dense = dense.repeat_interleave(num_q_heads // dense.shape[1], dim=1)
    offset = n_kv - n_q
    listed = dense.contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx < n_kv
        if causal:
            keep = keep & (kv_idx <= q_idx + offset)
        if exact_mask_mod:
            keep = keep & listed[b, h, q_idx // block, kv_idx // block]
        return keep

    if split_full:
        partial = needs_token_mask(dense.shape[2], nkb, block=block, n_q=n_q, n_kv=n_kv,
                                   causal=causal, device=dense.device)
        num, idx = _dense_to_lists(dense & partial)
        full_num, full_idx = _dense_to_lists(dense & ~partial)
    else:
        (num, idx), full_num, full_idx = _dense_to_lists(dense), None, None
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(n_q, n_kv))


def from_flex_block_mask(block_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks, kv_indices) listing every block of ``block_mask`` (partial and full)."""
    nkb = block_mask.kv_indices.shape[-1]
    dense = block_lists_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, nkb)
    if block_mask.full_kv_num_blocks is not None:
        dense = dense | block_lists_to_dense(block_mask.full_kv_num_blocks,
                                             block_mask.full_kv_indices, nkb)
    return _dense_to_lists(dense)
