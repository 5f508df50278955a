"""Symbolic index evaluation: a mask's subgraph as an exact function of its indices.

Masks are built from index arithmetic: ``arange`` compared with ``arange`` (HF masking_utils,
``kv_idx <= q_idx``), ``tril``/``triu`` of constants, slices of a causal buffer (nanoGPT).
``IndexEval`` evaluates such a subgraph *symbolically*: each tensor becomes an exact function
of its indices (sympy), so a mask can be proved causal from the graph rather than sampled.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from passes.graph import arg, const_scalar, fill_value, label, sym_expr, val


class IndexFn:
    """A tensor as an exact function of its indices.

    axes: per dim, the sympy symbol indexing that dim, or None where the value does not vary
    kind: "int"  -> expr is a sympy integer expression (arange arithmetic, positions)
          "bool" -> expr is a sympy boolean
          "num"  -> expr is a tuple of (value, condition) pairs; conditions disjoint, covering
    """

    __slots__ = ("axes", "kind", "expr")

    def __init__(self, axes, kind: str, expr):
        self.axes, self.kind, self.expr = tuple(axes), kind, expr

    def __repr__(self) -> str:
        return f"IndexFn(axes={self.axes}, kind={self.kind}, expr={self.expr})"


class Opaque(Exception):
    """The tensor depends on something other than indices and constants (the reason says what)."""


def _sp():
    import sympy
    return sympy


def _shape(node) -> tuple:
    v = val(node)
    if v is None:
        raise Opaque(f"no value recorded for {node}")
    return tuple(sym_expr(s) for s in v.shape)


def _subs(fn: IndexFn, mapping: dict) -> IndexFn:
    if not mapping:
        return fn
    axes = tuple(mapping.get(a, a) if a is not None else None for a in fn.axes)
    axes = tuple(a if (a is None or getattr(a, "is_Symbol", False)) else None for a in axes)
    # simultaneous: {a: b, b: a} swaps the two (subs would apply them one after the other)
    if fn.kind == "num":
        expr = tuple((v, c.xreplace(mapping)) for v, c in fn.expr)
    else:
        expr = fn.expr.xreplace(mapping)
    return IndexFn(axes, fn.kind, expr)


def _merge(cases) -> tuple:
    sp = _sp()
    out: dict = {}
    for v, c in cases:
        if c is sp.false:
            continue
        out[v] = sp.Or(out[v], c) if v in out else c
    if len(out) > 32:
        raise Opaque("mask has too many distinct values")
    return tuple(out.items())


def to_num(fn: IndexFn) -> IndexFn:
    sp = _sp()
    if fn.kind == "num":
        return fn
    if fn.kind == "bool":
        return IndexFn(fn.axes, "num", _merge([(1.0, fn.expr), (0.0, sp.Not(fn.expr))]))
    if fn.expr.is_number:
        return IndexFn(fn.axes, "num", ((float(fn.expr), sp.true),))
    raise Opaque("an index expression is used as a mask value")


def to_bool(fn: IndexFn):
    sp = _sp()
    if fn.kind == "bool":
        return fn.expr
    if fn.kind == "num":
        return sp.Or(*[c for v, c in fn.expr if v != 0])
    return sp.Ne(fn.expr, 0)


def _const(x) -> IndexFn:
    sp = _sp()
    if isinstance(x, bool):
        return IndexFn((), "bool", sp.true if x else sp.false)
    if isinstance(x, int):
        return IndexFn((), "int", sp.Integer(x))
    if isinstance(x, float):
        return IndexFn((), "num", ((x, sp.true),))
    e = sym_expr(x)
    if e is not None:
        return IndexFn((), "int", e)
    raise Opaque(f"unsupported operand {x!r}")


def _tri(x: IndexFn, rows, cols, diagonal, upper: bool, fresh) -> IndexFn:
    """tril/triu over the last two dims (sizes ``rows``, ``cols``)."""
    sp = _sp()
    axes = list(x.axes)
    if len(axes) < 2:
        raise Opaque("tril/triu of a tensor with fewer than 2 dims")
    idx = []
    for d, size in ((-2, rows), (-1, cols)):
        if axes[d] is None:
            if size == 1:
                idx.append(sp.Integer(0))
                continue
            axes[d] = fresh()
        idx.append(axes[d])
    diff = idx[1] - idx[0]
    cond = sp.Ge(diff, diagonal) if upper else sp.Le(diff, diagonal)
    if x.kind == "bool":
        return IndexFn(axes, "bool", sp.And(x.expr, cond))
    n = to_num(x)
    return IndexFn(axes, "num", _merge([(v, sp.And(c, cond)) for v, c in n.expr]
                                       + [(0.0, sp.Not(cond))]))


_ARITH = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}
_CMP = {"lt": "Lt", "le": "Le", "gt": "Gt", "ge": "Ge", "eq": "Eq", "ne": "Ne"}
_PYCMP = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
          "eq": operator.eq, "ne": operator.ne}


def data_index_fn(t: torch.Tensor, fresh) -> IndexFn:
    """IndexFn of a stored tensor that is a triangular pattern (a causal buffer), checked in
    full: ``tril(ones(n, n)).view(1, 1, n, n)`` -> ``col - row <= 0``."""
    sp = _sp()
    if t.dim() < 2 or any(s != 1 for s in t.shape[:-2]) or t.numel() > (1 << 24):
        raise Opaque(f"stored tensor of shape {list(t.shape)} is not a [1, .., R, C] pattern")
    m = t.reshape(t.shape[-2], t.shape[-1])
    nz = m if m.dtype == torch.bool else m != 0
    dev = m.device
    diff = (torch.arange(m.shape[1], device=dev)[None, :]
            - torch.arange(m.shape[0], device=dev)[:, None])
    r, c = fresh(), fresh()
    if not nz.any():
        cond = sp.false
    else:
        hi, lo = int(diff[nz].max()), int(diff[nz].min())
        if torch.equal(nz, diff <= hi):
            cond = sp.Le(c - r, hi)
        elif torch.equal(nz, diff >= lo):
            cond = sp.Ge(c - r, lo)
        else:
            raise Opaque("stored tensor is not a triangular (causal) pattern")
    axes = [None] * (t.dim() - 2) + [r, c]
    if m.dtype == torch.bool:
        return IndexFn(axes, "bool", cond)
    vals = m[nz].unique() if nz.any() else torch.zeros(0)
    if vals.numel() > 1:
        raise Opaque("stored tensor has several non-zero values")
    v = float(vals[0]) if vals.numel() else 0.0
    return IndexFn(axes, "num", _merge([(v, cond), (0.0, sp.Not(cond))]))


def _is_buffer(n: fx.Node) -> bool:
    """Is this Dynamo placeholder a module buffer (``..._buffers['bias']``)?"""
    src = getattr(n.meta.get("grapharg"), "source", None)
    name = getattr(src, "name", "") if src is not None else ""
    name = name() if callable(name) else name
    return "_buffers" in n.name or "_buffers[" in str(name)


class IndexEval:
    """Evaluate nodes into ``IndexFn`` (memoised); ``Opaque`` says what stops it.

    ``example_inputs`` (the real tensors a Dynamo backend receives, in placeholder order) let
    stored buffers be read; trainable parameters and other inputs stay opaque.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs=None, mutation=None):
        self.gm = gm
        self.memo: dict = {}
        self._n = 0
        self.data: dict = {}
        self.mutation = mutation           # passes.mutation.MutationInfo (None: no writes known)
        self.lookups: dict = {}            # sympy function -> the graph input it stands for
        self._readers: list = []           # the node whose read is being evaluated (innermost last)
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if example_inputs is not None and len(example_inputs) == len(phs):
            for n, t in zip(phs, example_inputs):
                self.data[n] = t

    def fresh(self):
        self._n += 1
        return _sp().Symbol(f"x{self._n}", integer=True, nonnegative=True)

    def __call__(self, x, reader: Optional[fx.Node] = None) -> IndexFn:
        """``x``'s value as read by ``reader`` (default: the node being evaluated, or, at the
        top, the end of the graph). Tensors written in place by a write that ``x``'s own
        derivation does not contain (before the read) are opaque: their contents are not the
        function of indices their graph node computes."""
        if not isinstance(x, fx.Node):
            return _const(x)
        self._check_writes(x, reader if reader is not None else
                           (self._readers[-1] if self._readers else None))
        if x not in self.memo:
            self._readers.append(x)
            try:
                fn = self._eval(x)
                v = val(x)
                if v is not None and v.dim() == len(fn.axes):
                    # a size-1 dim broadcasts: its value is the one at index 0 (arange(1) -> 0)
                    ones = {a: 0 for a, s in zip(fn.axes, v.shape) if a is not None and s == 1}
                    fn = _subs(fn, ones)
                self.memo[x] = fn
            except Opaque as e:
                self.memo[x] = e
            finally:
                self._readers.pop()
        r = self.memo[x]
        if isinstance(r, Opaque):
            raise r
        return r

    def _lookup(self, n: fx.Node, v) -> IndexFn:
        """A [B, N] integer / boolean graph input as ``input_<name>(b, j)``, a sympy function
        of its indices whose values are unknown (``lookups`` maps the function to the node)."""
        sp = _sp()
        f = sp.Function(f"input_{n.name}")
        self.lookups[f] = n
        axes = [self.fresh(), self.fresh()]
        app = f(*axes)
        if v.dtype == torch.bool:
            return IndexFn(axes, "bool", sp.Ne(app, 0))
        return IndexFn(axes, "int", app)

    def _check_writes(self, x: fx.Node, reader: Optional[fx.Node]) -> None:
        mi = self.mutation
        if mi is None or x not in mi.pos or not mi.has_writes(x):
            return
        limit = mi.pos.get(reader, len(mi.pos)) if reader is not None else len(mi.pos)
        bad = [w for w in mi.foreign_writes(x) if mi.pos[w] < limit]
        if bad:
            raise Opaque(f"{x.name} is written in place by {bad[0].format_node()}")

    # -- helpers
    def _bcast(self, fns: list, out_ndim: int) -> tuple[list, list]:
        """Right-align ``fns`` to ``out_ndim`` dims, unifying index symbols per dim."""
        axes: list = [None] * out_ndim
        out = []
        for fn in fns:
            pad = [None] * (out_ndim - len(fn.axes)) + list(fn.axes)
            mapping = {}
            for d, a in enumerate(pad):
                if a is None:
                    continue
                if axes[d] is None:
                    if a in axes:
                        # the symbol already indexes another output dim (``i[None, :] <=
                        # i[:, None]`` of one arange): here it is an independent index
                        axes[d] = mapping[a] = self.fresh()
                    else:
                        axes[d] = a
                elif axes[d] != a:
                    mapping[a] = axes[d]
            out.append(_subs(IndexFn(pad, fn.kind, fn.expr), mapping))
        return axes, out

    def _eval(self, n: fx.Node) -> IndexFn:
        sp = _sp()
        lab = label(n)
        v = val(n)
        if v is None and sym_expr(n) is not None:             # a SymInt: a size or an offset
            return IndexFn((), "int", sym_expr(n))
        if n.op in ("placeholder", "get_attr"):
            t = self.data.get(n) if n.op == "placeholder" else getattr(self.gm, n.target, None)
            from torch._subclasses.fake_tensor import FakeTensor
            if not isinstance(t, torch.Tensor) or isinstance(t, FakeTensor):
                raise Opaque(f"graph input {n.name}")
            if isinstance(t, torch.nn.Parameter) and t.requires_grad:
                raise Opaque(f"trainable parameter {n.name}")
            if n.op == "placeholder" and not _is_buffer(n):
                # a call argument may hold other values on the next call (Dynamo does not guard
                # tensor values): never prove anything from its contents. A [B, N] integer or
                # boolean input (a padding mask) is kept as an unknown function of its indices
                v = val(n)
                if v is not None and v.dim() == 2 and not v.is_floating_point():
                    return self._lookup(n, v)
                raise Opaque(f"graph input {n.name} (a call argument, its values may change)")
            return data_index_fn(t.detach(), self.fresh)
        if v is None:
            raise Opaque(f"{n.name} is not a tensor")
        nd = v.dim()
        src_dtype = getattr(val(n.args[0]), "dtype", None) if n.args else None
        if lab == "identity" or (lab == "cast" and v.dtype == src_dtype):
            return self(n.args[0])
        if lab == "cast":
            src = self(n.args[0])
            if v.dtype == torch.bool:
                return IndexFn(src.axes, "bool", to_bool(src))
            if src.kind == "int":
                return src
            num = to_num(src)
            if not v.dtype.is_floating_point:
                num = IndexFn(num.axes, "num", _merge([(float(int(a)), c) for a, c in num.expr]))
            return num
        if lab == "arange":
            a = [arg(n, i, nm) for i, nm in enumerate(("start", "end", "step"))]
            a = [x for x in a if x is not None]
            start, step = (0, 1) if len(a) == 1 else (a[0], a[2] if len(a) > 2 else 1)
            s0, st = sym_expr(start), sym_expr(step)
            if s0 is None or st is None:
                raise Opaque(f"arange with non-integer bounds ({n.format_node()})")
            s = self.fresh()
            return IndexFn([s], "int", s0 + st * s)
        if lab == "full":
            c = const_scalar(fill_value(n))
            if c is None:
                raise Opaque(f"constant with unknown fill value ({n.format_node()})")
            axes = [None] * nd
            if v.dtype == torch.bool:
                return IndexFn(axes, "bool", sp.true if c else sp.false)
            return IndexFn(axes, "num", ((c, sp.true),))
        if lab in _ARITH or lab in _CMP or lab in ("and", "or", "xor"):
            a, b = n.args[0], n.args[1] if len(n.args) > 1 else arg(n, 1, "other")
            axes, (fa, fb) = self._bcast([self(a), self(b)], nd)
            return IndexFn(axes, *self._binary(lab, fa, fb, v))
        if lab == "neg":
            f = self(n.args[0])
            if f.kind == "int":
                return IndexFn(f.axes, "int", -f.expr)
            f = to_num(f)
            return IndexFn(f.axes, "num", _merge([(-a, c) for a, c in f.expr]))
        if lab == "not":
            f = self(n.args[0])
            if f.kind != "bool":
                raise Opaque(f"bitwise not of a non-boolean tensor ({n.format_node()})")
            return IndexFn(f.axes, "bool", sp.Not(f.expr))
        if lab in ("where", "masked_fill"):
            if lab == "where":
                c, a, b = n.args[0], n.args[1], n.args[2]
            else:
                a, c, b = arg(n, 2, "value"), arg(n, 1, "mask"), n.args[0]
            axes, (fc, fa, fb) = self._bcast([self(c), self(a), self(b)], nd)
            cond = to_bool(fc)
            cases = [(x, sp.And(k, cond)) for x, k in to_num(fa).expr]
            cases += [(x, sp.And(k, sp.Not(cond))) for x, k in to_num(fb).expr]
            out = IndexFn(axes, "num", _merge(cases))
            return IndexFn(axes, "bool", to_bool(out)) if v.dtype == torch.bool else out
        if lab in ("tril", "triu"):
            x = self(n.args[0])
            d = sym_expr(arg(n, 1, "diagonal", 0))
            shp = _shape(n)
            return _tri(x, shp[-2], shp[-1], d, lab == "triu", self.fresh)
        if lab == "getitem":
            return self._getitem(n)
        if lab == "diff":
            return self._diff(n)
        if lab == "cumsum":
            return self._cumsum(n)
        if lab in ("unsqueeze", "squeeze", "reshape", "expand"):
            return self._reshape(n)
        if lab in ("transpose", "permute"):
            x = self(n.args[0])
            r = len(x.axes)
            if lab == "transpose":
                d0, d1 = arg(n, 1, "dim0") % r, arg(n, 2, "dim1") % r
                order = list(range(r))
                order[d0], order[d1] = order[d1], order[d0]
            else:
                order = n.args[1:] if len(n.args) > 2 else arg(n, 1, "dims")
                order = [d % r for d in order]
            return IndexFn([x.axes[d] for d in order], x.kind, x.expr)
        raise Opaque(f"{n.format_node()} ({lab}) is not index arithmetic")

    def _binary(self, lab, fa: IndexFn, fb: IndexFn, v) -> tuple:
        sp = _sp()
        if lab in ("and", "or", "xor"):
            if fa.kind == "bool" and fb.kind == "bool":
                op = {"and": sp.And, "or": sp.Or, "xor": sp.Xor}[lab]
                return "bool", op(fa.expr, fb.expr)
            raise Opaque(f"logical {lab} of non-boolean tensors")
        if fa.kind == "int" and fb.kind == "int":
            if lab in _CMP:
                return "bool", getattr(sp, _CMP[lab])(fa.expr, fb.expr)
            if lab == "div":
                raise Opaque("division of index tensors")
            return "int", _ARITH[lab](fa.expr, fb.expr)
        na, nb = to_num(fa), to_num(fb)
        cases = []
        for x, cx in na.expr:
            for y, cy in nb.expr:
                r = _PYCMP[lab](x, y) if lab in _PYCMP else _ARITH[lab](x, y)
                cases.append((r, sp.And(cx, cy)))
        if lab in _CMP:
            return "bool", sp.Or(*[c for r, c in cases if r])
        return "num", _merge(cases)

    def _getitem(self, n: fx.Node) -> IndexFn:
        x = self(n.args[0])
        shp = _shape(n.args[0])
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        if any(isinstance(i, fx.Node) and val(i) is not None for i in idx):
            return self._gather(n, x, idx)
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        exp = []
        for i in idx:
            if i is Ellipsis:
                exp += [slice(None)] * (len(x.axes) - used)
            else:
                exp.append(i)
        exp += [slice(None)] * (len(x.axes) - sum(1 for i in exp if i is not None))
        axes, mapping, d = [], {}, 0
        for i in exp:
            if i is None:
                axes.append(None)
                continue
            a = x.axes[d]
            if isinstance(i, slice):
                if i.step not in (None, 1):
                    raise Opaque(f"strided slice in {n.format_node()}")
                start = sym_expr(i.start) if i.start is not None else _sp().Integer(0)
                if start is None:
                    raise Opaque(f"slice start {i.start!r} is not an integer")
                if start.is_number and start < 0:
                    start = shp[d] + start
                if a is not None and start != 0:
                    t = self.fresh()
                    mapping[a] = start + t
                    a = t
                axes.append(a)
            else:
                k = sym_expr(i)
                if k is None:
                    raise Opaque(f"tensor index in {n.format_node()}")
                if k.is_number and k < 0:
                    k = shp[d] + k
                if a is not None:
                    mapping[a] = k
            d += 1
        out = _subs(IndexFn(x.axes, x.kind, x.expr), mapping)
        return IndexFn(axes, out.kind, out.expr)

    def _diff(self, n: fx.Node) -> IndexFn:
        """``torch.diff(x, dim=d, prepend=p)`` of an index expression along ``d``: x[s] - x[s-1]
        (x[0] - p at s = 0), e.g. Hugging Face's packed-sequence detection on positions."""
        sp = _sp()
        x = self(n.args[0])
        nd = len(x.axes)
        if arg(n, 1, "n", 1) != 1 or arg(n, 4, "append") is not None or x.kind != "int":
            raise Opaque(f"diff other than one step with a prepend ({n.format_node()})")
        d = arg(n, 2, "dim", -1) % nd
        s = x.axes[d]
        pre = arg(n, 3, "prepend")
        if s is None or pre is None:
            raise Opaque(f"diff of a constant or without prepend ({n.format_node()})")
        p = self(pre)
        axes, (xa, pa) = self._bcast([x, p], nd)
        s = axes[d]
        first = sp.simplify(xa.expr.subs(s, 0) - pa.expr.subs(s, 0) if pa.axes[d] is not None
                            else xa.expr.subs(s, 0) - pa.expr)
        step = sp.simplify(xa.expr - xa.expr.subs(s, s - 1))
        if sp.simplify(first - step) == 0:
            out_axes = list(axes)
            if not step.has(s):
                out_axes[d] = None
            return IndexFn(out_axes, "int", step)
        return IndexFn(axes, "int", sp.Piecewise((first, sp.Eq(s, 0)), (step, True)))

    def _cumsum(self, n: fx.Node) -> IndexFn:
        """``cumsum`` along a dim the value does not vary on: value * (index + 1) (a run of
        equal values, e.g. the zeros of ``(diff != 1).cumsum(-1)`` over consecutive positions)."""
        sp = _sp()
        x = self(n.args[0])
        v = val(n)
        d = arg(n, 1, "dim") % len(x.axes)
        if x.axes[d] is not None:
            raise Opaque(f"cumsum of a value that varies along the summed dim ({n.format_node()})")
        if x.kind == "bool":
            c = sp.Piecewise((1, x.expr), (0, True))
        elif x.kind == "int":
            c = x.expr
        else:
            raise Opaque(f"cumsum of a float mask value ({n.format_node()})")
        c = sp.simplify(c)
        axes = list(x.axes)
        if c == 0:
            return IndexFn(axes, "int", sp.Integer(0))
        axes[d] = self.fresh()
        return IndexFn(axes, "int", c * (axes[d] + 1))

    def _gather(self, n: fx.Node, x: IndexFn, idx: tuple) -> IndexFn:
        """``x[i0, i1, ...]`` with one index tensor per dim of ``x`` (advanced indexing: the
        result has the broadcast shape of the indices), e.g. Hugging Face's
        ``padding_mask[batch_idx, kv_idx]``: x's index symbols become the indices' values."""
        if len(idx) != len(x.axes) or not all(isinstance(i, fx.Node) for i in idx):
            raise Opaque(f"indexing mixes tensors with slices in {n.format_node()}")
        v = val(n)
        fns = [self(i) for i in idx]
        if any(f.kind != "int" for f in fns):
            raise Opaque(f"a non-integer index tensor in {n.format_node()}")
        axes, fns = self._bcast(fns, v.dim())
        mapping = {a: f.expr for a, f in zip(x.axes, fns) if a is not None}
        if x.kind == "num":
            return IndexFn(axes, "num", tuple((val_, c.subs(mapping)) for val_, c in x.expr))
        return IndexFn(axes, x.kind, x.expr.subs(mapping))

    def _reshape(self, n: fx.Node) -> IndexFn:
        """Views that only add/drop size-1 dims or broadcast size-1 dims (expand)."""
        x = self(n.args[0])
        sin, sout = _shape(n.args[0]), _shape(n)
        zero = {a: 0 for a, s in zip(x.axes, sin) if a is not None and s == 1}
        if label(n) == "expand":
            pad = len(sout) - len(sin)
            axes = [None] * pad + [None if s == 1 else a for a, s in zip(x.axes, sin)]
            out = _subs(x, zero)
            return IndexFn(axes, out.kind, out.expr)
        kin = [(a, s) for a, s in zip(x.axes, sin) if s != 1]
        kout = [d for d, s in enumerate(sout) if s != 1]
        if [s for _, s in kin] != [sout[d] for d in kout]:
            raise Opaque(f"reshape {list(sin)} -> {list(sout)} mixes dims ({n.format_node()})")
        axes = [None] * len(sout)
        for (a, _), d in zip(kin, kout):
            axes[d] = a
        out = _subs(x, zero)
        return IndexFn(axes, out.kind, out.expr)
