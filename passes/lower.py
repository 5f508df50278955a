"""The graph that runs: the rewritten graph (what ``planner.inspect`` shows and the verifier
checks) with each site's ``sparse.score -> sparse.select -> sparse.attend`` chain called as
one plain function, ``runtime.ops.site``.

The three ops stay in the inspected graph: they are the IR, and what Dynamo, export and
Inductor see (their fake impls give the shapes). Executed eagerly, each op call passes the
dispatcher (schema, autograd and mode checks), tens of microseconds per op on the host, which
a small model prefilling a short prompt pays on every layer; ``runtime.ops.site`` runs the
same Python implementations directly (and the ops themselves where autograd may record).
A chain is fused only when its three nodes read the same ``q``, ``k``, modifiers and site
key and nothing else reads the scores or the lists; any other shape of the graph is run as
it is."""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx

from runtime import ops


def _targets():
    sp = torch.ops.sparse            # defined by runtime.ops.register (import planner does it)
    return sp.score.default, sp.select.default, sp.attend.default


def _chain(attend: fx.Node):
    """The (score, select, getitems) nodes feeding ``attend`` if they form one site's chain
    that nothing else reads, else None."""
    score_op, select_op, _ = _targets()
    q, k, v, mods, counts, indices, key = attend.args
    if not all(isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem
               for n in (counts, indices)):
        return None
    sel = counts.args[0]
    if (indices.args[0] is not sel or (counts.args[1], indices.args[1]) != (0, 1)
            or not isinstance(sel, fx.Node) or sel.target is not select_op):
        return None
    scores, sq, sk_, skey = sel.args
    if (sq, sk_, skey) != (q, k, key) or not isinstance(scores, fx.Node) or \
            scores.target is not score_op or scores.args != (q, k, mods, key):
        return None
    if (set(sel.users) != {counts, indices} or set(counts.users) != {attend}
            or set(indices.users) != {attend} or set(scores.users) != {sel}):
        return None
    return scores, sel, counts, indices


def lower_for_eager(gm: fx.GraphModule) -> fx.GraphModule:
    """A module running ``gm``'s graph with every fusable chain as one ``runtime.ops.site``
    call; it shares ``gm``'s parameters and buffers (``gm`` itself is left as it is). ``gm``
    when no chain is found."""
    attend_op = _targets()[2]
    if not any(_chain(n) for n in gm.graph.nodes
               if n.op == "call_function" and n.target is attend_op):
        return gm
    graph = copy.deepcopy(gm.graph)
    for attend in [n for n in graph.nodes if n.op == "call_function" and n.target is attend_op]:
        chain = _chain(attend)
        if chain is None:
            continue
        q, k, v, mods, _, _, key = attend.args
        with graph.inserting_before(attend):
            fused = graph.call_function(ops.site, (q, k, v, mods, key))
        fused.meta = dict(attend.meta)
        attend.replace_all_uses_with(fused)
        graph.erase_node(attend)
        for n in reversed(chain):          # getitems, select, score: no users left
            graph.erase_node(n)
    graph.lint()
    return fx.GraphModule(gm, graph)
