"""Entry points of the Triton sparse-attention kernels: validate, pick a schedule, fetch the
compiled kernel from ``runtime.cache.KERNELS``, launch.

The forward functions return ``(out [B, Hq, Nq, Dv] in q.dtype, lse [B, Hq, Nq] fp32, natural
log)``; rows that keep no key give out = 0, lse = -inf (the head's logit with learned
``sinks``). Both forwards take ``sinks`` (float ``[Hq]``) and per-batch key ranges
``kv_start`` / ``kv_end`` (int32 ``[B]``) as runtime tensors; the kernels specialize only on
their presence; likewise a soft cap ``softcap`` (float) and a mask tensor ``mask`` /
``mask_kind`` ("add" float, "keep" bool; broadcastable to ``[B, Hq, Nq, Nkv]``; semantics in
``codegen.block_sparse.mask_blocks``), applied to the scores before the rule masks; rows whose
every pair is masked give out = 0, lse = -inf. ``token_sparse_attention_bwd`` returns
``(dq, dk, dv)`` of the gather attention (autograd wrapper: ``runtime.token_sparse_autograd``). On CPU they run under Triton's interpreter
(``TRITON_INTERPRET=1`` set before the first kernel is loaded); see ``available``.

Example (on a CUDA device)::

    >>> q = torch.randn(1, 8, 1000, 128, device="cuda", dtype=torch.bfloat16)
    >>> k = v = torch.randn(1, 2, 1000, 128, device="cuda", dtype=torch.bfloat16)
    >>> nqb = -(-1000 // 128)                                        # 8 query blocks
    >>> num = torch.arange(1, nqb + 1, dtype=torch.int32, device="cuda").expand(1, 2, nqb)
    >>> idx = torch.arange(nqb, dtype=torch.int32, device="cuda").expand(1, 2, nqb, nqb)
    >>> out, lse = block_sparse_attention(q, k, v, num.contiguous(), idx.contiguous(),
    ...                                   block=128, scale=128 ** -0.5, causal=True)
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional

import torch

from codegen.attention.reference import positions_offset
from codegen.block_sparse import wgmma_kernel
from codegen.block_sparse.mask_blocks import MASK_KINDS, broadcast_mask
from codegen.common import BlockSparseSpec, Schedule, TokenSparseSpec, next_pow2
from codegen.emit import emit
from codegen.token_sparse.backward import PRE_ROWS as BWD_PRE_ROWS, TokenSparseBackwardSpec
from runtime.cache import KERNELS, seq_bucket, stable_hash
from runtime.loader import load

LOG2E = 1.4426950408889634
_FLOAT_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
MAX_HEAD_DIM = 256
PACK_GQA_MAX_NQ = 64      # block-sparse: pack GQA groups by default only up to this many queries


# Tests set this to fill split-K workspaces with NaN, so a partial result that no program
# wrote shows up in the output.
POISON_WORKSPACE = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device) -> bool:
    """True where these kernels can run: a CUDA device, or the CPU under ``TRITON_INTERPRET=1``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return dev.type == "cpu" and _interpreting()


# ----------------------------------------------------------------------------- validation

def _check_qkv(fn: str, q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be a 4-d tensor [B, H, N, D], got {shape}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{fn}: {name}.dtype must be float16, bfloat16 or float32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, q is on {q.device}")
    if not available(q.device):
        raise ValueError(f"{fn}: Triton kernels cannot run on {q.device} (need CUDA, or the CPU "
                         "with TRITON_INTERPRET=1)")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise ValueError(f"{fn}: bfloat16 is not supported by Triton's CPU interpreter; use "
                         "float16 or float32 on the CPU")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{fn}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{fn}: batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"{fn}: k must be [B, Hkv, Nkv, {D}] (q's head dim), got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{fn}: v must be [{', '.join(map(str, k.shape[:3]))}, Dv], got {tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{fn}: query heads Hq={Hq} must be a multiple of key heads Hkv={Hkv}")
    if max(D, v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head dims up to {MAX_HEAD_DIM} supported, got D={D}, Dv={v.shape[3]}")


def _check_scale(fn: str, scale):
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{fn}: scale must be a finite float > 0, got {scale!r}")


def _check_index(fn: str, name: str, t, shape: tuple, device):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{fn}: {name} must be an int32 tensor, got {got}")
    if t.dim() != len(shape) or any(e is not None and e != a for e, a in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{fn}: {name} must have shape {want}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, q is on {device}")


def _heads_of_lists(fn: str, name: str, hs: int, Hq: int, Hkv: int,
                    shared_ok: bool = False) -> bool:
    """True when the lists are per KV head (shared by a GQA group) or, with ``shared_ok``, one
    list shared by every head (``hs == 1``); False when per query head."""
    if hs == Hkv or (shared_ok and hs == 1):
        return True
    if hs == Hq:
        return False
    one = "1 (shared by every head), " if shared_ok else ""
    raise ValueError(f"{fn}: {name}.shape[1] must be {one}Hkv={Hkv} (per group) or Hq={Hq} "
                     f"(per head), got {hs}")


def _check_extras(fn: str, q, k, sinks, kv_start, kv_end) -> tuple:
    """The learned sinks and key ranges as the kernels read them: ``(sinks fp32 [Hq] or None,
    ranges (kv_start, kv_end) int32 [B] or None)``, contiguous on q's device. Sinks of any
    float dtype are converted to fp32; a missing range bound becomes 0 / Nkv."""
    B, Hq, Nkv = q.shape[0], q.shape[1], k.shape[2]
    if sinks is not None:
        if (not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point()
                or tuple(sinks.shape) != (Hq,) or sinks.device != q.device):
            got = (f"{sinks.dtype} {list(sinks.shape)} on {sinks.device}"
                   if isinstance(sinks, torch.Tensor) else type(sinks).__name__)
            raise ValueError(f"{fn}: sinks must be a float tensor [{Hq}] (one logit per query "
                             f"head) on {q.device}, got {got}")
        sinks = sinks.to(torch.float32).contiguous()
    if kv_start is None and kv_end is None:
        return sinks, None
    bounds = []
    for name, t, missing in (("kv_start", kv_start, 0), ("kv_end", kv_end, Nkv)):
        if t is None:
            t = torch.full((B,), missing, dtype=torch.int32, device=q.device)
        _check_index(fn, name, t, (B,), q.device)
        bounds.append(t.contiguous())
    return sinks, tuple(bounds)


def _check_softcap(fn: str, softcap) -> float:
    """The soft cap as a float (0.0 = none); raises unless a finite number >= 0."""
    if (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
            or not math.isfinite(softcap) or softcap < 0):
        raise ValueError(f"{fn}: softcap must be a finite float >= 0 (0 = no cap), got {softcap!r}")
    return float(softcap)


def _mask_kind(fn: str, mask, mask_kind) -> str:
    """The kernels' ``mask`` spec field: "" without a mask, else the checked ``mask_kind``."""
    if mask is None:
        return ""
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"{fn}: mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
    return mask_kind


def _mask_args(fn: str, q, k, mask, mask_kind: str) -> tuple:
    """Launch arguments of ``mask``: ``(tensor, smb, smh, smn, smk)``, the mask viewed as
    ``[B, Hq, Nq, Nkv]`` (stride 0 where it broadcasts; a bool mask as uint8), element
    strides; ``()`` without a mask."""
    if mask is None:
        return ()
    B, Hq, Nq = q.shape[:3]
    m = broadcast_mask(fn, mask, mask_kind, (B, Hq, Nq, k.shape[2]), q.device)
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    return (m, *m.stride())


def _check_mask_flags(fn: str, mask_flags, kv_indices):
    """``mask_flags`` (int8 / int32, shaped like ``kv_indices``) made contiguous, or None."""
    if mask_flags is None:
        return None
    if (not isinstance(mask_flags, torch.Tensor)
            or mask_flags.dtype not in (torch.int8, torch.int32) or mask_flags.shape != kv_indices.shape or mask_flags.device != kv_indices.device):
        got = (f"{mask_flags.dtype} {list(mask_flags.shape)} on {mask_flags.device}"
               if isinstance(mask_flags, torch.Tensor) else type(mask_flags).__name__)
        raise ValueError(f"{fn}: mask_flags must be an int8 or int32 tensor "
                         f"{list(kv_indices.shape)} (kv_indices' shape) on {kv_indices.device}, "
                         f"got {got}")
    return mask_flags.contiguous()


def _stride_align(dtype, *tensors) -> int:
    """Largest of (16 bytes / element size, 1) dividing every non-last stride, where every
    tensor also starts on a 16-byte boundary (tensor descriptors need both)."""
    align = 16 // dtype.itemsize
    ok = all(s % align == 0 for t in tensors for s in t.stride()[:3]) and all(
        t.data_ptr() % 16 == 0 for t in tensors)
    return align if ok else 1


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _device_key(device) -> tuple:
    if device.type == "cuda":
        return ("cuda",) + tuple(torch.cuda.get_device_capability(device))
    return ("interpreter",)


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=None)
def _set_descriptor_allocator() -> None:
    """Tensor descriptors built inside a kernel need scratch memory from an allocator."""
    import triton

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, device="cuda", dtype=torch.int8)

    triton.set_allocator(alloc)


