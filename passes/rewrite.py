"""Rewrite each discovered site into the sparse IR chain and record it.

    scores          = torch.ops.sparse.score(q, k, [mods...], key)
    counts, indices = torch.ops.sparse.select(scores, q, k, key)
    out             = torch.ops.sparse.attend(q, k, v, [mods...], counts, indices, key)

A match may ask for small views first (``Match.q_fix`` ...): a ``[B*H, N, D]`` layout is viewed
as ``[B, H, N, D]`` and the output viewed back; a mask given as ``where(m, s, v)`` is negated
to fit ``masked_fill``; a bias added before a scale is scaled.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import runtime.ops  # noqa: F401  (registers torch.ops.sparse.*)
from passes.context import SiteRecord
from passes.discover import discover
from passes.graph import Emitter, val
from runtime.spec import SiteSpec, register


def discover_attention(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    ctx.matches, ctx.unmatched = discover(gm, ctx.example_inputs)
    return gm


def _apply_fix(em: Emitter, x: fx.Node, fix) -> fx.Node:
    """Materialise a discovery recipe on ``x`` (see ``passes.discover.Match``)."""
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


def rewrite_to_sparse(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    g = gm.graph
    for m in ctx.matches:
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
        spec = SiteSpec(site=m.site, owner=ctx.owner, policy=pol, scale=m.scale, causal=m.causal,
                        gqa_group=m.gqa_group, mods=m.mods)
        key = register(spec)
        em = Emitter(g, m.out)
        q, k, v = (_apply_fix(em, x, fix) for x, fix in ((m.q, m.q_fix), (m.k, m.k_fix),
                                                         (m.v, m.v_fix)))
        mods = [_apply_fix(em, t, fix) for t, fix in zip(m.mod_nodes, m.mod_fix or
                                                         [()] * len(m.mod_nodes))]
        if pol.name in ("quest", "dsa"):
            k = _keep_with_cache(g, k, pol.page if pol.name == "quest" else 0)
        sc = em.call(torch.ops.sparse.score.default, q, k, mods, key)
        sel = em.call(torch.ops.sparse.select.default, sc, q, k, key)
        counts = em.call(operator.getitem, sel, 0)
        indices = em.call(operator.getitem, sel, 1)
        out = em.call(torch.ops.sparse.attend.default, q, k, v, mods, counts, indices, key)
        out.meta["sparse_site"] = m.site
        out = _apply_fix(em, out, m.out_fix)
        m.out.replace_all_uses_with(out)
        rec.status, rec.spec_key = "rewritten", key
    g.eliminate_dead_code()
    gm.recompile()
    return gm
