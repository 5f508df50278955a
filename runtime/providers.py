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
from typing import Optional

import torch

from codegen.attention.reference import (MASKED_BELOW, attention_reference, positions_offset,
                                         visible_keys)
from codegen.block_sparse import mask_block_summary, prune_block_lists
from codegen.select.reference import (blocks_from_mask, mask_from_blocks, structural_blocks,
                                      window_pairs)
from runtime import cpu_attend, dispatch, env, estimators, plan
from runtime.kernels import block_sparse, sparse_mla, token_sparse
from runtime.kernels.launch import kernels_enabled
from runtime.rules import (dense_variant, fix_empty_rows, keep_of, reference_rules, sdpa_args,
                           sdpa_attention)
from runtime.spec import SiteSpec
from runtime.tensor_notes import TensorNotes


def _causal_flag(spec: SiteSpec, n_q: int, n_kv: int) -> Optional[bool]:
    """The kernel's causal mode is bottom-right aligned; None if the site's rule differs."""
    if spec.causal is None:
        return False
    if spec.causal == "lower_right" or n_q == n_kv:
        return True
    return None


def sdpa_dense(q, k, v, mods, counts, indices, spec: SiteSpec):
    if (not spec.policy.is_dense or q.device.type != "cuda"
            or env.kernels_mode() == "reference"):
        return None
    out = sdpa_attention(q, k, v, mods, spec)
    return None if out is None else (out, None)


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


#: block size of the lists a dense site with the model's own rules (window, sinks, padding)
#: runs the block-sparse kernel over: every block the rules leave visible
DENSE_RULES_BLOCK = 128


def _token_window(spec: SiteSpec) -> Optional[tuple]:
    """(sink, window) of the kernel's token rule (``window > 0``: key j kept iff
    ``pos - window < j`` or ``j < sink``) that is the intersection of the model's own window and
    the policy's token window; (0, 0) for none; None when the two do not intersect to one rule
    (a policy window narrower than the model's, with policy sink tokens)."""
    pol, wm = spec.policy, spec.window
    ps, pw = pol.token_window or (0, 0)
    if not pw:
        return (0, wm)
    if not wm or pw <= wm and ps == 0:
        return (ps, pw) if not wm else (0, pw)
    if pw >= wm:
        return (0, wm)                    # the model's window lies inside the policy's
    return None


_RANGES = TensorNotes()


def kv_ranges(valid: torch.Tensor, n_kv: int) -> Optional[tuple]:
    """(kv_start, kv_end) int32 [B] of a key-validity tensor [B, >= Nkv] whose real tokens form
    one run per batch row (left or right padding), else None. Computed once per tensor and
    version (every layer of a forward shares the model's attention mask): one host sync."""
    note = _RANGES.get(valid)
    if note is not None and note[0] == (valid._version, n_kv):
        return note[1]
    res = _ranges_of(valid, n_kv)
    _RANGES.put(valid, ((valid._version, n_kv), res))
    return res


def _ranges_of(valid: torch.Tensor, n_kv: int) -> Optional[tuple]:
    real = valid[:, :n_kv] != 0                                            # [B, Nkv]
    pos = torch.arange(n_kv, device=valid.device)
    count = real.sum(dim=1)
    start = torch.where(real, pos, n_kv).amin(dim=1)
    end = torch.where(real, pos + 1, 0).amax(dim=1)
    start = torch.where(count > 0, start, 0)
    one_run = bool(((end - start).clamp_min(0) == count).all())            # host sync
    return (start.to(torch.int32), end.to(torch.int32)) if one_run else None


def _batch_ranges(valid, n_kv: int, batch: int) -> Optional[tuple]:
    """``kv_ranges`` for ``batch`` rows (a [1, N] validity shared by every row is expanded)."""
    ranges = kv_ranges(valid, n_kv)
    if ranges is None or ranges[0].shape[0] == batch:
        return ranges
    return tuple(t.expand(batch).contiguous() for t in ranges)


@functools.lru_cache(maxsize=64)
def _visible_lists(n_q: int, n_kv: int, causal, window: int, block: int, device):
    """Block lists [1, 1, NQB] / [1, 1, NQB, W] of every key block the causal rule and the
    window leave visible (a dense site's lists for the block-sparse kernel; built once per
    shape, not to be written to)."""
    vis = structural_blocks(n_q, n_kv, causal, block, device, window=window)
    return blocks_from_mask(vis[None, None])


