"""Rewrite each discovered site into the sparse IR chain and record it.

    scores          = torch.ops.sparse.score(q, k, [mods...], key)
    counts, indices = torch.ops.sparse.select(scores, q, k, key)
    out             = torch.ops.sparse.attend(q, k, v, [mods...], counts, indices, key)

A site whose mask is the model's own DSA selection (``Match.native``: DeepSeek-V3.2,
GLM-MoE-DSA) is rewritten with the model's indexer as its score and select, under the ``dense``
and ``dsa`` policies or a ``NativeDSA`` value (``_rewrite_native``)::

    indices = torch.ops.sparse.score(q_I, k_I, [w, mask3d], key)     # fused indexer + top-k
    counts, indices = torch.ops.sparse.select(indices, q, k, key)
    out     = torch.ops.sparse.attend(q, k, v, [], counts, indices, key)

and, where its K/V are MLA's decompression of a latent, in the absorbed form (``q_nope @ W_UK``
attends to the latent rows, the output is multiplied by ``W_UV``).

A match may ask for small views first (``Match.q_fix`` ...): a ``[B*H, N, D]`` layout is viewed
as ``[B, H, N, D]`` and the output viewed back; a mask given as ``where(m, s, v)`` is negated
to fit ``masked_fill``; a bias added before a scale is scaled.
"""
from __future__ import annotations

import operator
import re
from typing import Optional

import torch
import torch.fx as fx

from passes.context import SiteRecord
from passes.discover import discover
from passes.graph import Emitter, val
from passes.mutation import MutationInfo, eliminate_dead_code
from passes.native_dsa import mla_latent
from runtime.kernels.launch import kernels_enabled
from runtime.policies import DSA, NativeDSA
from runtime.spec import SiteSpec, register


