"""Per-policy estimator (``sparse.score``) and selection (``sparse.select``), one row per policy
class in ``ESTIMATORS`` (looked up from the policy value by ``get``).

Every entry works on any device (the PyTorch code in codegen/select runs on CUDA as the
on-device estimator). Selections are block lists ``(counts [B, Hkv, NQB], indices [B, Hkv,
NQB, NKB])``; ``token_keep`` refines the block lists to token level inside attend when a policy
is defined per token (sink_window, longformer).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from codegen.attention.reference import positions_offset
from codegen.select import policies as P
from codegen.select.reference import (allowed_blocks, block_bounds, group_block_probs,
                                      pooled_block_logits, pooled_block_scores,
                                      select_topk_blocks, structural_blocks, topk_width,
                                      window_blocks, window_keep_fn)
from runtime import dsa, native_dsa, page_summaries
from runtime.kernels import select as sk
from runtime.kernels.launch import MAX_HEAD_DIM, kernels_enabled
from runtime.policies import (DSA, PRESETS, Auto, BigBird, BlockTopK, Dense, Longformer, NativeDSA,
                              Policy, Quest, SinkWindow, Threshold, VerticalSlash)


def _cdiv(a, b):
    return (a + b - 1) // b


@dataclass(frozen=True)
class Estimator:
    score: Optional[Callable] = None          # (q, k, mod_tensors, spec) -> Tensor
    score_shape: Optional[Callable] = None    # (q, k, spec) -> shape of the score tensor
    select: Optional[Callable] = None         # (scores, q, k, spec) -> (counts, indices)
    select_width: Optional[Callable] = None   # (q, k, spec) -> index-list width (default NKB)
    token_keep: Optional[Callable] = None     # (spec, n_q, n_kv, device) -> keep(r0, r1)
    score_dtype: torch.dtype = torch.float32  # what ``score`` returns (native dsa: int32 lists)


def block_of(spec) -> int:
    return int(getattr(spec.policy, "block", spec.block))


def _allowed(q, k, tensors, spec):
    """Blocks with a pair the model attends to; ``tensors``: the site's ``mods`` list (score
    modifiers, then sinks and key validity where the spec has them)."""
    mods, _, valid = spec.split(tensors)
    return allowed_blocks(q.shape, k.shape, spec.mods, mods, spec.causal, block_of(spec),
                          device=q.device, window=spec.window, kv_valid=valid)


def _grid_shape(q, k, spec):
    b = block_of(spec)
    return (q.shape[0], k.shape[1], _cdiv(q.shape[2], b), _cdiv(k.shape[2], b))


# ---------------------------------------------------------------- block_topk
# With one head per group and no mask tensors, on CUDA (or the CPU under Triton's interpreter
# with SPARSE_PLANNER_KERNELS=triton), score returns the unscaled pooled dot products
# (Triton pooling + a tensor-core product at about fp32 accuracy) and select runs one Triton program per query block that applies
# the scale and the causal rule and picks the blocks: the same lists as the PyTorch path.
# With GQA groups of several heads, score is the group's mean block probabilities from the same
# pooling and products (each head's softmax over its allowed blocks, a few tensor operations),
# and select ranks them with the same program.
def _kernels_ok(q, k, spec, *, one_head: bool) -> bool:
    """Whether the Triton estimators may run for this call: no mask tensors, q a 4-d tensor
    the kernels take (``kernels_enabled``, head dim up to ``MAX_HEAD_DIM``), k of q's dtype,
    and (``one_head``) one query head per KV head."""
    if (spec.mods or spec.window or spec.kv_valid
            or (one_head and q.dim() == 4 and q.shape[1] != k.shape[1])):
        return False
    return (k.dtype == q.dtype and kernels_enabled(q) and q.dim() == 4
            and q.shape[-1] <= MAX_HEAD_DIM)


def _bt_kernels(q, k, spec, *, grouped: bool = False) -> bool:
    """The pooled estimator and the selection program in Triton; ``grouped``: also for GQA
    groups of several query heads (block_topk's group path), else one head per group."""
    return (_kernels_ok(q, k, spec, one_head=not grouped)
            and _cdiv(k.shape[2], block_of(spec)) <= sk.BLOCK_TOPK_MAX_NKB)


def _group_block_scores(q, k, spec, block: int) -> torch.Tensor:
    """``pooled_block_scores`` from the Triton pooling and pooled products: each query head's
    softmax over the key blocks its query block may see, averaged over the heads of a group;
    fp32 [B, Hkv, NQB, NKB], -inf where no pair is allowed."""
    B, Hkv, G = q.shape[0], k.shape[1], q.shape[1] // k.shape[1]
    dots = sk.pooled_dots(sk.pool_blocks(q, block),
                          sk.pool_blocks(k, block).repeat_interleave(G, dim=1), n_q=q.shape[2],
                          n_kv=k.shape[2], causal=spec.causal, block=block)
    return group_block_probs(dots.mul_(spec.scale).view(B, Hkv, G, *dots.shape[2:]),
                             _hidden_blocks(q.shape[2], k.shape[2], spec.causal, block, q.device))


@functools.lru_cache(maxsize=64)
def _hidden_blocks(n_q: int, n_kv: int, causal, block: int, device) -> torch.Tensor:
    """bool [NQB, NKB]: key blocks no query of a query block may see (built once per shape;
    not to be written to)."""
    return ~structural_blocks(n_q, n_kv, causal, block, device=device)


def _lines_kernels(q, k, spec, last_q: int) -> bool:
    """The line statistics of the last ``last_q`` rows in Triton (``last_rows_lines``)."""
    if spec.causal not in ("lower_right", "upper_left") or not _kernels_ok(q, k, spec,
                                                                          one_head=False):
        return False
    n_q, n_kv = q.shape[2], k.shape[2]
    rows = min(last_q, n_q)
    return rows <= sk.LINES_MAX_ROWS and n_q - rows + positions_offset(spec.causal, n_q, n_kv) >= 0


def _lines(q, k, spec, last_q: int) -> torch.Tensor:
    """vslash_estimate's [B, Hkv, 2, Nkv] statistics, in Triton where it can run."""
    if _lines_kernels(q, k, spec, last_q):
        return sk.last_rows_lines(q, k, scale=spec.scale, causal=spec.causal, last_q=last_q)
    return None


def _bt_score(q, k, mods, spec):
    if _bt_kernels(q, k, spec):
        b = spec.policy.block
        return sk.pooled_dots(sk.pool_blocks(q, b), sk.pool_blocks(k, b), n_q=q.shape[2],
                              n_kv=k.shape[2], causal=spec.causal, block=b)
    if _bt_kernels(q, k, spec, grouped=True):     # GQA: the group's mean block probabilities
        return _group_block_scores(q, k, spec, spec.policy.block)
    allowed = _allowed(q, k, mods, spec)
    if q.shape[1] == k.shape[1]:          # one head per group: the softmax cannot change ranks
        return pooled_block_logits(q, k, spec.scale, spec.policy.block, allowed)
    return pooled_block_scores(q, k, spec.scale, spec.policy.block, allowed)


def _bt_select(sc, q, k, spec):
    p = spec.policy
    if _bt_kernels(q, k, spec, grouped=True):
        one_head = q.shape[1] == k.shape[1]       # one head: unscaled logits; groups: scores
        return sk.block_topk_select(sc, q.shape[2], k.shape[2], spec.causal, p.block,
                                    scale=spec.scale if one_head else 1.0, topk=p.topk,
                                    sink_blocks=p.sink_blocks, local_blocks=p.local_blocks)
    return select_topk_blocks(sc, q.shape[2], k.shape[2], spec.causal, p.block, topk=p.topk,
                              sink_blocks=p.sink_blocks, local_blocks=p.local_blocks)


# ---------------------------------------------------------------- threshold
def _th_score(q, k, mods, spec):
    b = spec.policy.block
    lines = _lines(q, k, spec, b)
    col = None if lines is None else lines[:, :, 0] / (q.shape[1] // k.shape[1] * min(b, q.shape[2]))
    # the pooled part (a) by block_topk's kernels, for one head or a group per KV head
    pooled = _group_block_scores(q, k, spec, b) if _bt_kernels(q, k, spec, grouped=True) else None
    return P.threshold_estimate(q, k, spec.scale, spec.mods, spec.split(mods)[0], spec.causal, b,
                                _allowed(q, k, mods, spec), col=col, p_pool=pooled)


def _th_select(sc, q, k, spec):
    p = spec.policy
    if _bt_kernels(q, k, spec, grouped=True):
        return sk.threshold_select(sc, q.shape[2], k.shape[2], spec.causal, p.block,
                                   gamma=p.gamma, min_budget=p.min_budget,
                                   max_budget=p.max_budget or None, sink_blocks=p.sink_blocks,
                                   local_blocks=p.local_blocks)
    return P.select_threshold(sc, q.shape[2], k.shape[2], spec.causal, p.block, gamma=p.gamma,
                              min_budget=p.min_budget, max_budget=p.max_budget or None,
                              sink_blocks=p.sink_blocks, local_blocks=p.local_blocks)


# ---------------------------------------------------------------- vertical_slash
def _vs_score(q, k, mods, spec):
    lines = _lines(q, k, spec, spec.policy.last_q)
    if lines is not None:
        return lines
    return P.vslash_estimate(q, k, spec.scale, spec.mods, spec.split(mods)[0], spec.causal,
                            spec.policy.last_q)


def _vs_select(sc, q, k, spec):
    p = spec.policy
    return P.select_vslash(sc, q.shape[2], k.shape[2], spec.causal, p.block,
                           n_vertical=p.n_vertical, n_slash=p.n_slash,
                           sink_tokens=p.sink_tokens, local_tokens=p.local_tokens)


# ---------------------------------------------------------------- quest
# Without mask tensors on the device: page min/max and the bounds in Triton (two tensor-core
# products per tile of pages, the max over each query block's rows and the group's heads in
# registers), the selection by the block_topk selection program.
def _q_kernels(q, k, spec) -> bool:
    page = spec.policy.page
    return (_kernels_ok(q, k, spec, one_head=False) and sk.quest_page_ok(page)
            and _cdiv(k.shape[2], page) <= sk.BLOCK_TOPK_MAX_NKB)


def _q_score(q, k, mods, spec):
    if _q_kernels(q, k, spec):
        page = spec.policy.page
        return sk.quest_page_bounds(q, k, page=page, causal=spec.causal,
                                    summaries=page_summaries.lookup(k, page))
    return P.quest_estimate(q, k, spec.policy.page, _allowed(q, k, mods, spec))


def _q_select(sc, q, k, spec):
    p = spec.policy
    topk = math.ceil(p.budget / p.page)
    # the selection program's counting-pass threshold beats torch.topk at every width measured
    # (benchmarks/results/estimators_h100.md), decode's few wide rows included
    if _q_kernels(q, k, spec):
        return sk.block_topk_select(sc, q.shape[2], k.shape[2], spec.causal, p.page, scale=1.0,
                                    topk=topk, sink_blocks=p.sink_pages,
                                    local_blocks=p.local_pages)
    return select_topk_blocks(sc, q.shape[2], k.shape[2], spec.causal, p.page, topk=topk,
                              sink_blocks=p.sink_pages, local_blocks=p.local_pages)


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
# No mask tensors and a causal rule, on the device: Triton pooling (k's blocks pooled by the
# line statistics' first pass over k where it can), the line statistics and the per-head
# criterion (on the last query block's pooled logits) in Triton, then one pass that writes each
# head's block scores (pooled logits for query-aware heads, line mass for the others; empty
# causal tiles skipped), and a selection program per query block with its own budget. GQA
# groups: the group's mean block probabilities (block_topk's group path) are the query-aware
# scores, and the criterion reads their last row. Same rankings as the PyTorch path.
def _auto_kernels(q, k, spec, *, grouped: bool = False) -> bool:
    return (_bt_kernels(q, k, spec, grouped=grouped) and spec.causal is not None
            and _lines_kernels(q, k, spec, spec.policy.block))


def _auto_score(q, k, mods, spec):
    p = spec.policy
    b, n_q = p.block, q.shape[2]
    if _auto_kernels(q, k, spec):
        pq = sk.pool_blocks(q, b)
        lines, pk = sk.last_rows_lines(q, k, scale=spec.scale, causal=spec.causal, last_q=b,
                                       pool_block=b)
        last = torch.matmul(pq[:, :, -1:], pk.transpose(-1, -2))      # the last query block
        aware = sk.auto_criterion(last, lines, n_q=n_q, causal=spec.causal, block=b,
                                  scale=spec.scale, tau=p.tau, as_int32=True)
        return sk.auto_block_scores(pq, pk, lines, aware, n_q=n_q, causal=spec.causal,
                                    block=b, scale=spec.scale)
    if _auto_kernels(q, k, spec, grouped=True):
        pool = _group_block_scores(q, k, spec, b)                 # -inf where hidden
        lines = sk.last_rows_lines(q, k, scale=spec.scale, causal=spec.causal, last_q=b)
        # the criterion's softmax of log(mean probabilities) gives the probabilities back
        # (the kernel reads only the causally allowed blocks, where they are >= 0)
        aware = sk.auto_criterion(pool[:, :, -1:].log(), lines, n_q=n_q, causal=spec.causal,
                                  block=b, scale=1.0, tau=p.tau, as_int32=True)
        return sk.auto_block_scores(None, None, lines, aware, n_q=n_q, causal=spec.causal,
                                    block=b, scale=1.0, scores=pool)
    scores, _ = P.auto_estimate(q, k, spec.scale, spec.mods, spec.split(mods)[0], spec.causal, p.block,
                                _allowed(q, k, mods, spec), p.tau)
    return scores


def _budget_max(n_q: int, n_kv: int, causal, block: int, density: float) -> int:
    """The largest per-query-block budget ``ceil(density * allowed blocks)`` (at least 1), from
    the shapes alone (it also sizes the select op's fake outputs): the last query block allows
    the most blocks."""
    nkb = _cdiv(n_kv, block)
    allowed = nkb
    if causal is not None:
        allowed = min(nkb, max((n_q - 1 + positions_offset(causal, n_q, n_kv)) // block + 1, 0))
    return max(math.ceil(density * allowed), 1)


@functools.lru_cache(maxsize=64)
def _budgets(n_q: int, n_kv: int, causal, block: int, density: float, device):
    """Per query block ``ceil(density * allowed blocks)`` (select_budget_fraction's rule) on
    ``device``, and its maximum; cached per shape (no host work or copy per call)."""
    nkb = _cdiv(n_kv, block)
    _, last = block_bounds(n_q, n_kv, causal, block)
    n_allowed = torch.clamp(last // block + 1, 0, nkb).to(torch.float64)
    budget = torch.ceil(density * n_allowed).to(torch.int32)
    return budget.to(device), _budget_max(n_q, n_kv, causal, block, density)


def _auto_width(q, k, spec) -> int:
    """``auto``'s list width: the largest budget plus the forced blocks (no row keeps more)."""
    p = spec.policy
    return topk_width(_cdiv(k.shape[2], p.block),
                      _budget_max(q.shape[2], k.shape[2], spec.causal, p.block,
                                  p.target_density), p.sink_blocks, p.local_blocks)


def _auto_select(sc, q, k, spec):
    p = spec.policy
    if _auto_kernels(q, k, spec, grouped=True):
        n_q, n_kv, b = q.shape[2], k.shape[2], p.block
        budget, budget_max = _budgets(n_q, n_kv, spec.causal, b, p.target_density, sc.device)
        return sk.block_topk_select(sc, n_q, n_kv, spec.causal, b, scale=1.0, topk=budget_max,
                                    sink_blocks=p.sink_blocks, local_blocks=p.local_blocks,
                                    budget=budget, budget_max=budget_max)
    counts, idx = P.select_budget_fraction(sc, q.shape[2], k.shape[2], spec.causal, p.block,
                                           density=p.target_density,
                                           sink_blocks=p.sink_blocks, local_blocks=p.local_blocks)
    return counts, idx[..., :_auto_width(q, k, spec)].contiguous()


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


def _empty_safe(est: Estimator) -> Estimator:
    """The same estimator, answering a call without queries or keys (Nq == 0 or Nkv == 0)
    without running it: zero scores of ``score_shape`` and empty block lists of the shapes
    ``sparse.select``'s fake gives (counts [B, Hkv, NQB], indices [B, Hkv, NQB, width]);
    attention then returns what eager does (an empty output for Nq == 0)."""
    def empty(q, k) -> bool:
        return q.shape[2] == 0 or k.shape[2] == 0

    def score(q, k, mods, spec):
        if empty(q, k):
            return q.new_zeros(est.score_shape(q, k, spec), dtype=torch.float32)
        return est.score(q, k, mods, spec)

    def select(sc, q, k, spec):
        if empty(q, k):
            b = block_of(spec)
            nqb = _cdiv(q.shape[2], b)
            width = (est.select_width(q, k, spec) if est.select_width is not None
                     else _cdiv(k.shape[2], b))
            counts = torch.zeros((q.shape[0], k.shape[1], nqb), dtype=torch.int32,
                                 device=q.device)
            return counts, torch.full((*counts.shape, width), -1, dtype=torch.int32,
                                      device=q.device)
        return est.select(sc, q, k, spec)
    return Estimator(score if est.score is not None else None, est.score_shape,
                     select if est.select is not None else None, est.select_width,
                     est.token_keep, est.score_dtype)


#: the estimator of each policy class, one row each (``register`` adds one for a new class)
ESTIMATORS: dict[type, Estimator] = {
    Dense: Estimator(),
    BlockTopK: Estimator(_bt_score, _grid_shape, _bt_select, select_width=lambda q, k, s: topk_width(
        _cdiv(k.shape[2], s.policy.block), s.policy.topk, s.policy.sink_blocks,
        s.policy.local_blocks)),
    Threshold: Estimator(_th_score, _grid_shape, _th_select),
    VerticalSlash: Estimator(_vs_score, lambda q, k, s: (q.shape[0], k.shape[1], 2, k.shape[2]),
                             _vs_select),
    Quest: Estimator(_q_score, _grid_shape, _q_select, select_width=lambda q, k, s: topk_width(
        _cdiv(k.shape[2], s.policy.page), math.ceil(s.policy.budget / s.policy.page),
        s.policy.sink_pages, s.policy.local_pages)),
    SinkWindow: Estimator(select=_static(_sw_select), token_keep=_sw_keep),
    Longformer: Estimator(select=_static(_lf_select), token_keep=_lf_keep),
    BigBird: Estimator(select=_static(_bb_select)),
    Auto: Estimator(_auto_score, _grid_shape, _auto_select, select_width=_auto_width),
    DSA: Estimator(select=dsa.select),
    NativeDSA: Estimator(native_dsa.score, native_dsa.score_shape, native_dsa.select,
                         score_dtype=torch.int32),
}


def _row(cls: type, est: Estimator) -> Estimator:
    """A table row as the ops call it: block selections answer calls without queries or keys
    (``_empty_safe``); token lists (the indexer's) handle those themselves."""
    return _empty_safe(est) if cls.attend_kind == "block" else est


ESTIMATORS.update({cls: _row(cls, est) for cls, est in ESTIMATORS.items()})


def register(cls: type, est: Estimator) -> None:
    """Add (or replace) the row of a policy class: what a new policy needs besides its class."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise TypeError(f"estimators are registered per Policy subclass, got {cls!r}")
    ESTIMATORS[cls] = _row(cls, est)


def get(policy) -> Estimator:
    """The estimator of a policy value (or its class, or a preset name); a subclass without a
    row of its own uses its nearest base class's."""
    cls = PRESETS.get(policy) if isinstance(policy, str) else (
        policy if isinstance(policy, type) else type(policy))
    for c in getattr(cls, "__mro__", ()):
        if c in ESTIMATORS:
            return ESTIMATORS[c]
    raise KeyError(f"no estimator registered for policy {policy!r}; known: "
                   f"{sorted(c.name for c in ESTIMATORS)}")
