"""Attention discovery: canonical labels -> networkx matching -> per-pattern parsing.

1. ``to_networkx`` gives the data-flow graph with canonical labels (after ``canonicalize``
   turned einsum / baddbmm / fused modules into plain ops).
2. It is contracted to the *core* ops (matmul, softmax, sdpa): an edge u -> v whenever v is
   reachable from u through score-transparent ops only (scale, mask, bias, casts, dropout,
   head split/merge views).
3. ``DiGraphMatcher`` finds every ``matmul -> softmax -> matmul`` in the contracted graph;
   every ``sdpa`` vertex is a candidate on its own, and so is every fused attention op that
   canonicalisation could not open (reported dense, with the reason).
4. Small named pattern functions (``passes.patterns``, reading score chains with
   ``passes.scores``) parse each candidate exactly (scale, modifiers, GQA, layout) and either
   produce a ``Match`` or say why not. Every softmax that ends in no Match is reported with
   the reason.
5. Masks are evaluated symbolically (``passes.masks``, over ``passes.index_eval.IndexEval``): a
   mask proved to be exactly causal is dropped from the modifiers and becomes ``Match.causal``.
6. A mask that is the model's own DSA selection (indexer, top-k, scattered index mask:
   DeepSeek-V3.2, GLM-MoE-DSA) is recognised as such (``passes.native_dsa``) and recorded in
   ``Match.native``, with what the mask under it was proved to be.

``PLANNER_DEBUG=match`` prints every decision; ``PLANNER_DEBUG=match:<node>`` only those about
the node (or site) of that name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import networkx as nx
import torch.fx as fx
from networkx.algorithms.isomorphism import DiGraphMatcher

from passes.graph import arg, label, module_path, sym_expr, to_networkx, val
from passes.index_eval import IndexEval
from passes.masks import prove_visibility, settle_masks
from passes.native_dsa import looks_native, recognize
from passes.mutation import MutationInfo
from passes.patterns import Match, match_fused, match_matmul_softmax, match_sdpa
from passes.scores import SCORE_OPS, NoMatch
from runtime import env

CORE = {"matmul", "softmax", "sdpa"}
FUSED = {"mha", "encoder_layer", "native_mha"}


@dataclass
@dataclass
class Unmatched:
    node: str
    site: str
    reason: str


def _debug_filter() -> Optional[set]:
    """None: debug off; empty set: every node; else the node/site names asked for."""
    names, on = set(), False
    for tok in env.planner_debug().split(","):
        tok = tok.strip()
        if tok == "match":
            on = True
        elif tok.startswith("match:"):
            on = True
            names.add(tok[len("match:"):])
    return names if on else None


def _debug(node: fx.Node, site: str, msg: str) -> None:
    names = _debug_filter()
    if names is None or (names and node.name not in names and site not in names):
        return
    print(f"[planner.match] {node.name} ({site}): {msg}")


# ops a candidate's chain may also pass through (a sink column appended with ``cat`` and dropped
# with a slice: GPT-OSS); the pattern functions decide whether they are attention
_CONTRACT_THROUGH = SCORE_OPS | {"getitem"}


def _contract(g: nx.DiGraph) -> nx.DiGraph:
    h = nx.DiGraph()
    for n, d in g.nodes(data=True):
        if d["label"] in CORE:
            h.add_node(n, label=d["label"])
    for u in list(h.nodes):
        stack, seen = list(g.successors(u)), set()
        while stack:
            w = stack.pop()
            if w in seen:
                continue
            seen.add(w)
            lab = g.nodes[w]["label"]
            if lab in CORE:
                h.add_edge(u, w)
            elif lab in _CONTRACT_THROUGH:
                stack.extend(g.successors(w))
    return h


_PATTERN = nx.DiGraph()
_PATTERN.add_node("scores", label="matmul")
_PATTERN.add_node("softmax", label="softmax")
_PATTERN.add_node("values", label="matmul")
_PATTERN.add_edges_from([("scores", "softmax"), ("softmax", "values")])


def _site_names(nodes) -> dict:
    """Module path per output node; repeated paths in one graph get ``#1``, ``#2``, ..."""
    names, counts = {}, {}
    for n in nodes:
        base = module_path(n) or n.name
        c = counts.get(base, 0)
        counts[base] = c + 1
        names[n] = base if c == 0 else f"{base}#{c}"
    return names


def _report(node, site, m: Match) -> None:
    extra = f" (dense: {m.fallback})" if m.fallback else ""
    note = f"; masks: {m.causal_note}" if m.causal_note else ""
    _debug(node, site, f"{m.pattern}: scale={m.scale:.6g} causal={m.causal} mods={m.mods} "
                       f"group={m.gqa_group}{extra}{note}")


