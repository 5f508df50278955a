"""A site's own rules (causal alignment, window, key validity, score modifiers) in the forms
that the implementations of ``sparse.attend`` take them: the reference's modifiers
(``reference_rules``), boolean masks (``lower_rules``), one exact SDPA call (``sdpa_args``,
``sdpa_attention``), a policy's keep-set (``keep_of``), and the rows no key is visible to
(``empty_rows``, ``fix_empty_rows``). ``runtime.dispatch``, ``runtime.providers`` and
``runtime.cpu_attend`` share them.

``passes/schedule.py`` (``_emit_dense``) still writes its own SDPA call into the graph from
``sdpa_args``; it is the one translation of a spec into SDPA arguments left outside this module.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from codegen.attention.reference import positions_offset
from codegen.select.reference import block_keep_fn
from runtime import estimators
from runtime.dsa import keep_from_indices
from runtime.policies import Dense
from runtime.spec import SiteSpec


@functools.lru_cache(maxsize=1024)
def dense_variant(spec: SiteSpec) -> SiteSpec:
    """The site with the dense policy (exact attention under the same rules)."""
    return dataclasses.replace(spec, policy=Dense())


def keep_of(spec: SiteSpec, counts, indices, n_q: int, n_kv: int, device):
    """The reference's keep-set for a policy's lists (None: every allowed pair)."""
    pol = spec.policy
    if pol.attend_kind == "token" and indices.numel():
        return keep_from_indices(indices, n_kv)
    if pol.attend_kind != "block" or not counts.numel():
        return None
    blk_keep = block_keep_fn(counts, indices, estimators.block_of(spec), n_kv)
    tok = estimators.get(pol).token_keep
    if tok is None:
        return blk_keep
    tok_keep = tok(spec, n_q, n_kv, device)
    return lambda r0, r1: blk_keep(r0, r1) & tok_keep(r0, r1)  # noqa: E731


def reference_rules(spec: SiteSpec, tensors, n_kv: int) -> tuple:
    """The site's modifiers for ``attention_reference``: (mods, mod tensors, sinks) with the key
    validity (padding) applied as one more boolean mask (exact for any validity pattern)."""
    mods, sinks, valid = spec.split(tensors)
    kinds = tuple(spec.mods)
    if valid is not None:
        kinds += (("keep",),)
        mods = list(mods) + [valid[:, None, None, :n_kv] != 0]          # [B|1, 1, 1, Nkv]
    return kinds, mods, sinks


def lower_rules(spec: SiteSpec, tensors, n_q: int, n_kv: int):
    """(spec, tensors) with the window and the key validity turned into boolean mask tensors
    (``("keep",)`` modifiers), for implementations that know masks but not these rules; None
    when the site has sinks (no mask expresses them)."""
    if not spec.rules:
        return spec, list(tensors)
    mods, sinks, valid = spec.split(tensors)
    if sinks is not None:
        return None
    kinds, mods = list(spec.mods), list(mods)
    dev = mods[0].device if mods else (valid.device if valid is not None else "cpu")
    if spec.window:
        pos = torch.arange(n_q, device=dev)[:, None] + positions_offset(spec.causal, n_q, n_kv)
        kinds.append(("keep",))
        mods.append((torch.arange(n_kv, device=dev)[None, :] > pos - spec.window)[None, None])
    if valid is not None:
        kinds.append(("keep",))
        mods.append(valid[:, None, None, :n_kv] != 0)
    return dataclasses.replace(spec, mods=tuple(kinds), window=0, kv_valid=False), mods


def empty_rows(spec: SiteSpec, valid: Optional[torch.Tensor], n_q: int, n_kv: int):
    """bool [B, Nq]: query rows that see no key under the site's rules (causal, window, key
    validity), or None when every row sees one (only a key-validity tensor can empty a row)."""
    if valid is None:
        return None
    real = (valid[:, :n_kv] != 0).to(torch.int32)                       # [B, Nkv]
    before = torch.nn.functional.pad(real.cumsum(1), (1, 0))            # keys < j that are real
    pos = torch.arange(n_q, device=valid.device) + positions_offset(spec.causal, n_q, n_kv)
    hi = (pos + 1).clamp(0, n_kv) if spec.causal is not None else torch.full_like(pos, n_kv)
    lo = (pos - spec.window + 1).clamp(0, n_kv) if spec.window else torch.zeros_like(pos)
    seen = before[:, hi] - before[:, lo.clamp(max=n_kv)]
    return seen <= 0


def fix_empty_rows(out: torch.Tensor, v: torch.Tensor, spec: SiteSpec, valid, n_q: int,
                   n_kv: int) -> torch.Tensor:
    """Rows that see no key give what the model computed: 0 (boolean masks, sinks: the kernels
    and the reference give that already) or, with an additive finite mask (``empty_rows ==
    "mean"``), the mean of v over every key (eager softmax over a row of equal huge negative
    scores is uniform)."""
    if spec.empty_rows != "mean" or spec.sinks:
        return out
    rows = empty_rows(spec, valid, n_q, n_kv)
    if rows is None:
        return out
    g = out.shape[1] // v.shape[1]
    mean = v.float().mean(dim=2).repeat_interleave(g, dim=1)            # [B, Hq, Dv]
    return torch.where(rows[:, None, :, None], mean[:, :, None, :].to(out.dtype), out)


def sdpa_args(spec: SiteSpec, n_q: int, n_kv: int):
    """How to run a site as one exact ``F.scaled_dot_product_attention`` call:
    ``(mask_kind, is_causal)`` with mask_kind None / "add" / "keep" / "fill" (masked_fill with
    -inf: SDPA's mask is the negation), or None when SDPA cannot express the site's modifiers
    and causal rule. Used at run time by ``sdpa_attention`` and at compile time by ``plan_schedule``."""
    mods = spec.mods
    if spec.rules:                        # window, sinks, key validity: not SDPA arguments
        return None
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


#: a call with at most this many query rows is a decode step: on CUDA it runs SDPA's flash,
#: memory-efficient or math kernels, never cuDNN attention, which builds an execution plan for
#: every new key length, and a decode step brings a new one each time (torch 2.11 on an H100:
#: about 16 ms of host time per call, so 85 ms a step for a 4-layer Llama-shaped model against
#: 6.8 ms without it; benchmarks/results/eviction_h100_cudnn.md beside eviction_h100.md).
#: Longer calls keep PyTorch's choice.
DECODE_ROWS = 16


#: the SDPA backends of a decode-shaped call on CUDA (``DECODE_ROWS``)
DECODE_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def sdpa(q, k, v, **kw) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kw)``; decode-shaped calls on CUDA without
    cuDNN attention (``DECODE_ROWS``)."""
    if q.is_cuda and q.shape[-2] <= DECODE_ROWS:
        with sdpa_kernel(list(DECODE_BACKENDS)):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def sdpa_attention(q, k, v, mod_tensors, spec: SiteSpec) -> Optional[torch.Tensor]:
    """The site as one exact ``F.scaled_dot_product_attention`` call (``sdpa_args``): q
    ``[B, Hq, Nq, D]``, k / v ``[B, Hkv, Nkv, D | Dv]`` -> ``[B, Hq, Nq, Dv]``; None where SDPA
    cannot express the site."""
    how = sdpa_args(spec, q.shape[2], k.shape[2])
    if how is None:
        return None
    kind, is_causal = how
    mask = None if kind is None else (torch.logical_not(mod_tensors[0]) if kind == "fill"
                                      else mod_tensors[0])
    kw = {"enable_gqa": True} if spec.gqa_group > 1 else {}
    return sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, scale=spec.scale, **kw)
