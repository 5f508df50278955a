"""The DeepSeek-Sparse-Attention "lightning indexer" in plain PyTorch (fp32): the reference for
the fused Triton score + top-k kernels in ``kernel.py``.

Index score of query ``t`` and key ``s`` (batch ``b``), over ``H_I`` indexer heads and one
shared indexer key per token::

    I[b, t, s] = sum_j w[b, t, j] * relu(q_idx[b, t, j, :] . k_idx[b, s, :])

Shapes: ``q_idx [B, Nq, H_I, d_I]``, ``w [B, Nq, H_I]``, ``k_idx [B, Nkv, d_I]``. With
``causal=True`` key ``s`` is visible to query ``t`` iff ``s <= t + (Nkv - Nq)`` (bottom-right
aligned: a single decode query sees every key). Each query keeps the ``topk`` visible keys with
the highest score; equal scores go to the larger (more recent) key index.

Example::

    >>> q = torch.randn(1, 5, 2, 16); w = torch.rand(1, 5, 2); k = torch.randn(1, 5, 16)
    >>> indexer_topk_ref(q, w, k, 3, causal=True)[0, :2].tolist()      # rows 0, 1 see 1, 2 keys
    [[0, -1, -1], [0, 1, -1]]
"""
from __future__ import annotations

import torch

from codegen.attention.reference import visible_keys


def visible_counts(n_q: int, n_kv: int, causal: bool, device=None) -> torch.Tensor:
    """int64 ``[Nq]``: how many keys each query row may select from."""
    return visible_keys("lower_right" if causal else None, n_q, n_kv, device)


def weighted_relu_scores(head_dots, w, n_kv: int, *, causal: bool) -> torch.Tensor:
    """``sum_j w[..., j] * ReLU(head_dots(j))`` in head order, fp32 ``[B, Nq, Nkv]``, ``-inf``
    where the causal rule hides the key. ``head_dots(j)``: fp32 ``[B, Nq, Nkv]`` dot products
    of indexer head ``j`` (computed by the caller, one head at a time or all at once)."""
    B, Nq, H = w.shape
    wf = w.float()
    scores = torch.zeros(B, Nq, n_kv, device=w.device, dtype=torch.float32)
    for j in range(H):
        scores += wf[:, :, j, None] * torch.relu(head_dots(j))
    if causal:
        hidden = (torch.arange(n_kv, device=w.device)[None, :]
                  >= visible_counts(Nq, n_kv, True, w.device)[:, None])    # [Nq, Nkv]
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


def indexer_scores_ref(q_idx, w, k_idx, *, causal: bool) -> torch.Tensor:
    """fp32 ``[B, Nq, Nkv]`` index scores, ``-inf`` where the causal rule hides the key."""
    kf_t = k_idx.float().transpose(1, 2)                                    # [B, d_I, Nkv]
    return weighted_relu_scores(lambda j: torch.matmul(q_idx[:, :, j].float(), kf_t), w,
                                k_idx.shape[1], causal=causal)


def topk_of_scores(scores: torch.Tensor, topk: int, visible: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, Nq, topk]``: per row the ``min(topk, visible)`` best keys of ``scores
    [B, Nq, Nkv]`` (ties to the larger index), sorted ascending, then -1."""
    B, Nq, Nkv = scores.shape
    # a stable descending sort of the reversed key axis puts, among equal scores, the larger
    # original index first
    order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
    kept = (Nkv - 1 - order)[..., :topk]                                    # [B, Nq, <=topk]
    rank = torch.arange(kept.shape[-1], device=scores.device)
    kept = torch.where(rank < visible[None, :, None], kept, Nkv)            # drop hidden keys
    kept = torch.sort(kept, dim=-1).values
    out = torch.full((B, Nq, topk), -1, dtype=torch.int32, device=scores.device)
    out[..., :kept.shape[-1]] = torch.where(kept < Nkv, kept, -1).to(torch.int32)
    return out


def indexer_topk_ref(q_idx, w, k_idx, topk: int, *, causal: bool) -> torch.Tensor:
    """int32 ``[B, Nq, topk]``: each query's ``topk`` best visible keys by index score (ties to
    the more recent key), ascending, padded with -1 when fewer than ``topk`` are visible."""
    scores = indexer_scores_ref(q_idx, w, k_idx, causal=causal)
    visible = visible_counts(q_idx.shape[1], k_idx.shape[1], causal, q_idx.device)
    return topk_of_scores(scores, topk, visible)
