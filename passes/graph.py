"""Canonical op labels over fx nodes, the networkx view of a graph, and helpers to add nodes.

Dynamo, ``torch.export`` and ``symbolic_trace`` spell one operation many ways
(``torch.matmul`` / ``operator.matmul`` / ``Tensor.matmul``, ``x += y`` / ``x + y``); discovery
works on the canonical label instead of the spelling.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Optional

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

from passes.mutation import READS_AS

_FUNCTIONS: dict[Any, str] = {
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
    torch.softmax: "softmax", F.softmax: "softmax", torch.Tensor.softmax: "softmax",
    torch._C._nn.scaled_dot_product_attention: "sdpa",
    torch.einsum: "einsum", torch.baddbmm: "baddbmm",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul",
    operator.truediv: "div", torch.div: "div", operator.itruediv: "div",
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    operator.sub: "sub", torch.sub: "sub", operator.isub: "sub",
    operator.neg: "neg", torch.neg: "neg", torch.tanh: "tanh",
    torch.logsumexp: "logsumexp", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    F.dropout: "dropout", torch.dropout: "dropout",
    torch.masked_fill: "masked_fill", torch.where: "where",
    torch.transpose: "transpose", torch.permute: "permute",
    operator.getitem: "getitem", torch.unsqueeze: "unsqueeze", torch.squeeze: "squeeze",
    torch.reshape: "reshape", torch.flatten: "reshape", torch.cat: "cat",
    torch.repeat_interleave: "repeat_interleave",
    operator.lt: "lt", operator.le: "le", operator.gt: "gt", operator.ge: "ge",
    operator.eq: "eq", operator.ne: "ne", torch.lt: "lt", torch.le: "le", torch.gt: "gt",
    torch.ge: "ge", torch.eq: "eq", torch.ne: "ne",
    operator.and_: "and", operator.or_: "or", operator.xor: "xor", operator.invert: "not",
    torch.logical_and: "and", torch.logical_or: "or", torch.logical_xor: "xor",
    torch.logical_not: "not", torch.bitwise_and: "and", torch.bitwise_or: "or",
    torch.bitwise_not: "not",
    torch.tril: "tril", torch.triu: "triu", torch.arange: "arange",
    torch.ones: "full", torch.zeros: "full", torch.full: "full", torch.ones_like: "full",
    torch.zeros_like: "full", torch.full_like: "full", torch.tensor: "full",
    torch.scalar_tensor: "full", torch.empty_like: "other:empty_like",
    F.embedding: "embedding", torch.diff: "diff", torch.cumsum: "cumsum",
    F.multi_head_attention_forward: "mha",
    torch._transformer_encoder_layer_fwd: "encoder_layer",
    torch._native_multi_head_attention: "native_mha",
}
if hasattr(F, "scaled_dot_product_attention"):
    _FUNCTIONS[F.scaled_dot_product_attention] = "sdpa"

_METHODS = {
    "matmul": "matmul", "bmm": "matmul", "__matmul__": "matmul", "softmax": "softmax",
    "baddbmm": "baddbmm", "transpose": "transpose", "permute": "permute",
    "to": "cast", "float": "cast", "half": "cast", "bfloat16": "cast", "double": "cast",
    "bool": "cast", "int": "cast", "long": "cast", "type": "cast", "type_as": "cast",
    "contiguous": "identity", "clone": "identity", "detach": "identity",
    "masked_fill": "masked_fill", "masked_fill_": "masked_fill",
    "mul": "mul", "mul_": "mul", "div": "div", "div_": "div", "add": "add", "add_": "add",
    "sub": "sub", "sub_": "sub", "neg": "neg", "tanh": "tanh",
    "logsumexp": "logsumexp", "sigmoid": "sigmoid",
    "expand": "expand", "expand_as": "expand", "reshape": "reshape", "view": "reshape",
    "view_as": "reshape", "reshape_as": "reshape", "flatten": "reshape", "unflatten": "reshape",
    "unsqueeze": "unsqueeze", "squeeze": "squeeze",
    "repeat_interleave": "repeat_interleave",
    "lt": "lt", "le": "le", "gt": "gt", "ge": "ge", "eq": "eq", "ne": "ne",
    "logical_and": "and", "logical_or": "or", "logical_not": "not", "__and__": "and",
    "__or__": "or", "__invert__": "not", "bitwise_not": "not",
    "tril": "tril", "triu": "triu",
    "new_ones": "full", "new_zeros": "full", "new_full": "full", "new_tensor": "full",
    "diff": "diff", "cumsum": "cumsum",
    # operators recorded as method calls (torch 2.11's Dynamo writes ``a == b`` on tensors as
    # ``call_method __eq__`` in Hugging Face's mask functions); reflected forms (``__rsub__``,
    # ...) swap their operands and are left out
    "__eq__": "eq", "__ne__": "ne", "__lt__": "lt", "__le__": "le", "__gt__": "gt",
    "__ge__": "ge", "__xor__": "xor", "__add__": "add", "__sub__": "sub", "__mul__": "mul",
    "__truediv__": "div", "__neg__": "neg", "__getitem__": "getitem",
}

# aten-level spellings (torch.export, or code calling torch.ops.aten.* directly)
_ATEN = {"_safe_softmax": "softmax", "_softmax": "softmax", "softmax": "softmax",
         "bmm": "matmul", "matmul": "matmul", "scaled_dot_product_attention": "sdpa"}


def label(node: fx.Node) -> str:
    """Canonical label of a node: 'matmul', 'softmax', 'sdpa', 'mul', ... or 'other:<name>'."""
    if node.op == "call_function":
        lab = _FUNCTIONS.get(node.target)
        if lab is None and isinstance(node.target, torch._ops.OpOverload):
            lab = _ATEN.get(node.target._opname)
        if lab is None and getattr(node.target, "__name__", "") == "_safe_softmax":
            lab = "softmax"
        if lab is None and node.target is getattr and len(node.args) > 1:
            lab = {"mT": "mT", "T": "other:T"}.get(node.args[1])
        return lab or f"other:{getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return _METHODS.get(node.target, f"other:{node.target}")
    return node.op


def val(node: Any) -> Optional[torch.Tensor]:
    """The example/fake value recorded for a node (None for non-tensors)."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val", node.meta.get("example_value"))
    return v if isinstance(v, torch.Tensor) else None


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument ``i``/``name`` of a call."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def rank_of(node: Any) -> Optional[int]:
    """The number of dims of the tensor a node holds (None when no value is recorded)."""
    v = val(node)
    return v.dim() if v is not None else None