def kernel_mods(spec: SiteSpec, mods: list) -> Optional[tuple]:
    """The site's score modifiers as the kernels apply them: ``(softcap, mask, kind, finite)``
    (soft-cap value or 0; one mask tensor or None, "add" or "keep"; whether masked pairs may
    hold a finite value, so that a row masked entirely is uniform in the model), or None when
    the kernels cannot apply them exactly (a soft-cap after a mask, a finite fill value that
    does not mask, several masks of one kind the sum below does not express)."""
    cap, rest, ts = 0.0, list(spec.mods), list(mods)
    if rest and rest[0][0] == "softcap":
        cap = float(rest[0][1])
        rest = rest[1:]
    if any(m[0] == "softcap" for m in rest):
        return None
    if not rest:
        return cap, None, "add", False
    if len(rest) == 1:
        (kind, *arg), t = rest[0], ts[0]
        if kind == "add":
            return cap, t, "add", True
        if kind == "keep":
            return cap, t if t.dtype == torch.bool else t != 0, "keep", False
        if kind == "fill" and arg[0] <= MASKED_BELOW:
            return cap, torch.logical_not(t.to(torch.bool)), "keep", arg[0] != float("-inf")
        return None
    total = None                          # several masks / biases: one additive tensor
    for (kind, *arg), t in zip(rest, ts):
        if kind == "add":
            a = t.float()
        elif kind == "keep":
            a = torch.zeros(t.shape, device=t.device).masked_fill(~t.to(torch.bool), -torch.inf)
        elif kind == "fill" and arg[0] <= MASKED_BELOW:
            # s.masked_fill(t, v) with v <= -1e30: s + v rounds to v where it applies
            a = torch.zeros(t.shape, device=t.device).masked_fill(t.to(torch.bool), arg[0])
        else:
            return None
        total = a if total is None else total + a
    return cap, total, "add", True


def _uniform_rows_fixed(out, lse, q, k, v, tensors, counts, indices, spec):
    """Rows whose every pair a finite additive mask masked (lse = -inf from the kernels): the
    model's softmax over equal huge negative scores is uniform over the keys that are not
    excluded otherwise; the reference computes that (rare: one host sync to find them)."""
    empty = lse == -torch.inf
    if not bool(empty.any()):
        return out
    keep = keep_of(spec, counts, indices, q.shape[2], k.shape[2], q.device)
    kinds, mods, sinks = reference_rules(spec, tensors, k.shape[2])
    ref, _ = attention_reference(q, k, v, scale=spec.scale, mods=kinds, mod_tensors=mods,
                                 causal=spec.causal, keep=keep, sinks=sinks, window=spec.window)
    return torch.where(empty[..., None], ref, out)