def discover_attention(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    ctx.matches, ctx.unmatched = discover(gm, ctx.example_inputs)
    return gm


def _apply_fix(em: Emitter, x: fx.Node, fix) -> fx.Node:
    """Materialise a discovery recipe on ``x`` (see ``passes.patterns.Match``)."""
    for step in fix:
        op = step[0]
        if op == "mul":
            x = em.call(operator.mul, x, step[1])
        elif op == "div":
            x = em.call(operator.truediv, x, step[1])
        elif op == "neg":
            x = em.call(operator.neg, x)
        elif op == "not":
            x = em.call(torch.logical_not, x)
        elif op == "unflatten0":
            x = em.method("unflatten", x, 0, (-1, step[1]))
        elif op == "unsqueeze0":
            x = em.method("unsqueeze", x, 0)
        elif op == "flatten01":
            x = em.method("flatten", x, 0, 1)
        elif op == "squeeze0":
            x = em.method("squeeze", x, 0)
        elif op == "to":
            x = em.method("to", x, step[1])
        else:
            raise ValueError(f"unknown recipe step {step!r} for {x.format_node()}")
    return x


def _shapes(m) -> str:
    parts = []
    for nm, n in (("q", m.q), ("k", m.k), ("v", m.v)):
        v = val(n)
        parts.append(f"{nm}{list(v.shape)}" if v is not None else f"{nm}?")
    v = val(m.q)
    if v is not None:
        parts.append(str(v.dtype).replace("torch.", ""))
    return " ".join(str(p) for p in parts)


def _keep_with_cache(g: fx.Graph, k: fx.Node, page: int) -> fx.Node:
    """Keys made by appending the step's keys to a cache (``cat([past, new], dim=-2)``) are
    made by ``sparse.append`` instead, which keeps quest's page summaries (``page`` > 0;
    ``runtime.page_summaries``) and the dsa indexer's keys (``runtime.dsa``) up to date; the
    same tensor either way."""
    if not (isinstance(k, fx.Node) and k.op == "call_function"
            and k.target in (torch.cat, torch.ops.aten.cat.default)):
        return k
    parts = k.args[0] if k.args else k.kwargs.get("tensors")
    dim = k.args[1] if len(k.args) > 1 else k.kwargs.get("dim", 0)
    vk = val(k)
    if (not isinstance(parts, (list, tuple)) or len(parts) != 2 or vk is None or vk.dim() != 4
            or dim not in (-2, 2) or not all(isinstance(p, fx.Node) for p in parts)):
        return k
    with g.inserting_before(k):
        new = g.call_function(torch.ops.sparse.append.default, (parts[0], parts[1], int(page)))
    new.meta.update(k.meta)
    k.replace_all_uses_with(new)
    g.erase_node(k)
    return new


def _is_empty(x) -> bool:
    """A value statically known to hold no token: a 1-D empty tensor (transformers'
    ``DynamicCache`` starts a layer with ``torch.tensor([])``) or a length-0 sequence axis."""
    v = val(x) if isinstance(x, fx.Node) else None
    if v is None:
        return False
    if v.dim() == 1:
        return isinstance(v.shape[0], int) and v.shape[0] == 0
    return v.dim() == 4 and isinstance(v.shape[2], int) and v.shape[2] == 0


def _cache_stores(g: fx.Graph, k: fx.Node, v: fx.Node) -> tuple[Optional[tuple], str]:
    """Where a prefill stores the site's K/V in the model's cache: ``((k_node, v_node), "")``
    when both are returned by the graph (Dynamo returns the tensors a ``DynamicCache`` layer
    holds; a tuple cache returns them itself) and hold the whole sequence (appended to an empty
    cache, or no cache read at all), else ``(None, why)``."""
    out = next(n for n in reversed(g.nodes) if n.op == "output")
    appended = (torch.cat, torch.ops.aten.cat.default, torch.ops.sparse.append.default)
    for x in (k, v):
        if not isinstance(x, fx.Node) or out not in x.users:
            return None, ("the site's keys/values are not stored in a cache the captured graph "
                          "returns (cache layout unknown)")
        if x.op == "call_function" and x.target in appended:
            past = x.args[0][0] if x.target is not torch.ops.sparse.append.default else x.args[0]
            if not _is_empty(past):
                return None, ("appends to a cached prefix: the cache is evicted after a prefill "
                              "only")
    return (k, v), ""


def _layer_of(site: str) -> Optional[int]:
    """The layer index in a site name (``model.layers.3.self_attn`` -> 3), None if none."""
    found = re.findall(r"(?:^|\.)(\d+)(?:\.|$)", site)
    return int(found[-1]) if found else None


def _insert_eviction(g: fx.Graph, em: Emitter, q, stores: tuple, key: str) -> None:
    """``k_kept, v_kept = sparse.evict(q, k, v, key)``; the graph returns the kept tensors
    where it returned the full ones (so the model's cache holds them); attention on this call
    still reads the full ones."""
    k, v = stores
    out = next(n for n in reversed(g.nodes) if n.op == "output")
    ev = em.call(torch.ops.sparse.evict.default, q, k, v, key)
    kk, vk = em.call(operator.getitem, ev, 0), em.call(operator.getitem, ev, 1)
    out.replace_input_with(k, kk)
    out.replace_input_with(v, vk)


def _follow(m, replaced: dict) -> None:
    """A site whose inputs include an earlier site's output reads the rewritten output."""
    if not replaced:
        return
    f = lambda x: replaced.get(x, x) if isinstance(x, fx.Node) else x  # noqa: E731
    m.q, m.k, m.v = f(m.q), f(m.k), f(m.v)
    m.mod_nodes = [f(x) for x in m.mod_nodes]
    m.sink, m.kv_valid = f(m.sink), f(m.kv_valid)
    m.q_fix, m.k_fix, m.v_fix = (tuple(tuple(f(a) for a in step) for step in fix)
                                 for fix in (m.q_fix, m.k_fix, m.v_fix))
    m.mod_fix = [tuple(tuple(f(a) for a in step) for step in fix) for fix in (m.mod_fix or [])]


def _rules(m) -> str:
    """The model's own rules a site carries, as ``planner.inspect`` shows them."""
    parts = [f"window {m.window}"] if m.window else []
    if m.sink is not None:
        parts.append("sinks")
    if m.kv_valid is not None:
        parts.append(f"padding ({m.kv_valid.name})")
    return ", ".join(parts)


def _site_inputs(m) -> list:
    """Every graph tensor the rewritten site reads: q, k, v, modifier tensors, run-time scales."""
    out = []
    for x in [m.q, m.k, m.v, *m.mod_nodes, m.sink, m.kv_valid]:
        if isinstance(x, fx.Node) and x not in out:
            out.append(x)
    for fix in (m.q_fix, m.k_fix, m.v_fix, *(m.mod_fix or [])):
        for step in fix:
            for a in step[1:]:
                if isinstance(a, fx.Node) and a not in out:
                    out.append(a)
    return out


def _site_reads(info: MutationInfo, m, inputs: list) -> tuple[dict, Optional[str]]:
    """Where the captured site first reads each input: ``{input: node}``, the node of the site
    (a descendant of its inputs that ``m.out`` depends on, not one computing an input) that first
    reads the input's storage. The rewritten site reads every input just before ``m.out``; that
    is the same value unless an in-place write into the input's storage lies in between, in which
    case the second element says why the site must stay dense (None if it need not). Also refuses
    an attention output written into an existing tensor (``out=``)."""
    if info.is_write(m.out):
        return {}, (f"the attention output is written into an existing tensor "
                    f"({m.out.format_node()}); the rewrite would leave it unwritten")
    b = info.pos[m.out]
    lo = min(info.pos[x] for x in inputs)

    def walk(starts, step, keep):
        seen, stack = set(), list(starts)
        while stack:
            for y in step(stack.pop()):
                if y not in seen and keep(y):
                    seen.add(y)
                    stack.append(y)
        return seen

    above = walk([m.out], lambda x: x.all_input_nodes, lambda y: info.pos[y] >= lo) | {m.out}
    feeding = walk(inputs, lambda x: x.all_input_nodes, lambda y: info.pos[y] >= lo)
    region = walk(inputs, lambda x: x.users, lambda y: y in above and y not in feeding)
    anchors = {}
    for x in inputs:
        g = info.group(x)
        first = m.out
        for n in region:
            if info.pos[n] < info.pos[first] and (
                    g in info.reads(n) or any(info.group(t) is g for t in info.written(n))):
                first = n
        anchors[x] = first
        for w in info.writes_between(g, info.pos[first], b):
            return anchors, (f"{x.name} is written in place by {w.format_node()} after the "
                             f"attention starts reading it ({first.name}); written in place after "
                             f"capture, the read cannot move to the rewritten site")
    return anchors, None


def _native_policy(m, pol) -> NativeDSA:
    """The ``NativeDSA`` value a recognised site runs with: the model's top-k (or the one a
    ``NativeDSA`` policy names), its indexer scale, and what its mask was proved to be."""
    ch = m.native
    rule = ("causal" if ch.causal == "lower_right" else "all" if ch.all_visible
            else m.mods[0][0] if ch.base is not None else "")
    given = pol if isinstance(pol, NativeDSA) else NativeDSA()
    # ``dense`` is the identity check: the model's selection over the model's own per-head K/V
    # (the absorbed form reassociates the products: equal within fp32 rounding, not bit-equal)
    return NativeDSA(topk=given.topk or ch.topk, fp8=given.fp8,
                     absorb=given.absorb and not pol.is_dense, score_scale=ch.scale, mask=rule)


def _emit_site(em, score_args: tuple, q, k, v, mods, key: str, site):
    """The site's ``sparse.score(*score_args, key) -> sparse.select -> sparse.attend`` chain;
    the attend node (the site's output) is marked with ``site``."""
    sc = em.call(torch.ops.sparse.score.default, *score_args, key)
    sel = em.call(torch.ops.sparse.select.default, sc, q, k, key)
    counts = em.call(operator.getitem, sel, 0)
    indices = em.call(operator.getitem, sel, 1)
    out = em.call(torch.ops.sparse.attend.default, q, k, v, mods, counts, indices, key)
    out.meta["sparse_site"] = site
    return out


def _rewrite_native(g: fx.Graph, m, pol: NativeDSA, rec, first: dict, owner: str) -> fx.Node:
    """Emit the native site (see the module docstring); returns the output node."""
    ch = m.native
    attend_mods = () if pol.mask in ("causal", "all", "") else (m.mods[0],)
    mla, why = mla_latent(m.q, m.k, m.v) if pol.absorb else (None, "as the model computes them")
    gqa = mla.heads if mla is not None else m.gqa_group
    # an additive finite mask that hides a whole row makes the model's softmax uniform there
    empty = "mean" if pol.mask == "add" else m.empty_rows
    spec = SiteSpec(site=m.site, owner=owner, policy=pol, scale=m.scale, causal=None,
                    gqa_group=gqa, mods=attend_mods, empty_rows=empty)
    key = register(spec)
    em = Emitter(g, m.out, reads_as=first)
    mods = [ch.base] if attend_mods else []
    if mla is None:
        q, k, v = (_apply_fix(em, x, fix) for x, fix in ((m.q, m.q_fix), (m.k, m.k_fix),
                                                         (m.v, m.v_fix)))
    else:
        # absorbed MLA: W_kvb = [W_UK; W_UV] per head; q_nope W_UK . c == q_nope . (W_UK c)
        r = val(mla.latent).shape[-1]
        w = em.method("view", mla.weight, mla.heads, mla.nope + mla.dv, r)   # [H, nope+dv, r]
        w_uk = em.call(operator.getitem, w, (slice(None), slice(None, mla.nope)))
        w_uv = em.call(operator.getitem, w, (slice(None), slice(mla.nope, None)))
        q_lat = em.call(torch.matmul, mla.q_nope, w_uk)                      # [B, H, S, r]
        q = em.call(torch.cat, (q_lat, mla.q_rope), -1)                      # [B, H, S, r+dr]
        k = em.call(torch.cat, (mla.latent, mla.rope_k), -1)                 # [B, 1, T, r+dr]
        v = em.call(operator.getitem, k, (Ellipsis, slice(None, r)))         # [B, 1, T, r]
    # a mask proved causal (or all-visible) is the kernels' rule: where they will run, the
    # model's [B, S, T] mask is not read (and is dead code unless the model reads it elsewhere);
    # the reference path reads it, so its scores and ties are bit-identical to the model's
    drop = pol.mask in ("causal", "all") and kernels_enabled(val(ch.q_i))
    sc_in = [ch.w] + ([ch.mask3d] if ch.mask3d is not None and not drop else [])
    out = _emit_site(em, (ch.q_i, ch.k_i, sc_in), q, k, v, mods, key, m.site)
    if mla is not None:
        out = em.call(torch.matmul, out, em.method("transpose", w_uv, -1, -2))  # [B, H, S, dv]
    rules = [f"model indexer ({val(ch.q_i).shape[2]}x{val(ch.q_i).shape[3]}), "
             f"mask {pol.mask or 'none'}"]
    rules.append(f"absorbed MLA (latent {val(mla.latent).shape[-1]} + rope "
                 f"{val(mla.rope_k).shape[-1]}, {mla.heads} heads share it)" if mla is not None
                 else f"per-head K/V ({why})")
    rec.rules = ", ".join(rules)
    rec.policy, rec.spec_key, rec.status = pol.short(), key, "rewritten"
    return _apply_fix(em, out, m.out_fix)


def rewrite_to_sparse(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    g = gm.graph
    replaced: dict = {}                  # an earlier site's output node -> its rewritten output
    for m in ctx.matches:
        _follow(m, replaced)
        pol, pattern = ctx.policies.lookup(m.site)
        if pattern is not None:
            ctx.matched_patterns.add(pattern)
        rec = SiteRecord(name=m.site, pattern=m.pattern, policy=pol.short() if pol else "-",
                         status="dense-fallback", graph=ctx.graph_index, node=m.out.name,
                         shapes=_shapes(m), gqa_group=m.gqa_group, causal=m.causal, mods=m.mods)
        ctx.sites.append(rec)
        if pol is None:
            rec.reason = "no policy pattern matches this site"
            continue
        if m.fallback:
            rec.reason = m.fallback
            continue
        native = m.native is not None and (pol.is_dense or isinstance(pol, (DSA, NativeDSA)))
        if isinstance(pol, NativeDSA) and not native:
            rec.reason = "dsa_native: the model computes no DSA selection at this site"
            continue
        inputs = _site_inputs(m)
        if native:
            ch = m.native
            inputs += [x for x in (ch.q_i, ch.k_i, ch.w, ch.mask3d, ch.base)
                       if isinstance(x, fx.Node) and x not in inputs]
        first, why = _site_reads(MutationInfo(g), m, inputs)
        if why:
            rec.reason = why
            continue
        if native:
            out = _rewrite_native(g, m, _native_policy(m, pol), rec, first, ctx.owner)
            m.out.replace_all_uses_with(out)
            replaced[m.out] = out
            continue
        if m.native_note:
            rec.reason = (f"the model's DSA index mask runs as a mask tensor (its chain was not "
                          f"recognised: {m.native_note})")
        ev = ctx.evictions.lookup(m.site)[0] if ctx.evictions is not None else None
        spec = SiteSpec(site=m.site, owner=ctx.owner, policy=pol, scale=m.scale, causal=m.causal,
                        gqa_group=m.gqa_group, mods=m.mods, window=m.window,
                        sinks=m.sink is not None, kv_valid=m.kv_valid is not None,
                        empty_rows=m.empty_rows, evict=ev, layer=_layer_of(m.site),
                        n_layers=ctx.n_layers)
        rec.rules = _rules(m)
        key = register(spec)
        em = Emitter(g, m.out, reads_as=first)  # {input: its first read}
        q, k, v = (_apply_fix(em, x, fix) for x, fix in ((m.q, m.q_fix), (m.k, m.k_fix),
                                                         (m.v, m.v_fix)))
        mods = [_apply_fix(em, t, fix) for t, fix in zip(m.mod_nodes, m.mod_fix or
                                                         [()] * len(m.mod_nodes))]
        mods += [x for x in (m.sink, m.kv_valid) if x is not None]
        if pol.cache_page is not None or ev is not None:
            k = _keep_with_cache(g, k, pol.cache_page or 0)
        stores = None
        if ev is not None:
            stores, rec.evict = _cache_stores(g, k, v)
            if stores is not None:
                rec.evict = ev.short()
        out = _emit_site(em, (q, k, mods), q, k, v, mods, key, m.site)
        if stores is not None:
            _insert_eviction(g, em, q, stores, key)
        out = _apply_fix(em, out, m.out_fix)
        m.out.replace_all_uses_with(out)
        replaced[m.out] = out
        rec.status, rec.spec_key = "rewritten", key
    eliminate_dead_code(gm)
    gm.recompile()
    return gm
