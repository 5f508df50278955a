"""Per-policy estimator (``sparse.score``) and selection (``sparse.select``), one entry each.

Every entry works on any device (the PyTorch code in codegen/select runs on CUDA as the
on-device estimator). Selections are block lists ``(counts [B, Hkv, NQB], indices [B, Hkv,
NQB, NKB])``; ``token_keep`` refines the block lists to token level inside attend when a policy
is defined per token (sink_window, longformer).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from codegen.select import policies as P
from runtime import dsa
from codegen.select.reference import (allowed_blocks, pooled_block_logits, pooled_block_scores,
                                      select_topk_blocks, topk_width, window_blocks,
                                      window_keep_fn)


def _cdiv(a, b):
    return (a + b - 1) // b


@dataclass(frozen=True)
class Estimator:
    score: Optional[Callable] = None          # (q, k, mod_tensors, spec) -> Tensor
    score_shape: Optional[Callable] = None    # (q, k, spec) -> shape of the score tensor
    select: Optional[Callable] = None         # (scores, q, k, spec) -> (counts, indices)
    select_width: Optional[Callable] = None   # (q, k, spec) -> index-list width (default NKB)
    token_keep: Optional[Callable] = None     # (spec, n_q, n_kv, device) -> keep(r0, r1)


def block_of(spec) -> int:
    return int(getattr(spec.policy, "block", spec.block))


def _allowed(q, k, mods, spec):
    return allowed_blocks(q.shape, k.shape, spec.mods, mods, spec.causal, block_of(spec),
                          device=q.device)


def _grid_shape(q, k, spec):
    b = block_of(spec)
    return (q.shape[0], k.shape[1], _cdiv(q.shape[2], b), _cdiv(k.shape[2], b))


# ---------------------------------------------------------------- block_topk
# With one head per group and no mask tensors, on CUDA (or the CPU under Triton's interpreter
# with SPARSE_PLANNER_KERNELS=triton), score returns the unscaled pooled dot products
# (Triton pooling + one matmul) and select runs one Triton program per query block that applies
# the scale and the causal rule and picks the blocks: the same lists as the PyTorch path.
def _bt_kernels(q, k, spec) -> bool:
    mode = os.environ.get("SPARSE_PLANNER_KERNELS", "auto")
    if mode == "reference" or spec.mods or q.shape[1] != k.shape[1] or q.dim() != 4:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        return False
    if q.device.type == "cpu":
        if mode != "triton" or q.dtype == torch.bfloat16:
            return False
    elif q.device.type != "cuda":
        return False
    from runtime import triton_kernels as tk
    return (tk.available(q.device) and q.shape[-1] <= tk.MAX_HEAD_DIM
            and _cdiv(k.shape[2], spec.policy.block) <= tk.BLOCK_TOPK_MAX_NKB)


def _bt_score(q, k, mods, spec):
    if _bt_kernels(q, k, spec):
        from runtime import triton_kernels as tk
        b = spec.policy.block
        return torch.matmul(tk.pool_blocks(q, b), tk.pool_blocks(k, b).transpose(-1, -2))
    allowed = _allowed(q, k, mods, spec)
    if q.shape[1] == k.shape[1]:          # one head per group: the softmax cannot change ranks
        return pooled_block_logits(q, k, spec.scale, spec.policy.block, allowed)
    return pooled_block_scores(q, k, spec.scale, spec.policy.block, allowed)


def _bt_select(sc, q, k, spec):
    p = spec.policy
    if _bt_kernels(q, k, spec):
        from runtime import triton_kernels as tk
        return tk.block_topk_select(sc, q.shape[2], k.shape[2], spec.causal, p.block,
                                    scale=spec.scale, topk=p.topk, sink_blocks=p.sink_blocks,
                                    local_blocks=p.local_blocks)
    return select_topk_blocks(sc, q.shape[2], k.shape[2], spec.causal, p.block, topk=p.topk,
                              sink_blocks=p.sink_blocks, local_blocks=p.local_blocks)


# ---------------------------------------------------------------- threshold
def _th_score(q, k, mods, spec):
    return P.threshold_estimate(q, k, spec.scale, spec.mods, mods, spec.causal, spec.policy.block,
                                _allowed(q, k, mods, spec))


def _th_select(sc, q, k, spec):
    p = spec.policy
    return P.select_threshold(sc, q.shape[2], k.shape[2], spec.causal, p.block, gamma=p.gamma,
                              min_budget=p.min_budget, max_budget=p.max_budget or None,
                              sink_blocks=p.sink_blocks, local_blocks=p.local_blocks)


# ---------------------------------------------------------------- vertical_slash
def _vs_score(q, k, mods, spec):
    return P.vslash_estimate(q, k, spec.scale, spec.mods, mods, spec.causal, spec.policy.last_q)


def _vs_select(sc, q, k, spec):
    p = spec.policy
    return P.select_vslash(sc, q.shape[2], k.shape[2], spec.causal, p.block,
                           n_vertical=p.n_vertical, n_slash=p.n_slash,
                           sink_tokens=p.sink_tokens, local_tokens=p.local_tokens)


# ---------------------------------------------------------------- quest
def _q_score(q, k, mods, spec):
    return P.quest_estimate(q, k, spec.policy.page, _allowed(q, k, mods, spec))


def _q_select(sc, q, k, spec):
    p = spec.policy
    return select_topk_blocks(sc, q.shape[2], k.shape[2], spec.causal, p.page,
                              topk=math.ceil(p.budget / p.page), sink_blocks=p.sink_pages,
                              local_blocks=p.local_pages)


# ---------------------------------------------------------------- static
def _sw_select(sc, q, k, spec):
    p = spec.policy
    return window_blocks(q.shape[0], k.shape[1], q.shape[2], k.shape[2], spec.causal, spec.block,
                         sink=p.sink, window=p.window, device=q.device)


def _sw_keep(spec, n_q, n_kv, device):
    return window_keep_fn(n_q, n_kv, spec.causal, sink=spec.policy.sink,
                          window=spec.policy.window, device=device)


def _lf_select(sc, q, k, spec):
    p = spec.policy
    return P.longformer_blocks(q.shape[0], k.shape[1], q.shape[2], k.shape[2], spec.causal,
                               p.block, window=p.window, global_tokens=p.global_tokens,
                               device=q.device)


def _lf_keep(spec, n_q, n_kv, device):
    return P.longformer_keep_fn(n_q, n_kv, spec.causal, window=spec.policy.window,
                                global_tokens=spec.policy.global_tokens, device=device)


def _bb_select(sc, q, k, spec):
    p = spec.policy
    return P.bigbird_blocks(q.shape[0], k.shape[1], q.shape[2], k.shape[2], spec.causal, p.block,
                            window=p.window, global_tokens=p.global_tokens,
                            random_blocks=p.random_blocks, seed=p.seed, device=q.device)


# ---------------------------------------------------------------- auto
def _auto_score(q, k, mods, spec):
    p = spec.policy
    scores, _ = P.auto_estimate(q, k, spec.scale, spec.mods, mods, spec.causal, p.block,
                                _allowed(q, k, mods, spec), p.tau)
    return scores


def _auto_select(sc, q, k, spec):
    p = spec.policy
    return P.select_budget_fraction(sc, q.shape[2], k.shape[2], spec.causal, p.block,
                                    density=p.target_density, sink_blocks=p.sink_blocks,
                                    local_blocks=p.local_blocks)


def _static(select_fn):
    """Static patterns do not depend on the input: build them once per shape and reuse them
    (across calls, layers and heads of the same shape)."""
    cache: dict = {}

    def select(sc, q, k, spec):
        key = (spec.policy, spec.causal, spec.block, q.shape[0], k.shape[1], q.shape[2],
               k.shape[2], str(q.device))
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 64:
                cache.clear()
            hit = cache[key] = select_fn(sc, q, k, spec)
        return hit[0].clone(), hit[1].clone()       # op outputs must not alias each other
    return select


ESTIMATORS: dict[str, Estimator] = {
    "dense": Estimator(),
    "block_topk": Estimator(_bt_score, _grid_shape, _bt_select, select_width=lambda q, k, s: topk_width(
        _cdiv(k.shape[2], s.policy.block), s.policy.topk, s.policy.sink_blocks,
        s.policy.local_blocks)),
    "threshold": Estimator(_th_score, _grid_shape, _th_select),
    "vertical_slash": Estimator(_vs_score, lambda q, k, s: (q.shape[0], k.shape[1], 2, k.shape[2]),
                                _vs_select),
    "quest": Estimator(_q_score, _grid_shape, _q_select, select_width=lambda q, k, s: topk_width(
        _cdiv(k.shape[2], s.policy.page), math.ceil(s.policy.budget / s.policy.page),
        s.policy.sink_pages, s.policy.local_pages)),
    "sink_window": Estimator(select=_static(_sw_select), token_keep=_sw_keep),
    "longformer": Estimator(select=_static(_lf_select), token_keep=_lf_keep),
    "bigbird": Estimator(select=_static(_bb_select)),
    "auto": Estimator(_auto_score, _grid_shape, _auto_select),
    "dsa": Estimator(select=dsa.select),
}


def get(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise KeyError(f"no estimator registered for policy {name!r}; known: "
                       f"{sorted(ESTIMATORS)}") from None
