"""Score walking: the ops between ``q @ k^T`` and softmax, and between softmax and ``@ v``.

``score_path`` finds the chain from the score matmul to the softmax input, ``walk_scores``
reads it as a scale and ordered modifiers (``Scores``: masks, biases, a soft-cap, a sink
column), ``walk_probs`` checks what the probabilities pass through before the value matmul.
Each raises ``NoMatch`` with the reason a chain is not attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from passes.graph import arg, const_scalar, label, rank_of, runtime_scalar, shape_of, val

# ops a score tensor may pass through between q @ k^T and softmax
SCORE_OPS = {"mul", "div", "add", "sub", "masked_fill", "where", "tanh", "cast", "identity",
             "dropout", "reshape", "cat"}
_BINARY = ("mul", "div", "add", "sub")


class NoMatch(Exception):
    """Raised by a pattern function with the reason a candidate is not (rewritable) attention."""


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


def score_path(sm_in: fx.Node, mm: fx.Node) -> list:
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


@dataclass
class Scores:
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
        rank = rank_of(scores)
        if node is not None:
            st, ss = shape_of(node), shape_of(scores)
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


def walk_scores(path: list, mm: fx.Node) -> Scores:
    """Parse the score chain forward from ``mm`` (q @ k^T) along ``path`` to softmax's input."""
    st = Scores()
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


def _sink_column(n: fx.Node, cur: fx.Node, st: Scores) -> fx.Node:
    """``cat([s, sink], dim=-1)`` with ``sink = x.reshape(1, -1, 1, 1).expand(B, -1, Nq, -1)``:
    one more score column holding a learned logit per head (GPT-OSS: the softmax's
    denominator gains exp(sink_h), the column is dropped after it). Returns ``x`` [H]."""
    parts = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = arg(n, 1, "dim", 0)
    rank = rank_of(cur)
    if (st.sink is not None or not isinstance(parts, (list, tuple)) or len(parts) != 2
            or parts[0] is not cur or rank is None or dim % rank != rank - 1):
        raise NoMatch(f"scores concatenated with another tensor ({n.format_node()}); only one "
                      f"sink column appended on the key axis is attention")
    x = parts[1]
    while isinstance(x, fx.Node) and label(x) in ("expand", "cast", "identity"):
        x = x.args[0]
    sx, sc = shape_of(x), shape_of(cur)
    if (not isinstance(x, fx.Node) or label(x) != "reshape" or len(sx) != 4
            or [sx[0], sx[2], sx[3]] != [1, 1, 1] or sx[1] != sc[1]):
        raise NoMatch(f"the column concatenated to the scores ({parts[1]}) is not one value per "
                      f"head broadcast over batch and queries")
    base = x.args[0]
    if rank_of(base) != 1 or shape_of(base)[0] != sc[1]:
        raise NoMatch(f"the sink column comes from {base}, not a [heads] tensor")
    st.extra += [p for p in chain_to(parts[1], base)]
    return base


def chain_to(top: fx.Node, base: fx.Node) -> list:
    """The nodes from ``top`` down its first arguments to ``base`` (``base`` excluded)."""
    out, x = [], top
    while isinstance(x, fx.Node) and x is not base:
        out.append(x)
        x = x.args[0]
    return out


def _row_max_of(n: fx.Node, cur: fx.Node, st: Scores) -> bool:
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
    rank = rank_of(cur)
    dim = arg(m, 1, "dim")
    keep = arg(m, 2, "keepdim", False)
    if not isinstance(dim, int) or rank is None or dim % rank != rank - 1 or keep is not True:
        return False
    if name == "max" and sel is None:
        return False                     # max(dim=...) is a (values, indices) pair
    st.extra += [m] + ([sel] if sel is not None else [])
    return True


def _check_head_view(st: Scores, cur: fx.Node, n: fx.Node) -> None:
    """Allow views that keep the scores' shape or split/merge [B*H] <-> [B, H] (Bloom)."""
    a, b = shape_of(cur), shape_of(n)
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


def walk_probs(sm: fx.Node, mm2: fx.Node, sink: bool = False) -> list:
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
            a, b = shape_of(n.args[0]), shape_of(n)
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
    rank = rank_of(n.args[0])
    lead = idx[:-1]
    return all(i is Ellipsis or i == slice(None) for i in lead) and (
        Ellipsis in lead or len(idx) == rank)