def _outputs(fn: str, out, lse, shape_out: tuple, shape_lse: tuple, dtype, device):
    """Caller-given (validated) or fresh ``out`` [B, Hq, Nq, Dv] and ``lse`` [B, Hq, Nq]."""
    if out is None:
        out = torch.empty(shape_out, device=device, dtype=dtype)
    elif (tuple(out.shape) != shape_out or out.dtype != dtype or out.device != device
          or not out.is_contiguous()):
        raise ValueError(f"{fn}: out must be a contiguous {dtype} tensor {list(shape_out)} on "
                         f"{device}, got {out.dtype} {list(out.shape)} on {out.device}")
    if lse is None:
        lse = torch.empty(shape_lse, device=device, dtype=torch.float32)
    elif (tuple(lse.shape) != shape_lse or lse.dtype != torch.float32 or lse.device != device
          or not lse.is_contiguous()):
        raise ValueError(f"{fn}: lse must be a contiguous float32 tensor {list(shape_lse)} on "
                         f"{device}, got {lse.dtype} {list(lse.shape)} on {lse.device}")
    return out, lse


def _workspace(shape: tuple, device) -> torch.Tensor:
    if POISON_WORKSPACE:
        return torch.full(shape, float("nan"), device=device, dtype=torch.float32)
    return torch.empty(shape, device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------- schedules

def default_block_sparse_schedule(spec: BlockSparseSpec, device, max_blocks: int = 0) -> Schedule:
    """Default tiling for the block-sparse forward (H100 measurements: benchmarks/NOTES_kernels.md).

    ``max_blocks``: width of the block lists. On Hopper with 128-blocks at D = 64 or 128: the
    warp-specialized kernel (``codegen/block_sparse/wgmma_kernel.py``; a persistent grid for
    lists of <= 16 blocks). Elsewhere very short lists (<= 4 blocks) run best with narrow key
    tiles whose small footprint lets two programs share an SM; at D <= 64, 128x64 tiles;
    otherwise 128x128 tiles with K/V through tensor descriptors (the copy engine) where
    strides allow. Tiles never exceed the mask block. The cost model (``planner.costmodel.VARIANTS``) picks among
    measured alternatives per call shape when a site runs with ``cost_model="auto"``."""
    d = max(spec.head_dim, spec.v_head_dim)
    if device.type != "cuda":
        sch = Schedule(block_m=64, block_n=64, num_warps=4, num_stages=1)
    elif spec.dtype == "float32":
        sch = Schedule(block_m=64, block_n=32, num_warps=4, num_stages=2)
    elif spec.block >= 128 and d <= 128:
        ws = Schedule(block_m=128, block_n=128, num_warps=8, num_stages=2, tma=True, wgmma=True,
                      persistent=1 if 0 < max_blocks <= 16 else 0)
        if spec.block == 128 and _wgmma_ok(spec, ws, device):
            # Hopper: the warp-specialized Gluon kernel, persistent for short lists (H100,
            # benchmarks/results/kernels_h100.md, D = 128: 65536 tokens at 12%: 3.90 ms vs 4.81
            # for the best Triton schedule; at 3%: 1.02 vs 1.46; full causal 30.1 vs 34.2;
            # 16384 at 3% (2-block lists): 0.123 vs 0.134 for 128x32 tiles. D = 64,
            # kernels_h100_d64.md: 65536 at 3%: 0.70 vs 0.79; full causal 19.7 vs 20.6)
            sch = ws
        elif 0 < max_blocks <= 4:
            sch = Schedule(block_m=128, block_n=32, num_warps=8, num_stages=4)
        elif d <= 64:
            # D = 64: 64-key steps as fast or faster everywhere on the cost-model grid (H100,
            # benchmarks/results/costmodel_h100.md: 65536 at 3% 0.75 vs 1.01 ms for 128x128)
            sch = Schedule(block_m=128, block_n=64, num_warps=8, num_stages=3)
        elif _tma_ok(spec, device):
            sch = Schedule(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True)
        else:
            sch = Schedule(block_m=128, block_n=64, num_warps=8, num_stages=3)
    elif d <= 128:
        sch = Schedule(block_m=64, block_n=64, num_warps=4, num_stages=3)
    else:
        sch = Schedule(block_m=64, block_n=32, num_warps=8, num_stages=2)
    if sch.block_m > spec.block or sch.block_n > spec.block:
        sch = dataclasses.replace(sch, block_m=min(sch.block_m, spec.block),
                                  block_n=min(sch.block_n, spec.block),
                                  num_warps=min(sch.num_warps, 4))
    return sch


def default_token_sparse_schedule(spec: TokenSparseSpec, device, rows: int, n_idx: int,
                                  per_sm: int = 16) -> Schedule:
    """Default for the gather kernel; ``rows`` = programs before splitting (B * heads * Nq).

    Splits the index list when the rows alone cannot fill the device (decode), aiming at
    ``per_sm`` small programs per SM (default 16, from the H100 decode sweep:
    benchmarks/NOTES_kernels.md; 0 = never split)."""
    if device.type != "cuda":
        return Schedule(block_m=16, block_n=32, num_warps=4, num_stages=1,
                        split=_split_for(rows, n_idx, 32, 2, minimum=32, per_sm=per_sm))
    stages = 3
    if max(spec.head_dim, spec.v_head_dim) <= 128:
        block_n, warps = 64, 2
        if spec.pack_gqa and rows >= 4 * _sm_count(device):
            # GQA-packed prefill (e.g. DSA over MQA): H100 sweep at N=65536, 16 heads x 128,
            # top-2048 (benchmarks/results/dsa_h100.md): 64/4 warps/2 stages 10.3 ms vs 11.2
            warps, stages = 4, 2
    else:
        block_n, warps = 32, 4
    return Schedule(block_m=16, block_n=block_n, num_warps=warps, num_stages=stages,
                    split=_split_for(rows, n_idx, block_n, _sm_count(device), minimum=2 * block_n,
                                     per_sm=per_sm))


def _split_for(rows: int, n_idx: int, block_n: int, sms: int, minimum: int,
               per_sm: int = 16) -> int:
    """Index entries per program (0 = no split) so that rows x splits ~ ``per_sm`` programs
    per SM (``per_sm`` 0: no split)."""
    if per_sm <= 0 or rows >= 4 * sms or n_idx <= minimum:
        return 0
    want = max(1, (per_sm * sms) // max(rows, 1))
    split = -(-max(-(-n_idx // want), minimum) // block_n) * block_n
    split = min(split, 4096)
    return 0 if split >= n_idx else split


# ----------------------------------------------------------------------------- kernels

_spec_hash = functools.lru_cache(maxsize=None)(stable_hash)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Everything derived from the shapes, strides and dtypes of one call signature: the
    kernel's cache key and how to launch it. Built once per signature (``plan``), reused by
    every later call with the same signature (``run``)."""
    key: tuple
    spec: object
    schedule: Schedule
    grid: tuple
    args: tuple                     # integer launch arguments that follow the tensors
    out_shape: tuple
    lse_shape: tuple
    n_split: int = 1
    contiguous: tuple = ()          # inputs that must be made contiguous before launch
    tail: tuple = ()                # integer launch arguments after the runtime scalars


_PLANS: dict = {}
_MAX_PLANS = 4096


def _signature(fn: str, tensors, extra: tuple) -> tuple:
    return (fn, extra) + tuple((t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)
                               for t in tensors)


def _cached_plan(sig: tuple, build):
    plan = _PLANS.get(sig)
    if plan is None:
        plan = build()
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[sig] = plan
    return plan


def _module(plan: LaunchPlan):
    return KERNELS.get(plan.key, lambda: load(emit(plan.spec, plan.schedule)))


def _plan_block_sparse(q, k, v, kv_num_blocks, kv_indices, block, causal, windowed,
                       schedule, pack_gqa, hopper_first: bool = False, sinks: bool = False,
                       kv_ranges: bool = False, softcap: bool = False, mask: str = "",
                       mask_flags: bool = False) -> LaunchPlan:
    fn = "block_sparse_attention"
    _check_qkv(fn, q, k, v)
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"{fn}: block must be a power of two >= 16, got {block!r}")
    B, Hq, Nq, D = q.shape
    Hkv, Nkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    nqb = -(-Nq // block)
    _check_index(fn, "kv_num_blocks", kv_num_blocks, (B, None, nqb), q.device)
    hs = kv_num_blocks.shape[1]
    _check_index(fn, "kv_indices", kv_indices, (B, hs, nqb, None), q.device)
    per_group = _heads_of_lists(fn, "kv_num_blocks", hs, Hq, Hkv)
    G = Hq // Hkv
    if pack_gqa and not per_group:
        raise ValueError(f"{fn}: pack_gqa=True needs lists per KV head (Hs == Hkv={Hkv}), "
                         f"got Hs={hs}")
    if pack_gqa is None:
        pack_gqa = Nq <= PACK_GQA_MAX_NQ
    strided = [_unit_last(t) for t in (q, k, v)]
    spec = BlockSparseSpec(head_dim=D, v_head_dim=Dv, gqa_group=G,
                           pack_gqa=bool(pack_gqa) and per_group and G > 1,
                           lists_per_group=per_group or G == 1, causal=bool(causal),
                           dtype=_FLOAT_DTYPES[q.dtype], block=block, windowed=windowed,
                           stride_align=_stride_align(q.dtype, *strided), sinks=sinks,
                           kv_ranges=kv_ranges, softcap=softcap, mask=mask,
                           mask_flags=mask_flags)
    maxb = kv_indices.shape[-1]
    if schedule is None or hopper_first:
        default = default_block_sparse_schedule(spec, q.device, maxb)
        if schedule is None or default.wgmma:     # wgmma only where _wgmma_ok
            schedule = default
    if schedule.tma and not _tma_ok(spec, q.device):
        schedule = dataclasses.replace(schedule, tma=False)
    if schedule.wgmma and not _wgmma_ok(spec, schedule, q.device):   # e.g. sinks, mask
        schedule = dataclasses.replace(schedule, wgmma=False)
    gp = next_pow2(G) if spec.pack_gqa else 1
    qm = max(schedule.block_m, gp) // gp
    heads = Hkv if spec.pack_gqa else Hq
    n_mtiles = -(-Nq // qm)
    n_tiles = n_mtiles * B * heads
    if schedule.persistent:
        grid = (min(n_tiles, schedule.persistent * _sm_count(q.device)),)
    elif schedule.wgmma:                    # a 1-D grid: one program per tile
        grid = (n_tiles,)
    else:
        grid = (n_mtiles, B * heads)
    a = spec.stride_align
    strides = tuple(st // a for t in strided for st in t.stride()[:3])
    key = ("block_sparse", _device_key(q.device), (str(q.dtype), str(kv_indices.dtype)),
           D, G, _spec_hash(spec), schedule, (seq_bucket(Nq), seq_bucket(Nkv)))
    return LaunchPlan(key=key, spec=spec, schedule=schedule, grid=grid,
                      args=strides + (Nq, Nkv, hs, Hq, nqb, maxb),
                      out_shape=(B, Hq, Nq, Dv), lse_shape=(B, Hq, Nq),
                      contiguous=tuple(t.stride(-1) != 1 for t in (q, k, v)) + (
                          not kv_num_blocks.is_contiguous(), not kv_indices.is_contiguous()),
                      tail=(n_mtiles, n_tiles))


def _tma_ok(spec: BlockSparseSpec, device) -> bool:
    """Tensor descriptors need 16-byte strides (and a Triton that has them)."""
    import triton.language as tl
    itemsize = 4 if spec.dtype == "float32" else 2
    return spec.stride_align * itemsize == 16 and hasattr(tl, "make_tensor_descriptor")


def _wgmma_ok(spec: BlockSparseSpec, sch: Schedule, device) -> bool:
    """The Gluon warpgroup-MMA kernel runs on Hopper (capability 9.x) for the cases that
    ``codegen.block_sparse.wgmma_kernel.supported`` accepts; elsewhere the Triton kernel runs."""
    if (device.type != "cuda" or not torch.cuda.is_available()
            or torch.cuda.get_device_capability(device)[0] != 9):
        return False
    try:
        wgmma_kernel.gluon_names()
    except ImportError:                     # a Triton without Gluon's Hopper module
        return False
    return wgmma_kernel.supported(spec, sch)


def _launch_warps(sch: Schedule) -> int:
    return wgmma_kernel.LAUNCH_WARPS if sch.wgmma else sch.num_warps


def _contiguous_as_planned(plan: LaunchPlan, tensors):
    return [t.contiguous() if c else t for t, c in zip(tensors, plan.contiguous)]


def block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, *, block: int, scale: float,
                           causal: bool, sink: int = 0, window: int = 0,
                           schedule: Optional[Schedule] = None, pack_gqa: Optional[bool] = None,
                           out=None, lse=None, hopper_first: bool = False,
                           return_schedule: bool = False, sinks: Optional[torch.Tensor] = None,
                           kv_start: Optional[torch.Tensor] = None,
                           kv_end: Optional[torch.Tensor] = None, softcap: float = 0.0,
                           mask: Optional[torch.Tensor] = None, mask_kind: str = "add",
                           mask_flags: Optional[torch.Tensor] = None):
    """Flash-attention forward over the listed key blocks of each query block.

    Shapes: q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nkv, D]``, v ``[B, Hkv, Nkv, Dv]``;
    ``kv_num_blocks`` int32 ``[B, Hs, ceil(Nq/block)]``, ``kv_indices`` int32
    ``[B, Hs, ceil(Nq/block), MAXB]`` with ``Hs`` in ``{Hkv, Hq}`` (FlexAttention layout).
    Listed entries must be distinct and in ``[0, ceil(Nkv/block))``. ``causal`` is bottom-right
    aligned; ``window > 0`` keeps key ``j`` iff ``pos - window < j`` or ``j < sink``.
    ``pack_gqa``: with per-group lists, let one program serve the group's query heads (K/V
    tiles loaded once per group); default: only when ``Nq <= PACK_GQA_MAX_NQ``, where query
    tiles of a single head would be mostly empty (at long Nq both load K/V equally often, and
    per-head tiles measured faster). ``out`` / ``lse``: optional contiguous tensors to write
    the results into. ``hopper_first``: ``schedule`` (e.g. the cost model's Triton tile
    schedule) yields to the warp-specialized Hopper kernel wherever that covers the call (it
    measured faster than every Triton schedule on H100: benchmarks/results/kernels_h100.md,
    kernels_h100_d64.md). Returns ``(out [B, Hq, Nq, Dv], lse [B, Hq, Nq] fp32)``, and the
    schedule that ran as a third element with ``return_schedule``.

    ``sinks`` (float ``[Hq]``, fp32 read as is, other dtypes converted): a learned logit per
    query head joining each row's softmax as one more key of value 0 (GPT-OSS), in the units
    of ``scale * q . k``; then ``lse = log(sum_j exp(s_j) + exp(sinks[h]))``, and rows without
    keys give out = 0, lse = ``sinks[h]``. ``kv_start`` / ``kv_end`` (int32 ``[B]``, either
    alone or both; missing: 0 / Nkv): batch row ``b`` keeps only keys ``kv_start[b] <= j <
    kv_end[b]`` on top of the lists and the other rules (padded batches; query rows keep their
    padded positions for the causal rule). Their values are read by the kernel (no host sync,
    no recompile); bounds outside ``[0, Nkv]`` are clipped and ``kv_start >= kv_end`` keeps
    nothing. Either one runs the Triton kernel (never the Hopper Gluon kernel, which has
    neither).

    Score modifiers, applied in this order to ``s = scale * q . k`` before the rules above
    (as ``attention_reference`` applies ``mods`` before its causal rule): ``softcap`` c > 0
    (0 = none): ``s = c * tanh(s / c)`` (Gemma 2, Grok); ``mask`` (any strides; shape
    ``[B | 1, Hq | 1, Nq | 1, Nkv | 1]``, fewer leading dimensions broadcast too) with
    ``mask_kind`` "add" (any float dtype, natural-log units: ``s + m``; values <= -1e30, e.g.
    ``finfo.min``, mask the pair) or "keep" (bool, False masks the pair). ``mask_flags``
    (int8 / int32, ``kv_indices``' shape; ``codegen.block_sparse.prune_block_lists`` makes it
    with lists pruned of the mask's empty blocks): the kernel reads the mask only for entries
    whose flag is nonzero, the others are taken as unmasked; without it every listed tile
    reads the mask. Rows whose every pair is masked (by the mask, the rules or the lists) give
    out = 0 and lse = -inf (the head's sink with ``sinks``): where eager attention with an
    additive ``finfo.min`` mask gives a finite average there, the caller finds the rows by
    ``lse == -inf`` and fixes them up. Either modifier runs the Triton kernel (never the Hopper
    Gluon kernel).
    """
    fn = "block_sparse_attention"
    _check_scale(fn, scale)
    softcap = _check_softcap(fn, softcap)
    sink, window = int(sink), int(window)
    if sink < 0 or window < 0:
        raise ValueError(f"{fn}: sink and window must be >= 0, got sink={sink}, window={window}")
    tensors = (q, k, v, kv_num_blocks, kv_indices)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        _check_qkv(fn, q, k, v)                  # raises with the offending argument's name
        _check_index(fn, "kv_num_blocks", kv_num_blocks, (None, None, None), q.device)
        _check_index(fn, "kv_indices", kv_indices, (None, None, None, None), q.device)
    has_sinks, has_ranges = sinks is not None, kv_start is not None or kv_end is not None
    mask_spec = _mask_kind(fn, mask, mask_kind)
    has_flags = mask_flags is not None
    if has_flags and mask is None:
        raise ValueError(f"{fn}: mask_flags given without a mask")
    sig = _signature(fn, tensors, (block, bool(causal), window > 0, schedule, pack_gqa,
                                   hopper_first, has_sinks, has_ranges, softcap > 0, mask_spec,
                                   has_flags))
    plan = _cached_plan(sig, lambda: _plan_block_sparse(q, k, v, kv_num_blocks, kv_indices, block,
                                                         causal, window > 0, schedule, pack_gqa,
                                                         hopper_first, has_sinks, has_ranges,
                                                         softcap > 0, mask_spec, has_flags))
    sinks, ranges = _check_extras(fn, q, k, sinks, kv_start, kv_end)
    mask_args = _mask_args(fn, q, k, mask, mask_kind)
    mask_flags = _check_mask_flags(fn, mask_flags, kv_indices)
    extra = (((sinks,) if has_sinks else ()) + (ranges if has_ranges else ())
             + ((softcap * LOG2E,) if softcap > 0 else ()) + mask_args
             + ((mask_flags,) if has_flags else ()))
    mod = _module(plan)
    if (plan.schedule.tma or plan.schedule.wgmma) and q.device.type == "cuda":
        _set_descriptor_allocator()
    out, lse = _outputs(fn, out, lse, plan.out_shape, plan.lse_shape, q.dtype, q.device)
    done = (out, lse, plan.schedule) if return_schedule else (out, lse)
    if out.numel() == 0:
        return done
    q, k, v, num, idx = _contiguous_as_planned(plan, tensors)
    # the Hopper kernel stores the output through a tensor descriptor (16-byte aligned start)
    o = torch.empty_like(out) if plan.schedule.wgmma and out.data_ptr() % 16 else out
    mod.block_sparse_fwd[plan.grid](
        q, k, v, o, lse, num, idx, *plan.args, float(scale) * LOG2E, sink, window, *plan.tail,
        *extra, num_warps=_launch_warps(plan.schedule), num_stages=plan.schedule.num_stages)
    if o is not out:
        out.copy_(o)
    return done


def _plan_token_sparse(q, k, v, indices, schedule, backward: bool = False,
                       split_per_sm: Optional[int] = None, sinks: bool = False,
                       kv_ranges: bool = False, softcap: bool = False,
                       mask: str = "") -> LaunchPlan:
    """Plan of the gather forward (or, with ``backward``, of its backward kernel).

    Lists shared by every head (``Hs == 1``) are read as per-group lists with head stride 0:
    GQA groups stay packed and the index tensor is never expanded in memory."""
    fn = "token_sparse_attention_bwd" if backward else "token_sparse_attention"
    _check_qkv(fn, q, k, v)
    B, Hq, Nq, D = q.shape
    Hkv, Nkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    _check_index(fn, "indices", indices, (B, None, Nq, None), q.device)
    hs, n_idx = indices.shape[1], indices.shape[3]
    per_group = _heads_of_lists(fn, "indices", hs, Hq, Hkv, shared_ok=True)
    G = Hq // Hkv
    strided = [_unit_last(t) for t in (q, k, v)]
    idx = _unit_last(indices)
    spec = TokenSparseSpec(head_dim=D, v_head_dim=Dv, gqa_group=G, pack_gqa=per_group and G > 1,
                           lists_per_group=per_group or G == 1, dtype=_FLOAT_DTYPES[q.dtype],
                           stride_align=_stride_align(q.dtype, *strided),
                           sinks=sinks and not backward, kv_ranges=kv_ranges,
                           softcap=softcap and not backward, mask="" if backward else mask)
    heads = Hkv if spec.pack_gqa else Hq
    if schedule is None:
        default = default_token_sparse_bwd_schedule if backward else default_token_sparse_schedule
        extra = {} if split_per_sm is None else {"per_sm": int(split_per_sm)}
        schedule = default(spec, q.device, B * heads * Nq, n_idx, **extra)
    chunk = schedule.split if 0 < schedule.split < n_idx else max(n_idx, 1)
    n_split = max(1, -(-n_idx // chunk))
    a = spec.stride_align
    strides = tuple(st // a for t in strided for st in t.stride()[:3])
    idx_strides = (idx.stride(0), idx.stride(1) if hs > 1 else 0, idx.stride(2))
    sizes = (Nq, Nkv, Hkv if per_group else Hq, Hq) + (
        (Hkv, n_idx, chunk) if backward else (n_idx, chunk, n_split))
    key = ("token_sparse_bwd" if backward else "token_sparse", _device_key(q.device),
           (str(q.dtype), str(indices.dtype)), D, G, _spec_hash(spec), schedule,
           (seq_bucket(Nkv), seq_bucket(n_idx)))
    return LaunchPlan(key=key, spec=spec, schedule=schedule, grid=(Nq, B * heads, n_split),
                      args=strides + idx_strides + sizes,
                      out_shape=(B, Hq, Nq, Dv), lse_shape=(B, Hq, Nq), n_split=n_split,
                      contiguous=tuple(t.stride(-1) != 1 for t in (q, k, v, indices)))


def _token_sparse_plan(fn: str, tensors: tuple, scale, schedule, *, backward: bool,
                       split_per_sm: Optional[int] = None, sinks: bool = False,
                       kv_ranges: bool = False, softcap: bool = False,
                       mask: str = "") -> LaunchPlan:
    """Checks shared by the gather forward and backward, then their (cached) launch plan."""
    q, k, v, indices = tensors
    _check_scale(fn, scale)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        _check_qkv(fn, q, k, v)
        _check_index(fn, "indices", indices, (None, None, None, None), q.device)
    if split_per_sm is not None and (isinstance(split_per_sm, bool) or
                                     not isinstance(split_per_sm, int) or split_per_sm < 0):
        raise ValueError(f"{fn}: split_per_sm must be None or an int >= 0, got {split_per_sm!r}")
    sig = _signature(fn, tensors, (schedule, split_per_sm, sinks, kv_ranges, softcap, mask))
    return _cached_plan(sig, lambda: _plan_token_sparse(q, k, v, indices, schedule,
                                                        backward=backward,
                                                        split_per_sm=split_per_sm, sinks=sinks,
                                                        kv_ranges=kv_ranges, softcap=softcap,
                                                        mask=mask))


def token_sparse_attention(q, k, v, indices, *, scale: float, schedule: Optional[Schedule] = None,
                           split_per_sm: Optional[int] = None, out=None, lse=None,
                           sinks: Optional[torch.Tensor] = None,
                           kv_start: Optional[torch.Tensor] = None,
                           kv_end: Optional[torch.Tensor] = None, softcap: float = 0.0,
                           mask: Optional[torch.Tensor] = None, mask_kind: str = "add"):
    """Each query row attends to its own list of key positions (gather attention).

    Shapes: q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nkv, D]``, v ``[B, Hkv, Nkv, Dv]``, ``indices``
    int32 ``[B, Hs, Nq, K]`` with ``Hs`` in ``{1, Hkv, Hq}`` (1: one list per query row for
    every head, DeepSeek Sparse Attention style; GQA groups are still served by one program);
    any strides with a unit last one. Negative entries are padding and entries ``>= Nkv`` are
    ignored; entries must be distinct. No causal mask is implied. With
    few rows (decode) the list is split across programs and merged by a combine kernel;
    ``split_per_sm`` sets how many programs per SM that split aims at (0: no split; None: the
    default, 16; ignored when ``schedule`` is given). ``out`` / ``lse``: optional contiguous
    tensors to write the results into. ``sinks`` (float ``[Hq]``): learned sink logits, one
    more key of value 0 per row's softmax (added once, in the combine, when the list is
    split); ``kv_start`` / ``kv_end`` (int32 ``[B]``): entries of batch row ``b`` outside
    ``[kv_start[b], kv_end[b])`` are skipped like padding; both as in
    ``block_sparse_attention``. ``softcap`` and ``mask`` / ``mask_kind``: the score modifiers of
    ``block_sparse_attention`` (same shapes and semantics), the mask read at each row's listed
    keys; the backward (``token_sparse_attention_bwd``) has neither. Returns ``(out [B, Hq, Nq,
    Dv], lse [B, Hq, Nq] fp32)``; rows without keys (or whose every listed key is masked) give
    out = 0 and lse = -inf (``sinks[h]`` with sinks).
    """
    fn = "token_sparse_attention"
    tensors = (q, k, v, indices)
    softcap = _check_softcap(fn, softcap)
    has_sinks, has_ranges = sinks is not None, kv_start is not None or kv_end is not None
    mask_spec = _mask_kind(fn, mask, mask_kind)
    plan = _token_sparse_plan(fn, tensors, scale, schedule, backward=False,
                              split_per_sm=split_per_sm, sinks=has_sinks, kv_ranges=has_ranges,
                              softcap=softcap > 0, mask=mask_spec)
    sinks, ranges = _check_extras(fn, q, k, sinks, kv_start, kv_end)
    mask_args = _mask_args(fn, q, k, mask, mask_kind)
    mod = _module(plan)
    out, lse = _outputs(fn, out, lse, plan.out_shape, plan.lse_shape, q.dtype, q.device)
    if out.numel() == 0:
        return out, lse
    q, k, v, idx = _contiguous_as_planned(plan, tensors)
    B, Hq, Nq, Dv = plan.out_shape
    if plan.n_split > 1:
        po = _workspace((B, Hq, Nq, plan.n_split, Dv), q.device)       # [B, Hq, Nq, S, Dv]
        pl = _workspace((B, Hq, Nq, plan.n_split), q.device)           # [B, Hq, Nq, S]
    else:
        po, pl = out, lse
    mod.token_sparse_fwd[plan.grid](
        q, k, v, idx, po, pl, *plan.args, float(scale) * LOG2E,
        *((sinks,) if has_sinks else ()), *(ranges if has_ranges else ()),
        *((softcap * LOG2E,) if softcap > 0 else ()), *mask_args,
        num_warps=plan.schedule.num_warps, num_stages=plan.schedule.num_stages)
    if plan.n_split > 1:
        mod.token_sparse_combine[(B * Hq * Nq,)](
            po, pl, out, lse, plan.n_split, *((Nq, Hq, sinks) if has_sinks else ()),
            num_warps=4)
    return out, lse


def default_token_sparse_bwd_schedule(spec: TokenSparseSpec, device, rows: int,
                                      n_idx: int) -> Schedule:
    """Default for the gather backward; ``rows`` = programs before splitting (B * heads * Nq).

    Each step holds a K and a V tile and their fp32 gradient tiles; small programs measured
    fastest (H200 sweep of 16/32 keys x 2/4/8 warps x 2/3 stages, D = 128 and 256, GQA groups
    1 to 64, 2k-entry lists): 2 warps, 32 keys per step when packed at D <= 128 else 16, 3
    stages; 4 warps once a packed group fills 64 rows. The list is split (dQ then adds up
    atomically in fp32) only when the rows alone cannot fill the device."""
    if device.type != "cuda":
        return Schedule(block_m=16, block_n=32, num_warps=4, num_stages=1,
                        split=_split_for(rows, n_idx, 32, 2, minimum=32))
    packed_rows = next_pow2(spec.gqa_group) if spec.pack_gqa else 1
    block_n = 32 if spec.pack_gqa and max(spec.head_dim, spec.v_head_dim) <= 128 else 16
    return Schedule(block_m=16, block_n=block_n, num_warps=4 if packed_rows >= 64 else 2,
                    num_stages=3, split=_split_for(rows, n_idx, block_n, _sm_count(device),
                                                   minimum=4 * block_n))


def _check_saved(fn: str, out, lse, dout, shape_out: tuple, dtype, device):
    """The forward's ``out`` and ``lse`` and the incoming ``dout`` for the backward."""
    for name, t, want, dt in (("out", out, shape_out, dtype), ("dout", dout, shape_out, dtype),
                              ("lse", lse, shape_out[:3], torch.float32)):
        if (not isinstance(t, torch.Tensor) or tuple(t.shape) != want or t.dtype != dt
                or t.device != device):
            got = (f"{t.dtype} {list(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"{fn}: {name} must be a {dt} tensor {list(want)} on {device}, "
                             f"got {got}")


def token_sparse_attention_bwd(q, k, v, indices, out, lse, dout, *, scale: float,
                               schedule: Optional[Schedule] = None,
                               kv_start: Optional[torch.Tensor] = None,
                               kv_end: Optional[torch.Tensor] = None):
    """Backward of ``token_sparse_attention``: ``(dq, dk, dv)`` shaped and typed like q, k, v.

    Arguments as in the forward, plus its ``out [B, Hq, Nq, Dv]`` and ``lse [B, Hq, Nq]`` fp32
    and the gradient ``dout [B, Hq, Nq, Dv]`` (q's dtype). A pre-pass computes
    ``delta = rowsum(dout * out)``; then one program per query row (and GQA group when the
    lists are shared by it or by every head, as in the forward) re-gathers the listed K/V rows,
    recomputes P from ``lse``, writes dQ and adds its dK/dV rows with atomics into fp32
    buffers, which are cast to k/v's dtype at the end. ``kv_start`` / ``kv_end``: the
    forward's key ranges. A forward run with ``sinks`` needs no argument here: its ``lse``
    holds the sink (a key of value 0, so dQ/dK/dV change only through lse); the gradient of
    the sinks themselves is not computed.

    Example (on a CUDA device)::

        >>> out, lse = token_sparse_attention(q, k, v, idx, scale=0.125)
        >>> dq, dk, dv = token_sparse_attention_bwd(q, k, v, idx, out, lse, torch.ones_like(out),
        ...                                         scale=0.125)
    """
    fn = "token_sparse_attention_bwd"
    tensors = (q, k, v, indices)
    has_ranges = kv_start is not None or kv_end is not None
    plan = _token_sparse_plan(fn, tensors, scale, schedule, backward=True, kv_ranges=has_ranges)
    _check_saved(fn, out, lse, dout, plan.out_shape, q.dtype, q.device)
    _, ranges = _check_extras(fn, q, k, None, kv_start, kv_end)
    B, Hq, Nq, Dv = plan.out_shape
    Hkv, Nkv, D = k.shape[1], k.shape[2], q.shape[3]
    dk = torch.zeros((B, Hkv, Nkv, D), device=q.device, dtype=torch.float32)   # [B, Hkv, Nkv, D]
    dv = torch.zeros((B, Hkv, Nkv, Dv), device=q.device, dtype=torch.float32)  # [B, Hkv, Nkv, Dv]
    rows = B * Hq * Nq
    if plan.schedule.split:
        dq = torch.zeros((B, Hq, Nq, D), device=q.device, dtype=torch.float32)
    elif POISON_WORKSPACE:
        dq = torch.full((B, Hq, Nq, D), float("nan"), device=q.device, dtype=q.dtype)
    else:
        dq = torch.empty((B, Hq, Nq, D), device=q.device, dtype=q.dtype)     # [B, Hq, Nq, D]
    if rows == 0:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    mod = _bwd_module(plan)
    q, k, v, idx = _contiguous_as_planned(plan, tensors)
    out, dout, lse = out.contiguous(), dout.contiguous(), lse.contiguous()
    delta = _workspace((B, Hq, Nq), q.device)                                  # [B, Hq, Nq]
    mod.token_sparse_bwd_pre[(-(-rows // BWD_PRE_ROWS),)](out, dout, delta, rows, num_warps=4)
    mod.token_sparse_bwd[plan.grid](
        q, k, v, idx, dout, lse, delta, dq, dk, dv, *plan.args, float(scale) * LOG2E,
        float(scale), *(ranges if has_ranges else ()), num_warps=plan.schedule.num_warps,
        num_stages=plan.schedule.num_stages)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _bwd_module(plan: LaunchPlan):
    return KERNELS.get(plan.key,
                       lambda: load(emit(TokenSparseBackwardSpec(plan.spec), plan.schedule)))


# ----------------------------------------------------------------------------- block_topk

BLOCK_TOPK_MAX_NKB = 16384     # key blocks one selection program keeps in registers
# Widest rows a partial sort in the selection program is the fastest way to select from (H100,
# benchmarks/results/estimators_h100.md): 0.26 ms vs 0.64 ms for rounds of max at 1024 blocks;
# at 4096 (Quest's pages at 65536 tokens) it takes 11.5 ms and torch.topk 8.3.
SORTED_SELECT_MAX_NKB = 1024
# Rows' thresholds by counting passes (block_topk_select's ``bisect``) instead of a partial sort:
# H100, 65536 tokens (estimators_h100.md): 1024-wide rows 0.21 ms for top-32 (sort: 0.26) and
# 0.23 with auto's budgets (0.29); Quest's 4096-wide rows 4.1 ms (sort: 11.5, torch.topk: 8.3)
SELECT_BISECT = True
# Wider rows still go to the selection program when there are at most this many (decode: one
# query block per head; torch's selection is ~100 small launches there, 1-1.6 ms on H100).
WIDE_SELECT_MAX_ROWS = 512


@functools.lru_cache(maxsize=None)
def has_tl_topk() -> bool:
    """Whether this Triton has ``tl.topk`` (a partial bitonic sort; Triton 3.6 has it)."""
    import triton.language as tl
    return hasattr(tl, "topk")


def _block_topk_module(device):
    from codegen.select.block_topk_kernel import BlockTopkSpec
    return KERNELS.get(("block_topk", _device_key(device)), lambda: load(emit(BlockTopkSpec())))


def pool_blocks(x: torch.Tensor, block: int, *, rows: Optional[int] = None,
                num_warps: int = 2, blocks_per_program: int = 1) -> torch.Tensor:
    """Mean of each block of ``block`` rows of ``x [B, H, N, D]`` (the last block may be
    short): fp32 ``[B, H, ceil(N / block), D]``. ``rows``: rows loaded per step (a power of
    two; default by D), ``num_warps``, ``blocks_per_program``: launch knobs (for sweeps)."""
    B, H, N, D = x.shape
    nb = -(-N // block)
    out = torch.empty((B, H, nb, D), device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    if rows is None:       # H100 sweep (benchmarks/results/estimators_h100.md): 32 rows, 2 warps
        rows = min(next_pow2(block), 64 if D <= 64 else 32)
    d_p = next_pow2(max(D, 16))
    bpp = max(1, int(blocks_per_program))
    _block_topk_module(x.device).pool_rows[(-(-nb // bpp), B * H)](
        x, out, *x.stride(), H, N, nb, block, D, ROWS=rows, D_P=d_p, BPP=bpp,
        num_warps=num_warps)
    return out


def pooled_dots(pq: torch.Tensor, pk: torch.Tensor, *, n_q: int, n_kv: int,
                causal: Optional[str], block: int, precision: Optional[str] = None) -> torch.Tensor:
    """``pq @ pk^T`` per head for pooled fp32 ``pq [B, H, NQB, D]`` and ``pk [B, H, NKB, D]``
    (``pool_blocks`` outputs): fp32 ``[B, H, NQB, NKB]``. With a causal rule (``block``-row
    blocks of ``n_q`` queries and ``n_kv`` keys), tiles holding no allowed pair are -inf.
    ``precision``: ``tl.dot``'s input precision (default ``"tf32x3"``: three TF32 products,
    about fp32 accuracy; ``"ieee"``: fp32 FMA)."""
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
        D_P=next_pow2(max(D, 16)), CAUSAL=causal is not None, PREC=precision or "tf32x3",
        num_warps=4)
    return out


def block_topk_select(dots: torch.Tensor, n_q: int, n_kv: int, causal: Optional[str], block: int,
                      *, scale: float, topk: int, sink_blocks: int, local_blocks: int,
                      num_warps: Optional[int] = None, sorted_select: Optional[bool] = None,
                      budget: Optional[torch.Tensor] = None, budget_max: int = 0,
                      rows_per_program: int = 1, sort32: bool = True,
                      bisect: Optional[bool] = None):
    """``select_topk_blocks`` on the logits ``scale * dots`` (``dots`` fp32 ``[B, H, NQB, NKB]``
    unscaled pooled dot products), with the causal rule (``"lower_right"`` / ``"upper_left"`` /
    None) applied by position inside the kernel. Returns ``(counts int32 [B, H, NQB], indices
    int32 [B, H, NQB, W])``, W = ``topk_width(NKB, topk, sink_blocks, local_blocks)``.

    ``budget`` (int32 ``[NQB]``): instead of ``topk``, query block ``i`` keeps ``budget[i]``
    blocks in all, its forced blocks included (``select_budget_fraction``), and ``budget_max``
    >= ``max(budget)`` sizes the partial sort; ``topk`` then only sets the lists' width.

    ``bisect``: find each row's threshold by 32 counting passes instead of a partial sort (same
    selection, ties included); default ``SELECT_BISECT``. ``sorted_select`` / ``sort32`` /
    ``num_warps`` / ``rows_per_program``: the other variants and launch knobs (for sweeps)."""
    from codegen.select.reference import topk_width
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
    if bisect is None:
        bisect = SELECT_BISECT and sorted_select is None
    if sorted_select is None:  # one partial sort beats topk rounds of max up to this width
        sorted_select = has_tl_topk() and nkb_p <= SORTED_SELECT_MAX_NKB
    if bisect:      # H100 sweep (benchmarks/results/estimators_h100.md): 1 warp, 4 from 2048
        warps = num_warps or (1 if nkb_p <= 1024 else 4)
    else:
        warps = num_warps or ((1 if sorted_select else 4) if nkb_p <= 1024
                              else (8 if nkb_p <= 4096 else 16))
    rpp = max(1, int(rows_per_program))
    _block_topk_module(dots.device).block_topk_select[(-(-nqb // rpp), B * H)](
        dots, counts, idx, counts if budget is None else budget, nqb, nkb, n_q, off, block,
        float(scale), min(topk, nkb), sink_blocks, local_blocks, width,
        CAUSAL=causal is not None, NKB_P=nkb_p, W_P=next_pow2(max(width, 16)),
        SORTED=bool(sorted_select and has_tl_topk()),
        K_P=min(nkb_p, max(16, next_pow2(min(topk if budget is None else budget_max, nkb)))),
        BUDGET=budget is not None, RPP=rpp, SORT32=bool(sort32), BISECT=bool(bisect),
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
    from codegen.select.lines_kernel import LinesSpec
    return KERNELS.get(("lines", _device_key(device)), lambda: load(emit(LinesSpec())))


def last_rows_lines(q: torch.Tensor, k: torch.Tensor, *, scale: float, causal: str,
                    last_q: int, tiles_per_program: Optional[int] = None,
                    pool_block: Optional[int] = None):
    """MInference's line statistics without the ``[L, Nkv]`` probabilities: the softmax
    attention of the last ``min(last_q, Nq)`` query rows summed per key (vertical) and per
    diagonal offset ``pos - key`` (slash), summed over the heads of each GQA group: fp32
    ``[B, Hkv, 2, Nkv]``, as ``codegen.select.policies.vslash_estimate`` without modifiers.
    ``causal``: ``"lower_right"`` or ``"upper_left"``.

    ``pool_block``: also return ``pool_blocks(k, pool_block)`` (``(lines, pooled_k)``), made
    by the first pass over the keys when it can (one query head per KV head, the rows' tile is
    one block), else by ``pool_blocks``."""
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
    pm = _workspace((B * Hq, t0, l_p), dev)
    pl = _workspace((B * Hq, t0, l_p), dev)
    pk = torch.empty((B, Hkv, nkb, D), device=dev, dtype=torch.float32) if fuse else out
    mod = _lines_module(dev)
    args = (*q.stride(), *k.stride(), Hq, Hq // Hkv, Nkv, r0, L, p0)
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


def auto_block_scores(pq: torch.Tensor, pk: torch.Tensor, lines: torch.Tensor,
                      aware: torch.Tensor, *, n_q: int, causal: str, block: int,
                      scale: float) -> torch.Tensor:
    """The ``auto`` policy's block scores (causal, one head per group) in one pass: for the
    query-aware heads (``aware`` bool ``[B, H]``) the pooled logits ``scale * pq . pk`` (pooled
    fp32 ``[B, H, NQB, D]`` / ``[B, H, NKB, D]``), for the others the line mass of ``lines``
    (``[B, H, 2, Nkv]``, from ``last_rows_lines``) through each key block; fp32
    ``[B, H, NQB, NKB]``, -inf where the causal rule allows no pair."""
    B, H, nqb, D = pq.shape
    nkb = pk.shape[2]
    n_kv = lines.shape[-1]
    if (lines.shape != (B, H, 2, n_kv) or aware.shape != (B, H) or pk.shape[:2] != (B, H)
            or pk.shape[3] != D):
        raise ValueError(f"auto_block_scores: pooled q {tuple(pq.shape)}, pooled k "
                         f"{tuple(pk.shape)}, lines {tuple(lines.shape)} and aware "
                         f"{tuple(aware.shape)} do not match")
    out = torch.empty((B, H, nqb, nkb), device=pq.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    pre = line_prefix_sums(lines)                            # [B, H, 2, Nkv + 1]
    if aware.dtype != torch.int32:
        aware = aware.to(torch.int32)
    bm = bn = 64 if D <= 128 else 32
    _lines_module(pq.device).auto_block_scores[(-(-nqb // bm), -(-nkb // bn), B * H)](
        pq.contiguous(), pk.contiguous(), pre, aware.contiguous(), out, nqb,
        nkb, n_q, n_kv, positions_offset(causal, n_q, n_kv), block, D, float(scale), BM=bm,
        BN=bn, D_P=next_pow2(max(D, 16)), PREC="tf32x3", num_warps=4)
    return out


QUEST_MAX_PAGE = 64       # pages (powers of two) whose query blocks one bounds program packs


def _quest_module(device):
    from codegen.select.quest_kernel import QuestSpec
    return KERNELS.get(("quest", _device_key(device)), lambda: load(emit(QuestSpec())))


def quest_page_bounds(q: torch.Tensor, k: torch.Tensor, *, page: int, causal: Optional[str],
                      pages_per_tile: int = 64, num_warps: int = 4,
                      summaries: Optional[tuple] = None) -> torch.Tensor:
    """Quest's page bounds without a ``[Nq, NP]`` intermediate: per query block of ``page``
    rows and page of ``page`` keys, the largest over the block's rows and the group's heads of
    ``sum_d max(q_d max_d, q_d min_d)``; fp32 ``[B, Hkv, NQB, NP]``, -inf where the causal rule
    (``"lower_right"`` / ``"upper_left"`` / None) allows no pair. ``page``: a power of two up
    to ``QUEST_MAX_PAGE``. Same values as ``codegen.select.policies.quest_estimate``.
    ``summaries``: ``(max, min)`` of k's pages kept from earlier calls (``quest_page_summaries``
    layout, at least NP pages), instead of reading all of k again."""
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or Hq % Hkv or k.shape[3] != D or k.dtype != q.dtype:
        raise ValueError(f"quest_page_bounds: q {tuple(q.shape)} {q.dtype} and k "
                         f"{tuple(k.shape)} {k.dtype} do not match")
    _check_page("quest_page_bounds", page, D)
    n_p, nqb = -(-Nkv // page), -(-Nq // page)
    d_p = next_pow2(max(D, 16))
    dev = q.device
    out = _workspace((B, Hkv, nqb, n_p), dev)
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
    sms = _sm_count(dev)
    qb = max(1, 64 // page)
    off = 0 if causal is None else positions_offset(causal, Nq, Nkv)
    tiles = -(-nqb // qb) * B * Hkv
    # few query tiles (decode): split the pages so that ~4 programs per SM run
    split = max(1, min(-(-n_p // pages_per_tile), (4 * sms) // max(tiles, 1)))
    pch = -(-(-(-n_p // split)) // pages_per_tile) * pages_per_tile
    _quest_module(dev).quest_bounds[(-(-nqb // qb), B * Hkv, -(-n_p // pch))](
        q, mx, mn, out, *q.stride(), Hkv, Hq // Hkv, Nq, nqb, n_p, mx.shape[1], off, pch, D=D,
        D_P=d_p, PAGE=page, QB=qb, BP=pages_per_tile, CAUSAL=causal is not None,
        IEEE=q.dtype == torch.float32, num_warps=num_warps)
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
    chunks = max(1, -(-32 * _sm_count(k.device) // (B * Hkv)))
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
