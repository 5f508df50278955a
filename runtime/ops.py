"""The ``sparse`` custom ops the rewritten graph calls, with fake impls for Dynamo/export.

    scores = torch.ops.sparse.score(q, k, mods, key)                # importance estimate
    counts, indices = torch.ops.sparse.select(scores, q, k, key)    # index set (block lists)
    out = torch.ops.sparse.attend(q, k, v, mods, counts, indices, key)
    keys = torch.ops.sparse.append(past, new, page)     # cat along the sequence, for quest
    k_kept, v_kept = torch.ops.sparse.evict(q, k, v, key)  # the K/V a cache keeps (eviction)

``key`` names a registered ``SiteSpec`` (runtime.spec). Shapes: q [B, Hq, Nq, D],
k [B, Hkv, Nkv, D], v [B, Hkv, Nkv, Dv], out [B, Hq, Nq, Dv].

Nothing is defined at import: ``register()`` defines the ops and registers the attend
providers, once per process (``import planner`` calls it, through
``planner.backend.register``).

Effects: ``score``, ``select`` and ``attend`` are pure functions of their arguments.
``append`` mutates none of its arguments (``mutates_args=()``) but has a side effect on
process-global state: it moves what is kept with ``past`` (quest's page summaries, the dsa
indexer's keys; caches found by the identity of a keys tensor) to its result. Its schema says
so: it is registered as an *ordered effectful* op (``torch.library._register_effectful_op``),
so graph passes keep it, in order, even where its result looks unused. The caches never change
a result: a keys tensor without them gets them computed in full. ``evict`` returns new tensors
(the kept K/V) and records what it kept per site (``runtime.eviction``); where heads kept
different counts it notes the padding with its keys result, which ``append`` moves on and
``attend`` masks.
"""
from __future__ import annotations

from typing import List

import torch

from runtime import dispatch, dsa, estimators, eviction, page_summaries, providers, rules, stats
from codegen.attention.reference import mask_visible
from runtime.kernels.token_sparse import token_sparse_attention_bwd
from runtime.spec import lookup


def _cdiv(a, b):
    return (a + b - 1) // b


def score(q: torch.Tensor, k: torch.Tensor, mods: List[torch.Tensor], key: str) -> torch.Tensor:
    return dispatch.score(q, k, mods, lookup(key))


def _score_fake(q, k, mods, key):
    spec = lookup(key)
    est = estimators.get(spec.policy)
    if est.score_shape is None:
        return q.new_empty(0, dtype=torch.float32)
    return q.new_empty(*est.score_shape(q, k, spec), dtype=est.score_dtype)


def select(scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
           key: str) -> tuple[torch.Tensor, torch.Tensor]:
    counts, indices = dispatch.select(scores, q, k, lookup(key))
    return counts.contiguous(), indices.contiguous()


def _select_fake(scores, q, k, key):
    spec = lookup(key)
    if spec.policy.attend_kind == "block":
        b = estimators.block_of(spec)
        nqb, nkb = _cdiv(q.shape[2], b), _cdiv(k.shape[2], b)
        width = estimators.get(spec.policy).select_width
        if width is not None:
            nkb = width(q, k, spec)
        return (q.new_empty(q.shape[0], k.shape[1], nqb, dtype=torch.int32),
                q.new_empty(q.shape[0], k.shape[1], nqb, nkb, dtype=torch.int32))
    e = q.new_empty(0, dtype=torch.int32)
    if spec.policy.attend_kind == "token":          # one list per query row, shared by all heads
        return e, q.new_empty(q.shape[0], 1, q.shape[2], spec.policy.topk, dtype=torch.int32)
    return e, e.clone()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mods: List[torch.Tensor],
           counts: torch.Tensor, indices: torch.Tensor, key: str) -> torch.Tensor:
    if _no_pairs(q, k):
        return _empty_attend(q, k, v, lookup(key))
    spec = lookup(key)
    if spec.evict is not None and spec.evict.per_head_budgets:
        valid = eviction.key_valid(k)
        if valid is not None:
            return _padded_attend(q, k, v, mods, valid, spec)
    return dispatch.attend(q, k, v, mods, counts, indices, spec)


