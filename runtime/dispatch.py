"""Choose the implementation of each sparse op: a compiled kernel where one is registered
for the device and the spec, else the PyTorch reference (always correct, any device).

Kernel providers register with ``register_attend(name, provider)``; a provider is a callable
``provider(q, k, v, mod_tensors, counts, indices, spec) -> (out, density[, schedule]) | None``
that returns None when it does not handle the case (so the next provider, finally the
reference, takes it); ``density`` is None or per-query-head ``(allowed, kept)`` pair counts;
``schedule``, optional, names the kernel schedule it launched (shown with the kernel's name).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional

import torch

from codegen.attention.reference import MASKED_BELOW, attention_reference, positions_offset
from codegen.select.reference import block_keep_fn
from runtime import estimators, plan, stats
from runtime.env import kernels_unavailable_reason
from runtime.spec import SiteSpec

Provider = Callable[..., Optional[torch.Tensor]]
_ATTEND_PROVIDERS: list[tuple[str, Provider]] = []


def register_attend(name: str, provider: Provider) -> None:
    """Add a kernel provider for ``sparse.attend``, tried before the reference."""
    global _ATTEND_PROVIDERS
    _ATTEND_PROVIDERS = [(n, p) for n, p in _ATTEND_PROVIDERS if n != name] + [(name, provider)]


def score(q, k, mod_tensors, spec: SiteSpec) -> torch.Tensor:
    est = estimators.get(spec.policy)
    if est.score_shape is not None and plan.choose(spec, q, k) == "dense":
        return q.new_zeros(est.score_shape(q, k, spec), dtype=torch.float32)
    if est.score is None:
        return q.new_empty(0, dtype=torch.float32)
    return est.score(q, k, mod_tensors, spec)


def select(scores, q, k, spec: SiteSpec):
    est = estimators.get(spec.policy)
    if est.select is None:
        return q.new_empty(0, dtype=torch.int32), q.new_empty(0, dtype=torch.int32)
    if _cost_model_dense(spec, q, k):
        if spec.policy.attend_kind == "token":
            from runtime import dsa
            return dsa.no_lists(q, k, spec)
        return _all_blocks(q, k, spec)
    counts, indices = est.select(scores, q, k, spec)
    return counts.to(torch.int32), indices.to(torch.int32)


def _cost_model_dense(spec: SiteSpec, q, k) -> bool:
    """Whether the cost model runs this call densely. A token-list site whose indexer is being
    trained (``runtime.dsa.recording``) follows the recording's mode instead."""
    if spec.policy.is_dense or plan.choose(spec, q, k) != "dense":
        return False
    if spec.policy.attend_kind == "token":
        from runtime import dsa
        return dsa.active_recorder() is None
    return True


