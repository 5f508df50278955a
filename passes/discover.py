"""Attention discovery: canonical labels -> networkx matching -> per-pattern parsing.

1. ``to_networkx`` gives the data-flow graph with canonical labels.
2. It is contracted to the *core* ops (matmul, softmax, sdpa): an edge u -> v whenever v is
   reachable from u through score-transparent ops only (scale, mask add, casts, dropout).
3. ``DiGraphMatcher`` finds every ``matmul -> softmax -> matmul`` in the contracted graph;
   every ``sdpa`` vertex is a candidate on its own.
4. Small named pattern functions parse each candidate exactly (scale, masks, GQA, causal) and
   either produce a ``Match`` or say why not. Every softmax that ends in no Match is reported
   with the reason.
"""
from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass, field
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx
from networkx.algorithms.isomorphism import DiGraphMatcher

from passes.graph import arg, label, module_path, to_networkx, val

CORE = {"matmul", "softmax", "sdpa"}
TRANSPARENT = {"mul", "div", "add", "masked_fill", "cast", "identity", "dropout"}


class NoMatch(Exception):
    """Raised by a pattern function with the reason a candidate is not (rewritable) attention."""


@dataclass
class Match:
    """One attention computation found in a graph."""

    pattern: str
    site: str
    out: fx.Node                       # node whose value is the attention output [B, Hq, Nq, Dv]
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    gqa_group: int = 1
    causal: Optional[str] = None
    mods: tuple = ()
    mod_nodes: list = field(default_factory=list)
    softmax: Optional[fx.Node] = None
    fallback: Optional[str] = None     # set: attention, but it must stay dense (the reason)


@dataclass
class Unmatched:
    node: str
    site: str
    reason: str


def _debug(msg: str) -> None:
    if "match" in os.environ.get("PLANNER_DEBUG", ""):
        print(f"[planner.match] {msg}")


# ---------------------------------------------------------------------------- helpers