def _padded_attend(q, k, v, mods, valid, spec) -> torch.Tensor:
    """Attention over a cache whose heads kept different counts (Ada-KV eviction): the padding
    slots (``valid`` False, [B, Hkv, Nkv]) are masked, with the causal rule aligned to the last
    key (the queries are the newest tokens). A site with score modifiers or rules of its own
    is refused rather than answered without them."""
    if mods or spec.rules or spec.causal == "upper_left":
        raise NotImplementedError(
            f"site {spec.site}: attention over a cache padded per head (eviction "
            f"{spec.evict.name}) supports plain causal attention only; this site has "
            f"modifiers {spec.mods} / rules {spec.rules}")
    g = spec.gqa_group
    nq, n = q.shape[2], k.shape[2]
    keep = valid.repeat_interleave(g, dim=1)[:, :, None, :]        # [B, Hq, 1, Nkv]
    if spec.causal and nq > 1:
        causal = torch.ones(nq, n, dtype=torch.bool, device=q.device).tril(n - nq)
        keep = keep & causal
    out = rules.sdpa(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1),
                     attn_mask=keep, scale=spec.scale)
    stats.record(spec.stats_key, q=q, k=k, v=v, kernel="sdpa (cache padded per head, masked)")
    return out.contiguous()


def site(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mods: List[torch.Tensor],
         key: str) -> torch.Tensor:
    """``score -> select -> attend`` of one site as plain calls, what the executed graph runs
    in place of the three ops (``passes.lower``): the dispatcher's per-op work (schema,
    autograd and mode checks: tens of microseconds per op) is skipped, and a call the cost
    model runs densely goes straight to dense attention, without building the placeholder
    scores and lists. Same results as the three ops. Where autograd may record (grad enabled
    and an input that requires grad, or a trainable indexer), it calls the ops themselves
    (``attend`` alone for a dense call)."""
    spec = lookup(key)
    dense = _no_pairs(q, k) or dispatch.runs_dense(spec, q, k)
    if dense and spec.policy.attend_kind == "token":
        dsa.made(q, k, spec)
    if not dense:
        k, v, mods = unwritten_keys_dropped(q, k, v, mods, spec)
    if torch.is_grad_enabled() and (spec.policy.attend_kind == "token" or any(
            t.requires_grad for t in (q, k, v, *mods))):
        sp = torch.ops.sparse
        if dense:
            e = q.new_empty(0, dtype=torch.int32)
            return sp.attend(q, k, v, mods, e, e, key)
        c, i = sp.select(sp.score(q, k, mods, key), q, k, key)
        return sp.attend(q, k, v, mods, c, i, key)
    if dense:
        e = q.new_empty(0, dtype=torch.int32)
        return attend(q, k, v, mods, e, e, key)
    c, i = select(score(q, k, mods, key), q, k, key)
    return attend(q, k, v, mods, c, i, key)


def unwritten_keys_dropped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mods: List[torch.Tensor], spec) -> tuple:
    """``(k, v, mods)`` without the trailing keys that no query of the call can see.

    A static KV cache (``generate(cache_implementation="static")``) is preallocated at its full
    length and written in place; causality or its mask hides the slots not written yet. Dense
    attention is the same with or without them, but a sparse policy is not: a window would be
    the last slots of the buffer (unwritten, so masked) instead of the last tokens, a block or
    page selection would spend its budget on masked blocks, and a partial last block's pooled
    key would average unwritten zeros. Dropping the keys that every query is denied makes the
    call what it is with a cache of the written length. With top-left causality (the prefill
    into a static cache) the queries see keys up to their own count: no host work. With a mask
    tensor (no proved causal rule, no window, sink or key-length rule): one host read of the
    mask's columns per call, skipped while a CUDA graph is being captured (the keys then stay
    as given). Only where there are more keys than queries, never with eviction."""
    n, nq = k.shape[2], q.shape[2]
    if spec.evict is not None or n <= nq:
        return k, v, mods
    if spec.causal == "upper_left":
        return _keys_cut(k, v, mods, spec, nq)
    if spec.causal is not None or spec.rules or not mods or (
            k.is_cuda and torch.cuda.is_current_stream_capturing()):
        return k, v, mods                   # (a CUDA graph capture cannot read the mask)
    dead = None
    kinds = [m[0] for m in spec.mods if m[0] != "softcap"]
    for kind, t in zip(kinds, spec.split(mods)[0]):
        if kind not in ("add", "keep") or t.dim() < 2 or t.shape[-1] != n:
            continue
        col = ~mask_visible(t, kind).reshape(-1, n).any(0)
        dead = col if dead is None else dead | col
    if dead is None or not bool(dead[-1]):
        return k, v, mods
    alive = (~dead).nonzero()
    if not alive.numel():
        return k, v, mods
    return _keys_cut(k, v, mods, spec, int(alive.max()) + 1)


