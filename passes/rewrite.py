"""Rewrite each discovered site into the sparse IR chain and record it.

    scores          = torch.ops.sparse.score(q, k, [mods...], key)
    counts, indices = torch.ops.sparse.select(scores, q, k, key)
    out             = torch.ops.sparse.attend(q, k, v, [mods...], counts, indices, key)
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import runtime.ops  # noqa: F401  (registers torch.ops.sparse.*)
from passes.context import SiteRecord
from passes.discover import discover
from passes.graph import val
from runtime.spec import SiteSpec, register


def discover_attention(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    ctx.matches, ctx.unmatched = discover(gm)
    return gm


def _shapes(m) -> str:
    parts = []
    for nm, n in (("q", m.q), ("k", m.k), ("v", m.v)):
        v = val(n)
        parts.append(f"{nm}{list(v.shape)}" if v is not None else f"{nm}?")
    v = val(m.q)
    if v is not None:
        parts.append(str(v.dtype).replace("torch.", ""))
    return " ".join(str(p) for p in parts)


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
        meta = {k: m.out.meta[k] for k in ("nn_module_stack", "stack_trace", "source_fn_stack")
                if k in m.out.meta}
        with g.inserting_before(m.out):
            mods = list(m.mod_nodes)
            sc = g.call_function(torch.ops.sparse.score.default, (m.q, m.k, mods, key))
            sel = g.call_function(torch.ops.sparse.select.default, (sc, m.q, m.k, key))
            counts = g.call_function(operator.getitem, (sel, 0))
            indices = g.call_function(operator.getitem, (sel, 1))
            out = g.call_function(torch.ops.sparse.attend.default,
                                  (m.q, m.k, m.v, mods, counts, indices, key))
        for n in (sc, sel, counts, indices, out):
            n.meta.update(meta)
        if "val" in m.out.meta:
            out.meta["val"] = m.out.meta["val"]
        out.meta["sparse_site"] = m.site
        m.out.replace_all_uses_with(out)
        rec.status, rec.spec_key = "rewritten", key
    g.eliminate_dead_code()
    gm.recompile()
    return gm
