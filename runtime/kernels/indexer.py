"""Entry point of the lightning indexer (DeepSeek Sparse Attention): fused index scores and exact
per-query top-k, without an ``[Nq, Nkv]`` tensor in memory.

``indexer_topk`` validates, then runs the Triton kernels of ``codegen.indexer.kernel``
where ``launch.kernels_enabled`` routes the call (CUDA; the CPU interpreter when asked), else the
PyTorch reference. Candidates are int64 (score image, key index) pairs, distinct and ordered
like the top-k rule (score, then recency). Per row, with ``C = max(2 topk, topk + slack)``
candidate slots:

1. estimate, for rows with more than ``C`` visible keys (every ``sample_stride``-th key tile
   only): the score range, then two rounds of ``T`` threshold counts give a floor expected to
   leave ``sqrt(want * C)`` keys above it (``want = min(topk, visible)``); when that count
   falls inside the exact zeros of the ReLU, the floor splits the zeros by key index;
2. one sweep over all keys writes the candidates above the floor into the row's slots and
   counts them (every visible key where ``visible <= C``);
3. a row whose count is not in ``[want, C]`` (the estimate missed) is resolved exactly: when
   few rows missed (``DIRECT_ELEMS``), from their full score rows (``few_row_scores``, one
   ``torch.topk``); otherwise count sweeps over its query block narrow a candidate bracket
   ``(lo, hi]`` (first with the sampled thresholds, then evenly spaced scores, score images
   and indices) until at most ``C`` candidates lie inside, then a two-sided sweep writes the
   candidates above ``hi`` straight to the output and buffers the bracket;
4. one program per row selects the exact best ``want - certain`` buffered candidates.

Extra memory: ``B * Nq * C`` int64 candidates plus O(B * Nq * T) counts (and at most
``DIRECT_ELEMS`` fp32 scores for missed rows). Host syncs: one per call, plus two per
refinement round when many rows missed.

Example (on a CUDA device)::

    >>> q = torch.randn(1, 4096, 4, 64, device="cuda", dtype=torch.bfloat16)
    >>> w = torch.rand(1, 4096, 4, device="cuda")
    >>> k = torch.randn(1, 4096, 64, device="cuda", dtype=torch.bfloat16)
    >>> idx = indexer_topk(q, w, k, 2048, causal=True)                  # int32 [1, 4096, 2048]
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import torch

from codegen.common import next_pow2
from codegen.emit import emit
from codegen.indexer.kernel import IndexerSpec
from codegen.indexer.reference import indexer_topk_ref, visible_counts
from runtime.cache import KERNELS
from runtime.kernels import tuned
from runtime.kernels.indexer_rows import (FEW_ROWS, few_row_scores, from_key, score_key,
                                          top_of_rows, topk_few_rows)
from runtime.kernels.launch import FLOAT_DTYPES, device_key, kernels_enabled, sm_count
from runtime.loader import load

MAX_TOPK = 8192             # the selection program keeps 2 * topk candidates in registers
MAX_ROUNDS = 48             # exact refinement sweeps per call (a bracket shrinks >= 4x a round)
# Rows whose estimate missed are scored directly (their full score rows, ``few_row_scores``,
# and one torch.topk) when rows x indexer heads x keys stays under this many fp32 elements;
# more missed rows go through the threshold refinement. H100, 65536 tokens: the refinement of
# 6 missed rows took 2.45 ms of a 16 ms call (benchmarks/results/indexer_h100.md).
DIRECT_ELEMS = 2 ** 26

# What the kernel path did: calls, calls that sampled a threshold estimate, rows whose estimate
# missed and were resolved exactly (of those, rows scored directly), count sweeps that took,
# two-sided write sweeps.
COUNTERS: collections.Counter = collections.Counter()

# Tests set this to fill the candidate buffer with the best possible candidate (score +inf, key
# 0) before a call, so a slot the selection reads without a write shows up in its output.
POISON_WORKSPACE = False


@dataclasses.dataclass(frozen=True)
class IndexerSchedule:
    """Tiling and selection knobs. ``block_m`` query rows x ``block_n`` keys per score tile;
    ``slack``: candidate slots per row are ``max(2 * topk, topk + slack)``; ``sample_stride``:
    the threshold estimate scores one key tile in this many; ``split``: programs per query
    block along the keys (0: enough to fill the device); ``thresholds``: per-row thresholds
    counted in one sweep; ``stack_heads``: one tensor-core product per key tile for all heads
    (else one per head); ``finish_warps``: warps of the per-row selection (0: by its width);
    ``stream_queries``: each head's query tile reloaded per key tile rather than resident (for
    many wide heads, whose tiles do not fit on chip together); ``head_group``: streamed heads
    per tensor-core product (their tiles stacked)."""
    block_m: int = 64
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2
    slack: int = 1024
    sample_stride: int = 16
    split: int = 0
    thresholds: int = 16
    stack_heads: bool = False
    finish_warps: int = 0
    stream_queries: bool = False
    head_group: int = 1

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"IndexerSchedule.{name} must be a power of two >= 16, got {val}")
        for name in ("num_warps", "finish_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16) and not (name == "finish_warps"
                                                                    and self.finish_warps == 0):
                raise ValueError(f"IndexerSchedule.{name} must be 1, 2, 4, 8 or 16, got "
                                 f"{getattr(self, name)}")
        for name, least in (("num_stages", 1), ("slack", 1), ("sample_stride", 1), ("split", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"IndexerSchedule.{name} must be >= {least}, got {getattr(self, name)}")
        if self.thresholds < 16:
            raise ValueError(f"IndexerSchedule.thresholds must be >= 16, got {self.thresholds}")
        if self.head_group < 1 or self.head_group & (self.head_group - 1) or (
                self.head_group > 1 and not self.stream_queries):
            raise ValueError(f"IndexerSchedule.head_group must be a power of two >= 1, and 1 "
                             f"unless stream_queries, got {self.head_group}")
        if self.stack_heads and self.stream_queries:
            raise ValueError("IndexerSchedule: stack_heads and stream_queries exclude each other "
                             "(one product for all heads, or each head's tile reloaded)")

    def capacity(self, topk: int) -> int:
        """Candidate slots per row."""
        return max(2 * topk, topk + self.slack)


#: the per-head kernels keep every head's [block_m, head_dim] query tile resident up to this
#: many bytes (Hopper has 227 KB of shared memory a block; DeepSeek-V3.2's 64 x 128 index heads
#: at 16 rows take 256 KB); above it the schedule streams them
RESIDENT_Q_BYTES = 96 * 1024


def default_schedule(heads: int, head_dim: int, device) -> IndexerSchedule:
    """CUDA: 64 query rows x 32 keys per score tile, 4 warps, one product per head (H200,
    H_I=4, d_I=64, bf16, N=65536: write sweep 6.6 ms against 6.7-10.2 ms for 64x64, 128x64 and
    32x64 tiles or stacked heads; 136 registers, three programs per SM); fewer query rows for
    many wide heads (their queries stay resident). CPU interpreter: 16 x 32 tiles (fewer,
    smaller numpy operations)."""
    if torch.device(device).type != "cuda":
        return IndexerSchedule(block_m=16, block_n=32, num_warps=4, num_stages=1)
    fields = tuned.best("indexer_prefill", device, H_I=heads, d_I=head_dim)
    if fields is not None:             # measured on this card at this head shape
        return IndexerSchedule(**fields)
    width = heads * max(head_dim, 16)
    block_m = 64 if width <= 512 else (32 if width <= 1024 else 16)
    if width * block_m * 2 > RESIDENT_Q_BYTES:
        # the query tiles stream through the key loop (codegen.indexer.kernel), one head per
        # product; measured on an H200 at 64 x 128 heads, N=16384
        # (benchmarks/results/dsa_sweep_h200.md): 64 x 64 tiles 15.7 ms, 16 x 64 24.1 ms,
        # heads stacked in groups of 2-8 40-67 ms
        return IndexerSchedule(block_m=64, block_n=64, num_warps=4, num_stages=1,
                               stream_queries=True)
    return IndexerSchedule(block_m=block_m, block_n=32, num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------- validation

def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _validate(fn: str, q_idx, w, k_idx, topk) -> None:
    for name, t, rank, layout in (("q_idx", q_idx, 4, "[B, Nq, H_I, d_I]"), ("w", w, 3, "[B, Nq, H_I]"),
                                  ("k_idx", k_idx, 3, "[B, Nkv, d_I]")):
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            raise ValueError(f"{fn}: {name} must be a {rank}-d tensor {layout}, got {_shape(t)}")
    if q_idx.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fn}: q_idx.dtype must be float16, bfloat16 or float32, got {q_idx.dtype}")
    if k_idx.dtype != q_idx.dtype:
        raise ValueError(f"{fn}: k_idx.dtype must equal q_idx.dtype ({q_idx.dtype}), got {k_idx.dtype}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"{fn}: w must be a floating-point tensor, got {w.dtype}")
    for name, t in (("w", w), ("k_idx", k_idx)):
        if t.device != q_idx.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, q_idx is on {q_idx.device}")
    B, Nq, H, D = q_idx.shape
    if tuple(w.shape) != (B, Nq, H):
        raise ValueError(f"{fn}: w must be [B, Nq, H_I] = {[B, Nq, H]} (from q_idx), got {_shape(w)}")
    if k_idx.shape[0] != B or k_idx.shape[2] != D:
        raise ValueError(f"{fn}: k_idx must be [B, Nkv, d_I] with B={B}, d_I={D} (from q_idx), "
                         f"got {_shape(k_idx)}")
    if H < 1 or D < 1:
        raise ValueError(f"{fn}: q_idx needs H_I >= 1 and d_I >= 1, got {_shape(q_idx)}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"{fn}: topk must be an int >= 1, got {topk!r}")


# ----------------------------------------------------------------------------- entry point

def indexer_topk(q_idx, w, k_idx, topk: int, *, causal: bool,
                 schedule: Optional[IndexerSchedule] = None, out: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
    """int32 ``[B, Nq, topk]``: per query, the ``topk`` visible keys with the highest index score
    ``sum_j w[b, t, j] * relu(q_idx[b, t, j] . k_idx[b, s])`` (fp32; equal scores go to the
    newer key), -1 after them when fewer than ``topk`` keys are visible. The kernel path returns
    each row's keys in no particular order; the reference sorts them.

    Shapes: ``q_idx [B, Nq, H_I, d_I]`` (float16 / bfloat16 / float32), ``w [B, Nq, H_I]`` (any
    float dtype), ``k_idx [B, Nkv, d_I]`` (q_idx's dtype); any strides. ``causal``: key ``s``
    visible to query ``t`` iff ``s <= t + Nkv - Nq``. ``schedule``: tiling and selection knobs
    of the kernel path (default: ``default_schedule``). ``out``: optional contiguous int32
    ``[B, Nq, topk]`` tensor to write the result into.
    """
    fn = "indexer_topk"
    _validate(fn, q_idx, w, k_idx, topk)
    shape = (q_idx.shape[0], q_idx.shape[1], topk)
    if out is not None and (tuple(out.shape) != shape or out.dtype != torch.int32
                            or out.device != q_idx.device or not out.is_contiguous()):
        raise ValueError(f"{fn}: out must be a contiguous int32 tensor {list(shape)} on "
                         f"{q_idx.device}, got {out.dtype} {list(out.shape)} on {out.device}")
    if not kernels_enabled(q_idx):
        ref = indexer_topk_ref(q_idx, w, k_idx, topk, causal=bool(causal))
        return ref if out is None else out.copy_(ref)
    if q_idx.shape[1] <= FEW_ROWS and q_idx.device.type == "cuda":
        res = topk_few_rows(q_idx, w, k_idx, topk, causal=bool(causal))
        return res if out is None else out.copy_(res)
    if topk > MAX_TOPK:
        raise ValueError(f"{fn}: the Triton path supports topk <= {MAX_TOPK}, got {topk} "
                         "(SPARSE_PLANNER_KERNELS=reference runs the PyTorch reference)")
    if schedule is None:
        schedule = default_schedule(q_idx.shape[2], q_idx.shape[3], q_idx.device)
    return _IndexerRun(q_idx, w, k_idx, topk, bool(causal), schedule).run(out)


def _module(spec: IndexerSpec, device):
    return KERNELS.get(("indexer", device_key(device), spec), lambda: load(emit(spec)))


def _pack(score: torch.Tensor, idx: int) -> torch.Tensor:
    """int64 candidate (order-preserving score image << 32 | idx) of fp32 scores (-0.0 is +0.0)."""
    return (score_key(score + 0.0) << 32) | idx


def _below(x: torch.Tensor) -> torch.Tensor:
    """The next fp32 value below x."""
    return torch.nextafter(x, torch.full_like(x, float("-inf")))


def _unpack_score(p: torch.Tensor) -> torch.Tensor:
    return from_key(p >> 32)


IDX_ABOVE = 2 ** 31 - 1          # (score, IDX_ABOVE): the candidates above it score above
KEY_NEG_INF = -2139095041        # score images of -inf and +inf
KEY_POS_INF = 2139095040
P_MAX = 2 ** 63 - 2               # above every candidate (INT64_MAX marks an inactive row)


def _spaced(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """[R, n]: n points evenly spaced strictly between a and b ([R] each)."""
    f = torch.arange(1, n + 1, device=a.device, dtype=a.dtype) / (n + 1)
    return a[:, None] + (b - a)[:, None] * f


class _IndexerRun:
    """One call of the Triton path: buffers, launches and the host-side threshold choices."""

    def __init__(self, q, w, k, topk: int, causal: bool, sch: IndexerSchedule):
        # unit last strides; the others are passed divided by the largest of 16 bytes /
        # element size and 1 that divides them all (lets each row load in 16-byte pieces)
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        align = 16 // q.element_size()
        if any(st % align for st in (*q.stride()[:3], *k.stride()[:2])):
            align = 1
        self.q, self.w, self.k = q, w.float(), k
        self.B, self.Nq, H, D = q.shape
        self.Nkv = k.shape[1]
        self.off = self.Nkv - self.Nq
        self.topk, self.causal, self.sch = topk, causal, sch
        self.dev = q.device
        self.spec = IndexerSpec(heads=H, head_dim=D, dtype=FLOAT_DTYPES[q.dtype],
                                block_m=sch.block_m, block_n=sch.block_n, thresholds=sch.thresholds,
                                stride_align=align, stack_heads=sch.stack_heads,
                                stream_queries=sch.stream_queries,
                                head_group=sch.head_group)
        self.mod = _module(self.spec, self.dev)
        self.R = self.B * self.Nq
        self.C = sch.capacity(topk)
        self.nmb = -(-self.Nq // sch.block_m)
        vis = visible_counts(self.Nq, self.Nkv, causal, self.dev)                 # [Nq]
        self.vis = vis.repeat(self.B)                                             # [R]
        self.want = self.vis.clamp(max=topk)                                      # [R]
        self.v_max = self.Nkv if self.Nq else 0          # the last row sees every key
        self.strides = (*(st // align for st in q.stride()[:3]), *self.w.stride(),
                        *(st // align for st in k.stride()[:2]))
        self.stats = self.seeds = None
        self.dummy = torch.zeros(1, device=self.dev, dtype=torch.int32)       # unused list
        self.top = max(self.Nkv - 1, 0)            # largest key index
        self.lo_all = int(_pack(torch.tensor(float("-inf")), IDX_ABOVE))  # admits every visible key

    # -------------------------------------------------------------- launches

    def _split(self, items: int, tiles: int) -> int:
        if self.sch.split:
            return max(1, min(self.sch.split, tiles))
        want = -(-2 * sm_count(self.dev) // max(items, 1))
        return max(1, min(want, tiles // 4 if tiles >= 8 else 1))

    def _items(self, blocks: Optional[torch.Tensor]) -> int:
        return self.B * self.nmb if blocks is None else blocks.numel()

    def count(self, theta: torch.Tensor, stride: int, blocks=None, counts=True, stats=False):
        """Per-row counts of keys above theta [R, T] (fp32 scores, or int64 candidates) over
        every stride-th key tile, and with ``stats`` the max / min score there."""
        T = self.sch.thresholds
        items = self._items(blocks)
        n_tiles = -(-min(self.v_max, self.Nkv) // self.sch.block_n)
        split = self._split(items, -(-n_tiles // stride))
        cnt = torch.empty((split, self.R, T) if counts else (1,), device=self.dev,
                          dtype=torch.int32)
        mx = torch.empty((split, self.R) if stats else (1,), device=self.dev, dtype=torch.float32)
        mn = torch.empty_like(mx)
        self.mod.indexer_count[(items, split)](
            self.q, self.w, self.k, theta, cnt, mx, mn, self.dummy if blocks is None else blocks,
            *self.strides, self.Nq, self.Nkv, self.off, self.nmb, split, stride, self.R,
            CAUSAL=self.causal, LISTED=blocks is not None, COUNT=counts, STATS=stats,
            PACKED=theta.dtype == torch.int64, num_warps=self.sch.num_warps,
            num_stages=self.sch.num_stages)
        if split == 1:
            return (cnt[0] if counts else None), ((mx[0], mn[0]) if stats else None)
        return (cnt.sum(0) if counts else None), ((mx.amax(0), mn.amin(0)) if stats else None)

    def write(self, lo, buf, cnt, out, sure, hi=None, blocks=None):
        """Candidates above lo [R] int64 (two-sided: in (lo, hi], the keys above hi written to
        ``out``); see ``indexer_write``."""
        items = self._items(blocks)
        n_tiles = -(-min(self.v_max, self.Nkv) // self.sch.block_n)
        split = self._split(items, n_tiles)
        if split > 1:                                   # counters are added to atomically
            active = lo < torch.iinfo(torch.int64).max
            cnt.masked_fill_(active, 0)
            sure.masked_fill_(active, 0)
        self.mod.indexer_write[(items, split)](
            self.q, self.w, self.k, lo, lo if hi is None else hi, buf, cnt, out, sure,
            self.dummy if blocks is None else blocks, *self.strides,
            self.Nq, self.Nkv, self.off, self.nmb, split, 1, self.C, self.topk,
            CAUSAL=self.causal, LISTED=blocks is not None, TWO_SIDED=hi is not None,
            SPLIT=split > 1, num_warps=self.sch.num_warps, num_stages=self.sch.num_stages)

    def finish(self, buf, cnt, out, sure):
        cp = next_pow2(max(self.C, 16))
        warps = self.sch.finish_warps or (4 if cp <= 4096 else (8 if cp <= 8192 else 16))
        self.mod.indexer_finish[(self.R,)](
            buf, cnt, sure, out, self.Nq, self.Nkv, self.off, self.topk, self.C,
            CAUSAL=self.causal, CP=cp, PB=min(1024, next_pow2(max(self.topk, 16))), num_warps=warps)

    # -------------------------------------------------------------- thresholds

    def estimate(self) -> torch.Tensor:
        """Per-row floor ``lo`` [R] int64 candidate expected to leave about sqrt(want * C) keys
        above it (``lo_all`` where every visible key fits the candidate slots): the score range
        on every (4 * sample_stride)-th key tile, then two rounds of T threshold counts on every
        sample_stride-th tile (the whole range, then the bucket holding the target)."""
        T, stride, R, dev = self.sch.thresholds, self.sch.sample_stride, self.R, self.dev
        theta = torch.zeros((R, T), device=dev)
        _, (mx1, mn1) = self.count(theta, 4 * stride, counts=False, stats=True)
        fin = torch.isfinite(mx1) & torch.isfinite(mn1)
        mx1, mn1 = torch.where(fin, mx1, 0.0), torch.where(fin, mn1, 0.0)
        # round 1: the first threshold (-inf) counts the sampled keys
        th1 = torch.cat([torch.full((R, 1), float("-inf"), device=dev),
                         _spaced(mn1, mx1, T - 2), mx1[:, None]], 1)                # [R, T]
        c1, (mx2, mn2) = self.count(th1, stride, stats=True)
        self.stats = (mx2, mn2)
        n_samp = c1[:, 0].float()
        target = (self.want.float() * self.C).sqrt() * n_samp / self.vis.clamp(min=1).float()
        j = ((c1.float() >= target[:, None]).sum(1) - 1).clamp(min=0)             # last ok
        a = th1.gather(1, j[:, None])[:, 0]
        b = th1.gather(1, (j + 1).clamp(max=T - 1)[:, None])[:, 0]
        a = torch.where(j == 0, torch.minimum(mn2, b), a)
        b = torch.where(j == T - 1, torch.maximum(mx2, a), b)
        # round 2: thresholds inside [a, b], and "score above" -0 and 0 (ReLU zeros are exact
        # ties; they are split by index below)
        zero = torch.zeros(R, device=dev)
        th2 = torch.cat([a[:, None], _spaced(a, b, T - 4), b[:, None],
                         torch.minimum(torch.maximum(_below(zero), a), b)[:, None],
                         torch.minimum(torch.maximum(zero, a), b)[:, None]], 1).sort(1).values
        c2, _ = self.count(th2.contiguous(), stride)
        self.seeds = th2                        # the refinement's first thresholds
        j2 = (c2.float() >= target[:, None]).sum(1) - 1
        lo = torch.where(j2 < 0, _below(a), th2.gather(1, j2.clamp(min=0)[:, None])[:, 0])
        lo_p = _pack(lo, IDX_ABOVE)
        # the target falls inside the zeros: admit the zeros of the newest keys, assuming they
        # spread evenly over the row (a miss is resolved exactly)
        nxt = th2.gather(1, (j2 + 1).clamp(max=T - 1)[:, None])[:, 0]
        c_at = c2.gather(1, j2.clamp(min=0)[:, None])[:, 0].float()
        c_nx = c2.gather(1, (j2 + 1).clamp(max=T - 1)[:, None])[:, 0].float()
        zeros = (lo == _below(zero)) & (nxt == 0) & (j2 >= 0) & (j2 < T - 1) & (c_at > c_nx)
        share = ((target - c_nx) / (c_at - c_nx).clamp(min=1)).clamp(0, 1)
        cut = (self.vis.float() * (1 - share)).long().clamp(0, self.top)
        lo_p = torch.where(zeros, _pack(zero, 0) | cut, lo_p)
        sampled = (self.vis > self.C) & (n_samp > 0)
        return torch.where(sampled, lo_p, self.lo_all)

    def refine(self, lo, cnt, fail: torch.Tensor):
        """For the rows in ``fail`` [R] bool: candidate brackets (lo, hi] [R] int64 with
        #(candidates > lo) >= want > #(candidates > hi) and at most C candidates inside.
        Candidates are distinct (score, index) pairs, so a bracket always narrows down, equal
        scores included. ``lo`` [R] int64: the floor the write sweep used, ``cnt`` its count."""
        R, dev = self.R, self.dev
        cnt = cnt.long()
        over = cnt > self.C                     # lo let too many keys in: it becomes the floor
        lo_p = torch.where(over, lo, self.lo_all)
        c_lo = torch.where(over, cnt, self.vis)
        hi_p = torch.where(over, P_MAX, lo)
        c_hi = torch.where(over, 0, cnt)
        mx, mn = self.stats if self.stats is not None else (torch.zeros(R, device=dev),) * 2
        mx = torch.where(torch.isfinite(mx), mx, 0.0)
        mn = torch.where(torch.isfinite(mn), mn, 0.0)
        for rnd in range(MAX_ROUNDS):
            todo = fail & (c_lo - c_hi > self.C)
            if not bool(todo.any()):
                return lo_p, hi_p
            if rnd == 0 and self.seeds is not None:
                # first the thresholds the sample counted: the bracket they leave is about as
                # tight as the sample's resolution
                cand = _pack(self.seeds, IDX_ABOVE)
            else:
                cand = self._candidates(lo_p, hi_p, mx, mn)
            inside = (cand > lo_p[:, None]) & (cand < hi_p[:, None]) & todo[:, None]
            theta = torch.where(inside, cand, lo_p[:, None]).contiguous()
            c, _ = self.count(theta, 1, blocks=self._blocks(todo))
            COUNTERS["refine_sweeps"] += 1
            c = c.long()
            # counts fall as thresholds rise: the highest threshold still leaving `want`
            # candidates above it is the new floor, the lowest one leaving fewer the new ceiling
            up = inside & (c >= self.want[:, None])
            down = inside & (c < self.want[:, None])
            new_lo = torch.where(up, theta, self.lo_all).amax(1)
            new_hi = torch.where(down, theta, P_MAX).amin(1)
            take_lo, take_hi = new_lo > lo_p, new_hi < hi_p
            c_lo = torch.where(take_lo, torch.where(up, c, 2 ** 62).amin(1), c_lo)
            c_hi = torch.where(take_hi, torch.where(down, c, -1).amax(1), c_hi)
            lo_p = torch.where(take_lo, new_lo, lo_p)
            hi_p = torch.where(take_hi, new_hi, hi_p)
        raise RuntimeError(f"indexer_topk: threshold refinement did not converge in {MAX_ROUNDS} "
                           "sweeps (non-finite scores?)")

    def _candidates(self, lo_p, hi_p, mx, mn) -> torch.Tensor:
        """[R, T] int64 thresholds strictly inside most brackets (lo_p, hi_p]."""
        T, dev, top = self.sch.thresholds, self.dev, self.top
        n_key = 3                               # score images at the bracket's quartiles: at
        n_idx = (T - 6 - n_key) // 2            # worst the bracket shrinks 4x a round
        n_val = T - 6 - n_key - n_idx
        quarter = torch.arange(1, n_key + 1, device=dev)
        zero = torch.zeros_like(mx)
        # thresholds: "score above" zero and the sample extremes (where ties happen), evenly
        # spaced scores (reaching past the sample's range where the bracket is open) and
        # score images, and among the keys of the ceiling's score evenly spaced indices
        # (equal scores split by recency)
        lo_open, hi_open = lo_p <= self.lo_all, hi_p >= P_MAX
        f_lo, f_hi = _unpack_score(lo_p), _unpack_score(hi_p)
        fb = torch.where(hi_open, mx, f_hi)
        fa = torch.where(lo_open, torch.minimum(mn, fb), f_lo)
        span = (fb - fa).clamp(min=1e-30) + fb.abs() * 2 ** -10
        fb = torch.where(hi_open, fb + 3 * span, fb)
        fa = torch.where(lo_open, fa - 3 * span, fa)
        ka = torch.where(lo_open, KEY_NEG_INF, score_key(f_lo))
        kb = torch.where(hi_open, KEY_POS_INF, score_key(f_hi))
        kmid = ka[:, None] + (kb - ka)[:, None] * quarter // (n_key + 1)
        values = torch.cat([torch.stack([_below(zero), zero, _below(mn), mn, _below(mx), mx], 1),
                            _spaced(fa, fb, n_val), from_key(kmid)], 1)
        same = (lo_p >> 32) == (hi_p >> 32)
        i0 = torch.where(same, (lo_p & 0xFFFFFFFF) + 1, 0).clamp(max=top)
        i1 = torch.where(hi_open, top, (hi_p & 0xFFFFFFFF).clamp(max=top))
        idx = i0[:, None] + (i1 - i0)[:, None] * torch.arange(n_idx, device=dev) // n_idx
        ties = torch.where(hi_open, lo_p, (hi_p >> 32) << 32)[:, None] | idx
        return torch.cat([_pack(values, IDX_ABOVE), ties], 1)                      # [R, T]

    def direct(self, rows: torch.Tensor) -> torch.Tensor:
        """int32 [len(rows), topk]: the exact selection of the rows ``rows`` (flat ``b * Nq +
        t``) from their full score rows, as ``topk_few_rows`` does for decode."""
        b, t = rows // self.Nq, rows % self.Nq
        res = torch.empty((rows.numel(), self.topk), device=self.dev, dtype=torch.int32)
        for bi in b.unique().tolist():
            at = (b == bi).nonzero()[:, 0]
            tt = t[at]
            sc = few_row_scores(self.q[bi:bi + 1, tt], self.w[bi:bi + 1, tt],
                                self.k[bi:bi + 1], causal=False)[0]       # [m, Nkv] fp32
            vis = ((tt + self.off + 1).clamp(0, self.Nkv) if self.causal
                   else torch.full_like(tt, self.Nkv))
            res[at] = top_of_rows(sc, vis, self.topk)
        return res

    def _blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """int32 work items (b * NMB + query block) holding a row of ``rows`` [R] bool."""
        r = rows.nonzero()[:, 0]
        items = (r // self.Nq) * self.nmb + (r % self.Nq) // self.sch.block_m
        return torch.unique(items).to(torch.int32)

    # -------------------------------------------------------------- run

    def run(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if out is None:
            out = torch.empty((self.B, self.Nq, self.topk), device=self.dev, dtype=torch.int32)
        if self.R == 0:
            return out
        COUNTERS["calls"] += 1
        if POISON_WORKSPACE:
            buf = torch.full((self.R, self.C), 0x7F800000 << 32, device=self.dev, dtype=torch.int64)
        else:
            buf = torch.empty((self.R, self.C), device=self.dev, dtype=torch.int64)
        cnt = torch.zeros(self.R, device=self.dev, dtype=torch.int32)
        sure = torch.zeros(self.R, device=self.dev, dtype=torch.int32)
        if self.v_max > self.C:
            COUNTERS["estimates"] += 1
            lo = self.estimate()
        else:
            lo = torch.full((self.R,), self.lo_all, device=self.dev, dtype=torch.int64)
        self.write(lo, buf, cnt, out, sure)
        if self.v_max > self.C:
            fail = (cnt < self.want) | (cnt > self.C)
            n_fail = int(fail.sum())                                    # the call's host sync
            if n_fail:
                COUNTERS["refined_rows"] += n_fail
            if n_fail and n_fail * self.spec.heads * self.Nkv <= DIRECT_ELEMS:
                COUNTERS["direct_rows"] += n_fail
                rows = fail.nonzero()[:, 0]
                cnt.masked_fill_(fail, 0)                 # finish pads them; replaced below
                sure.masked_fill_(fail, 0)
                self.finish(buf, cnt, out, sure)
                out.view(self.R, self.topk)[rows] = self.direct(rows)
                return out
            if n_fail:
                lo_p, hi_p = self.refine(lo, cnt, fail)
                COUNTERS["two_sided_sweeps"] += 1
                off = torch.iinfo(torch.int64).max                      # inactive rows
                self.write(torch.where(fail, lo_p, off).contiguous(), buf, cnt, out, sure,
                           hi=torch.where(fail, hi_p, off).contiguous(), blocks=self._blocks(fail))
        self.finish(buf, cnt, out, sure)
        return out