def discover(gm: fx.GraphModule, example_inputs=None) -> tuple[list[Match], list[Unmatched]]:
    """Find every attention computation in ``gm``; explain every softmax left alone."""
    g = to_networkx(gm.graph)
    h = _contract(g)
    ev = IndexEval(gm, example_inputs, MutationInfo(gm.graph))
    candidates = []
    for n in gm.graph.nodes:
        if label(n) == "sdpa":
            candidates.append(("sdpa", n, (n,)))
        elif label(n) in FUSED:
            candidates.append(("fused", n, (n,)))
    matcher = DiGraphMatcher(h, _PATTERN, node_match=lambda a, b: a["label"] == b["label"])
    by_softmax: dict[fx.Node, list] = {}
    for mapping in matcher.subgraph_monomorphisms_iter():
        inv = {p: n for n, p in mapping.items()}
        by_softmax.setdefault(inv["softmax"], []).append((inv["scores"], inv["values"]))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for sm, pairs in by_softmax.items():
        # the value matmul that consumes the probabilities; the score matmul closest upstream
        pairs.sort(key=lambda p: (-order[p[0]], order[p[1]]))
        candidates.append(("softmax", sm, pairs))
    candidates.sort(key=lambda c: order[c[1]])
    names = _site_names([c[1] if c[0] != "softmax" else c[2][0][1] for c in candidates])

    matches, unmatched, explained = [], [], set()
    for kind, node, extra in candidates:
        site = names[node if kind != "softmax" else extra[0][1]]
        if kind in ("sdpa", "fused"):
            try:
                m = match_sdpa(node, site) if kind == "sdpa" else match_fused(node, site)
            except NoMatch as e:
                unmatched.append(Unmatched(node.name, site, f"sdpa call: {e}"))
                _debug(node, site, f"no match: {e}")
                continue
            settle_masks(m, ev)
            _native(m, ev)
            matches.append(m)
            _report(node, site, m)
            continue
        reasons = []
        for mm1, mm2 in extra:
            try:
                m = match_matmul_softmax(mm1, node, mm2, site)
            except NoMatch as e:
                reasons.append(str(e))
                continue
            settle_masks(m, ev)
            _native(m, ev)
            matches.append(m)
            explained.add(node)
            _report(node, site, m)
            break
        else:
            unmatched.append(Unmatched(node.name, site, reasons[0]))
            explained.add(node)
            _debug(node, site, f"no match: {reasons[0]}")
    for n in gm.graph.nodes:
        if label(n) == "softmax" and n not in explained:
            reason = _explain_softmax(n, g)
            site = module_path(n) or n.name
            unmatched.append(Unmatched(n.name, site, reason))
            _debug(n, site, f"no match: {reason}")
    return matches, unmatched


def _native(m: Match, ev: IndexEval) -> None:
    """Record the model's own DSA chain where the site's one mask tensor is its index mask;
    the mask under it is proved causal (the fused indexer then needs no mask tensor) or kept
    for the indexer's scores to read."""
    if len(m.mods) != 1 or m.mods[0][0] not in ("add", "keep") or len(m.mod_nodes) != 1 \
            or (m.mod_fix and m.mod_fix[0]) or m.sink is not None or m.window:
        return
    chain, why = recognize(m.mod_nodes[0])
    if chain is None:
        if looks_native(m.mod_nodes[0]):
            m.native_note = why
        _debug(m.out, m.site, f"no native dsa chain: {why}")
        return
    vq, vk = val(m.q), val(m.k)
    if chain.base is not None and vq is not None and vk is not None:
        chain.causal, chain.all_visible, chain.note = prove_visibility(
            m.mods[0][0], chain.base, ev, sym_expr(vq.shape[-2]), sym_expr(vk.shape[-2]), m.out)
    m.native = chain
    _debug(m.out, m.site, f"native dsa: top-{chain.topk}, mask under it: {chain.note}")


def _explain_softmax(sm: fx.Node, g: nx.DiGraph) -> str:
    """Why a softmax is not part of a q @ k^T -> softmax -> @ v chain, as specifically as the
    graph allows."""
    vin = val(sm.args[0]) if sm.args else None
    dim = arg(sm, 1, "dim")
    if vin is not None and isinstance(dim, int) and dim % vin.dim() != vin.dim() - 1:
        return f"softmax over dim {dim} of a rank-{vin.dim()} tensor: not the key axis"
    ups = [a for a in nx.ancestors(g, sm) if g.nodes[a]["label"] == "matmul"]
    if not ups:
        src = sm.args[0] if sm.args else None
        what = src.format_node() if isinstance(src, fx.Node) else repr(src)
        return (f"no q @ k^T matmul feeds this softmax (its input is {what}): a classifier or "
                f"router softmax, or scores computed outside this graph")
    # the first op on the way up that is not a scale/mask/bias
    n = sm.args[0]
    while isinstance(n, fx.Node) and label(n) in SCORE_OPS:
        nxt = [a for a in (n.args[1:3] if label(n) == "where" else n.args[:2])
               if isinstance(a, fx.Node) and any(u in nx.ancestors(g, a) or u is a for u in ups)]
        if not nxt:
            break
        n = nxt[0]
    if isinstance(n, fx.Node) and label(n) != "matmul":
        return (f"scores reach the softmax through {n.format_node()} ({label(n)}), which is not "
                f"a scale, mask, bias or soft-cap")
    downs = [d for d in nx.descendants(g, sm) if g.nodes[d]["label"] == "matmul"]
    if not downs:
        users = ", ".join(u.format_node() for u in sm.users) or "nothing"
        return (f"the probabilities never meet a value matmul (used by: {users}): weights "
                f"returned to the caller, or not attention")
    return ("the probabilities reach a matmul only through ops other than casts/dropout "
            f"(first users: {', '.join(u.name for u in sm.users)})")