def _all_blocks(q, k, spec: SiteSpec):
    """Placeholder lists (shaped like the policy's selection, all empty) for a call the cost
    model runs densely: attend ignores them and computes every pair."""
    b = estimators.block_of(spec)
    nqb, width = -(-q.shape[2] // b), -(-k.shape[2] // b)
    w = estimators.get(spec.policy).select_width
    if w is not None:
        width = w(q, k, spec)
    counts = torch.zeros((q.shape[0], k.shape[1], nqb), dtype=torch.int32, device=q.device)
    idx = torch.full((q.shape[0], k.shape[1], nqb, width), -1, dtype=torch.int32, device=q.device)
    return counts, idx


@functools.lru_cache(maxsize=1024)
def _dense_variant(spec: SiteSpec) -> SiteSpec:
    from runtime.policies import Dense
    return dataclasses.replace(spec, policy=Dense())


def _want_density() -> bool:
    return os.environ.get("SPARSE_PLANNER_DENSITY", "1") != "0"


def _resolve(q, k, counts, indices, spec: SiteSpec):
    """The spec, lists and report tag a call actually runs with: the dense variant where the
    cost model (or the dsa warm-up) says so."""
    from runtime import dsa
    tag = ""
    e = q.new_empty(0, dtype=torch.int32)
    if spec.policy.attend_kind == "token" and dsa.dense_mode():
        return _dense_variant(spec), e, e, " (dsa warm-up: dense)"
    if _cost_model_dense(spec, q, k):
        # the cost model chose dense at this shape: exact attention, reported as such
        return _dense_variant(spec), e, e, " (cost model: dense)"
    go_dense, rho = plan.dense_at_measured_density(spec, q, k, counts, estimators.block_of(spec))
    if go_dense:
        tag = f" (cost model: dense at measured density {rho:.2f})"
        return _dense_variant(spec), e, e, tag
    return spec, counts, indices, tag


def _keep_of(spec: SiteSpec, counts, indices, n_q: int, n_kv: int, device):
    """The reference's keep-set for a policy's lists (None: every allowed pair)."""
    pol = spec.policy
    if pol.attend_kind == "token" and indices.numel():
        from runtime.dsa import keep_from_indices
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


def attend(q, k, v, mod_tensors, counts, indices, spec: SiteSpec) -> torch.Tensor:
    spec, counts, indices, tag = _resolve(q, k, counts, indices, spec)
    for name, provider in _ATTEND_PROVIDERS:
        res = provider(q, k, v, mod_tensors, counts, indices, spec)
        if res is not None:
            out, dens, *sched = res
            if dens is None and spec.policy.is_dense:
                dens = ([1.0] * q.shape[1], [1.0] * q.shape[1])
            sched = f"[{sched[0]}]" if sched and sched[0] else ""
            stats.record(spec.stats_key, q=q, k=k, v=v, kernel=name + sched + tag,
                         allowed=dens[0] if dens else None, kept=dens[1] if dens else None,
                         rules=_rules_note(spec, mod_tensors))
            return out.contiguous()            # the op's declared layout (its fake impl's)
    keep = _keep_of(spec, counts, indices, q.shape[2], k.shape[2], q.device)
    st = {} if _want_density() else None
    mods, tensors, sinks = reference_rules(spec, mod_tensors, k.shape[2])
    out, _ = attention_reference(q, k, v, scale=spec.scale, mods=mods, mod_tensors=tensors,
                                 causal=spec.causal, keep=keep, stats=st, sinks=sinks,
                                 window=spec.window)
    out = fix_empty_rows(out, v, spec, spec.split(mod_tensors)[2], q.shape[2], k.shape[2])
    if spec.mods and not spec.policy.is_dense and estimators.kernels_take(q):
        # kernels were there but apply rule masks only (causal, window): say why they did not run
        tag += f" (the site's {'mask tensors' if mod_tensors else 'score modifiers'} need the reference)"
    elif why := kernels_unavailable_reason(q.device):     # kernels asked for where none can run
        tag += f" ({why})"
    stats.record(spec.stats_key, q=q, k=k, v=v, kernel="reference" + tag,
                 allowed=st.get("allowed") if st else None, kept=st.get("kept") if st else None,
                 rules=_rules_note(spec, mod_tensors))
    return out


def _rules_note(spec: SiteSpec, tensors) -> str:
    """What the site's rules were on this call, for ``planner.inspect``: the window, the sink
    term, the per-row key lengths (padding)."""
    if not spec.rules:
        return ""
    parts = []
    if spec.window:
        parts.append(f"window {spec.window}")
    _, sinks, valid = spec.split(tensors)
    if sinks is not None:
        parts.append("sinks")
    if valid is not None:
        n = (valid != 0).sum(dim=-1).tolist()
        parts.append(f"lengths {n if len(n) <= 8 else n[:8] + ['...']}")
    return ", ".join(parts)


def attend_differentiable(q, k, v, mod_tensors, counts, indices, spec: SiteSpec) -> torch.Tensor:
    """What ``attend`` computes, as differentiable torch code (the backward of ``sparse.attend``
    runs it under autograd): SDPA for dense sites SDPA can express, the token-sparse kernels
    with their backward for token lists, else the fp32 reference."""
    spec, counts, indices, _ = _resolve(q, k, counts, indices, spec)
    pol = spec.policy
    if pol.is_dense and q.device.type == "cuda":
        from runtime.providers import sdpa_args
        how = sdpa_args(spec, q.shape[2], k.shape[2])
        if how is not None:
            import torch.nn.functional as F
            kind, is_causal = how
            mask = None if kind is None else (torch.logical_not(mod_tensors[0]) if kind == "fill"
                                              else mod_tensors[0])
            kw = {"enable_gqa": True} if spec.gqa_group > 1 else {}
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                  scale=spec.scale, **kw)
    if pol.attend_kind == "token" and indices.numel() and not spec.mods and not spec.rules:
        from runtime.token_sparse_autograd import token_sparse_attention_fn
        return token_sparse_attention_fn(q, k, v, indices, scale=spec.scale)
    keep = _keep_of(spec, counts, indices, q.shape[2], k.shape[2], q.device)
    mods, tensors, sinks = reference_rules(spec, mod_tensors, k.shape[2])
    out, _ = attention_reference(q, k, v, scale=spec.scale, mods=mods, mod_tensors=tensors,
                                 causal=spec.causal, keep=keep, sinks=sinks, window=spec.window)
    return fix_empty_rows(out, v, spec, spec.split(mod_tensors)[2], q.shape[2], k.shape[2])