def triton_block_sparse(q, k, v, tensors, counts, indices, spec: SiteSpec):
    if not kernels_enabled(q):
        return None
    pol = spec.policy
    # a dense site SDPA cannot run (the model's rules, a soft-cap, several masks): every
    # visible block
    dense_rules = pol.is_dense and (spec.rules or sdpa_args(spec, q.shape[2],
                                                            k.shape[2]) is None)
    if not dense_rules and (pol.attend_kind != "block" or not counts.numel()):
        return None
    mods, sinks, valid = spec.split(tensors)
    km = kernel_mods(spec, mods)
    if km is None:
        return None
    cap, mask, mask_kind, finite = km
    block = DENSE_RULES_BLOCK if dense_rules else estimators.block_of(spec)
    if block < 16 or block & (block - 1):
        return None
    n_q, n_kv = q.shape[2], k.shape[2]
    causal = _causal_flag(spec, n_q, n_kv)
    if causal is None:
        return None
    rule = _token_window(spec)
    if rule is None or (rule[1] and not causal):
        return None                      # the kernel's window is one-sided (causal)
    if estimators.get(pol).token_keep is not None and pol.token_window is None:
        return None
    sink, window = rule
    start = end = None
    if valid is not None:
        ranges = _batch_ranges(valid, n_kv, q.shape[0])
        if ranges is None:
            return None                  # real tokens not one run per row: the reference
        start, end = ranges
    if dense_rules:
        counts, indices = _visible_lists(n_q, n_kv, spec.causal, spec.window, block, q.device)
        counts = counts.expand(q.shape[0], k.shape[1], -1)
        indices = indices.expand(q.shape[0], k.shape[1], -1, -1)
    site_counts, site_indices = counts, indices
    flags = None
    if mask is not None:      # blocks the mask empties leave the lists; partial ones read it
        summary = mask_block_summary(mask, mask_kind, block=block, n_q=n_q, n_kv=n_kv)
        counts, indices, flags = prune_block_lists(counts.contiguous(), indices.contiguous(),
                                                   summary)
    var = None if dense_rules else plan.variant(spec, q, k)   # cost model's schedule or default
    sch = var.schedule() if var is not None and var.family == "block_sparse" else None
    # the cost model's variants are Triton tile schedules: where the warp-specialized Hopper
    # kernel covers the call it runs instead (hopper_first)
    out, lse, ran = block_sparse.block_sparse_attention(
        q, k, v, counts, indices, block=block, scale=spec.scale, causal=causal, sink=sink,
        window=window, schedule=sch, hopper_first=True, return_schedule=True, sinks=sinks,
        kv_start=start, kv_end=end, softcap=cap, mask=mask, mask_kind=mask_kind, mask_flags=flags)
    out = fix_empty_rows(out, v, spec, valid, n_q, n_kv)
    if finite and sinks is None:
        out = _uniform_rows_fixed(out, lse, q, k, v, tensors, site_counts, site_indices,
                                  _dense_variant_if(spec, dense_rules))
    tag = "wgmma" if ran.wgmma else (var.tag if sch is not None else "")
    if not env.density_counting():
        return out, None, tag
    if dense_rules:
        return out, None, tag            # every visible pair: density 1 by construction
    if mask is not None:
        return out, None, tag            # pairs a mask tensor allows: not counted here
    if (spec.window or valid is not None) and pol.token_window is None:
        kept, allowed = _pairs_kept_rules(counts, indices, block, n_q, n_kv, spec, start, end)
    elif window:                         # token-level windows: counted by the rule, not blocks
        if spec.window or valid is not None:
            return out, None, tag        # a policy window over the model's rules: not counted
        kept1, vis1 = window_pairs(n_q, n_kv, spec.causal, sink=sink, window=window)
        n = q.shape[0]
        return out, ([vis1 * n] * q.shape[1], [kept1 * n] * q.shape[1]), tag
    else:
        kept, allowed = _pairs_kept(counts, indices, block, n_q, n_kv, causal)
    g = q.shape[1] // counts.shape[1]
    return out, (allowed.repeat_interleave(g), kept.repeat_interleave(g)), tag


def _dense_variant_if(spec: SiteSpec, dense: bool) -> SiteSpec:
    return spec if not dense or spec.policy.is_dense else dense_variant(spec)


