"""Canonical op labels over fx nodes and the networkx view of a graph.

Dynamo, ``torch.export`` and ``symbolic_trace`` spell one operation many ways
(``torch.matmul`` / ``operator.matmul`` / ``Tensor.matmul``); discovery works on the
canonical label instead of the spelling.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

_FUNCTIONS: dict[Any, str] = {
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
    torch.softmax: "softmax", F.softmax: "softmax", torch.Tensor.softmax: "softmax",
    torch._C._nn.scaled_dot_product_attention: "sdpa",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    operator.add: "add", torch.add: "add",
    F.dropout: "dropout", torch.dropout: "dropout",
    torch.masked_fill: "masked_fill", torch.where: "where",
    torch.transpose: "transpose", torch.permute: "permute",
    operator.getitem: "getitem", torch.unsqueeze: "unsqueeze",
    torch.reshape: "reshape", torch.cat: "cat",
}
if hasattr(F, "scaled_dot_product_attention"):
    _FUNCTIONS[F.scaled_dot_product_attention] = "sdpa"

_METHODS = {
    "matmul": "matmul", "bmm": "matmul", "softmax": "softmax", "transpose": "transpose",
    "permute": "permute", "to": "cast", "float": "cast", "half": "cast", "bfloat16": "cast",
    "type": "cast", "type_as": "cast", "contiguous": "identity", "clone": "identity",
    "masked_fill": "masked_fill", "mul": "mul", "div": "div", "add": "add",
    "expand": "expand", "reshape": "reshape", "view": "reshape", "unsqueeze": "unsqueeze",
    "repeat_interleave": "repeat_interleave",
}


def label(node: fx.Node) -> str:
    """Canonical label of a node: 'matmul', 'softmax', 'sdpa', 'mul', ... or 'other:<name>'."""
    if node.op == "call_function":
        lab = _FUNCTIONS.get(node.target)
        if lab is None and getattr(node.target, "__name__", "") == "_safe_softmax":
            lab = "softmax"
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
    import re
    path = re.sub(r"^(L|G)\[[^\]]*\](\[[^\]]*\])*\.?", "", path)
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.strip(".").replace("..", ".")
