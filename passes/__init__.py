"""fx passes. The pipeline is written out once, here, in order."""
from __future__ import annotations

import torch
import torch.fx as fx

from passes.canonicalize import canonicalize
from passes.context import PassContext, SiteRecord
from passes.meta import propagate_meta
from passes.mutation import snapshot, thread_writes
from passes.rewrite import discover_attention, rewrite_to_sparse
from passes.schedule import plan_schedule
from passes.verify import IRVerificationError, verify_ir

PIPELINE = [
    propagate_meta,       # every node has meta['val']
    thread_writes,        # later users of a tensor written in place read the write's result
    canonicalize,         # einsum / baddbmm / fused attention modules -> plain ops
    discover_attention,   # ctx.matches / ctx.unmatched
    rewrite_to_sparse,    # sparse.score -> sparse.select -> sparse.attend
    plan_schedule,        # cost model: estimates, crossover, per-call dense/sparse choice
    verify_ir,            # the IR is well formed
]


def register() -> None:
    """What the passes need of Dynamo, for the whole process (idempotent; run by
    ``planner.backend.register``): Dynamo cannot trace the builtin ``torch._safe_softmax`` and
    breaks the graph around it, which would split an attention between two graphs; it is kept
    in the graph as one op instead (labelled "softmax", ``passes.graph.label``)."""
    torch._dynamo.allow_in_graph(torch._safe_softmax)


def run_pipeline(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if ctx.verify:
        ctx.mutation_baseline = snapshot(gm.graph)    # the writes every pass must keep in order
    for p in PIPELINE:
        gm = p(gm, ctx)
        if ctx.verify and p is not verify_ir:
            verify_ir(gm, ctx)
    return gm


__all__ = ["PIPELINE", "PassContext", "SiteRecord", "IRVerificationError", "register",
           "run_pipeline"]