def shape_of(node: Any) -> list:
    """The shape of the tensor a node holds, as sympy expressions ([] when none is recorded)."""
    v = val(node)
    return [sym_expr(s) for s in v.shape] if v is not None else []


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """Data-flow DiGraph: one vertex per fx node (attribute ``label``), edges producer -> user."""
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n, label=label(n))
        for inp in n.all_input_nodes:
            g.add_edge(inp, n)
    return g


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that produced ``node`` ('' at top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return clean_path(path)


def clean_path(path: str) -> str:
    """Strip Dynamo's source prefixes: ``L['self'].model.layers.0`` -> ``model.layers.0``."""
    path = re.sub(r"^(L|G)\[[^\]]*\](\[[^\]]*\])*\.?", "", path)
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    path = re.sub(r"(^|\.)__self__(?=\.|$)", "", path)      # a compiled bound method's module
    return path.strip(".").replace("..", ".")


# ---------------------------------------------------------------------------- adding nodes

_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


class Emitter:
    """Adds nodes to a graph before an anchor, with ``meta['val']`` computed on fake tensors
    and the anchor's module stack (so sites keep their module path).

        em = Emitter(gm.graph, anchor)
        kt = em.method("transpose", k, -2, -1)        # [B, H, D, N]
        s = em.call(torch.matmul, q, kt)              # [B, H, N, N]
    """

    def __init__(self, graph: fx.Graph, anchor: fx.Node, reads_as=None):
        self.graph, self.anchor = graph, anchor
        self.meta = {k: anchor.meta[k] for k in _COPIED_META if k in anchor.meta}
        if reads_as is not None:
            # the new nodes read their inputs as the captured program did at ``reads_as`` (a
            # node, or {input: node}; checked against in-place writes by passes.mutation.check)
            self.meta[READS_AS] = reads_as

    def _add(self, op: str, target, args, kwargs):
        from torch._subclasses.fake_tensor import FakeTensor
        inputs: list = []
        fx.node.map_arg((args, kwargs), inputs.append)
        # the mode of the recorded values (the tracing context may hold another one)
        mode = next((v.fake_mode for v in map(val, inputs) if isinstance(v, FakeTensor)), None)
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, tuple(args), dict(kwargs))
        node.meta.update(self.meta)
        a, kw = fx.node.map_arg((args, kwargs),
                                lambda n: n.meta.get("val", n.meta.get("example_value")))
        if mode is not None:
            with mode:
                fn = getattr(a[0], target) if op == "call_method" else target
                out = fn(*a[1:], **kw) if op == "call_method" else fn(*a, **kw)
            node.meta["val"] = out
        return node

    def call(self, fn, *args, **kwargs) -> fx.Node:
        return self._add("call_function", fn, args, kwargs)

    def method(self, name: str, *args, **kwargs) -> fx.Node:
        return self._add("call_method", name, args, kwargs)


def runtime_scalar(x: Any) -> bool:
    """A node holding a Python number known only at run time (a SymFloat/SymInt: Dynamo lifts
    a float attribute that changed between compilations, e.g. ``self.scaling``, to one)."""
    if not isinstance(x, fx.Node):
        return False
    v = x.meta.get("val", x.meta.get("example_value"))
    return isinstance(v, (torch.SymFloat, torch.SymInt))


def sym_expr(x: Any):
    """sympy expression of an int / SymInt / fx node holding one (None otherwise)."""
    import sympy
    if isinstance(x, fx.Node):
        x = x.meta.get("val", x.meta.get("example_value"))
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return None


def const_scalar(x: Any) -> Optional[float]:
    """A compile-time constant number: a Python number, or a node that builds a one-element
    tensor from literals (``torch.full([], 8.0)``, ``torch.tensor(0.125)``, ``torch.ones(())``)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, fx.Node) and x.op in ("call_function", "call_method") and label(x) == "full":
        v = val(x)
        if v is not None and v.numel() == 1:
            return const_scalar(fill_value(x))
    return None


_FILLS = {torch.ones: 1, torch.ones_like: 1, torch.zeros: 0, torch.zeros_like: 0,
          "new_ones": 1, "new_zeros": 0}
_FILL_ARG = {torch.full: 1, torch.full_like: 1, "new_full": 2, torch.tensor: 0,
             torch.scalar_tensor: 0}


def fill_value(n: fx.Node):
    """The value every element of a constant-building node (label "full") has."""
    if n.target in _FILLS:
        return _FILLS[n.target]
    i = _FILL_ARG.get(n.target)
    return arg(n, i, "fill_value") if i is not None else None
