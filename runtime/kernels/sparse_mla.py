"""Entry point of token-sparse MLA attention in its absorbed form (forward): the Triton kernel of
``codegen.mla.sparse_kernel`` where ``launch.kernels_enabled`` routes the call (CUDA; the CPU
interpreter when asked), else the PyTorch reference ``codegen.mla.reference``.

Example (on a CUDA device, DeepSeek-V3.2's sizes)::

    >>> q = torch.randn(1, 4096, 128, 576, device="cuda", dtype=torch.bfloat16)
    >>> kv = torch.randn(1, 4096, 576, device="cuda", dtype=torch.bfloat16)
    >>> idx = torch.randint(0, 4096, (1, 4096, 2048), device="cuda", dtype=torch.int32)
    >>> out, lse = sparse_mla(q, kv, idx, scale=576 ** -0.5, dv=512)   # [1, 4096, 128, 512]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from codegen.common import next_pow2
from codegen.emit import emit
from codegen.mla.reference import sparse_mla_reference
from codegen.mla.sparse_kernel import SparseMLASpec
from runtime.cache import KERNELS
from runtime.kernels import tuned
from runtime.kernels.launch import device_key, kernels_enabled, sm_count
from runtime.loader import load


# Tests set this to fill the outputs with NaN before a launch, so an element the kernel does not
# write shows up.
POISON_OUTPUT = False


@dataclasses.dataclass(frozen=True)
class MLASchedule:
    """``block_h`` query heads x ``block_n`` listed keys per step; warps and pipeline stages.
    This default (32 heads x 32 keys, 8 warps, one stage) is what the CPU interpreter runs; on
    CUDA ``default_schedule`` picks measured ones.
    ``splits``: each row's list split into this many parts, merged by their log-sum-exp (0:
    ``parts`` decides; decode rows need it to fill the device)."""
    block_h: int = 32
    block_n: int = 32
    num_warps: int = 8
    num_stages: int = 1
    splits: int = 0          # parts each row's list is split into (0: by the grid, see parts)

    def __post_init__(self):
        if self.splits < 0:
            raise ValueError(f"MLASchedule.splits must be >= 0 (0: automatic), got {self.splits}")
        for name in ("block_h", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"MLASchedule.{name} must be a power of two >= 16, got {v}")


def default_schedule(rows: int, heads: int, dk: int, dv: int, device) -> MLASchedule:
    """The fastest schedule ``benchmarks/dsa_sweep.py`` measured on this card at these widths
    (``runtime.kernels.tuned``; prefill where ``rows`` (query rows x batch) alone fill the
    device, else its decode section, parts left automatic), else ``MLASchedule``'s default
    with ``block_h`` cut to the head count."""
    if heads >= 16:
        decode = torch.device(device).type == "cuda" and rows < sm_count(torch.device(device))
        shape = dict(dk=dk, dv=dv, H=heads) if not decode else dict(dk=dk, dv=dv, H=heads,
                                                                       splits=0)
        fields = tuned.best("mla_decode" if decode else "mla_prefill", device, **shape)
        if fields is not None:
            return MLASchedule(**fields)
        if torch.device(device).type == "cuda":
            # Hopper, measured (benchmarks/results/dsa_sweep_h200.md, 128 heads x 576 / 512):
            # prefill 64 heads x 64 keys, 8 warps, 2 stages 232 TFLOP/s against 66 for the
            # 32 x 32 single-stage tile; decode 32 x 32 with 2 stages
            return (MLASchedule(block_h=32, num_stages=2) if decode or heads < 64 else
                    MLASchedule(block_h=64, block_n=64, num_warps=8, num_stages=2))
    return MLASchedule(block_h=min(32, next_pow2(max(heads, 16))))


def _check(q, kv, indices, dv, v):
    fn = "sparse_mla"
    for name, t, rank, lay in (("q", q, 4, "[B, S, H, Dk]"), ("kv", kv, 3, "[B, T, Dk]"),
                               ("indices", indices, 3, "[B, S, K]")):
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be a {rank}-d tensor {lay}, got {got}")
    B, S, H, D = q.shape
    if kv.shape[0] != B or kv.shape[2] != D:
        raise ValueError(f"{fn}: kv must be [B={B}, T, Dk={D}] (from q), got {list(kv.shape)}")
    if tuple(indices.shape[:2]) != (B, S) or indices.dtype.is_floating_point:
        raise ValueError(f"{fn}: indices must be an integer [B={B}, S={S}, K] tensor, got "
                         f"{indices.dtype} {list(indices.shape)}")
    if not 0 < dv <= D:
        raise ValueError(f"{fn}: dv must be in [1, Dk={D}], got {dv}")
    if v is not None and (v.dim() != 3 or tuple(v.shape) != (B, kv.shape[1], dv)):
        raise ValueError(f"{fn}: v must be [B, T, dv] = {[B, kv.shape[1], dv]}, got "
                         f"{list(v.shape)}")
    if q.dtype != kv.dtype or (v is not None and v.dtype != kv.dtype):
        raise ValueError(f"{fn}: q, kv (and v) must share a dtype, got {q.dtype}, {kv.dtype}")


def sparse_mla(q, kv, indices, *, scale: float, dv: int, dl: Optional[int] = None,
               v: Optional[torch.Tensor] = None, schedule: Optional[MLASchedule] = None):
    """``(out [B, S, H, dv] in q's dtype, lse [B, S, H] fp32)``: every query head of a row
    attends to the row's listed latent rows (see ``codegen.mla.reference``).

    ``q [B, S, H, Dk]`` absorbed queries, ``kv [B, T, Dk]`` latent rows, ``indices [B, S, K]``
    int (entries outside ``[0, T)`` name no key; a row may not list a key twice), ``scale``
    the softmax scale, ``dv`` value width. The scores split ``Dk`` as ``dl + (Dk - dl)``
    (latent, rope; ``dl`` defaults to ``dv``). Values: ``kv[..., :dv]`` (default) or ``v
    [B, T, dv]``.
    """
    _check(q, kv, indices, dv, v)
    if not kernels_enabled(q):
        if v is None:
            out, lse = sparse_mla_reference(q, kv, indices, scale=scale, dv=dv)
        else:
            out, lse = _reference_separate_v(q, kv, v, indices, scale)
        return out.to(q.dtype), lse
    B, S, H, D = q.shape
    dl = dv if dl is None else dl
    dr = D - dl
    sch = schedule or default_schedule(B * S, H, D, dv, q.device)
    v_is_k = v is None and dv == dl
    vt = kv if v is None else v
    if v is None and not v_is_k:
        vt = kv[..., :dv]
    idx = indices if indices.dtype == torch.int32 else indices.to(torch.int32)
    K = idx.shape[2]
    if B * S * H * dv == 0:
        return (torch.empty((B, S, H, dv), device=q.device, dtype=q.dtype),
                torch.full((B, S, H), float("-inf"), device=q.device))
    n_parts, ks = parts(B * S * -(-H // sch.block_h), K, sch, q.device)
    if n_parts == 1:
        out = torch.empty((B, S, H, dv), device=q.device, dtype=q.dtype)
        lse = torch.empty((B, S, H), device=q.device, dtype=torch.float32)
    else:           # one normalised output and log-sum-exp per part, merged below
        out = torch.empty((n_parts, B, S, H, dv), device=q.device, dtype=torch.float32)
        lse = torch.empty((n_parts, B, S, H), device=q.device, dtype=torch.float32)
    if POISON_OUTPUT:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    mod = KERNELS.get(("sparse_mla", device_key(q.device)), lambda: load(emit(SparseMLASpec())))
    grid = (B * S, -(-H // sch.block_h), n_parts)
    o_st, l_st = out.stride()[-4:], lse.stride()[-3:]
    p_st = (out.stride(0), lse.stride(0)) if n_parts > 1 else (0, 0)
    mod.sparse_mla_fwd[grid](
        q, kv, vt, idx, out, lse, *q.stride(), *kv.stride(), *vt.stride(), *idx.stride(),
        *o_st, *l_st, *p_st, S, H, kv.shape[1], K, ks,
        float(scale) * math.log2(math.e), DL=dl, DR=dr, DV=dv,
        BDL=next_pow2(max(dl, 16)), BDR=next_pow2(max(dr, 16)), BDV=next_pow2(max(dv, 16)),
        BLOCK_H=sch.block_h, BLOCK_N=sch.block_n, V_IS_K=v_is_k,
        num_warps=sch.num_warps, num_stages=sch.num_stages)
    if n_parts == 1:
        return out, lse
    o, l = merge_parts(out, lse)
    return o.to(q.dtype), l


#: a split part walks at least this many list entries (fewer: the merge costs more than the
#: parallelism gives)
MIN_PART = 128


def parts(programs: int, K: int, sch: MLASchedule, device) -> tuple:
    """``(parts, entries per part)`` for a call of ``programs`` (row, head block) programs over
    lists of ``K`` entries: ``sch.splits`` where given; else, on CUDA, enough parts for about
    two programs per SM where the grid has fewer programs than SMs (decode), each part a
    multiple of ``block_n`` and at least ``MIN_PART`` entries; one part otherwise."""
    n = sch.splits
    if not n:
        n = 1
        if torch.device(device).type == "cuda" and K > MIN_PART:
            sms = sm_count(torch.device(device))
            if programs < sms:
                n = min(-(-2 * sms // max(programs, 1)), K // MIN_PART)
    n = max(1, min(n, -(-K // sch.block_n)))
    ks = -(-K // n)
    ks = -(-ks // sch.block_n) * sch.block_n
    return -(-K // ks) if K else 1, max(ks, sch.block_n)


def merge_parts(out: torch.Tensor, lse: torch.Tensor) -> tuple:
    """Merge per-part normalised outputs ``[P, B, S, H, dv]`` and natural-log LSEs ``[P, B, S,
    H]`` (a part that saw no key: -inf) into ``(out [B, S, H, dv], lse [B, S, H])`` fp32."""
    m = lse.max(0).values
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m_safe)                                           # 0 for empty parts
    den = w.sum(0)
    o = (w[..., None] * out).sum(0) / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    return o, torch.where(den > 0, m_safe + torch.log(den), torch.full_like(den, float("-inf")))


def _reference_separate_v(q, kv, v, indices, scale):
    """The reference with values from their own tensor: the rows ``[v, kv]`` with the queries
    padded by zeros over ``v``'s features."""
    dv = v.shape[-1]
    rows = torch.cat([v, kv], -1)                                          # [B, T, dv + Dk]
    qq = torch.cat([q.new_zeros(*q.shape[:3], dv), q], -1)
    return sparse_mla_reference(qq, rows, indices, scale=scale, dv=dv)


def flops(B: int, S: int, H: int, K: int, dk: int, dv: int) -> float:
    """Matrix FLOPs of one forward over ``K`` listed keys per row: ``2 B S H K (Dk + dv)``."""
    return 2.0 * B * S * H * K * (dk + dv)


