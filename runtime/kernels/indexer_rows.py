"""The lightning indexer's selection for few query rows (decode, short speculative chunks),
and the int64 selection keys that order candidates like the top-k rule: an order-preserving
image of the fp32 score in the high word, the key index in the low word, so equal scores go to
the newer key and hidden keys can never be chosen. ``runtime.kernels.indexer`` uses both.
"""
from __future__ import annotations

import torch

from codegen.common import next_pow2
from codegen.emit import emit
from codegen.indexer.few_rows_kernel import FewRowsSpec
from codegen.indexer.reference import indexer_scores_ref, visible_counts, weighted_relu_scores
from runtime.cache import KERNELS
from runtime.kernels.launch import device_key, kernels_enabled
from runtime.loader import load


#: up to this many query rows (decode, short speculative chunks) the score rows are
#: materialised (``B * Nq * Nkv`` fp32, a vector per query) and ranked by ``torch.topk``
FEW_ROWS = 16


def few_row_scores(q_idx, w, k_idx, *, causal: bool) -> torch.Tensor:
    """``indexer_scores_ref``'s fp32 rows. For 16-bit inputs on CUDA, one batched product over
    all indexer heads with fp32 output (``torch.bmm(..., out_dtype=float32)``: exact products,
    fp32 accumulation; no fp32 copy of the keys, which the reference makes, and one read of
    them instead of one per head), then the reference's weighted ReLU sum in its head order."""
    if (q_idx.device.type == "cuda" and q_idx.dtype in (torch.float16, torch.bfloat16)
            and k_idx.dtype == q_idx.dtype):
        B, n_q, n_h, d = q_idx.shape
        n_kv = k_idx.shape[1]
        try:
            dots = torch.bmm(q_idx.reshape(B, n_q * n_h, d), k_idx.transpose(1, 2),
                             out_dtype=torch.float32).view(B, n_q, n_h, n_kv)
        except (TypeError, RuntimeError, NotImplementedError):     # torch without out_dtype
            dots = None
        if dots is not None:
            return weighted_relu_scores(lambda j: dots[:, :, j], w, n_kv, causal=causal)
    return indexer_scores_ref(q_idx, w, k_idx, causal=causal)


def topk_few_rows(q_idx, w, k_idx, topk: int, *, causal: bool) -> torch.Tensor:
    """The selection for few query rows: one int64 selection key per (row, key), order-preserving
    score image << 32 | key index, so equal scores go to the newer key exactly as in the
    reference and hidden keys can never be chosen; then one ``torch.topk`` per row. Where the
    kernels run, one Triton launch builds the keys (``few_row_keys``); elsewhere they come from
    the reference's fp32 score rows (``few_row_scores``). Rows unordered."""
    if kernels_enabled(q_idx) and q_idx.shape[-1] <= FEW_ROWS_MAX_DIM:
        return top_of_keys(few_row_keys(q_idx, w, k_idx, causal=causal), topk)
    n_q, n_kv = q_idx.shape[1], k_idx.shape[1]
    scores = few_row_scores(q_idx, w, k_idx, causal=causal)                   # [B, Nq, Nkv] fp32
    return top_of_rows(scores, visible_counts(n_q, n_kv, causal, q_idx.device), topk)


#: index head dims the few-row key kernel takes (a [BN, d_I] key tile in registers)
FEW_ROWS_MAX_DIM = 256
#: keys per program of the few-row key kernel
FEW_ROWS_BLOCK_N = 128
#: from this many index heads the few-row keys come from one tensor-core product per (query row,
#: key tile) (``few_row_keys_mma``) instead of a loop over the heads on the CUDA cores
FEW_ROWS_MMA_HEADS = 16


def few_row_keys(q_idx, w, k_idx, *, causal: bool) -> torch.Tensor:
    """int64 ``[B, Nq, Nkv]`` selection keys of every (query row, key) in one launch (see
    ``codegen.indexer.few_rows_kernel``): what ``keys_of_scores`` makes of the reference's
    score rows, up to the summation order of the dot products."""
    B, n_q, n_h, d = q_idx.shape
    n_kv = k_idx.shape[1]
    out = torch.empty((B, n_q, n_kv), device=q_idx.device, dtype=torch.int64)
    if out.numel() == 0:
        return out
    mod = KERNELS.get(("indexer_few_rows", device_key(q_idx.device)),
                      lambda: load(emit(FewRowsSpec())))
    bn = FEW_ROWS_BLOCK_N if n_kv >= FEW_ROWS_BLOCK_N else max(16, next_pow2(n_kv))
    grid = (-(-n_kv // bn), B * n_q)
    args = (q_idx, w, k_idx, out, *q_idx.stride(), *w.stride(), *k_idx.stride(), n_q, n_kv,
            n_kv - n_q)
    if n_h >= FEW_ROWS_MMA_HEADS and k_idx.dtype == q_idx.dtype:
        mod.few_row_keys_mma[grid](
            *args, H=n_h, H_P=next_pow2(n_h), D=d, D_P=next_pow2(max(d, 16)), BN=bn,
            CAUSAL=bool(causal), IEEE=q_idx.dtype == torch.float32, num_warps=4)
    else:
        mod.few_row_keys[grid](
            *args, H=n_h, D=d, D_P=next_pow2(max(d, 16)), BN=bn, CAUSAL=bool(causal),
            num_warps=4)
    return out


def keys_of_scores(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """int64 selection keys of fp32 score rows ``[..., Nkv]``: score image << 32 | key index,
    INT64_MIN after each row's first ``visible [rows]`` keys."""
    n_kv = scores.shape[-1]
    idx = torch.arange(n_kv, device=scores.device)
    keys = (score_key(scores + 0.0) << 32) | idx
    hidden = idx[None, :] >= visible[:, None]
    return keys.masked_fill(hidden, torch.iinfo(torch.int64).min)


def top_of_keys(keys: torch.Tensor, topk: int) -> torch.Tensor:
    """int32 ``[..., topk]``: the keys (low words) of the ``topk`` largest selection keys per
    row, -1 for hidden ones and after the row's end; unordered."""
    n_kv = keys.shape[-1]
    lowest = torch.iinfo(torch.int64).min
    kk = min(topk, n_kv)
    top = torch.topk(keys, kk, dim=-1, sorted=False).values                  # [..., kk]
    chosen = torch.where(top == lowest, -1, top & 0xFFFFFFFF).to(torch.int32)
    if kk == topk:
        return chosen
    out = torch.full((*keys.shape[:-1], topk), -1, dtype=torch.int32, device=keys.device)
    out[..., :kk] = chosen
    return out


def top_of_rows(scores: torch.Tensor, visible: torch.Tensor, topk: int) -> torch.Tensor:
    """int32 ``[..., topk]``: per row of ``scores [..., Nkv]`` fp32 the ``topk`` best of its
    first ``visible [rows]`` keys (score, then the newer key), -1 after them; unordered."""
    return top_of_keys(keys_of_scores(scores, visible), topk)



def score_key(x: torch.Tensor) -> torch.Tensor:
    """int64 order-preserving image of fp32 values (the kernels' candidate high word)."""
    bits = x.float().contiguous().view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()


def from_key(key: torch.Tensor) -> torch.Tensor:
    k32 = key.clamp(-2 ** 31, 2 ** 31 - 1).to(torch.int32)
    return (k32 ^ ((k32 >> 31) & 0x7FFFFFFF)).view(torch.float32)
