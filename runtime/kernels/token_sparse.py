"""Launchers of the token-sparse (gather) attention, forward and backward
(``codegen/token_sparse``), and the autograd function over them.

``token_sparse_attention`` returns ``(out [B, Hq, Nq, Dv] in q.dtype, lse [B, Hq, Nq] fp32,
natural log)`` with the conventions of ``block_sparse_attention`` (sinks, key ranges, soft cap,
mask); ``token_sparse_attention_bwd`` returns ``(dq, dk, dv)``. ``token_sparse_attention_fn`` is
differentiable w.r.t. q, k, v: the kernels where ``launch.kernels_enabled`` routes the call,
else the PyTorch reference (``codegen/token_sparse/reference.py``) and its explicit backward.
The forward saves ``out`` and ``lse``; the backward recomputes the probabilities from them (no
attention matrix is kept); the index lists are not differentiable.

Example::

    >>> q = torch.randn(1, 8, 64, 32, requires_grad=True)                  # [B, Hq, Nq, D]
    >>> k = torch.randn(1, 2, 64, 32, requires_grad=True)                  # [B, Hkv, Nkv, D]
    >>> v = torch.randn(1, 2, 64, 32, requires_grad=True)                  # [B, Hkv, Nkv, Dv]
    >>> idx = torch.randint(0, 64, (1, 1, 64, 16), dtype=torch.int32)      # [B, 1, Nq, K]
    >>> out = token_sparse_attention_fn(q, k, v, idx, scale=32 ** -0.5)
    >>> out.sum().backward()
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from codegen.common import Schedule, TokenSparseSpec, next_pow2
from codegen.emit import emit
from codegen.token_sparse import token_sparse_attention_bwd_ref, token_sparse_attention_ref
from codegen.token_sparse.backward import PRE_ROWS as BWD_PRE_ROWS, TokenSparseBackwardSpec
from runtime.cache import KERNELS, seq_bucket
from runtime.kernels import launch
from runtime.kernels.launch import (FLOAT_DTYPES, LOG2E, MAX_HEAD_DIM, LaunchPlan, cached_plan,
                                    check_extras, check_index, check_qkv, check_scale,
                                    check_softcap, contiguous_as_planned, device_key,
                                    heads_of_lists, kernels_enabled, mask_field, mask_launch_args,
                                    outputs, planned_module, signature, sm_count, spec_hash,
                                    stride_align, unit_last, workspace)
from runtime.loader import load


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
        if spec.pack_gqa and rows >= 4 * sm_count(device):
            # GQA-packed prefill (e.g. DSA over MQA): H100 sweep at N=65536, 16 heads x 128,
            # top-2048 (benchmarks/results/dsa_h100.md): 64/4 warps/2 stages 10.3 ms vs 11.2
            warps, stages = 4, 2
    else:
        block_n, warps = 32, 4
    return Schedule(block_m=16, block_n=block_n, num_warps=warps, num_stages=stages,
                    split=_split_for(rows, n_idx, block_n, sm_count(device), minimum=2 * block_n,
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


def _plan_token_sparse(q, k, v, indices, schedule, backward: bool = False,
                       split_per_sm: Optional[int] = None, sinks: bool = False,
                       kv_ranges: bool = False, softcap: bool = False,
                       mask: str = "") -> LaunchPlan:
    """Plan of the gather forward (or, with ``backward``, of its backward kernel).

    Lists shared by every head (``Hs == 1``) are read as per-group lists with head stride 0:
    GQA groups stay packed and the index tensor is never expanded in memory."""
    fn = "token_sparse_attention_bwd" if backward else "token_sparse_attention"
    check_qkv(fn, q, k, v)
    B, Hq, Nq, D = q.shape
    Hkv, Nkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    check_index(fn, "indices", indices, (B, None, Nq, None), q.device)
    hs, n_idx = indices.shape[1], indices.shape[3]
    per_group = heads_of_lists(fn, "indices", hs, Hq, Hkv, shared_ok=True)
    G = Hq // Hkv
    strided = [unit_last(t) for t in (q, k, v)]
    idx = unit_last(indices)
    spec = TokenSparseSpec(head_dim=D, v_head_dim=Dv, gqa_group=G, pack_gqa=per_group and G > 1,
                           lists_per_group=per_group or G == 1, dtype=FLOAT_DTYPES[q.dtype],
                           stride_align=stride_align(q.dtype, *strided),
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
    key = ("token_sparse_bwd" if backward else "token_sparse", device_key(q.device),
           (str(q.dtype), str(indices.dtype)), D, G, spec_hash(spec), schedule,
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
    check_scale(fn, scale)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        check_qkv(fn, q, k, v)
        check_index(fn, "indices", indices, (None, None, None, None), q.device)
    if split_per_sm is not None and (isinstance(split_per_sm, bool) or
                                     not isinstance(split_per_sm, int) or split_per_sm < 0):
        raise ValueError(f"{fn}: split_per_sm must be None or an int >= 0, got {split_per_sm!r}")
    sig = signature(fn, tensors, (schedule, split_per_sm, sinks, kv_ranges, softcap, mask))
    return cached_plan(sig, lambda: _plan_token_sparse(q, k, v, indices, schedule,
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
    softcap = check_softcap(fn, softcap)
    has_sinks, has_ranges = sinks is not None, kv_start is not None or kv_end is not None
    mask_spec = mask_field(fn, mask, mask_kind)
    plan = _token_sparse_plan(fn, tensors, scale, schedule, backward=False,
                              split_per_sm=split_per_sm, sinks=has_sinks, kv_ranges=has_ranges,
                              softcap=softcap > 0, mask=mask_spec)
    sinks, ranges = check_extras(fn, q, k, sinks, kv_start, kv_end)
    mask_args = mask_launch_args(fn, q, k, mask, mask_kind)
    mod = planned_module(plan)
    out, lse = outputs(fn, out, lse, plan.out_shape, plan.lse_shape, q.dtype, q.device)
    if out.numel() == 0:
        return out, lse
    q, k, v, idx = contiguous_as_planned(plan, tensors)
    B, Hq, Nq, Dv = plan.out_shape
    if plan.n_split > 1:
        po = workspace((B, Hq, Nq, plan.n_split, Dv), q.device)       # [B, Hq, Nq, S, Dv]
        pl = workspace((B, Hq, Nq, plan.n_split), q.device)           # [B, Hq, Nq, S]
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
                    num_stages=3, split=_split_for(rows, n_idx, block_n, sm_count(device),
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
    _, ranges = check_extras(fn, q, k, None, kv_start, kv_end)
    B, Hq, Nq, Dv = plan.out_shape
    Hkv, Nkv, D = k.shape[1], k.shape[2], q.shape[3]
    dk = torch.zeros((B, Hkv, Nkv, D), device=q.device, dtype=torch.float32)   # [B, Hkv, Nkv, D]
    dv = torch.zeros((B, Hkv, Nkv, Dv), device=q.device, dtype=torch.float32)  # [B, Hkv, Nkv, Dv]
    rows = B * Hq * Nq
    if plan.schedule.split:
        dq = torch.zeros((B, Hq, Nq, D), device=q.device, dtype=torch.float32)
    elif launch.POISON_WORKSPACE:
        dq = torch.full((B, Hq, Nq, D), float("nan"), device=q.device, dtype=q.dtype)
    else:
        dq = torch.empty((B, Hq, Nq, D), device=q.device, dtype=q.dtype)     # [B, Hq, Nq, D]
    if rows == 0:
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    mod = _bwd_module(plan)
    q, k, v, idx = contiguous_as_planned(plan, tensors)
    out, dout, lse = out.contiguous(), dout.contiguous(), lse.contiguous()
    delta = workspace((B, Hq, Nq), q.device)                                  # [B, Hq, Nq]
    mod.token_sparse_bwd_pre[(-(-rows // BWD_PRE_ROWS),)](out, dout, delta, rows, num_warps=4)
    mod.token_sparse_bwd[plan.grid](
        q, k, v, idx, dout, lse, delta, dq, dk, dv, *plan.args, float(scale) * LOG2E,
        float(scale), *(ranges if has_ranges else ()), num_warps=plan.schedule.num_warps,
        num_stages=plan.schedule.num_stages)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _bwd_module(plan: LaunchPlan):
    return KERNELS.get(plan.key, lambda: load(emit(TokenSparseBackwardSpec(plan.spec),
                                                          plan.schedule)))


# ----------------------------------------------------------------------------- autograd

def _kernels_serve(q, k, v) -> bool:
    """Whether the kernels serve these inputs: ``kernels_enabled(q)``, k and v of q's dtype and
    device, head dims up to ``MAX_HEAD_DIM``."""
    if not kernels_enabled(q):
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        return False
    return max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM


class _TokenSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, scale):
        use_kernels = _kernels_serve(q, k, v)
        if use_kernels:
            out, lse = token_sparse_attention(q, k, v, indices, scale=scale)
        else:
            out, lse = token_sparse_attention_ref(q, k, v, indices, scale=scale)
        ctx.save_for_backward(q, k, v, indices, out, lse)
        ctx.scale, ctx.use_kernels = scale, use_kernels
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, indices, out, lse = ctx.saved_tensors
        bwd = token_sparse_attention_bwd if ctx.use_kernels else token_sparse_attention_bwd_ref
        dout = dout.to(out.dtype) if dout.dtype != out.dtype else dout
        dq, dk, dv = bwd(q, k, v, indices, out, lse, dout, scale=ctx.scale)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                None, None)


def token_sparse_attention_fn(q, k, v, indices, *, scale: float):
    """Gather attention differentiable w.r.t. q, k, v: ``out [B, Hq, Nq, Dv]`` in q's dtype.

    q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nkv, D]``, v ``[B, Hkv, Nkv, Dv]``, ``indices`` integer
    ``[B, Hs, Nq, K]`` with ``Hs`` in ``{1, Hkv, Hq}`` (1: one list per query row for every
    head, DeepSeek Sparse Attention style); negative entries are padding; entries of a row must
    be distinct and ``< Nkv``. Rows with no valid entry give 0 and zero gradients. Kernels take
    int32 lists (others are converted once per call).
    """
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point \
            or indices.dtype.is_complex or indices.dtype == torch.bool:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"token_sparse_attention_fn: indices must be an integer tensor, got {got}")
    if indices.dtype != torch.int32 and _kernels_serve(q, k, v):
        indices = indices.to(torch.int32)
    out, _ = _TokenSparseAttention.apply(q, k, v, indices, float(scale))
    return out
