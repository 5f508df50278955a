"""Launcher of the block-sparse flash-attention forward (``codegen/block_sparse``): each query
block attends to the key blocks of its list (FlexAttention layout).

``block_sparse_attention`` returns ``(out [B, Hq, Nq, Dv] in q.dtype, lse [B, Hq, Nq] fp32,
natural log)``; rows that keep no key give out = 0, lse = -inf (the head's logit with learned
``sinks``). It takes ``sinks`` (float ``[Hq]``) and per-batch key ranges ``kv_start`` /
``kv_end`` (int32 ``[B]``) as runtime tensors, specializing only on their presence; likewise a
soft cap ``softcap`` (float) and a mask tensor ``mask`` / ``mask_kind`` ("add" float, "keep" bool;
broadcastable to ``[B, Hq, Nq, Nkv]``; semantics in ``codegen.block_sparse.mask_blocks``), applied
to the scores before the rule masks. On the CPU it runs under Triton's interpreter
(``TRITON_INTERPRET=1`` set before the first kernel is loaded; ``launch.runs_triton``).

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
from typing import Optional

import torch

from codegen.block_sparse import wgmma_kernel
from codegen.common import BlockSparseSpec, Schedule, next_pow2
from runtime.cache import seq_bucket
from runtime.kernels.launch import (FLOAT_DTYPES, LOG2E, LaunchPlan, cached_plan, check_extras,
                                    check_index, check_mask_flags, check_qkv, check_scale,
                                    check_softcap, contiguous_as_planned, device_key,
                                    heads_of_lists, mask_field, mask_launch_args, outputs,
                                    planned_module, set_descriptor_allocator, signature, sm_count,
                                    spec_hash, stride_align, unit_last)

PACK_GQA_MAX_NQ = 64      # pack GQA groups by default only up to this many queries


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



def _plan_block_sparse(q, k, v, kv_num_blocks, kv_indices, block, causal, windowed,
                       schedule, pack_gqa, hopper_first: bool = False, sinks: bool = False,
                       kv_ranges: bool = False, softcap: bool = False, mask: str = "",
                       mask_flags: bool = False) -> LaunchPlan:
    fn = "block_sparse_attention"
    check_qkv(fn, q, k, v)
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"{fn}: block must be a power of two >= 16, got {block!r}")
    B, Hq, Nq, D = q.shape
    Hkv, Nkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    nqb = -(-Nq // block)
    check_index(fn, "kv_num_blocks", kv_num_blocks, (B, None, nqb), q.device)
    hs = kv_num_blocks.shape[1]
    check_index(fn, "kv_indices", kv_indices, (B, hs, nqb, None), q.device)
    per_group = heads_of_lists(fn, "kv_num_blocks", hs, Hq, Hkv)
    G = Hq // Hkv
    if pack_gqa and not per_group:
        raise ValueError(f"{fn}: pack_gqa=True needs lists per KV head (Hs == Hkv={Hkv}), "
                         f"got Hs={hs}")
    if pack_gqa is None:
        pack_gqa = Nq <= PACK_GQA_MAX_NQ
    strided = [unit_last(t) for t in (q, k, v)]
    spec = BlockSparseSpec(head_dim=D, v_head_dim=Dv, gqa_group=G,
                           pack_gqa=bool(pack_gqa) and per_group and G > 1,
                           lists_per_group=per_group or G == 1, causal=bool(causal),
                           dtype=FLOAT_DTYPES[q.dtype], block=block, windowed=windowed,
                           stride_align=stride_align(q.dtype, *strided), sinks=sinks,
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
        grid = (min(n_tiles, schedule.persistent * sm_count(q.device)),)
    elif schedule.wgmma:                    # a 1-D grid: one program per tile
        grid = (n_tiles,)
    else:
        grid = (n_mtiles, B * heads)
    a = spec.stride_align
    strides = tuple(st // a for t in strided for st in t.stride()[:3])
    key = ("block_sparse", device_key(q.device), (str(q.dtype), str(kv_indices.dtype)),
           D, G, spec_hash(spec), schedule, (seq_bucket(Nq), seq_bucket(Nkv)))
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
    check_scale(fn, scale)
    softcap = check_softcap(fn, softcap)
    sink, window = int(sink), int(window)
    if sink < 0 or window < 0:
        raise ValueError(f"{fn}: sink and window must be >= 0, got sink={sink}, window={window}")
    tensors = (q, k, v, kv_num_blocks, kv_indices)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        check_qkv(fn, q, k, v)                  # raises with the offending argument's name
        check_index(fn, "kv_num_blocks", kv_num_blocks, (None, None, None), q.device)
        check_index(fn, "kv_indices", kv_indices, (None, None, None, None), q.device)
    has_sinks, has_ranges = sinks is not None, kv_start is not None or kv_end is not None
    mask_spec = mask_field(fn, mask, mask_kind)
    has_flags = mask_flags is not None
    if has_flags and mask is None:
        raise ValueError(f"{fn}: mask_flags given without a mask")
    sig = signature(fn, tensors, (block, bool(causal), window > 0, schedule, pack_gqa,
                                   hopper_first, has_sinks, has_ranges, softcap > 0, mask_spec,
                                   has_flags))
    plan = cached_plan(sig, lambda: _plan_block_sparse(q, k, v, kv_num_blocks, kv_indices, block,
                                                         causal, window > 0, schedule, pack_gqa,
                                                         hopper_first, has_sinks, has_ranges,
                                                         softcap > 0, mask_spec, has_flags))
    sinks, ranges = check_extras(fn, q, k, sinks, kv_start, kv_end)
    mask_args = mask_launch_args(fn, q, k, mask, mask_kind)
    mask_flags = check_mask_flags(fn, mask_flags, kv_indices)
    extra = (((sinks,) if has_sinks else ()) + (ranges if has_ranges else ())
             + ((softcap * LOG2E,) if softcap > 0 else ()) + mask_args
             + ((mask_flags,) if has_flags else ()))
    mod = planned_module(plan)
    if (plan.schedule.tma or plan.schedule.wgmma) and q.device.type == "cuda":
        set_descriptor_allocator()
    out, lse = outputs(fn, out, lse, plan.out_shape, plan.lse_shape, q.dtype, q.device)
    done = (out, lse, plan.schedule) if return_schedule else (out, lse)
    if out.numel() == 0:
        return done
    q, k, v, num, idx = contiguous_as_planned(plan, tensors)
    # the Hopper kernel stores the output through a tensor descriptor (16-byte aligned start)
    o = torch.empty_like(out) if plan.schedule.wgmma and out.data_ptr() % 16 else out
    mod.block_sparse_fwd[plan.grid](
        q, k, v, o, lse, num, idx, *plan.args, float(scale) * LOG2E, sink, window, *plan.tail,
        *extra, num_warps=_launch_warps(plan.schedule), num_stages=plan.schedule.num_stages)
    if o is not out:
        out.copy_(o)
    return done
