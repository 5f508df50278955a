"""plan_schedule: annotate each rewritten site with the cost model's view of it.

For the captured shape it records the estimated dense and sparse times and the chosen schedule
as ``runtime.plan.decide`` gives them (dense, or the policy with the sparse kernel's cheapest
schedule variant, e.g. ``policy (block_sparse@m128n64w8s3) at N=65536``), and the crossover
length (solved on the sympy cost expressions). With ``cost_model="auto"`` the site's spec is
re-registered with ``schedule="auto"``, so that the runtime re-decides per call shape
(``runtime.plan``): dense below the crossover, the policy above.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn.functional as F

from passes.graph import val
from passes.mutation import eliminate_dead_code
from runtime import costmodel as cm, plan
from runtime.rules import sdpa_args
from runtime.spec import lookup, register


def _hint(x) -> int:
    """A concrete size for planning. ``int()`` on a SymInt would add a guard and specialise
    the graph (one recompile per decode step); the hint does not."""
    if isinstance(x, torch.SymInt):
        hint = getattr(x.node, "hint", None)          # the example value's size, no guard
        if hint is None:
            from torch.fx.experimental import symbolic_shapes as ss
            fn = getattr(ss, "optimization_hint", None) or getattr(ss, "hint_int")
            hint = fn(x)
        return int(hint)
    return int(x)


def _emit_dense(gm: fx.GraphModule, attend: fx.Node, spec, how) -> fx.Node:
    """Replace a site's score/select/attend chain by one exact SDPA call."""
    q, k, v, mods = attend.args[0], attend.args[1], attend.args[2], attend.args[3]
    kind, is_causal = how
    g = gm.graph
    with g.inserting_before(attend):
        mask = None
        if kind in ("add", "keep"):
            mask = mods[0]
        elif kind == "fill":                               # masked_fill(t, -inf): keep ~t
            mask = g.call_function(torch.logical_not, (mods[0],))
        kw = {"attn_mask": mask, "is_causal": is_causal, "scale": spec.scale}
        if spec.gqa_group > 1:
            kw["enable_gqa"] = True
        new = g.call_function(F.scaled_dot_product_attention, (q, k, v), kw)
    new.meta.update({kk: vv for kk, vv in attend.meta.items() if kk != "sparse_site"})
    attend.replace_all_uses_with(new)
    return new


def plan_schedule(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    ops = torch.ops.sparse
    records = {r.spec_key: r for r in ctx.sites if r.spec_key}
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not ops.attend.default:
            continue
        key = n.args[-1]
        spec = lookup(key)
        rec = records.get(key)
        vq, vk = val(n.args[0]), val(n.args[1])
        if rec is None or vq is None or vk is None:
            continue
        static = not any(isinstance(x, torch.SymInt) for x in (vq.shape[2], vk.shape[2]))
        b, hq, nq, d = (_hint(x) for x in vq.shape)
        hkv, nkv = _hint(vk.shape[1]), _hint(vk.shape[2])
        if min(b, hq, nq, nkv, d) == 0:
            rec.schedule = "empty (no work at the captured shape)"
            continue
        prof = cm.profile_for(vq.device)
        pol = spec.policy
        dtype = vq.dtype
        plan_at = plan.decide(pol, prof, B=b, Hq=hq, Hkv=hkv, Nq=nq, Nkv=nkv, D=d, dtype=dtype)
        rec.est_dense_ms, rec.est_sparse_ms = plan_at.dense_s * 1e3, plan_at.sparse_s * 1e3
        if pol.is_dense:
            rec.schedule = "dense"
        elif pol.native:
            rec.schedule = "the model's own selection (never run densely)"
        elif not prof.sparse_kernels:
            rec.schedule = "policy (reference kernels)"
        else:
            rho = pol.expected_density(nq, nkv)
            rho_n = cm.sp.Min(1, cm.sp.Float(rho) * nkv / cm.N) if nq > 1 else rho
            rec.crossover = cm.crossover(prof, B=b, Hq=hq, Hkv=hkv, D=d, rho_of_n=rho_n,
                                         block=int(getattr(pol, "block", 64)), decode=nq == 1,
                                         dtype=dtype, estimator=pol.name,
                                         estimator_block=int(getattr(pol, "block",
                                                                     getattr(pol, "page", 64))))
            chosen = ("dense" if plan_at.choice == "dense" else
                      f"policy ({plan_at.candidate})" if plan_at.candidate else "policy")
            rec.schedule = (f"{chosen} at N={nkv}" if ctx.cost_model == "auto"
                            else "policy (cost model off)")
        if ctx.cost_model == "auto" and prof.sparse_kernels and static and (
                pol.is_dense or plan_at.choice == "dense") and pol.attend_kind != "token" \
                and not getattr(spec.evict, "per_head_budgets", False):
            # (token policies keep their ops: their indexer is trained through them; a site
            # whose cache is padded per head (Ada-KV eviction) masks the padding in its attend)
            # static shape, dense is cheaper: emit exact SDPA, no sparse ops at run time
            how = sdpa_args(spec, nq, nkv)
            if how is not None:
                _emit_dense(gm, n, spec, how)
                rec.schedule = f"dense SDPA (static N={nkv}, planned)"
                rec.kernel_planned = "sdpa (in graph)"
                continue
        if ctx.cost_model == "auto" and not pol.is_dense and not pol.native \
                and prof.sparse_kernels:
            # (a native selection is the model's meaning: never run densely)
            new_key = register(dataclasses.replace(spec, schedule="auto"))
            for m in list(gm.graph.nodes):
                if m.op == "call_function" and m.args and m.args[-1] == key and m.target in (
                        ops.score.default, ops.select.default, ops.attend.default):
                    m.args = m.args[:-1] + (new_key,)
            rec.spec_key = new_key
    eliminate_dead_code(gm)
    gm.recompile()
    return gm