def _scalar(x) -> Optional[float]:
    """A Python number, or None if ``x`` is a tensor/node."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def _rank(n) -> Optional[int]:
    v = val(n)
    return v.dim() if v is not None else None


def _is_last_two_transpose(n: fx.Node) -> bool:
    lab = label(n)
    rank = _rank(n.args[0]) if n.args else None
    if rank is None:
        return False
    if lab == "transpose":
        d0, d1 = arg(n, 1, "dim0"), arg(n, 2, "dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return False
        return sorted((d0 % rank, d1 % rank)) == [rank - 2, rank - 1]
    if lab == "permute":
        dims = n.args[1:] if len(n.args) > 2 else arg(n, 1, "dims")
        dims = [d % rank for d in dims]
        return dims == list(range(rank - 2)) + [rank - 1, rank - 2]
    return False


def strip_transpose(kt: fx.Node) -> Optional[fx.Node]:
    """k from k^T (``k.transpose(-2, -1)``, ``k.transpose(2, 3)``, ``k.permute(0, 1, 3, 2)``, ``k.mT``)."""
    if isinstance(kt, fx.Node) and _is_last_two_transpose(kt):
        return kt.args[0]
    if (isinstance(kt, fx.Node) and kt.op == "call_function" and kt.target is getattr
            and kt.args[1] == "mT"):
        return kt.args[0]
    return None


def strip_repeat_kv(x: fx.Node) -> tuple[fx.Node, int]:
    """HF ``repeat_kv``: ``x[:, :, None].expand(B, H, n, N, D).reshape(B, H*n, N, D)`` -> (x, n).

    Seen in HuggingFace Llama/Qwen2/Mistral ``eager_attention_forward`` and ``sdpa_attention_forward``.
    Anything else returns (x, 1).
    """
    if label(x) != "reshape":
        return x, 1
    ex = x.args[0]
    if not isinstance(ex, fx.Node) or label(ex) != "expand":
        return x, 1
    src = ex.args[0]
    base = None
    if label(src) == "getitem" and isinstance(src.args[1], tuple):
        idx = src.args[1]
        if (len(idx) >= 3 and idx[2] is None and all(i == slice(None) for i in idx[:2])
                and all(i == slice(None) for i in idx[3:])):
            base = src.args[0]
    elif label(src) == "unsqueeze" and arg(src, 1, "dim") == 2:
        base = src.args[0]
    vb, vx = val(base), val(x)
    if base is None or vb is None or vx is None or vb.dim() != 4 or vx.dim() != 4:
        return x, 1
    if vx.shape[1] % vb.shape[1] != 0:
        return x, 1
    return base, int(vx.shape[1] // vb.shape[1])


def _gqa(k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node, int]:
    kb, gk = strip_repeat_kv(k)
    vb, gv = strip_repeat_kv(v)
    if gk == gv and gk > 1:
        return kb, vb, gk
    return k, v, 1


def _check_4d(q, k, v) -> Optional[str]:
    for nm, n in (("q", q), ("k", k), ("v", v)):
        r = _rank(n)
        if r != 4:
            return (f"{nm} has rank {r} (expected [B, H, N, D]; the [B*H, N, D] layout is not "
                    f"supported yet)")
    return None


# ---------------------------------------------------------------------------- patterns

def match_sdpa(node: fx.Node, site: str) -> Match:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``.

    Seen in HuggingFace ``sdpa_attention_forward`` (Llama, Qwen2, BERT) and hand-written models.
    """
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = arg(node, 3, "attn_mask")
    dropout_p = arg(node, 4, "dropout_p", 0.0)
    is_causal = arg(node, 5, "is_causal", False)
    scale = arg(node, 6, "scale")
    enable_gqa = arg(node, 7, "enable_gqa", False)
    if not all(isinstance(x, fx.Node) for x in (q, k, v)):
        raise NoMatch("q, k or v is not a tensor of this graph")
    m = Match("sdpa", site, node, q, k, v, scale=0.0)
    if not isinstance(dropout_p, (int, float)) or dropout_p != 0:
        m.fallback = f"attention dropout p={dropout_p} is active (training)"
    if not isinstance(is_causal, bool):
        raise NoMatch(f"is_causal is not a constant ({is_causal!r})")
    vq = val(q)
    if scale is None:
        if vq is None:
            raise NoMatch("no shape recorded for q, cannot infer the default scale")
        scale = 1.0 / math.sqrt(vq.shape[-1])
    if _scalar(scale) is None:
        raise NoMatch(f"scale is not a constant ({scale!r})")
    m.scale = float(scale)
    m.causal = "upper_left" if is_causal else None
    if mask is not None:
        vm = val(mask)
        if vm is None:
            raise NoMatch("attn_mask has no recorded value")
        m.mods = (("keep",),) if vm.dtype == torch.bool else (("add",),)
        m.mod_nodes = [mask]
    if enable_gqa:
        vk = val(k)
        m.gqa_group = int(vq.shape[1] // vk.shape[1]) if (vq is not None and vk is not None) else 1
        m.pattern = "sdpa+enable_gqa"
    else:
        m.k, m.v, m.gqa_group = _gqa(k, v)
        if m.gqa_group > 1:
            m.pattern = "sdpa+repeat_kv"
    bad = _check_4d(m.q, m.k, m.v)
    if bad:
        m.fallback = bad
    return m


def _walk_scores(sm_in: fx.Node, mm: fx.Node):
    """From the softmax input back to the score matmul: scale factors and modifiers.

    Returns (scale, mods, mod_nodes, chain) with mods in application order.
    """
    scale, mods, mod_nodes, chain = 1.0, [], [], []
    n = sm_in
    seen_scale = False     # walking backwards: a scale seen before a mask means scale-after-mask
    while n is not mm:
        if not isinstance(n, fx.Node):
            raise NoMatch("score chain leaves the graph")
        chain.append(n)
        lab = label(n)
        if lab in ("cast", "identity"):
            n = n.args[0]
        elif lab in ("mul", "div"):
            a, b = n.args[0], n.args[1]
            main, other = (a, b) if isinstance(a, fx.Node) and _scalar(b) is not None else (b, a)
            s = _scalar(other)
            if s is None or not isinstance(main, fx.Node):
                raise NoMatch(f"scores are scaled by a tensor ({n.format_node()}); constant scales only")
            seen_scale = True
            if lab == "div" and main is not a:
                raise NoMatch(f"scores appear as a divisor ({n.format_node()})")
            scale *= s if lab == "mul" else 1.0 / s
            n = main
        elif lab == "add":
            a, b = n.args[0], n.args[1]
            if _reaches(a, mm):
                main, other = a, b
            elif _reaches(b, mm):
                main, other = b, a
            else:
                raise NoMatch(f"neither operand of {n.format_node()} comes from the score matmul")
            if not isinstance(other, fx.Node):
                if _scalar(other) is None:
                    raise NoMatch(f"unsupported addend {other!r}")
                n = main          # adding a constant does not change softmax
                continue
            if seen_scale:
                raise NoMatch("the scale is applied after a mask/bias; only scale-then-mask is supported")
            mods.append(("add",))
            mod_nodes.append(other)
            n = main
        elif lab == "masked_fill":
            fill = arg(n, 2, "value")
            if _scalar(fill) is None:
                raise NoMatch(f"masked_fill with a non-constant value ({n.format_node()})")
            if seen_scale:
                raise NoMatch("the scale is applied after a mask/bias; only scale-then-mask is supported")
            mods.append(("fill", float(fill)))
            mod_nodes.append(arg(n, 1, "mask"))
            n = n.args[0]
        elif lab == "dropout":
            raise NoMatch("dropout on the scores before softmax")
        else:
            raise NoMatch(f"scores pass through {n.format_node()} ({lab}), not a scale or mask")
    mods.reverse()
    mod_nodes.reverse()
    return scale, tuple(mods), mod_nodes, chain


def _reaches(x, target: fx.Node, depth: int = 16) -> bool:
    """Is ``target`` reachable backwards from ``x`` through transparent ops (bounded)?"""
    while isinstance(x, fx.Node) and depth > 0:
        if x is target:
            return True
        lab = label(x)
        if lab in ("cast", "identity", "masked_fill", "dropout"):
            x = x.args[0]
        elif lab in ("mul", "div", "add"):
            return any(_reaches(a, target, depth - 1) for a in x.args[:2])
        else:
            return False
        depth -= 1
    return False


def _walk_probs(sm: fx.Node, mm2: fx.Node) -> list:
    """softmax -> casts/dropout(eval) -> matmul(p, v); returns the chain, checks dropout."""
    chain = []
    n = mm2.args[0]
    while n is not sm:
        if not isinstance(n, fx.Node):
            raise NoMatch("probabilities do not reach the value matmul as its first operand")
        lab = label(n)
        if lab == "dropout":
            p = arg(n, 1, "p", 0.5)
            training = arg(n, 2, "training", True)
            if training and p:
                raise NoMatch(f"attention dropout p={p} in training mode")
        elif lab not in ("cast", "identity"):
            raise NoMatch(f"probabilities pass through {n.format_node()} before the value matmul")
        chain.append(n)
        n = n.args[0]
    return chain


def match_matmul_softmax(mm1: fx.Node, sm: fx.Node, mm2: fx.Node, site: str) -> Match:
    """``softmax(scale * q @ k^T + mask) @ v`` and its spellings.

    Seen in HuggingFace ``eager_attention_forward`` (Llama, Qwen2, Mistral: fp32 softmax then
    ``.to(q.dtype)``, ``repeat_kv``, eval dropout), BERT self-attention (``/ sqrt(d)`` then
    additive mask) and nanoGPT (``masked_fill(mask == 0, -inf)``).
    """
    vin = val(sm.args[0])
    dim = arg(sm, 1, "dim")
    if vin is None:
        raise NoMatch("no shape recorded for the softmax input")
    if not isinstance(dim, int) or dim % vin.dim() != vin.dim() - 1:
        raise NoMatch(f"softmax over dim {dim} of a rank-{vin.dim()} tensor: not the key axis")
    if mm2.args[0] is not sm and not _walk_probs(sm, mm2):
        raise NoMatch("softmax output is not the first operand of the value matmul")
    p_chain = _walk_probs(sm, mm2)
    scale, mods, mod_nodes, s_chain = _walk_scores(sm.args[0], mm1)
    q, kt = mm1.args[0], mm1.args[1]
    k = strip_transpose(kt)
    if k is None:
        raise NoMatch(f"key operand {kt} of the score matmul is not a transposed key tensor")
    # pre-scaled q: (q * s) @ k^T
    if isinstance(q, fx.Node) and label(q) in ("mul", "div") and _scalar(q.args[1]) is not None:
        s = _scalar(q.args[1])
        scale *= s if label(q) == "mul" else 1.0 / s
        q = q.args[0]
    v = mm2.args[1]
    m = Match("matmul_softmax", site, mm2, q, k, v, scale=scale, mods=mods, mod_nodes=mod_nodes,
              softmax=sm)
    m.k, m.v, m.gqa_group = _gqa(k, v)
    if m.gqa_group > 1:
        m.pattern = "matmul_softmax+repeat_kv"
    for n in [mm1, sm] + s_chain + p_chain:
        others = [u for u in n.users if u not in (s_chain + p_chain + [sm, mm2])]
        if others:
            m.fallback = (f"attention weights ({n.name}) are also used by "
                          f"{', '.join(u.name for u in others)}; rewriting would not save them")
            break
    bad = _check_4d(m.q, m.k, m.v)
    if bad:
        m.fallback = bad
    return m


# ---------------------------------------------------------------------------- driver

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
            elif lab in TRANSPARENT:
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


def discover(gm: fx.GraphModule) -> tuple[list[Match], list[Unmatched]]:
    """Find every attention computation in ``gm``; explain every softmax left alone."""
    g = to_networkx(gm.graph)
    h = _contract(g)
    candidates = []
    for n in gm.graph.nodes:
        if label(n) == "sdpa":
            candidates.append(("sdpa", n, (n,)))
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
    outs = [c[1] for c in candidates]
    names = _site_names(outs)

    matches, unmatched, explained = [], [], set()
    for kind, node, extra in candidates:
        site = names[node]
        if kind == "sdpa":
            try:
                m = match_sdpa(node, site)
            except NoMatch as e:
                unmatched.append(Unmatched(node.name, site, f"sdpa call: {e}"))
                _debug(f"{node.name}: no match: {e}")
                continue
            matches.append(m)
            _debug(f"{node.name}: {m.pattern} at {site}" + (f" (dense: {m.fallback})" if m.fallback else ""))
            continue
        reasons = []
        for mm1, mm2 in extra:
            try:
                m = match_matmul_softmax(mm1, node, mm2, site)
            except NoMatch as e:
                reasons.append(str(e))
                continue
            matches.append(m)
            explained.add(node)
            _debug(f"{node.name}: {m.pattern} at {site}" + (f" (dense: {m.fallback})" if m.fallback else ""))
            break
        else:
            unmatched.append(Unmatched(node.name, site, reasons[0]))
            explained.add(node)
            _debug(f"{node.name}: no match: {reasons[0]}")
    for n in gm.graph.nodes:
        if label(n) == "softmax" and n not in explained:
            reason = _explain_softmax(n, g)
            unmatched.append(Unmatched(n.name, module_path(n) or n.name, reason))
            _debug(f"{n.name}: no match: {reason}")
    return matches, unmatched


def _explain_softmax(sm: fx.Node, g: nx.DiGraph) -> str:
    vin = val(sm.args[0]) if sm.args else None
    dim = arg(sm, 1, "dim")
    if vin is not None and isinstance(dim, int) and dim % vin.dim() != vin.dim() - 1:
        return f"softmax over dim {dim} of a rank-{vin.dim()} tensor: not the key axis"
    ups = [a for a in nx.ancestors(g, sm) if g.nodes[a]["label"] == "matmul"]
    downs = [d for d in nx.descendants(g, sm) if g.nodes[d]["label"] == "matmul"]
    if not ups:
        return "no q @ k^T matmul feeds this softmax (not attention, or the scores come from outside this graph)"
    if not downs:
        return "the probabilities never meet a value matmul (classifier/router softmax, or weights returned)"
    return "a matmul feeds it, but only through ops other than scale/mask/cast (unsupported score modifier)"