def _rule_pairs_per_block(n_q: int, n_kv: int, block: int, spec: SiteSpec, start, end,
                          chunk_rows: int = 8192) -> torch.Tensor:
    """fp64 [B|1, NQB, NKB]: pairs the model's rules (causal, window, key ranges) leave visible
    in each block pair, counted row by row in chunks (no N x N map)."""
    dev = start.device if start is not None else "cpu"
    nqb, nkb = -(-n_q // block), -(-n_kv // block)
    k_lo = torch.arange(nkb, device=dev, dtype=torch.int64) * block
    k_hi = torch.clamp(k_lo + block, max=n_kv) - 1
    b = 1 if start is None else start.shape[0]
    s = torch.zeros(b, 1, 1, dtype=torch.int64, device=dev) if start is None else \
        start.to(torch.int64)[:, None, None]
    e = torch.full((b, 1, 1), n_kv, dtype=torch.int64, device=dev) if end is None else \
        end.to(torch.int64)[:, None, None]
    off = positions_offset(spec.causal, n_q, n_kv)
    out = torch.zeros(b, nqb, nkb, dtype=torch.float64, device=dev)
    rows_per = max(block, chunk_rows // block * block)
    for r0 in range(0, n_q, rows_per):
        r1 = min(r0 + rows_per, n_q)
        p = (torch.arange(r0, r1, device=dev) + off)[None, :, None]       # [1, R, 1]
        hi = torch.minimum(torch.minimum(k_hi[None, None, :], e - 1),
                           p if spec.causal is not None else torch.full_like(p, n_kv))
        lo = torch.maximum(k_lo[None, None, :], s)
        if spec.window:
            lo = torch.maximum(lo, p - spec.window + 1)
        cnt = (hi - lo + 1).clamp_min(0).to(torch.float64)                 # [b, R, NKB]
        qb = torch.arange(r0, r1, device=dev) // block
        out.index_add_(1, qb, cnt)
    return out


def _pairs_kept_rules(counts, indices, block, n_q, n_kv, spec, start, end):
    """Per selection head, (kept, allowed) pair counts of a block selection under the model's
    own rules (window, key ranges)."""
    nkb = -(-n_kv // block)
    sel = mask_from_blocks(counts, indices, nkb)                           # [B, Hs, NQB, NKB]
    per = _rule_pairs_per_block(n_q, n_kv, block, spec, start, end).to(counts.device)
    per = per[:, None] if per.shape[0] == sel.shape[0] else per[None].expand(sel.shape[0], 1, -1, -1)
    kept = (sel * per).sum(dim=(0, 2, 3))
    allowed = per.sum() * torch.ones_like(kept) if per.shape[0] == 1 else \
        per.sum(dim=(0, 2, 3)).expand_as(kept)
    return kept, allowed


def triton_token_sparse(q, k, v, tensors, counts, indices, spec: SiteSpec):
    """Token lists (``dsa``): the gather kernel; the lists already respect causality."""
    if (not kernels_enabled(q) or spec.policy.attend_kind != "token" or not indices.numel()
            or spec.window):
        return None
    mods, sinks, valid = spec.split(tensors)
    km = kernel_mods(spec, mods)
    if km is None:
        return None
    cap, mask, mask_kind, finite = km
    start = end = None
    if valid is not None:
        ranges = _batch_ranges(valid, k.shape[2], q.shape[0])
        if ranges is None:
            return None
        start, end = ranges
    var = plan.variant(spec, q, k)            # decode: the cost model's split of the lists
    per_sm = var.per_sm if var is not None and var.family == "token_sparse_decode" else None
    tag = var.tag if per_sm is not None else ""
    out, lse = token_sparse.token_sparse_attention(
        q, k, v, indices, scale=spec.scale, split_per_sm=per_sm, sinks=sinks, kv_start=start,
        kv_end=end, softcap=cap, mask=mask, mask_kind=mask_kind)
    out = fix_empty_rows(out, v, spec, valid, q.shape[2], k.shape[2])
    if finite and sinks is None:
        out = _uniform_rows_fixed(out, lse, q, k, v, tensors, counts, indices, spec)
    if (q.requires_grad or k.requires_grad or v.requires_grad) and not spec.rules and not spec.mods:
        remember_lse(out, lse)                    # the backward starts from it (no re-run)
    if not env.density_counting():
        return out, None, tag
    if valid is not None or mask is not None:
        return out, None, tag                     # per-row lengths, mask tensors: not counted
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


def triton_sparse_mla(q, k, v, tensors, counts, indices, spec: SiteSpec):
    """A native DSA site in MLA's absorbed form (``policies.NativeDSA``, ``passes.rewrite``):
    every query head over one shared latent row per listed key, ``q [B, H, S, r + d_r]``,
    ``k [B, 1, T, r + d_r]``, ``v [B, 1, T, r]``, lists ``[B, 1, S, K]`` (forward only)."""
    pol = spec.policy
    if (not pol.native or not kernels_enabled(q) or not indices.numel() or spec.mods
            or spec.rules or k.shape[1] != 1 or v.shape[1] != 1 or indices.shape[1] != 1
            or v.shape[-1] >= k.shape[-1] or q.requires_grad or k.requires_grad
            or v.requires_grad):
        return None
    kv, vv = k[:, 0], v[:, 0]
    shared = vv.data_ptr() == kv.data_ptr() and vv.stride() == kv.stride()   # v = k[..., :r]
    out, _ = sparse_mla.sparse_mla(q.transpose(1, 2), kv, indices[:, 0], scale=spec.scale,
                                   dv=vv.shape[-1], v=None if shared else vv)
    return out.transpose(1, 2), None, ""


def register_all() -> None:
    dispatch.register_attend("sdpa_dense", sdpa_dense)
    dispatch.register_attend("triton_block_sparse", triton_block_sparse)
    dispatch.register_attend("triton_sparse_mla", triton_sparse_mla)
    dispatch.register_attend("triton_token_sparse", triton_token_sparse)
    dispatch.register_attend(cpu_attend.NAME, cpu_attend.provider)     # CPU: SDPA / gather