def _keys_cut(k, v, mods, spec, m: int) -> tuple:
    """The first ``m`` keys: K, V and every per-key modifier tensor (score modifiers whose last
    dimension runs over the keys, the key-validity rule); the sinks are per head, kept."""
    n = k.shape[2]
    scores, sinks, valid = spec.split(mods)
    cut = [t[..., :m] if t.dim() >= 2 and t.shape[-1] == n else t for t in scores]
    if sinks is not None:
        cut.append(sinks)
    if valid is not None:
        cut.append(valid[..., :m])
    return k[:, :, :m], v[:, :, :m], cut


def _no_pairs(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[2] == 0 or k.shape[2] == 0


def _empty_attend(q, k, v, spec) -> torch.Tensor:
    """Attention without queries or keys, as eager computes it: an empty ``[B, Hq, 0, Dv]``
    for Nq == 0, zeros ``[B, Hq, Nq, Dv]`` for Nkv == 0 (no key to attend to). No kernel
    runs; the call is counted, its density left unmeasured (there is no pair)."""
    stats.record(spec.stats_key, q=q, k=k, v=v, kernel="none (no queries or keys)")
    return q.new_zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


def _attend_fake(q, k, v, mods, counts, indices, key):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


def _attend_setup(ctx, inputs, output):
    q, k, v, mods, counts, indices, key = inputs
    # the gather kernel's lse for this output: the backward kernel starts from it
    ctx.lse = providers.take_lse(output)
    ctx.save_for_backward(q, k, v, counts, indices, *mods,
                          *((output,) if ctx.lse is not None else ()))
    ctx.key = key
    ctx.n_mods = len(mods)


def _attend_backward(ctx, grad):
    """Gradients of ``attend`` w.r.t. q, k, v. Token lists whose forward ran the gather kernel:
    its backward kernel, from the saved output and log-sum-exp. Otherwise the same computation
    re-run differentiably (``dispatch.attend_differentiable``: SDPA, the token-sparse kernels
    or the fp32 reference), one extra forward per backward. Lists and masks get no gradient."""
    saved = ctx.saved_tensors
    q, k, v, counts, indices = saved[:5]
    mods = list(saved[5:5 + ctx.n_mods])
    need = ctx.needs_input_grad[:3]
    no_mods = [None] * ctx.n_mods
    if not any(need):
        return None, None, None, no_mods, None, None, None
    if _no_pairs(q, k):                     # the output is constant (empty or zeros)
        return (*(torch.zeros_like(t) if n else None for t, n in zip((q, k, v), need)),
                no_mods, None, None, None)
    if ctx.lse is not None:
        out = saved[5 + ctx.n_mods]
        grads = token_sparse_attention_bwd(q, k, v, indices, out, ctx.lse, grad.to(out.dtype),
                                           scale=lookup(ctx.key).scale)
        return (*(g if n else None for g, n in zip(grads, need)), no_mods, None, None, None)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), need)]
        out = dispatch.attend_differentiable(*leaves, mods, counts, indices, lookup(ctx.key))
        wanted = [t for t, n in zip(leaves, need) if n]
        got = iter(torch.autograd.grad(out, wanted, grad.to(out.dtype)))
    grads = [next(got) if n else None for n in need]
    return (*grads, no_mods, None, None, None)



def _skipped(t: torch.Tensor) -> bool:
    """True for what ``torch.cat`` leaves out: a 1-D empty tensor (transformers' DynamicCache
    starts each layer with ``torch.tensor([])``)."""
    return t.dim() == 1 and t.numel() == 0


