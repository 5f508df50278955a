"""Choose the implementation of each sparse op: a compiled kernel where one is registered
for the device and the spec, else the PyTorch reference (always correct, any device).

Kernel providers register with ``register_attend(name, provider)``; a provider is a callable
``provider(q, k, v, mod_tensors, counts, indices, spec) -> (out, density[, schedule]) | None``
that returns None when it does not handle the case (so the next provider, finally the
reference, takes it); ``density`` is None or per-query-head ``(allowed, kept)`` pair counts;
``schedule``, optional, names the kernel schedule it launched (shown with the kernel's name).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from codegen.attention.reference import attention_reference
from runtime import dsa, env, estimators, native_dsa, plan, recall, stats
from runtime.kernels.launch import MAX_HEAD_DIM, kernels_enabled, kernels_unavailable_reason
from runtime.kernels.token_sparse import token_sparse_attention_fn
from runtime.rules import (dense_variant, fix_empty_rows, keep_of, reference_rules,
                           sdpa_attention)
from runtime.spec import SiteSpec

Provider = Callable[..., Optional[torch.Tensor]]
_ATTEND_PROVIDERS: list[tuple[str, Provider]] = []


def register_attend(name: str, provider: Provider) -> None:
    """Add a kernel provider for ``sparse.attend``, tried before the reference."""
    global _ATTEND_PROVIDERS
    _ATTEND_PROVIDERS = [(n, p) for n, p in _ATTEND_PROVIDERS if n != name] + [(name, provider)]


def score(q, k, mod_tensors, spec: SiteSpec) -> torch.Tensor:
    est = estimators.get(spec.policy)
    if (est.score_shape is not None and not spec.policy.native
            and plan.choose(spec, q, k) == "dense"):
        return q.new_zeros(est.score_shape(q, k, spec), dtype=torch.float32)
    if est.score is None:
        return q.new_empty(0, dtype=torch.float32)
    return est.score(q, k, mod_tensors, spec)


def select(scores, q, k, spec: SiteSpec):
    est = estimators.get(spec.policy)
    if est.select is None:
        return q.new_empty(0, dtype=torch.int32), q.new_empty(0, dtype=torch.int32)
    if runs_dense(spec, q, k):
        if spec.policy.attend_kind == "token":
            return dsa.no_lists(q, k, spec)
        return _all_blocks(q, k, spec)
    counts, indices = est.select(scores, q, k, spec)
    return counts.to(torch.int32), indices.to(torch.int32)


def runs_dense(spec: SiteSpec, q, k) -> bool:
    """Whether the cost model runs this call densely (``attend`` then computes every pair
    whatever the lists say, as ``_resolve`` makes it), so that neither the estimator nor the
    selection need run, nor placeholder lists be built (for a token site at 65536 tokens and
    top-2048 they are 0.5 GB a site). A token-list site whose indexer is being trained
    (``runtime.dsa.recording``) follows the recording's mode instead."""
    if spec.policy.is_dense or spec.policy.native or plan.choose(spec, q, k) != "dense":
        return False
    if spec.policy.attend_kind == "token":
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


def _resolve(q, k, counts, indices, spec: SiteSpec):
    """The spec, lists and report tag a call actually runs with: the dense variant where the
    cost model (or the dsa warm-up) says so."""
    tag = ""
    e = q.new_empty(0, dtype=torch.int32)
    if spec.policy.attend_kind == "token" and not spec.policy.native and dsa.dense_mode():
        return dense_variant(spec), e, e, " (dsa warm-up: dense)"
    if runs_dense(spec, q, k):
        # the cost model chose dense at this shape: exact attention, reported as such
        return dense_variant(spec), e, e, " (cost model: dense)"
    go_dense, rho = plan.dense_at_measured_density(spec, q, k, counts, estimators.block_of(spec))
    if go_dense:
        tag = f" (cost model: dense at measured density {rho:.2f})"
        return dense_variant(spec), e, e, tag
    return spec, counts, indices, tag


def attend(q, k, v, mod_tensors, counts, indices, spec: SiteSpec) -> torch.Tensor:
    spec, counts, indices, tag = _resolve(q, k, counts, indices, spec)
    if not spec.policy.is_dense:
        plan.note_sparse_run()
    if recall.active(spec.owner):          # opt-in (planner.compile(..., record="recall"))
        recall.observe(spec, q, k, mod_tensors, counts, indices)
    for name, provider in _ATTEND_PROVIDERS:
        res = provider(q, k, v, mod_tensors, counts, indices, spec)
        if res is not None:
            out, dens, *sched = res
            if dens is None and spec.policy.is_dense:
                dens = ([1.0] * q.shape[1], [1.0] * q.shape[1])
            if spec.policy.native:
                out = native_dsa.fix_unseen_rows(out, v, indices, spec)
            sched = f"[{sched[0]}]" if sched and sched[0] else ""
            stats.record(spec.stats_key, q=q, k=k, v=v, kernel=name + sched + tag,
                         allowed=dens[0] if dens else None, kept=dens[1] if dens else None,
                         rules=_rules_note(spec, mod_tensors))
            return out.contiguous()            # the op's declared layout (its fake impl's)
    keep = keep_of(spec, counts, indices, q.shape[2], k.shape[2], q.device)
    st = {} if env.density_counting() else None
    mods, tensors, sinks = reference_rules(spec, mod_tensors, k.shape[2])
    out, _ = attention_reference(q, k, v, scale=spec.scale, mods=mods, mod_tensors=tensors,
                                 causal=spec.causal, keep=keep, stats=st, sinks=sinks,
                                 window=spec.window)
    out = fix_empty_rows(out, v, spec, spec.split(mod_tensors)[2], q.shape[2], k.shape[2])
    if spec.policy.native:
        out = native_dsa.fix_unseen_rows(out, v, indices, spec)
    if (spec.mods and not spec.policy.is_dense and kernels_enabled(q)
            and q.shape[-1] <= MAX_HEAD_DIM):
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
        out = sdpa_attention(q, k, v, mod_tensors, spec)
        if out is not None:
            return out
    if pol.attend_kind == "token" and indices.numel() and not spec.mods and not spec.rules:
        out = token_sparse_attention_fn(q, k, v, indices, scale=spec.scale)
        return native_dsa.fix_unseen_rows(out, v, indices, spec) if pol.native else out
    keep = keep_of(spec, counts, indices, q.shape[2], k.shape[2], q.device)
    mods, tensors, sinks = reference_rules(spec, mod_tensors, k.shape[2])
    out, _ = attention_reference(q, k, v, scale=spec.scale, mods=mods, mod_tensors=tensors,
                                 causal=spec.causal, keep=keep, sinks=sinks, window=spec.window)
    out = fix_empty_rows(out, v, spec, spec.split(mod_tensors)[2], q.shape[2], k.shape[2])
    return native_dsa.fix_unseen_rows(out, v, indices, spec) if pol.native else out
