"""Launchers of the selection-family kernels (``codegen/select``): the estimators' block
scores and the block selection, without ``[Nq, Nkv]`` intermediates.

* block_topk: ``pool_blocks`` (mean-pooled blocks), ``pooled_dots`` (pooled q x pooled k),
  ``block_topk_select`` (top-k blocks with forced sink / local blocks, or per-row budgets),
  ``threshold_select`` (cumulative-mass threshold);
* MInference / auto: ``last_rows_lines`` (vertical and slash statistics of the last rows),
  ``line_prefix_sums``, ``auto_criterion``, ``auto_block_scores``;
* Quest: ``quest_page_summaries`` (page min / max), ``quest_page_bounds``.

Launch variants for sweeps are a ``SelectSchedule`` passed explicitly; the default is what the
library runs. Same values as the PyTorch estimators of ``codegen.select.policies``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch

from codegen.attention.reference import positions_offset
from codegen.common import next_pow2
from codegen.emit import emit
from codegen.select.block_topk_kernel import BlockTopkSpec
from codegen.select.lines_kernel import LinesSpec
from codegen.select.quest_kernel import QuestSpec
from codegen.select.reference import topk_width
from runtime.cache import KERNELS
from runtime.kernels.launch import MAX_HEAD_DIM, device_key, sm_count, workspace
from runtime.loader import load

BLOCK_TOPK_MAX_NKB = 16384     # key blocks one selection program keeps in registers
# Widest rows a partial sort in the selection program is the fastest way to select from (H100,
# benchmarks/results/estimators_h100.md): 0.26 ms vs 0.64 ms for rounds of max at 1024 blocks;
# at 4096 (Quest's pages at 65536 tokens) it takes 11.5 ms and torch.topk 8.3.
SORTED_SELECT_MAX_NKB = 1024


@dataclasses.dataclass(frozen=True)
class SelectSchedule:
    """Launch variants of the selection-family kernels, for sweeps and tests; the default
    (every field None or its default) is what the library runs.

    ``block_topk_select``: ``bisect`` finds each row's threshold by 32 counting passes (same
    selection, ties included; the default unless ``sorted_select`` is given: H100, 65536
    tokens, benchmarks/results/estimators_h100.md: 1024-wide rows 0.21 ms for top-32, sort
    0.26, and 0.23 with auto's budgets, sort 0.29; Quest's 4096-wide rows 4.1 ms, sort 11.5,
    torch.topk 8.3); ``sorted_select`` one partial sort (True) or rounds of max (False);
    ``sort32`` the sort on fp32 keys with ties by a running count (else int64 keys);
    ``rows_per_program`` query blocks per program. ``pool_blocks``: ``rows`` loaded per step (a
    power of two; default by D), ``blocks_per_program``. ``pooled_dots``: ``precision`` of
    ``tl.dot`` (default ``"tf32x3"``: three TF32 products, about fp32 accuracy; ``"ieee"``: fp32
    FMA). ``last_rows_lines``: ``tiles_per_program``. ``quest_page_bounds``: ``pages_per_tile``.
    ``num_warps``: of the launch (default: each launcher's own)."""
    num_warps: Optional[int] = None
    bisect: Optional[bool] = None
    sorted_select: Optional[bool] = None
    sort32: bool = True
    rows_per_program: int = 1
    rows: Optional[int] = None
    blocks_per_program: int = 1
    precision: Optional[str] = None
    tiles_per_program: Optional[int] = None
    pages_per_tile: int = 64


DEFAULT_SCHEDULE = SelectSchedule()


@functools.lru_cache(maxsize=None)
def has_tl_topk() -> bool:
    """Whether this Triton has ``tl.topk`` (a partial bitonic sort; Triton 3.6 has it)."""
    import triton.language as tl
    return hasattr(tl, "topk")


def _block_topk_module(device):
    return KERNELS.get(("block_topk", device_key(device)), lambda: load(emit(BlockTopkSpec())))


def pool_blocks(x: torch.Tensor, block: int, *,
                schedule: SelectSchedule = DEFAULT_SCHEDULE) -> torch.Tensor:
    """Mean of each block of ``block`` rows of ``x [B, H, N, D]`` (the last block may be
    short): fp32 ``[B, H, ceil(N / block), D]``. ``schedule``: launch variants (sweeps)."""
    B, H, N, D = x.shape
    nb = -(-N // block)
    out = torch.empty((B, H, nb, D), device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    rows = schedule.rows
    if rows is None:       # H100 sweep (benchmarks/results/estimators_h100.md): 32 rows, 2 warps
        rows = min(next_pow2(block), 64 if D <= 64 else 32)
    d_p = next_pow2(max(D, 16))
    bpp = max(1, int(schedule.blocks_per_program))
    _block_topk_module(x.device).pool_rows[(-(-nb // bpp), B * H)](
        x, out, *x.stride(), H, N, nb, block, D, ROWS=rows, D_P=d_p, BPP=bpp,
        num_warps=schedule.num_warps or 2)
    return out


def pooled_dots(pq: torch.Tensor, pk: torch.Tensor, *, n_q: int, n_kv: int,
                causal: Optional[str], block: int,
                schedule: SelectSchedule = DEFAULT_SCHEDULE) -> torch.Tensor:
    """``pq @ pk^T`` per head for pooled fp32 ``pq [B, H, NQB, D]`` and ``pk [B, H, NKB, D]``
    (``pool_blocks`` outputs): fp32 ``[B, H, NQB, NKB]``. With a causal rule (``block``-row
    blocks of ``n_q`` queries and ``n_kv`` keys), tiles holding no allowed pair are -inf.
    ``schedule.precision``: ``tl.dot``'s input precision (sweeps)."""
    B, H, nqb, D = pq.shape
    nkb = pk.shape[2]
    if (pk.shape[:2] != (B, H) or pk.shape[3] != D or pq.dtype != torch.float32
            or pk.dtype != torch.float32):
        raise ValueError(f"pooled_dots: pooled q {tuple(pq.shape)} {pq.dtype} and k "
                         f"{tuple(pk.shape)} {pk.dtype} must be fp32 with matching B, H, D")
    out = torch.empty((B, H, nqb, nkb), device=pq.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    off = 0 if causal is None else positions_offset(causal, n_q, n_kv)
    bm = bn = 64 if D <= 128 else 32
    _block_topk_module(pq.device).pooled_dots[(-(-nqb // bm), -(-nkb // bn), B * H)](
        pq.contiguous(), pk.contiguous(), out, nqb, nkb, n_q, off, block, D, BM=bm, BN=bn,
        D_P=next_pow2(max(D, 16)), CAUSAL=causal is not None, PREC=schedule.precision or "tf32x3",
        num_warps=4)
    return out


def block_topk_select(dots: torch.Tensor, n_q: int, n_kv: int, causal: Optional[str], block: int,
                      *, scale: float, topk: int, sink_blocks: int, local_blocks: int,
                      budget: Optional[torch.Tensor] = None, budget_max: int = 0,
                      schedule: SelectSchedule = DEFAULT_SCHEDULE):
    """``select_topk_blocks`` on the logits ``scale * dots`` (``dots`` fp32 ``[B, H, NQB, NKB]``
    unscaled pooled dot products), with the causal rule (``"lower_right"`` / ``"upper_left"`` /
    None) applied by position inside the kernel. Returns ``(counts int32 [B, H, NQB], indices
    int32 [B, H, NQB, W])``, W = ``topk_width(NKB, topk, sink_blocks, local_blocks)``.

    ``budget`` (int32 ``[NQB]``): instead of ``topk``, query block ``i`` keeps ``budget[i]``
    blocks in all, its forced blocks included (``select_budget_fraction``), and ``budget_max``
    >= ``max(budget)`` sizes the partial sort; ``topk`` then only sets the lists' width.

    ``schedule``: the selection's variant (``SelectSchedule``: counting passes by default, a
    partial sort or rounds of max) and launch knobs, for sweeps."""
    B, H, nqb, nkb = dots.shape
    if budget is not None:
        if budget.shape != (nqb,) or budget.dtype != torch.int32 or budget.device != dots.device:
            raise ValueError(f"block_topk_select: budget must be int32 [{nqb}] on {dots.device}, "
                             f"got {budget.dtype} {tuple(budget.shape)} on {budget.device}")
        if budget_max < 1:
            raise ValueError(f"block_topk_select: budget_max must be >= 1 (the largest budget), "
                             f"got {budget_max}")
    width = topk_width(nkb, topk, sink_blocks, local_blocks)
    counts = torch.empty((B, H, nqb), device=dots.device, dtype=torch.int32)
    idx = torch.empty((B, H, nqb, width), device=dots.device, dtype=torch.int32)
    if counts.numel() == 0:
        return counts, idx
    dots = dots.contiguous()
    off = positions_offset(causal, n_q, n_kv)
    nkb_p = next_pow2(max(nkb, 16))
    num_warps, sorted_select, bisect = schedule.num_warps, schedule.sorted_select, schedule.bisect
    if bisect is None:
        bisect = sorted_select is None
    if sorted_select is None:  # one partial sort beats topk rounds of max up to this width
        sorted_select = has_tl_topk() and nkb_p <= SORTED_SELECT_MAX_NKB
    if bisect:      # H100 sweep (benchmarks/results/estimators_h100.md): 1 warp, 4 from 2048
        warps = num_warps or (1 if nkb_p <= 1024 else 4)
    else:
        warps = num_warps or ((1 if sorted_select else 4) if nkb_p <= 1024
                              else (8 if nkb_p <= 4096 else 16))
    rpp = max(1, int(schedule.rows_per_program))
    _block_topk_module(dots.device).block_topk_select[(-(-nqb // rpp), B * H)](
        dots, counts, idx, counts if budget is None else budget, nqb, nkb, n_q, off, block,
        float(scale), min(topk, nkb), sink_blocks, local_blocks, width,
        CAUSAL=causal is not None, NKB_P=nkb_p, W_P=next_pow2(max(width, 16)),
        SORTED=bool(sorted_select and has_tl_topk()),
        K_P=min(nkb_p, max(16, next_pow2(min(topk if budget is None else budget_max, nkb)))),
        BUDGET=budget is not None, RPP=rpp, SORT32=bool(schedule.sort32), BISECT=bool(bisect),
        num_warps=warps)
    return counts, idx


def threshold_select(est: torch.Tensor, n_q: int, n_kv: int, causal: Optional[str], block: int,
                     *, gamma: float, min_budget: int, max_budget: Optional[int],
                     sink_blocks: int, local_blocks: int):
    """``codegen.select.policies.select_threshold`` in one launch: fp32 estimates ``est
    [B, H, NQB, NKB]`` (>= 0, -inf where not allowed) -> ``(counts int32 [B, H, NQB], indices
    int32 [B, H, NQB, NKB])``, the causal rule (``"lower_right"`` / ``"upper_left"`` / None)
    applied by position inside the kernel."""
    B, H, nqb, nkb = est.shape
    counts = torch.empty((B, H, nqb), device=est.device, dtype=torch.int32)
    idx = torch.empty((B, H, nqb, nkb), device=est.device, dtype=torch.int32)
    if counts.numel() == 0:
        return counts, idx
    if est.dtype != torch.float32:
        raise ValueError(f"threshold_select: estimates must be fp32, got {est.dtype}")
    nkb_p = next_pow2(max(nkb, 16))
    _block_topk_module(est.device).threshold_select[(nqb, B * H)](
        est.contiguous(), counts, idx, nqb, nkb, n_q, positions_offset(causal, n_q, n_kv), block,
        float(gamma), int(min_budget), -1 if max_budget is None else int(max_budget),
        sink_blocks, local_blocks, nkb, CAUSAL=causal is not None, NKB_P=nkb_p,
        W_P=nkb_p, num_warps=1 if nkb_p <= 1024 else 4)
    return counts, idx


LINES_MAX_ROWS = 128      # last rows one line-statistics program holds (a [rows, 2 * rows] tile)


def _lines_module(device):
    return KERNELS.get(("lines", device_key(device)), lambda: load(emit(LinesSpec())))


def last_rows_lines(q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: str,
                    last_q: int, pool_block: Optional[int] = None,
                    schedule: SelectSchedule = DEFAULT_SCHEDULE):
    """MInference's line statistics without the ``[L, Nkv]`` probabilities: the softmax
    attention of the last ``min(last_q, Nq)`` query rows summed per key (vertical) and per
    diagonal offset ``pos - key`` (slash), summed over the heads of each GQA group: fp32
    ``[B, Hkv, 2, Nkv]``, as ``codegen.select.policies.vslash_estimate`` without modifiers.
    ``causal``: ``"lower_right"`` or ``"upper_left"``.

    ``pool_block``: also return ``pool_blocks(k, pool_block)`` (``(lines, pooled_k)``), made
    by the first pass over the keys when it can (one query head per KV head, the rows' tile is
    one block), else by ``pool_blocks``. ``schedule.tiles_per_program``: sweeps."""
    if causal not in ("lower_right", "upper_left"):
        raise ValueError(f"last_rows_lines: causal must be 'lower_right' or 'upper_left', "
                         f"got {causal!r}")
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or Hq % Hkv or k.shape[3] != D or k.dtype != q.dtype:
        raise ValueError(f"last_rows_lines: q {tuple(q.shape)} {q.dtype} and k "
                         f"{tuple(k.shape)} {k.dtype} do not match")
    L = min(int(last_q), Nq)
    r0 = Nq - L
    p0 = r0 + positions_offset(causal, Nq, Nkv)
    if L < 1 or L > LINES_MAX_ROWS or p0 < 0 or D > MAX_HEAD_DIM:
        raise ValueError(f"last_rows_lines: needs 1 <= rows <= {LINES_MAX_ROWS}, a first row "
                         f"at position >= 0 and D <= {MAX_HEAD_DIM}; got rows {L}, first "
                         f"position {p0}, D {D}")
    l_p = max(16, next_pow2(L))
    T = -(-(p0 + 1) // l_p) + 1
    dev = q.device
    lse = torch.empty((B * Hq, l_p), device=dev, dtype=torch.float32)
    out = torch.zeros((B, Hq, 2, Nkv), device=dev, dtype=torch.float32)
    fuse = pool_block is not None and pool_block == l_p and Hq == Hkv
    nkb = -(-Nkv // l_p)
    t0 = nkb if fuse else -(-min(Nkv, p0 + L) // l_p)    # first pass: blocks of l_p keys
    pm = workspace((B * Hq, t0, l_p), dev)
    pl = workspace((B * Hq, t0, l_p), dev)
    pk = torch.empty((B, Hkv, nkb, D), device=dev, dtype=torch.float32) if fuse else out
    mod = _lines_module(dev)
    args = (*q.stride(), *k.stride(), Hq, Hq // Hkv, Nkv, r0, L, p0)
    tiles_per_program = schedule.tiles_per_program
    if tiles_per_program is None:   # H100 sweep at 65536 keys (estimators_h100.md): 16 tiles
        tiles_per_program = 16 if T >= 512 else 8
    tpp = max(1, int(tiles_per_program))
    meta = dict(D=D, D_P=next_pow2(max(D, 16)), L_P=l_p, IEEE=q.dtype == torch.float32, TPP=tpp,
                num_warps=4 if l_p <= 64 else 8)
    mod.last_rows_lines[(-(-t0 // tpp), B * Hq)](q, k, pm, pl, out, pk, *args, t0, nkb,
                                                 float(scale), PHASE=0, POOL=fuse, **meta)
    mod.lines_lse[(B * Hq, l_p // 16)](pm, pl, lse, t0, L_P=l_p, RB=16, TCH=128, num_warps=4)
    mod.last_rows_lines[(-(-T // tpp), B * Hq)](q, k, lse, pl, out, pk, *args, T, nkb,
                                                float(scale), PHASE=1, POOL=False, **meta)
    lines = out if Hq == Hkv else out.reshape(B, Hkv, Hq // Hkv, 2, Nkv).sum(2)
    if pool_block is None:
        return lines
    return lines, (pk if fuse else pool_blocks(k, pool_block))


def line_prefix_sums(lines: torch.Tensor) -> torch.Tensor:
    """``pad(lines.cumsum(-1), (1, 0))`` in one launch: fp32 ``lines [..., N]`` ->
    ``[..., N + 1]``, a leading 0 then the running sums."""
    if lines.dtype != torch.float32:
        raise ValueError(f"line_prefix_sums: lines must be fp32, got {lines.dtype}")
    n = lines.shape[-1]
    rows = math.prod(lines.shape[:-1])
    x = lines.contiguous().reshape(rows, n)
    out = torch.empty((rows, n + 1), device=lines.device, dtype=torch.float32)
    if rows:
        ch = min(4096, max(16, next_pow2(n)))
        _lines_module(lines.device).prefix_rows[(-(-n // ch) if n else 1, x.shape[0])](
            x, out, n, CH=ch, num_warps=4)
    return out.reshape(*lines.shape[:-1], n + 1)


def auto_block_scores(pq: Optional[torch.Tensor], pk: Optional[torch.Tensor],
                      lines: torch.Tensor, aware: torch.Tensor, *, n_q: int, causal: str,
                      block: int, scale: float, scores: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """The ``auto`` policy's block scores (causal) in one pass: for the query-aware heads
    (``aware`` bool ``[B, H]``) the pooled logits ``scale * pq . pk`` (pooled fp32
    ``[B, H, NQB, D]`` / ``[B, H, NKB, D]``; one head per group) or, given ``scores`` (fp32
    ``[B, H, NQB, NKB]``, e.g. a GQA group's mean block probabilities), those scores; for the
    other heads the line mass of ``lines`` (``[B, H, 2, Nkv]``, from ``last_rows_lines``)
    through each key block; fp32 ``[B, H, NQB, NKB]``, -inf where the causal rule allows no
    pair."""
    n_kv = lines.shape[-1]
    if scores is not None:
        B, H, nqb, nkb = scores.shape
        D = 16
        a, b_ = scores.contiguous(), scores
    else:
        B, H, nqb, D = pq.shape
        nkb = pk.shape[2]
        if pk.shape[:2] != (B, H) or pk.shape[3] != D:
            raise ValueError(f"auto_block_scores: pooled q {tuple(pq.shape)} and pooled k "
                             f"{tuple(pk.shape)} do not match")
        a, b_ = pq.contiguous(), pk.contiguous()
    if lines.shape != (B, H, 2, n_kv) or aware.shape != (B, H):
        raise ValueError(f"auto_block_scores: scores [{B}, {H}, {nqb}, {nkb}], lines "
                         f"{tuple(lines.shape)} and aware {tuple(aware.shape)} do not match")
    out = torch.empty((B, H, nqb, nkb), device=lines.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    pre = line_prefix_sums(lines)                            # [B, H, 2, Nkv + 1]
    if aware.dtype != torch.int32:
        aware = aware.to(torch.int32)
    bm = bn = 64 if D <= 128 else 32
    _lines_module(lines.device).auto_block_scores[(-(-nqb // bm), -(-nkb // bn), B * H)](
        a, b_, pre, aware.contiguous(), out, nqb, nkb, n_q, n_kv,
        positions_offset(causal, n_q, n_kv), block, D, float(scale), BM=bm, BN=bn,
        D_P=next_pow2(max(D, 16)), PREC="tf32x3", FROM_SCORES=scores is not None, num_warps=4)
    return out


QUEST_MAX_PAGE = 64       # pages (powers of two) whose query blocks one bounds program packs


def _quest_module(device):
    return KERNELS.get(("quest", device_key(device)), lambda: load(emit(QuestSpec())))


def quest_page_bounds(q: torch.Tensor, k: torch.Tensor, *, page: int, causal: Optional[str],
                      summaries: Optional[tuple] = None,
                      schedule: SelectSchedule = DEFAULT_SCHEDULE) -> torch.Tensor:
    """Quest's page bounds without a ``[Nq, NP]`` intermediate: per query block of ``page``
    rows and page of ``page`` keys, the largest over the block's rows and the group's heads of
    ``sum_d max(q_d max_d, q_d min_d)``; fp32 ``[B, Hkv, NQB, NP]``, -inf where the causal rule
    (``"lower_right"`` / ``"upper_left"`` / None) allows no pair. ``page``: a power of two up
    to ``QUEST_MAX_PAGE``. Same values as ``codegen.select.policies.quest_estimate``.
    ``summaries``: ``(max, min)`` of k's pages kept from earlier calls (``quest_page_summaries``
    layout, at least NP pages), instead of reading all of k again. ``schedule``:
    ``pages_per_tile`` and ``num_warps`` (sweeps)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or Hq % Hkv or k.shape[3] != D or k.dtype != q.dtype:
        raise ValueError(f"quest_page_bounds: q {tuple(q.shape)} {q.dtype} and k "
                         f"{tuple(k.shape)} {k.dtype} do not match")
    _check_page("quest_page_bounds", page, D)
    n_p, nqb = -(-Nkv // page), -(-Nq // page)
    d_p = next_pow2(max(D, 16))
    dev = q.device
    out = workspace((B, Hkv, nqb, n_p), dev)
    if out.numel() == 0:
        return out
    if summaries is None:
        mx = torch.empty((B * Hkv, n_p, d_p), device=dev, dtype=k.dtype)
        mn = torch.empty_like(mx)
        quest_page_summaries(k, page, mx, mn, first_page=0)
    else:
        mx, mn = summaries
        if (mx.shape[0] != B * Hkv or mx.shape[1] < n_p or mx.shape[2] != d_p
                or mn.shape != mx.shape or mx.dtype != k.dtype or not mx.is_contiguous()
                or not mn.is_contiguous()):
            raise ValueError(f"quest_page_bounds: summaries must be contiguous {k.dtype} "
                             f"[{B * Hkv}, >= {n_p}, {d_p}] pairs, got {tuple(mx.shape)} "
                             f"{mx.dtype} / {tuple(mn.shape)}")
    sms = sm_count(dev)
    pages_per_tile = schedule.pages_per_tile
    qb = max(1, 64 // page)
    off = 0 if causal is None else positions_offset(causal, Nq, Nkv)
    tiles = -(-nqb // qb) * B * Hkv
    # few query tiles (decode): split the pages so that ~4 programs per SM run
    split = max(1, min(-(-n_p // pages_per_tile), (4 * sms) // max(tiles, 1)))
    pch = -(-(-(-n_p // split)) // pages_per_tile) * pages_per_tile
    _quest_module(dev).quest_bounds[(-(-nqb // qb), B * Hkv, -(-n_p // pch))](
        q, mx, mn, out, *q.stride(), Hkv, Hq // Hkv, Nq, nqb, n_p, mx.shape[1], off, pch, D=D,
        D_P=d_p, PAGE=page, QB=qb, BP=pages_per_tile, CAUSAL=causal is not None,
        IEEE=q.dtype == torch.float32, num_warps=schedule.num_warps or 4)
    return out


def quest_page_ok(page: int) -> bool:
    """Pages the quest kernels take: powers of two up to ``QUEST_MAX_PAGE``."""
    return 1 <= page <= QUEST_MAX_PAGE and not page & (page - 1)


def _check_page(fn: str, page: int, D: int) -> None:
    if not quest_page_ok(page) or D > MAX_HEAD_DIM:
        raise ValueError(f"{fn}: page must be a power of two <= {QUEST_MAX_PAGE} "
                         f"and D <= {MAX_HEAD_DIM}; got page {page}, D {D}")


def quest_page_summaries(k: torch.Tensor, page: int, mx: torch.Tensor, mn: torch.Tensor, *,
                         first_page: int = 0) -> None:
    """Write the channel-wise max and min of k's pages ``first_page ..`` into ``mx`` / ``mn``
    (contiguous, k's dtype, ``[B * Hkv, capacity >= pages, D padded to a power of two]``,
    padding channels 0); the pages before ``first_page`` are left as they are."""
    B, Hkv, Nkv, D = k.shape
    _check_page("quest_page_summaries", page, D)
    n_p = -(-Nkv // page)
    d_p = next_pow2(max(D, 16))
    if mx.shape[0] != B * Hkv or mx.shape[1] < n_p or mx.shape[2] != d_p or mn.shape != mx.shape:
        raise ValueError(f"quest_page_summaries: mx / mn must be [{B * Hkv}, >= {n_p}, {d_p}], "
                         f"got {tuple(mx.shape)} / {tuple(mn.shape)}")
    todo = n_p - first_page
    if todo <= 0 or B * Hkv == 0:
        return
    # single-warp programs of at least 8 pages, ~32 per SM
    chunks = max(1, -(-32 * sm_count(k.device) // (B * Hkv)))
    ch = max(8, -(-todo // chunks))
    _quest_module(k.device).page_minmax[(-(-todo // ch), B * Hkv)](
        k, mx, mn, *k.stride(), Hkv, Nkv, n_p, first_page, mx.shape[1], ch, D, PAGE=page,
        ROWS=min(page, 16), D_P=d_p, num_warps=1)


def auto_criterion(dots: torch.Tensor, lines: torch.Tensor, *, n_q: int, causal: str,
                   block: int, scale: float, tau: float, as_int32: bool = False) -> torch.Tensor:
    """``auto``'s per-head choice (one head per group, causal) in one launch: bool ``[B, H]``,
    True where the Jensen-Shannon divergence between the softmax of the last query block's
    pooled logits ``scale * dots[..., -1, :]`` and its true attention mass per key block (from
    the vertical statistics of ``lines``, mean over the last ``min(block, n_q)`` rows) is at
    most ``tau``: ``codegen.select.policies.auto_criterion``. ``as_int32``: 0 / 1 int32
    instead (what ``auto_block_scores`` reads, no conversion launch)."""
    B, H, nqb, nkb = dots.shape
    n_kv = lines.shape[-1]
    if lines.shape != (B, H, 2, n_kv):
        raise ValueError(f"auto_criterion: dots {tuple(dots.shape)} and lines "
                         f"{tuple(lines.shape)} do not match")
    aware = torch.empty((B, H), device=dots.device, dtype=torch.int32)
    if aware.numel() == 0 or nqb == 0:         # no query block: no head is query-aware
        aware.zero_()
        return aware if as_int32 else aware.bool()
    last_pos = n_q - 1 + positions_offset(causal, n_q, n_kv)      # the last query block's end
    nkb_p = next_pow2(max(nkb, 16))
    _lines_module(dots.device).auto_criterion[(B * H,)](
        dots.contiguous(), lines.contiguous(), aware, nqb, nkb, n_kv, block, last_pos,
        float(scale), float(min(block, n_q)), float(tau), NKB_P=nkb_p,
        TB=max(1, min(next_pow2(block), 8192 // nkb_p)), num_warps=8)
    return aware if as_int32 else aware.bool()