def append(past: torch.Tensor, new: torch.Tensor, page: int) -> torch.Tensor:
    """``torch.cat([past, new], dim=-2)`` (a KV cache growing by the step's keys), which also
    extends what is kept with ``past`` to the result: quest's page summaries (of ``page``-token
    pages; ``runtime.page_summaries``) and the dsa indexer's keys (``runtime.dsa.extend_keys``).
    As ``torch.cat``, a 1-D empty ``past`` (an empty cache) or ``new`` is skipped: the result
    is then the other tensor, copied. Declared an ordered effect (the kept state moves from
    ``past`` to the result; see the module docstring)."""
    out = torch.cat([past, new], dim=-2)
    if out.dim() == 4:            # a skipped ``past`` has nothing kept: ``out`` gets it in full
        if page > 0:
            page_summaries.extend(past, out, page)
        dsa.extend_keys(past, out)
        eviction.extend(past, out)
    return out


def evict(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The K/V the site's cache keeps after its eviction policy (``runtime.eviction``):
    [B, Hkv, M, D] each, M the kept count per head (new tensors; copies where nothing is
    evicted). Records the kept indices, lengths and bytes for ``planner.inspect``."""
    spec = lookup(key)
    return eviction.run(spec.evict, q, k, v, spec.scale, spec.gqa_group, spec.layer,
                        spec.n_layers, spec.stats_key)


def _evict_fake(q, k, v, key):
    spec = lookup(key)
    m = spec.evict.width(spec.layer, spec.n_layers, k.shape[2])
    return (k.new_empty(k.shape[0], k.shape[1], m, k.shape[3]),
            v.new_empty(v.shape[0], v.shape[1], m, v.shape[3]))


def _append_fake(past, new, page):
    return torch.cat([past, new], dim=-2)


def _append_setup(ctx, inputs, output):
    past, new = inputs[0], inputs[1]
    ctx.shapes = (past.shape, new.shape)
    ctx.skipped = (_skipped(past), _skipped(new))
    ctx.n_past = 0 if ctx.skipped[0] else past.shape[-2]


def _append_backward(ctx, grad):
    """Each input's slice of ``grad`` along dim -2; zeros (empty) for a skipped input."""
    (past_shape, new_shape), (skip_past, skip_new) = ctx.shapes, ctx.skipped
    if skip_past and skip_new:
        return grad.new_zeros(past_shape), grad.new_zeros(new_shape), None
    g_past = grad.new_zeros(past_shape) if skip_past else grad[..., :ctx.n_past, :]
    g_new = grad.new_zeros(new_shape) if skip_new else grad[..., ctx.n_past:, :]
    return g_past, g_new, None



_OPS: dict = {}     # op name -> its torch.library.CustomOpDef, filled by register()


def register() -> None:
    """Define ``torch.ops.sparse.{score, select, attend, append, evict}`` (fake impls for Dynamo and
    export, autograd for ``attend`` and ``append``, ``append`` declared effectful) and register
    the attend providers. Idempotent: later calls do nothing."""
    if _OPS:
        return
    providers.register_all()
    for name, fn, fake in (("score", score, _score_fake), ("select", select, _select_fake),
                           ("attend", attend, _attend_fake), ("append", append, _append_fake),
                           ("evict", evict, _evict_fake)):
        op = torch.library.custom_op(f"sparse::{name}", fn, mutates_args=())
        op.register_fake(fake)
        _OPS[name] = op
    _OPS["attend"].register_autograd(_attend_backward, setup_context=_attend_setup)
    _OPS["append"].register_autograd(_append_backward, setup_context=_append_setup)
    _declare_ordered_effect(torch.ops.sparse.append.default)


def _declare_ordered_effect(op) -> None:
    """Mark ``op`` as having an ordered side effect (torch.library's spelling where it has one,
    else the older one of ``torch._higher_order_ops.effects``)."""
    if hasattr(torch.library, "_register_effectful_op") and hasattr(torch.library, "EffectType"):
        torch.library._register_effectful_op(op, torch.library.EffectType.ORDERED)
    else:
        from torch._higher_order_ops import effects
        effects._register_effectful_op(op, effects._EffectType.ORDERED)
