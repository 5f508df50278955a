"""Attention discovery: canonical labels -> networkx matching -> per-pattern parsing.

1. ``to_networkx`` gives the data-flow graph with canonical labels (after ``canonicalize``
   turned einsum / baddbmm / fused modules into plain ops).
2. It is contracted to the *core* ops (matmul, softmax, sdpa): an edge u -> v whenever v is
   reachable from u through score-transparent ops only (scale, mask, bias, casts, dropout,
   head split/merge views).
3. ``DiGraphMatcher`` finds every ``matmul -> softmax -> matmul`` in the contracted graph;
   every ``sdpa`` vertex is a candidate on its own, and so is every fused attention op that
   canonicalisation could not open (reported dense, with the reason).
4. Small named pattern functions parse each candidate exactly (scale, modifiers, GQA, layout)
   and either produce a ``Match`` or say why not. Every softmax that ends in no Match is
   reported with the reason.
5. Masks are evaluated symbolically (``passes.index_eval.IndexEval``): a mask proved to be exactly
   causal is dropped from the modifiers and becomes ``Match.causal``.

``PLANNER_DEBUG=match`` prints every decision; ``PLANNER_DEBUG=match:<node>`` only those about
the node (or site) of that name.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx
from networkx.algorithms.isomorphism import DiGraphMatcher

from passes.mutation import MutationInfo, written_inputs
from passes.graph import (arg, const_scalar, label, module_path, runtime_scalar, sym_expr,
                          to_networkx, val)
from passes.index_eval import IndexEval, IndexFn, Opaque, to_bool

CORE = {"matmul", "softmax", "sdpa"}
FUSED = {"mha", "encoder_layer", "native_mha"}
# ops a score tensor may pass through between q @ k^T and softmax
SCORE_OPS = {"mul", "div", "add", "sub", "masked_fill", "where", "tanh", "cast", "identity",
             "dropout", "reshape", "cat"}
_BINARY = ("mul", "div", "add", "sub")
MASKED = -1e30          # a modifier value at or below this excludes the pair (HF uses finfo.min)


class NoMatch(Exception):
    """Raised by a pattern function with the reason a candidate is not (rewritable) attention."""


@dataclass
class Match:
    """One attention computation found in a graph.

    ``q``/``k``/``v`` are the graph's tensors; ``*_fix`` are short recipes the rewrite applies to
    them (and ``out_fix`` to the attend output) so that the sparse ops see ``[B, H, N, D]``:
    ("unflatten0", H) splits a ``[B*H, N, D]`` layout, ("unsqueeze0",) views it as one batch,
    ("mul"/"div", x) applies a run-time scale, ("not",) / ("neg",) adapt a mask tensor,
    ("to", dtype) restores the output dtype of the original attention.
    ``causal_note`` records how each mask was settled (dropped as causal, or kept and why).
    """

    pattern: str
    site: str
    out: fx.Node                       # node whose value is the attention output
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
    q_fix: tuple = ()
    k_fix: tuple = ()
    v_fix: tuple = ()
    mod_fix: list = field(default_factory=list)
    out_fix: tuple = ()
    causal_note: str = ""
    window: int = 0                    # the model's sliding window, proved from its mask
    sink: Optional[fx.Node] = None     # [Hq] learned sink logits (GPT-OSS), or None
    kv_valid: Optional[fx.Node] = None  # [B, >= Nkv] key validity (padding), or None
    empty_rows: str = "zero"           # a row that sees no key: "zero" or "mean" (see SiteSpec)


@dataclass
class Unmatched:
    node: str
    site: str
    reason: str


def _debug_filter() -> Optional[set]:
    """None: debug off; empty set: every node; else the node/site names asked for."""
    names, on = set(), False
    for tok in os.environ.get("PLANNER_DEBUG", "").split(","):
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


# ---------------------------------------------------------------------------- helpers

def _rank(n) -> Optional[int]:
    v = val(n)
    return v.dim() if v is not None else None


def _shape(n) -> list:
    v = val(n)
    return [sym_expr(s) for s in v.shape] if v is not None else []


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
    return lab == "mT"


def strip_transpose(kt: fx.Node) -> Optional[fx.Node]:
    """k from k^T: ``k.transpose(-2, -1)``, ``k.transpose(2, 3)``, ``k.permute(0, 1, 3, 2)``,
    ``k.mT``."""
    if isinstance(kt, fx.Node) and _is_last_two_transpose(kt):
        return kt.args[0]
    return None


def strip_scale(x, scale: float) -> tuple:
    """``x * c`` / ``x / c`` with constant c (any number of them) -> (x, scale * c...).

    Seen on q in OPT/BART (``q_proj(h) * scaling``) and split over q and k in timm / CLIP
    (``q * d**-0.25``, ``k * d**-0.25``).
    """
    while isinstance(x, fx.Node) and label(x) in ("mul", "div") and len(x.args) >= 2:
        if written_inputs(x):
            break                  # ``x.mul_(c)`` changed x's storage: read the result
        a, b = x.args[0], x.args[1]
        if isinstance(a, fx.Node) and const_scalar(b) is not None:
            c = const_scalar(b)
        elif label(x) == "mul" and isinstance(b, fx.Node) and const_scalar(a) is not None:
            a, c = b, const_scalar(a)
        else:
            break
        if c == 0:
            break
        scale *= c if label(x) == "mul" else 1.0 / c
        x = a
    return x, scale


def strip_repeat_kv(x: fx.Node) -> tuple[fx.Node, int]:
    """Keys/values repeated per query head -> (un-repeated tensor, group).

    ``repeat_kv`` of HuggingFace Llama/Qwen2/Mistral: ``x[:, :, None].expand(B, H, n, N, D)
    .reshape(B, H*n, N, D)`` (also ``unsqueeze(2)`` / ``flatten(1, 2)``), and
    ``repeat_interleave(x, n, dim=1)`` (GPT-NeoX-style GQA ports, Gemma's reference code).
    Anything else returns (x, 1).
    """
    if label(x) == "repeat_interleave":
        n, dim = arg(x, 1, "repeats"), arg(x, 2, "dim")
        base = x.args[0]
        if isinstance(n, int) and n > 1 and dim in (1, -3) and _rank(base) == 4:
            return base, n
        return x, 1
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
    sb, sx = _shape(base), _shape(x)
    if len(sb) != 4 or len(sx) != 4 or sx[2:] != sb[2:] or not (sx[1] / sb[1]).is_integer:
        return x, 1
    return base, int(sx[1] / sb[1])


def _gqa(q: fx.Node, k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node, int]:
    """Un-repeat keys/values; keys with one head broadcast over all query heads (Falcon MQA)."""
    kb, gk = strip_repeat_kv(k)
    vb, gv = strip_repeat_kv(v)
    if gk == gv and gk > 1:
        return kb, vb, gk
    sq, sk, sv = _shape(q), _shape(k), _shape(v)
    if len(sq) == len(sk) == len(sv) == 4 and sk[1] == 1 and sv[1] == 1 and sq[1] != 1:
        return k, v, int(sq[1])
    return k, v, 1


def _check_4d(q, k, v, group: int) -> Optional[str]:
    for nm, n in (("q", q), ("k", k), ("v", v)):
        r = _rank(n)
        if r != 4:
            return f"{nm} has rank {r} (expected [B, H, N, D] or [B*H, N, D])"
    sq, sk = _shape(q), _shape(k)
    if sq[0] != sk[0]:
        return f"q batch {sq[0]} and k batch {sk[0]} differ (broadcast batch)"
    if sq[1] != sk[1] * group:
        return f"q heads {sq[1]} != k heads {sk[1]} x group {group}"
    return None


def _score_inputs(n: fx.Node) -> tuple:
    """The operands of a score op that may carry the scores."""
    lab = label(n)
    if lab == "where":
        return tuple(n.args[1:3])
    if lab == "cat":
        parts = n.args[0] if n.args else n.kwargs.get("tensors")
        return tuple(parts[:1]) if isinstance(parts, (list, tuple)) else ()
    if lab in _BINARY:
        return tuple(n.args[:2])
    return tuple(n.args[:1])


def _reaches(x, target: fx.Node) -> bool:
    """Is ``target`` reachable backwards from ``x`` through score ops only?"""
    stack, seen = [x], set()
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if not isinstance(n, fx.Node) or n in seen or label(n) not in SCORE_OPS:
            continue
        seen.add(n)
        stack.extend(_score_inputs(n))
    return False


def _depends_on(x, target: fx.Node) -> bool:
    """Is ``target`` an ancestor of ``x`` (any ops)?"""
    stack, seen = [x], set()
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if isinstance(n, fx.Node) and n not in seen and n.op != "placeholder":
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def _score_path(sm_in: fx.Node, mm: fx.Node) -> list:
    """Nodes from the score matmul (exclusive) to the softmax input (inclusive), in order."""
    path, n = [], sm_in
    while n is not mm:
        if not isinstance(n, fx.Node) or label(n) not in SCORE_OPS:
            what = f"{n.format_node()} ({label(n)})" if isinstance(n, fx.Node) else repr(n)
            raise NoMatch(f"scores pass through {what}, not a scale, mask or bias")
        path.append(n)
        nxt = [a for a in _score_inputs(n) if _reaches(a, mm)]
        if not nxt:
            raise NoMatch(f"{n.format_node()} does not come from the score matmul")
        n = nxt[0]
    return path[::-1]


# ---------------------------------------------------------------------------- score chain

@dataclass
class _Scores:
    """What the ops between q @ k^T and softmax do, as (scale, ordered modifiers)."""

    scale: float = 1.0
    tensor_scales: list = field(default_factory=list)     # ("mul"|"div", run-time scalar)
    mods: list = field(default_factory=list)              # ("add",) ("fill", v) ("softcap", c)
    nodes: list = field(default_factory=list)             # tensor per mod (None for softcap)
    fixes: list = field(default_factory=list)             # recipe per mod tensor
    ranks: list = field(default_factory=list)             # score rank where the mod applied
    heads: Optional[int] = None                           # H of a [B*H] <-> [B, H] view
    sink: Optional[fx.Node] = None                        # [H] learned sink logits (GPT-OSS)
    extra: list = field(default_factory=list)             # nodes of the chain off its path

    def add_mod(self, kind: tuple, node, fix: list, scores: fx.Node) -> None:
        rank = _rank(scores)
        if node is not None:
            st, ss = _shape(node), _shape(scores)
            if len(st) > len(ss) or any(a != 1 and a != b for a, b in zip(st[::-1], ss[::-1])):
                raise NoMatch(f"modifier {node} of shape {st} does not broadcast to the scores "
                              f"{ss} without enlarging them")
        self.mods.append(kind)
        self.nodes.append(node)
        self.fixes.append(fix)
        self.ranks.append(rank)

    def rescale(self, c: float, where: fx.Node) -> None:
        """Scores times a constant after some modifiers: ``(s + t) * c = s * c + t * c``
        (Falcon's ALiBi path scales after adding the bias)."""
        for i, kind in enumerate(self.mods):
            if kind[0] == "softcap":
                raise NoMatch(f"scores are rescaled after a soft-cap ({where.format_node()})")
            if kind[0] == "add":
                self.fixes[i].append(("mul", c))
            elif c <= 0:
                raise NoMatch(f"non-positive scale {c} after a mask ({where.format_node()})")
            elif kind[0] == "fill":
                self.mods[i] = ("fill", kind[1] * c)
        self.scale *= c


def _softcap_at(path: list, i: int) -> Optional[float]:
    """``s / c`` (or ``s * (1/c)``) -> ``tanh`` -> ``* c`` starting at path[i]: the cap c.

    Seen in Gemma-2 (``attn_logit_softcapping``) and Grok-1.
    """
    if i + 2 >= len(path) or label(path[i + 1]) != "tanh" or label(path[i + 2]) != "mul":
        return None
    n, m = path[i], path[i + 2]
    a = const_scalar(n.args[1]) if len(n.args) > 1 else None
    b = next((const_scalar(x) for x in m.args[:2] if const_scalar(x) is not None), None)
    if a is None or b is None or label(n) not in ("mul", "div") or a == 0:
        return None
    inner = a if label(n) == "div" else 1.0 / a
    return b if math.isclose(inner, b, rel_tol=1e-6) else None


def _other(n: fx.Node, cur: fx.Node):
    a, b = n.args[0], n.args[1] if len(n.args) > 1 else arg(n, 1, "other")
    return (b, 0) if a is cur else (a, 1)


def walk_scores(path: list, mm: fx.Node) -> _Scores:
    """Parse the score chain forward from ``mm`` (q @ k^T) along ``path`` to softmax's input."""
    st = _Scores()
    cur, i = mm, 0
    while i < len(path):
        n = path[i]
        lab = label(n)
        cap = _softcap_at(path, i) if lab in ("mul", "div") else None
        if cap is not None:
            st.add_mod(("softcap", cap), None, [], cur)
            cur, i = path[i + 2], i + 3
            continue
        if lab in ("cast", "identity"):
            pass
        elif lab == "dropout":
            p, training = arg(n, 1, "p", 0.5), arg(n, 2, "training", True)
            if training and p:
                raise NoMatch(f"dropout p={p} on the scores in training mode ({n.format_node()})")
        elif lab == "reshape":
            _check_head_view(st, cur, n)
        elif lab in ("mul", "div"):
            other, pos = _other(n, cur)
            c = const_scalar(other)
            if lab == "div" and pos == 1:
                raise NoMatch(f"scores appear as a divisor ({n.format_node()})")
            vo = val(other)
            if c is not None:
                if c == 0:
                    raise NoMatch(f"scores multiplied by zero ({n.format_node()})")
                f = c if lab == "mul" else 1.0 / c
                if st.mods:
                    st.rescale(f, n)
                else:
                    st.scale *= f
            elif (vo is not None and vo.dim() == 0) or runtime_scalar(other):
                if st.mods:
                    raise NoMatch(f"scores scaled by the tensor {other} after a mask or bias "
                                  f"({n.format_node()})")
                st.tensor_scales.append((lab, other))
            else:
                shape = list(vo.shape) if vo is not None else "?"
                raise NoMatch(f"scores are multiplied by the tensor {other} of shape {shape} "
                              f"({n.format_node()}); expected a constant or 0-dim scale")
        elif lab == "tanh":
            raise NoMatch(f"tanh on the scores without the soft-cap form s/c -> tanh -> *c "
                          f"({n.format_node()})")
        elif lab == "cat":
            st.sink = _sink_column(n, cur, st)
        elif lab == "sub" and _row_max_of(n, cur, st):
            pass                          # s - max(s): the softmax does not change
        elif lab in ("add", "sub"):
            other, pos = _other(n, cur)
            if lab == "sub" and pos == 1:
                raise NoMatch(f"scores are negated ({n.format_node()})")
            alpha = n.kwargs.get("alpha", 1)
            if const_scalar(other) is None:
                fix = [("neg",)] if lab == "sub" else []
                if alpha != 1:
                    fix.append(("mul", float(alpha)))
                st.add_mod(("add",), other, fix, cur)
        elif lab == "masked_fill":
            fill = const_scalar(arg(n, 2, "value"))
            if n.args[0] is not cur or fill is None:
                raise NoMatch(f"masked_fill with a non-constant value ({n.format_node()})")
            st.add_mod(("fill", fill), arg(n, 1, "mask"), [], cur)
        elif lab == "where":
            cond, a, b = n.args[0], n.args[1], n.args[2]
            if a is cur and const_scalar(b) is not None:
                st.add_mod(("fill", const_scalar(b)), cond, [("not",)], cur)
            elif b is cur and const_scalar(a) is not None:
                st.add_mod(("fill", const_scalar(a)), cond, [], cur)
            else:
                raise NoMatch(f"where() on the scores with a tensor fill value ({n.format_node()})")
        else:
            raise NoMatch(f"scores pass through {n.format_node()} ({lab})")
        cur, i = n, i + 1
    return st


def _sink_column(n: fx.Node, cur: fx.Node, st: _Scores) -> fx.Node:
    """``cat([s, sink], dim=-1)`` with ``sink = x.reshape(1, -1, 1, 1).expand(B, -1, Nq, -1)``:
    one more score column holding a learned logit per head (GPT-OSS: the softmax's
    denominator gains exp(sink_h), the column is dropped after it). Returns ``x`` [H]."""
    parts = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = arg(n, 1, "dim", 0)
    rank = _rank(cur)
    if (st.sink is not None or not isinstance(parts, (list, tuple)) or len(parts) != 2
            or parts[0] is not cur or rank is None or dim % rank != rank - 1):
        raise NoMatch(f"scores concatenated with another tensor ({n.format_node()}); only one "
                      f"sink column appended on the key axis is attention")
    x = parts[1]
    while isinstance(x, fx.Node) and label(x) in ("expand", "cast", "identity"):
        x = x.args[0]
    sx, sc = _shape(x), _shape(cur)
    if (not isinstance(x, fx.Node) or label(x) != "reshape" or len(sx) != 4
            or [sx[0], sx[2], sx[3]] != [1, 1, 1] or sx[1] != sc[1]):
        raise NoMatch(f"the column concatenated to the scores ({parts[1]}) is not one value per "
                      f"head broadcast over batch and queries")
    base = x.args[0]
    if _rank(base) != 1 or _shape(base)[0] != sc[1]:
        raise NoMatch(f"the sink column comes from {base}, not a [heads] tensor")
    st.extra += [p for p in _chain(parts[1], base)]
    return base


def _chain(top: fx.Node, base: fx.Node) -> list:
    out, x = [], top
    while isinstance(x, fx.Node) and x is not base:
        out.append(x)
        x = x.args[0]
    return out


def _row_max_of(n: fx.Node, cur: fx.Node, st: _Scores) -> bool:
    """``cur - cur.max(dim=-1, keepdim=True).values`` (or ``amax``): the softmax-invariant
    shift GPT-OSS applies before its softmax."""
    if n.args[0] is not cur or len(n.args) < 2 or not isinstance(n.args[1], fx.Node):
        return False
    m = n.args[1]
    sel = None
    if label(m) == "getitem" and m.args[1] == 0 or (
            m.op == "call_function" and m.target is getattr and m.args[1] == "values"):
        sel, m = m, m.args[0]
    name = m.target if m.op == "call_method" else getattr(m.target, "__name__", "")
    if name not in ("max", "amax") or m.args[0] is not cur:
        return False
    rank = _rank(cur)
    dim = arg(m, 1, "dim")
    keep = arg(m, 2, "keepdim", False)
    if not isinstance(dim, int) or rank is None or dim % rank != rank - 1 or keep is not True:
        return False
    if name == "max" and sel is None:
        return False                     # max(dim=...) is a (values, indices) pair
    st.extra += [m] + ([sel] if sel is not None else [])
    return True


def _check_head_view(st: _Scores, cur: fx.Node, n: fx.Node) -> None:
    """Allow views that keep the scores' shape or split/merge [B*H] <-> [B, H] (Bloom)."""
    a, b = _shape(cur), _shape(n)
    if a == b:
        return
    if len(a) == 3 and len(b) == 4 and a[1:] == b[2:] and a[0] == b[0] * b[1]:
        h = b[1]
    elif len(a) == 4 and len(b) == 3 and b[1:] == a[2:] and b[0] == a[0] * a[1]:
        h = a[1]
    else:
        raise NoMatch(f"scores reshaped from {a} to {b} ({n.format_node()}); only a split or "
                      f"merge of the batch and head dims is supported")
    if not h.is_number:
        raise NoMatch(f"the head count {h} of {n.format_node()} is symbolic")
    st.heads = int(h)


def _walk_probs(sm: fx.Node, mm2: fx.Node, sink: bool = False) -> list:
    """softmax -> casts / dropout(eval) / head-merge view -> matmul(p, v); returns the chain.
    With a sink column (``sink``), the chain drops it: ``p[..., :-1]``."""
    chain = []
    n = mm2.args[0]
    dropped = False
    while n is not sm:
        if not isinstance(n, fx.Node):
            raise NoMatch("probabilities do not reach the value matmul as its first operand")
        lab = label(n)
        if lab == "getitem" and sink and not dropped and _drops_last_column(n):
            dropped = True
        elif lab == "getitem":
            raise NoMatch(f"probabilities are sliced ({n.format_node()}) before the value "
                          f"matmul{'' if sink else ' (no sink column to drop)'}")
        elif lab == "dropout":
            p = arg(n, 1, "p", 0.5)
            training = arg(n, 2, "training", True)
            if training and p:
                raise NoMatch(f"attention dropout p={p} in training mode ({n.format_node()})")
        elif lab == "reshape":
            a, b = _shape(n.args[0]), _shape(n)
            if not (a == b or (len(a) == 4 and len(b) == 3 and b[1:] == a[2:]
                               and b[0] == a[0] * a[1])):
                raise NoMatch(f"probabilities reshaped from {a} to {b} ({n.format_node()})")
        elif lab not in ("cast", "identity"):
            raise NoMatch(f"probabilities pass through {n.format_node()} before the value matmul")
        chain.append(n)
        n = n.args[0]
    if sink and not dropped:
        raise NoMatch("the sink column appended to the scores is not dropped before the value "
                      "matmul")
    return chain


def _drops_last_column(n: fx.Node) -> bool:
    """``p[..., :-1]``: the last key column removed, nothing else."""
    idx = n.args[1] if len(n.args) > 1 else None
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not idx or idx[-1] != slice(None, -1, None):
        return False
    rank = _rank(n.args[0])
    lead = idx[:-1]
    return all(i is Ellipsis or i == slice(None) for i in lead) and (
        Ellipsis in lead or len(idx) == rank)


# ---------------------------------------------------------------------------- masks

@dataclass
class _MaskFact:
    """What one modifier is: noop / causal / window / mask / bias / softcap / fill (finite)."""

    what: str
    note: str
    align: Optional[str] = None
    window: Optional[int] = None
    pad: Optional[fx.Node] = None      # the [B, N] input whose nonzero entries are real keys
    empty: str = "zero"                # a row it masks entirely: "zero" or "mean" (SiteSpec)


def _nonneg(e) -> Optional[bool]:
    import sympy as sp
    e = sp.simplify(e)
    return True if e.is_nonnegative else False if e.is_negative else None


def _same(a, b) -> bool:
    import sympy as sp
    return sp.simplify(a - b) == 0


def _normalize_atom(rel, I, J, n_q, n_kv, single_q: bool):
    """One comparison of q/kv positions -> ("X", c, True) meaning ``kv - q <= c``, or its
    negation ("X", c, False), or a constant True/False on the domain; None if not of that form.
    With a single query row (``single_q``, decode) q is 0 and a bound on kv is read as kv - q."""
    import sympy as sp
    name = type(rel).__name__
    e = sp.expand(rel.lhs - rel.rhs)
    if name in ("LessThan",):
        pass
    elif name == "StrictLessThan":
        e = e + 1
    elif name == "GreaterThan":
        e = -e
    elif name == "StrictGreaterThan":
        e = -e + 1
    else:
        return None
    a, b = sp.diff(e, J), sp.diff(e, I)
    if not (a.is_number and b.is_number):
        return None
    r = sp.expand(e - a * J - b * I)
    if r.has(I) or r.has(J):
        return None
    if single_q and b == 0:
        b = -a
    if a == 0 and b == 0:
        return {True: sp.true, False: sp.false}.get(_nonneg(-r))
    if a == -b and abs(a) == 1:
        return ("X", -r, True) if a == 1 else ("X", r - 1, False)
    for coef, other, size in ((a, b, n_kv), (b, a, n_q)):
        if other != 0 or abs(coef) != 1:
            continue
        # a bound on one position x in [0, size - 1]: decide it on that range
        if coef == 1:                                       # x <= -r
            always, never = _nonneg(-r - (size - 1)), _nonneg(r - 1)
        else:                                               # x >= r
            always, never = _nonneg(-r), _nonneg(r - size)
        if always:
            return sp.true
        if never:
            return sp.false
        return None
    return None


def _causal_form(K, I, J, n_q, n_kv):
    """Decide a kept-set predicate: ("causal", c) for ``kv <= q + c``, ("window", c, w) for
    ``q + c - w < kv <= q + c``, ("all",) or None."""
    import sympy as sp
    if K is sp.true:
        return ("all",)
    single_q = _same(n_q, 1)
    if single_q:
        K = K.subs(I, 0)
    offsets, reps = [], {}
    for rel in K.atoms(sp.core.relational.Relational):
        norm = _normalize_atom(rel, I, J, n_q, n_kv, single_q)
        if norm is None:
            return None
        if norm in (sp.true, sp.false):
            reps[rel] = norm
            continue
        _, c, positive = norm
        for k, (c2, sym) in enumerate(offsets):
            if _same(c, c2):
                break
        else:
            offsets.append((c, sp.Symbol(f"X{len(offsets)}")))
            k = len(offsets) - 1
        sym = offsets[k][1]
        reps[rel] = sym if positive else sp.Not(sym)
    K2 = sp.simplify_logic(K.xreplace(reps))
    by_sym = {sym: c for c, sym in offsets}
    if K2 is sp.true:
        return ("all",)
    if isinstance(K2, sp.Symbol):
        return ("causal", by_sym[K2])
    if isinstance(K2, sp.And) and len(K2.args) == 2:
        pos = [a for a in K2.args if isinstance(a, sp.Symbol)]
        neg = [a.args[0] for a in K2.args if isinstance(a, sp.Not)]
        if len(pos) == 1 and len(neg) == 1:
            c, c2 = by_sym[pos[0]], by_sym[neg[0]]
            w = sp.simplify(c - c2)
            if w.is_number and w >= 1:
                return ("window", c, int(w))
    return None


def _align(c, n_q, n_kv) -> Optional[str]:
    """Which causal alignment ``kv <= q + c`` is, with every query row keeping a key."""
    if _same(c, n_kv - n_q) and _nonneg(n_kv - n_q):
        return "lower_right"
    if _same(c, 0):
        return "upper_left"
    return None


def _apply_fix_symbolic(fn: IndexFn, fix) -> IndexFn:
    import sympy as sp
    for step in fix:
        if step[0] == "not":
            fn = IndexFn(fn.axes, "bool", sp.Not(to_bool(fn)))
        elif step[0] == "neg" and fn.kind == "num":
            fn = IndexFn(fn.axes, "num", tuple((-v, c) for v, c in fn.expr))
        elif step[0] == "mul" and fn.kind == "num" and isinstance(step[1], float):
            fn = IndexFn(fn.axes, "num", tuple((v * step[1], c) for v, c in fn.expr))
        elif step[0] in ("unflatten0", "unsqueeze0"):
            continue
        else:
            raise Opaque(f"modifier recipe {step}")
    return fn


def _could_mask(node: fx.Node, ev: IndexEval) -> Optional[str]:
    """Why an opaque additive tensor might hold masked (huge negative) entries; None when it is
    built only from parameters, index arithmetic and moderate constants (a bias: T5 position
    bias, ALiBi)."""
    v = val(node)
    if v is not None and v.dtype == torch.bool:
        return "it is boolean"
    seen, stack = set(), [node]
    while stack:
        x = stack.pop()
        if x in seen or len(seen) > 2000:
            continue
        seen.add(x)
        consts: list = []
        fx.node.map_aggregate((x.args, x.kwargs), lambda a: consts.append(a) or a)
        for c in consts:
            if isinstance(c, float) and (c <= -1e3 or math.isinf(c) or math.isnan(c)):
                return f"{x.name} uses the constant {c}"
        if x.op == "placeholder":
            t = ev.data.get(x)
            vx = val(x)
            is_param = isinstance(t, torch.nn.Parameter)
            if vx is not None and vx.is_floating_point() and not is_param:
                return f"it depends on the floating-point graph input {x.name}"
            continue
        if getattr(x.target, "__name__", "") in ("log", "log_", "finfo"):
            return f"{x.name} may produce -inf"
        if label(x) == "embedding":
            stack.append(x.args[1])                     # the values come from the table
            continue
        stack.extend(x.all_input_nodes)
    return None


def _mask_fact(kind: tuple, node, fix, ev: IndexEval, n_q, n_kv, reader=None) -> _MaskFact:
    import sympy as sp
    if kind[0] == "softcap":
        return _MaskFact("softcap", f"soft-cap {kind[1]}")
    masking_kind = kind[0] == "keep" or (kind[0] == "fill" and kind[1] <= MASKED)
    if kind[0] == "fill" and not masking_kind:
        return _MaskFact("fill", f"fills {node} with the finite value {kind[1]}")
    try:
        fn = _apply_fix_symbolic(ev(node, reader), fix)
    except Opaque as e:
        if masking_kind:
            return _MaskFact("mask", f"mask {node} kept: it depends on {e}")
        why = _could_mask(node, ev)
        if why is None:
            return _MaskFact("bias", f"bias {node} kept")
        return _MaskFact("mask", f"additive {node} kept: {why}, and it is not index "
                                 f"arithmetic alone ({e})")
    if kind[0] == "add":
        if fn.kind == "int":
            return _MaskFact("bias", f"bias {node} kept (index arithmetic)")
        cases = fn.expr if fn.kind == "num" else ((1.0, fn.expr), (0.0, sp.Not(fn.expr)))
        if all(v == 0 for v, _ in cases):
            return _MaskFact("noop", f"additive {node} is all zero: dropped")
        if not all(v == 0 or v <= MASKED for v, _ in cases):
            if all(math.isfinite(v) and v > -1e3 for v, _ in cases):
                return _MaskFact("bias", f"bias {node} kept")
            return _MaskFact("mask", f"additive {node} kept: it mixes masked and finite values")
        K = sp.Or(*[c for v, c in cases if v == 0])
        masked = {v for v, _ in cases if v != 0}
        empty = "mean" if len(masked) == 1 and math.isfinite(masked.pop()) else "zero"
    elif kind[0] == "keep":
        K = to_bool(fn)
        empty = "zero"
    else:
        K = sp.Not(to_bool(fn))
        empty = "mean" if math.isfinite(kind[1]) else "zero"
    axes = list(fn.axes)
    I = axes[-2] if len(axes) >= 2 else None
    J = axes[-1] if len(axes) >= 1 else None
    lead = [a for a in axes[:-2] if a is not None]
    K, pad = _split_padding(K, ev, axes, J)
    if isinstance(pad, str):
        return _MaskFact("mask", f"mask {node} kept: {pad}")
    if K.free_symbols & set(lead):
        return _MaskFact("mask", f"mask {node} kept: it varies over the batch or head dims")
    I = I if I is not None else sp.Symbol("q_unused", integer=True, nonnegative=True)
    J = J if J is not None else sp.Symbol("kv_unused", integer=True, nonnegative=True)
    form = _causal_form(K, I, J, n_q, n_kv)
    if form is None:
        return _MaskFact("mask", f"mask {node} kept: its kept set is not kv <= q + c "
                                 f"(it is {K})")
    with_pad = f" and the key padding of {pad.name}" if pad is not None else ""
    if form[0] == "all":
        if pad is not None:
            return _MaskFact("pad", f"mask {node} is the key padding of {pad.name}", pad=pad,
                             empty=empty)
        return _MaskFact("noop", f"mask {node} keeps every pair: dropped")
    align = _align(form[1], n_q, n_kv)
    if align is None:
        return _MaskFact("mask", f"mask {node} kept: causal with offset {form[1]}, which is "
                                 f"neither upper-left (0) nor lower-right ({n_kv - n_q})")
    if form[0] == "window":
        return _MaskFact("window", f"mask {node} is causal ({align}) with a window of "
                                   f"{form[2]} keys{with_pad}", align, form[2], pad=pad,
                         empty=empty)
    return _MaskFact("causal", f"mask {node} is exactly kv <= q + ({form[1]}): "
                               f"{align}{with_pad}", align, pad=pad, empty=empty)


def _split_padding(K, ev: IndexEval, axes: list, J) -> tuple:
    """``K = C & (pad[b, kv] != 0)`` with ``pad`` a [B, N] graph input (Hugging Face's
    ``padding_mask_function``: ``padding_mask[batch_idx, kv_idx]``) -> (C, pad's node);
    (K, None) when no graph input appears in K; (K, why) when one appears otherwise."""
    import sympy as sp
    apps = [a for a in K.atoms(sp.Function) if a.func in ev.lookups]
    if not apps:
        return K, None
    funcs = {a.func for a in apps}
    if len(funcs) != 1 or len(set(apps)) != 1:
        return K, "it reads several graph inputs or one at several places"
    app = apps[0]
    b = axes[0] if len(axes) >= 3 else None       # [B, (H,) Nq, Nkv]: the batch axis
    if J is None or b is None or app.args[1] != J or not (app.args[0] == b or app.args[0] == 0):
        return K, (f"it reads the graph input {ev.lookups[app.func].name} at {app.args}, not at "
                   f"(batch, key)")
    P = sp.Symbol("key_is_real")
    reps = {}
    for rel in K.atoms(sp.core.relational.Relational):
        if not rel.has(app):
            continue
        if isinstance(rel, sp.Ne) and rel.lhs == app and rel.rhs == 0:
            reps[rel] = P
        elif isinstance(rel, sp.Eq) and rel.lhs == app and rel.rhs == 0:
            reps[rel] = sp.Not(P)
        else:
            return K, f"it compares the graph input {ev.lookups[app.func].name} as {rel}"
    K2 = K.xreplace(reps)
    if K2.has(app) or sp.simplify_logic(K2.subs(P, False)) is not sp.false:
        return K, (f"the graph input {ev.lookups[app.func].name} is not a key padding mask "
                   f"(keys it marks are not simply excluded)")
    return sp.simplify_logic(K2.subs(P, True)), ev.lookups[app.func]


def settle_masks(m: Match, ev: IndexEval) -> None:
    """Turn a purely causal mask into ``m.causal`` (and drop it) where that is provably exact.

    A causal modifier is dropped only if (1) every masking modifier of the site is causal with
    the same alignment, (2) no soft-cap or finite fill comes after it (they could un-mask a
    pair), and (3) every query row keeps a key (so ``finfo.min`` and ``-inf`` give the same
    softmax). Non-causal additive tensors must be biases: built from parameters, indices and
    moderate constants; a bias with values near +-1e30 is outside what this proves.
    A sliding-window mask (causal and a window) alone among the masks is dropped the same way
    and sets ``m.causal`` and ``m.window`` (the kernels' window rule).
    """
    if not m.mods:
        return
    vq, vk = val(m.q), val(m.k)
    if vq is None or vk is None:
        return
    n_q, n_kv = sym_expr(vq.shape[-2]), sym_expr(vk.shape[-2])
    facts = [_mask_fact(kind, node, fix, ev, n_q, n_kv, m.out)
             for kind, node, fix in zip(m.mods, _mod_slots(m, m.mod_nodes),
                                        _mod_slots(m, m.mod_fix))]
    notes = [f.note for f in facts]
    masking = [i for i, f in enumerate(facts) if f.what in ("mask", "causal", "window", "pad")]
    pads = [i for i in masking if facts[i].pad is not None]
    if pads:
        # a mask that is the rules (causal / window) and the key padding of a [B, N] input,
        # alone among the masks with nothing after it that could un-mask a pair: the rules
        # and the per-row key lengths replace the tensor
        i = pads[0]
        f = facts[i]
        ok = masking == [i] and not any(facts[j].what in ("softcap", "fill")
                                        for j in range(i + 1, len(facts)))
        if ok and m.causal in (None, f.align) and m.kv_valid is None:
            m.causal = f.align if f.align is not None else m.causal
            m.window = f.window or 0
            m.kv_valid, m.empty_rows = f.pad, f.empty
            drop = {i} | {j for j, g in enumerate(facts) if g.what == "noop"}
            notes[i] += " -> dropped, rules and per-row key lengths set"
            _drop_mods(m, drop)
            m.causal_note = "; ".join(notes)
            return
        notes[i] += " -> kept (another mask or a later soft-cap/fill)"
        facts[i] = _MaskFact("mask", notes[i])
    causal = [i for i in masking if facts[i].what == "causal"]
    aligns = {facts[i].align for i in causal}
    drop = {i for i, f in enumerate(facts) if f.what == "noop"}
    unmask_after = lambda i: any(facts[j].what in ("softcap", "fill")  # noqa: E731
                                 for j in range(i + 1, len(facts)))
    if causal and causal == masking and len(aligns) == 1 and not any(map(unmask_after, causal)):
        align = aligns.pop()
        if m.causal in (None, align):
            m.causal = align
            drop |= set(causal)
            notes = [n + " -> dropped, causal set" if i in causal else n
                     for i, n in enumerate(notes)]
    elif causal:
        notes.append("causal mask kept: another masking modifier or a later soft-cap/fill "
                     "could change which pairs are excluded")
    windows = [i for i in masking if facts[i].what == "window"]
    if (windows and masking == windows[:1] and not unmask_after(windows[0])
            and m.causal in (None, facts[windows[0]].align)):
        # the window becomes the kernels' rule: keys j with pos - window < j <= pos
        i = windows[0]
        m.causal, m.window = facts[i].align, facts[i].window
        drop.add(i)
        notes[i] += " -> dropped, causal and window set"
    _drop_mods(m, drop)
    m.causal_note = "; ".join(notes)


def _drop_mods(m: Match, drop: set) -> None:
    if drop:
        keep = [i for i in range(len(m.mods)) if i not in drop]
        slots, fixes = _mod_slots(m, m.mod_nodes), _mod_slots(m, m.mod_fix)
        m.mods = tuple(m.mods[i] for i in keep)
        m.mod_nodes = [slots[i] for i in keep if slots[i] is not None]
        m.mod_fix = [fixes[i] for i in keep if slots[i] is not None]


def _mod_slots(m: Match, per_tensor: list) -> list:
    """Spread a list with one entry per modifier tensor (``mod_nodes``, ``mod_fix``) to one
    entry per modifier (None for a soft-cap, which has no tensor)."""
    it = iter(per_tensor)
    return [None if kind[0] == "softcap" else next(it) for kind in m.mods]


def _pack_mods(m: Match, st: _Scores) -> None:
    m.mods = tuple(st.mods)
    m.mod_nodes = [n for n in st.nodes if n is not None]
    m.mod_fix = [tuple(f) for f, n in zip(st.fixes, st.nodes) if n is not None]


# ---------------------------------------------------------------------------- patterns

def match_sdpa(node: fx.Node, site: str) -> Match:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
    enable_gqa)``.

    Seen in HuggingFace ``sdpa_attention_forward`` (Llama, Qwen2, BERT, GPT-2, OPT, ...),
    ``nn.MultiheadAttention`` once opened by canonicalisation, and hand-written models.
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
    if runtime_scalar(scale):
        m.scale, m.q_fix = 1.0, (("mul", scale),)       # known at run time only: scale q
    elif const_scalar(scale) is None:
        raise NoMatch(f"scale is not a constant ({scale!r})")
    else:
        m.scale = const_scalar(scale)
    m.causal = "upper_left" if is_causal else None
    if mask is not None:
        vm = val(mask)
        if vm is None:
            raise NoMatch("attn_mask has no recorded value")
        m.mods = (("keep",),) if vm.dtype == torch.bool else (("add",),)
        m.mod_nodes = [mask]
        m.mod_fix = [()]
    if enable_gqa:
        vk = val(k)
        m.gqa_group = int(vq.shape[1] // vk.shape[1]) if (vq is not None and vk is not None) else 1
        m.pattern = "sdpa+enable_gqa"
    else:
        m.k, m.v, m.gqa_group = _gqa(q, k, v)
        if m.gqa_group > 1:
            m.pattern = "sdpa+repeat_kv" if m.k is not k else "sdpa+mqa"
    bad = _check_4d(m.q, m.k, m.v, m.gqa_group)
    if bad:
        m.fallback = bad
    return m


def match_matmul_softmax(mm1: fx.Node, sm: fx.Node, mm2: fx.Node, site: str) -> Match:
    """``softmax(mods(scale * q @ k^T)) @ v`` and its spellings.

    Seen in HuggingFace ``eager_attention_forward`` (Llama, Qwen2/3, Mistral, Phi, GPT-2,
    GPT-NeoX, OPT, T5 and BERT: fp32 softmax then ``.to(q.dtype)``, ``repeat_kv``, eval
    dropout), Gemma-2 (soft-cap), Bloom (``baddbmm`` with ALiBi on ``[B*H, N, D]``, views to
    ``[B, H, N, N]`` and back), Falcon (ALiBi added before the scale, MQA by broadcast),
    nanoGPT (``masked_fill`` of a causal buffer slice), einsum/timm/CLIP spellings.
    """
    vin = val(sm.args[0])
    dim = arg(sm, 1, "dim")
    if vin is None:
        raise NoMatch("no shape recorded for the softmax input")
    if not isinstance(dim, int) or dim % vin.dim() != vin.dim() - 1:
        raise NoMatch(f"softmax over dim {dim} of a rank-{vin.dim()} tensor: not the key axis")
    s_chain = _score_path(sm.args[0], mm1)
    st = walk_scores(s_chain, mm1)
    p_chain = _walk_probs(sm, mm2, sink=st.sink is not None)
    for t in st.nodes + [x for _, x in st.tensor_scales]:
        if t is not None and _depends_on(t, mm1):
            raise NoMatch(f"a modifier of the scores ({t}) is computed from the scores "
                          f"themselves (thresholding / top-k style), not a mask or bias")
    q, kt = mm1.args[0], mm1.args[1]
    q, st.scale = strip_scale(q, st.scale)
    kt, st.scale = strip_scale(kt, st.scale)
    k = strip_transpose(kt)
    if k is None:
        raise NoMatch(f"key operand {kt.format_node() if isinstance(kt, fx.Node) else kt} of "
                      f"the score matmul is not a transposed key tensor")
    k, st.scale = strip_scale(k, st.scale)
    v = mm2.args[1]
    m = Match("matmul_softmax", site, mm2, q, k, v, scale=st.scale, softmax=sm)
    _pack_mods(m, st)
    if st.sink is not None:
        m.sink = st.sink
        m.pattern += "+sink"
    m.q_fix = tuple(st.tensor_scales)
    rank = _rank(q)
    if rank == 3:
        _layout_3d(m, st)
    elif rank == 4:
        m.k, m.v, m.gqa_group = _gqa(q, k, v)
        if m.gqa_group > 1:
            m.pattern += "+repeat_kv" if m.k is not k else "+mqa"
        bad = _check_4d(m.q, m.k, m.v, m.gqa_group)
        if bad:
            raise NoMatch(bad)
    else:
        raise NoMatch(f"q has rank {rank} (expected [B, H, N, D] or [B*H, N, D])")
    vo, vq = val(mm2), val(q)
    if vo is not None and vq is not None and vo.dtype != vq.dtype:      # e.g. fp32 p @ v.float()
        m.out_fix = tuple(m.out_fix) + (("to", vo.dtype),)
    inside = set(s_chain + p_chain + st.extra + [sm, mm2])
    for n in [mm1, sm] + s_chain + p_chain:
        others = [u for u in n.users if u not in inside]
        if others:
            m.fallback = (f"attention weights ({n.name}) are also used by "
                          f"{', '.join(u.name for u in others)}; they would have to be "
                          f"materialised, so the site stays dense")
            break
    return m


def _layout_3d(m: Match, st: _Scores) -> None:
    """``[B*H, N, D]`` operands (``bmm``/``baddbmm``: Bloom, ``F.multi_head_attention_forward``
    with weights): view them as ``[B, H, N, D]`` when a view in the chain names H, else as one
    batch of B*H heads (exact either way: heads are independent)."""
    vq, vk, vv = val(m.q), val(m.k), val(m.v)
    for nm, t in (("k", vk), ("v", vv)):
        if t is None or t.dim() != 3:
            raise NoMatch(f"q is [B*H, N, D] but {nm} has rank {None if t is None else t.dim()}")
        if sym_expr(t.shape[0]) != sym_expr(vq.shape[0]):
            raise NoMatch(f"q has {vq.shape[0]} batch*heads, {nm} has {t.shape[0]}")
    h = st.heads
    split = ("unflatten0", h) if h else ("unsqueeze0",)
    m.q_fix = tuple(m.q_fix) + (split,)
    m.k_fix, m.v_fix = (split,), (split,)
    m.out_fix = (("flatten01",),) if h else (("squeeze0",),)
    m.pattern += "+bmm3d"
    fixes = []
    for fix, r, t in zip(m.mod_fix, [r for r, n in zip(st.ranks, st.nodes) if n is not None],
                         m.mod_nodes):
        st_ = _shape(t)
        if r == 4 and not h:
            raise NoMatch(f"modifier {t} applies to [B, H, ..] scores but the head count is "
                          f"unknown")
        if r == 3 and len(st_) == 3 and st_[0] != 1:
            fix = tuple(fix) + (split,)
        fixes.append(tuple(fix))
    m.mod_fix = fixes


def match_fused(node: fx.Node, site: str) -> Match:
    """A fused attention op that canonicalisation did not open: a dense site with the reason.

    ``torch._transformer_encoder_layer_fwd`` (``nn.TransformerEncoderLayer`` fast path),
    ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``),
    ``torch._native_multi_head_attention`` (its fast path).
    """
    x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else node
    why = node.meta.get("planner_fused_reason", f"fused attention op {node.target.__name__} "
                                                "is not opened by canonicalisation")
    return Match(f"fused:{label(node)}", site, node, x, x, x, scale=0.0, fallback=why)


# ---------------------------------------------------------------------------- driver

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
