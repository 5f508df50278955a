"""IR verifier: run between passes (``PassContext.verify``) and after the pipeline."""
from __future__ import annotations

import torch
import torch.fx as fx

from passes import mutation
from passes.graph import val
from runtime.spec import lookup


class IRVerificationError(RuntimeError):
    pass


def _fail(node: fx.Node, msg: str):
    raise IRVerificationError(f"{msg}\n  at: {node.format_node()}")


def verify_ir(gm: fx.GraphModule, ctx=None) -> fx.GraphModule:
    gm.graph.lint()
    baseline = getattr(ctx, "mutation_baseline", None)
    if baseline is not None:
        bad = mutation.check(gm.graph, baseline)
        if bad:
            raise IRVerificationError(f"in-place writes not preserved: {bad}")
    ops = torch.ops.sparse
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is ops.attend.default:
            q, k, v, mods, counts, indices, key = n.args
            spec = lookup(key)
            if len(mods) != spec.n_mod_tensors():
                _fail(n, f"attend has {len(mods)} modifier tensors, spec {spec.mods} needs "
                         f"{spec.n_mod_tensors()}")
            sel = counts.args[0] if isinstance(counts, fx.Node) and counts.args else None
            if (not isinstance(sel, fx.Node) or sel.target is not ops.select.default
                    or sel.args[3] != key):
                _fail(n, "attend's block lists do not come from a select of the same site")
            if not isinstance(indices, fx.Node) or not indices.args or indices.args[0] is not sel:
                _fail(n, "attend's counts and indices come from different selects")
            vq, vk, vv = val(q), val(k), val(v)
            if vq is not None and vk is not None:
                if vq.dim() != 4 or vk.dim() != 4 or (vv is not None and vv.dim() != 4):
                    _fail(n, f"attend expects 4-D q/k/v, got ranks {vq.dim()}, {vk.dim()}")
                if vq.shape[1] != vk.shape[1] * spec.gqa_group:
                    _fail(n, f"q heads {vq.shape[1]} != k heads {vk.shape[1]} x group "
                             f"{spec.gqa_group}")
                if vq.shape[-1] != vk.shape[-1]:
                    _fail(n, f"q head dim {vq.shape[-1]} != k head dim {vk.shape[-1]}")
        elif n.target is ops.select.default:
            sc = n.args[0]
            if not (isinstance(sc, fx.Node) and sc.target is ops.score.default
                    and sc.args[3] == n.args[3]):
                _fail(n, "select's scores do not come from a score of the same site")
    return gm
