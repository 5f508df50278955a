"""Kernel providers for ``sparse.attend`` (tried before the PyTorch reference).

* ``sdpa_dense`` — the dense policy on CUDA: ``F.scaled_dot_product_attention`` (the fused
  kernels), with the site's masks passed as SDPA masks where that is exact.
* ``triton_block_sparse`` — block policies on CUDA (or on the CPU under ``TRITON_INTERPRET=1``
  when ``SPARSE_PLANNER_KERNELS=triton``): the block-sparse flash-attention kernel over the
  selected block lists, with the token-level sink/window masks where the policy has them; on
  Hopper, where it covers the call, the warp-specialized kernel (schedule ``wgmma``) instead of
  the cost model's Triton tile schedule.

A provider returns ``(out, density[, schedule])`` — ``density`` None or ``(allowed, kept)``
per-query-head pair counts, ``schedule`` the cost model's variant it launched (or ``wgmma``) —
or None for what it cannot compute exactly (arbitrary mask tensors, top-left causal alignment
with Nq != Nkv, blocks that are not powers of two >= 16); the reference then runs, so a case
is never approximated silently.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from codegen.attention.reference import visible_keys
from codegen.select.reference import mask_from_blocks, window_pairs
from runtime import dispatch, estimators
from runtime.env import kernels_mode
from runtime.spec import SiteSpec
from runtime.tensor_notes import TensorNotes


def _causal_flag(spec: SiteSpec, n_q: int, n_kv: int) -> Optional[bool]:
    """The kernel's causal mode is bottom-right aligned; None if the site's rule differs."""
    if spec.causal is None:
        return False
    if spec.causal == "lower_right" or n_q == n_kv:
        return True
    return None


def sdpa_args(spec: SiteSpec, n_q: int, n_kv: int):
    """How to run a site as one exact ``F.scaled_dot_product_attention`` call:
    ``(mask_kind, is_causal)`` with mask_kind None / "add" / "keep" / "fill" (masked_fill with
    -inf: SDPA's mask is the negation), or None when SDPA cannot express the site's modifiers
    and causal rule. Used at run time here and at compile time by ``plan_schedule``."""
    mods = spec.mods
    if len(mods) > 1 or (mods and mods[0][0] not in ("add", "keep", "fill")):
        return None
    if mods and mods[0][0] == "fill" and mods[0][1] != float("-inf"):
        return None
    if spec.causal is None:
        is_causal = False
    elif spec.causal == "upper_left" or n_q == n_kv:
        is_causal = True
    elif n_q == 1:
        is_causal = False                 # a single query at the last position sees every key
    else:
        return None
    if is_causal and mods:
        return None                       # SDPA takes a mask or is_causal, not both
    return (mods[0][0] if mods else None), is_causal


def sdpa_dense(q, k, v, mods, counts, indices, spec: SiteSpec):
    if spec.policy.name != "dense" or q.device.type != "cuda" or kernels_mode() == "reference":
        return None
    how = sdpa_args(spec, q.shape[2], k.shape[2])
    if how is None:
        return None
    kind, is_causal = how
    mask = None if kind is None else (torch.logical_not(mods[0]) if kind == "fill" else mods[0])
    kw = {"enable_gqa": True} if spec.gqa_group > 1 else {}
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                         scale=spec.scale, **kw)
    return out, None


@functools.lru_cache(maxsize=64)
def _visible_per_block(block: int, n_q: int, n_kv: int, causal: bool, device) -> torch.Tensor:
    """fp64 [NQB, NKB]: pairs the causal rule allows in each block (closed form, no N x N map);
    built once per shape (about 40 small launches), shared by every later call: not to be
    written to."""
    nqb, nkb = -(-n_q // block), -(-n_kv // block)
    r_lo = torch.arange(nqb, device=device, dtype=torch.float64) * block
    n_rows = torch.clamp(r_lo + block, max=n_q) - r_lo                      # [NQB]
    k_lo = torch.arange(nkb, device=device, dtype=torch.float64) * block
    size = torch.clamp(k_lo + block, max=n_kv) - k_lo                       # [NKB]
    if not causal:
        return n_rows[:, None] * size[None, :]

    def g(t):   # sum_{x <= t} clamp(x, 0, size) over integers x >= 0
        t = t.clamp_min(-1.0)
        lin = t.clamp(max=size) * (t.clamp(max=size) + 1) / 2
        return lin + (t - size).clamp_min(0.0) * size
    # a query at position p sees clamp(p - k_lo + 1, 0, size) keys of block j
    a = (r_lo + (n_kv - n_q))[:, None] - k_lo[None, :] + 1                  # first row's count arg
    return g(a + n_rows[:, None] - 1) - g(a - 1)


def _pairs_kept(counts, indices, block: int, n_q: int, n_kv: int, causal: bool):
    """Per selection head, (kept, allowed) pair counts of a block selection, causal-aware."""
    nkb = -(-n_kv // block)
    sel = mask_from_blocks(counts, indices, nkb)                           # [B, Hs, NQB, NKB]
    per_block = _visible_per_block(block, n_q, n_kv, causal, counts.device)
    kept = (sel * per_block).sum(dim=(0, 2, 3))
    allowed = per_block.sum() * sel.shape[0] * torch.ones_like(kept)
    return kept, allowed


def triton_block_sparse(q, k, v, mods, counts, indices, spec: SiteSpec):
    mode = kernels_mode()
    if mode == "reference":
        return None
    pol = spec.policy
    if pol.attend_kind != "block" or not counts.numel() or spec.mods:
        return None
    if q.device.type == "cpu" and mode != "triton":
        return None
    from runtime import triton_kernels as tk
    if not tk.available(q.device) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    block = estimators.block_of(spec)
    if block < 16 or block & (block - 1):
        return None
    n_q, n_kv = q.shape[2], k.shape[2]
    causal = _causal_flag(spec, n_q, n_kv)
    if causal is None:
        return None
    sink = window = 0
    if pol.name == "sink_window":
        if not causal:
            return None                  # the kernel's window is one-sided (causal)
        sink, window = pol.sink, pol.window
    elif pol.name == "longformer":
        if not causal:
            return None                  # global queries see later keys only without causality
        sink, window = pol.global_tokens, pol.window
    elif estimators.get(pol.name).token_keep is not None:
        return None
    from runtime import plan
    var = plan.variant(spec, q, k)            # the cost model's schedule (None: the default)
    sch = var.schedule() if var is not None and var.family == "block_sparse" else None
    # the cost model's variants are Triton tile schedules: where the warp-specialized Hopper
    # kernel covers the call it runs instead (hopper_first)
    out, _, ran = tk.block_sparse_attention(q, k, v, counts, indices, block=block,
                                            scale=spec.scale, causal=causal, sink=sink,
                                            window=window, schedule=sch, hopper_first=True,
                                            return_schedule=True)
    tag = "wgmma" if ran.wgmma else (var.tag if sch is not None else "")
    if os.environ.get("SPARSE_PLANNER_DENSITY", "1") == "0":
        return out, None, tag
    if window:                           # token-level windows: counted by the rule, not blocks
        kept1, vis1 = window_pairs(n_q, n_kv, spec.causal, sink=sink, window=window)
        n = q.shape[0]
        return out, ([vis1 * n] * q.shape[1], [kept1 * n] * q.shape[1]), tag
    kept, allowed = _pairs_kept(counts, indices, block, n_q, n_kv, causal)
    g = q.shape[1] // counts.shape[1]
    return out, (allowed.repeat_interleave(g), kept.repeat_interleave(g)), tag


def triton_token_sparse(q, k, v, mods, counts, indices, spec: SiteSpec):
    """Token lists (``dsa``): the gather kernel; the lists already respect causality."""
    mode = kernels_mode()
    if mode == "reference" or spec.policy.attend_kind != "token" or not indices.numel():
        return None
    if spec.mods or (q.device.type == "cpu" and mode != "triton"):
        return None
    from runtime import triton_kernels as tk
    if not tk.available(q.device) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    from runtime import plan
    var = plan.variant(spec, q, k)            # decode: the cost model's split of the lists
    per_sm = var.per_sm if var is not None and var.family == "token_sparse_decode" else None
    tag = var.tag if per_sm is not None else ""
    out, lse = tk.token_sparse_attention(q, k, v, indices, scale=spec.scale, split_per_sm=per_sm)
    if q.requires_grad or k.requires_grad or v.requires_grad:
        remember_lse(out, lse)                    # the backward starts from it (no re-run)
    if os.environ.get("SPARSE_PLANNER_DENSITY", "1") == "0":
        return out, None, tag
    visible = float(visible_keys(spec.causal, q.shape[2], k.shape[2]).sum())
    kept = (indices >= 0).sum(dim=(0, 2, 3)).to(torch.float64)          # per list head
    kept = kept.repeat_interleave(q.shape[1] // indices.shape[1])
    allowed = torch.full_like(kept, visible * q.shape[0])
    return out, (allowed, kept), tag


# The gather kernel's log-sum-exp per output it produced, for the backward of sparse.attend:
# with it the backward kernel runs directly instead of re-running the forward. Entries go
# when the output is freed or taken.
_LSE = TensorNotes()


def remember_lse(out: torch.Tensor, lse: torch.Tensor) -> None:
    _LSE.put(out, lse)


def take_lse(out: torch.Tensor) -> Optional[torch.Tensor]:
    """The lse ``triton_token_sparse`` computed with ``out`` (None if it did not)."""
    return _LSE.pop(out)


def register_all() -> None:
    dispatch.register_attend("sdpa_dense", sdpa_dense)
    dispatch.register_attend("triton_block_sparse", triton_block_sparse)
    dispatch.register_attend("triton_token_sparse", triton_token_sparse)
