"""Mutation in captured graphs: which nodes write tensors in place, which share storage, and
the checks and clean-up that keep those writes where the program put them.

Real model code writes tensors in place: Hugging Face's MLA builds K with
``k = new_empty(..); k[..., :d].copy_(k_nope); k[..., d:].copy_(k_rot)`` (DeepSeek-V3/V3.2,
GLM-MoE-DSA), static KV caches are filled with ``index_copy_``, masks are applied with
``masked_fill_`` and old mask builders scale with ``*=``. A write's result is often unused
(``copy_`` as a statement), so a pass that treats fx nodes as pure values (torch.fx's
``eliminate_dead_code`` considers every ``call_method`` pure) would drop it and the attention
would read uninitialised memory.

``MutationInfo(graph)`` answers, for the graph as it is now:

* ``writes`` — nodes that write a tensor in place, in program order; ``written(w)`` the input
  nodes each writes (``x.copy_(y)``, ``x[i] = y`` (``operator.setitem``), ``x += y``
  (``operator.iadd``), any ``Tensor`` method named ``*_``, ``torch.*_`` functions, ``F.relu(x,
  inplace=True)``, ``out=`` arguments, aten overloads whose schema marks an argument written);
* ``group(n)`` — the storage group of a tensor node: nodes whose values may share memory
  (views, slices, ``reshape``/``contiguous``/``to`` that may return their input, an in-place
  op's result); ``external(g)`` when the group holds a graph input, buffer or attribute;
* ``readers(g)`` — nodes that read the data of a group (a view is not a read; its user is).

``eliminate_dead_code`` removes unused nodes but keeps every write whose storage is observed
(read later, returned, or an input/buffer of the graph). ``thread_writes`` makes later users
of a tensor written in place read the write's result (the same tensor object, so the program
is unchanged) so that discovery sees in-place masks. ``snapshot`` and ``check`` implement the
verifier's rule: no write removed while its storage is still observed, no write added, and
no read moved across a write to the storage it reads.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

# operator.i* on a tensor left operand write it in place and return it
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.imatmul}
# Tensor methods ending in "_" that do not write the tensor's data
_NOT_DATA_WRITES = {"requires_grad_", "retain_grad_", "share_memory_", "record_stream_",
                    "is_set_to_"}
# results that are (or may be) a view of, or the very object of, their first argument
# (PyTorch "Tensor Views" plus ops that may return their input unchanged)
_VIEW_NAMES = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "ravel", "expand",
    "expand_as", "transpose", "permute", "movedim", "moveaxis", "swapaxes", "swapdims", "t",
    "adjoint", "squeeze", "unsqueeze", "narrow", "select", "diagonal", "as_strided", "unfold",
    "split", "split_with_sizes", "tensor_split", "hsplit", "vsplit", "dsplit", "chunk",
    "unbind", "real", "imag", "view_as_real", "view_as_complex", "detach", "detach_",
    "contiguous", "to", "type", "type_as", "float", "double", "half", "bfloat16", "int",
    "long", "short", "bool", "byte", "char", "cpu", "cuda", "align_to", "alias",
    "requires_grad_", "data", "T", "mT", "H", "mH", "__getitem__",
}
_VIEW_FUNCTIONS = {operator.getitem, torch.Tensor.__getitem__}
# the operator module's functions: in place only as listed above (``and_``, ``or_``, ``not_``
# name the pure operators)
_OPERATOR_FUNCTIONS = {id(f): True for f in vars(operator).values() if callable(f)}


def _name(target) -> str:
    return getattr(target, "__name__", "") or str(target)


def _tensor_node(x) -> bool:
    if not isinstance(x, fx.Node):
        return False
    v = x.meta.get("val", x.meta.get("example_value"))
    if v is None:                      # no recorded value: assume it may be a tensor
        return x.op not in ("output",)
    return isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and any(
        isinstance(t, torch.Tensor) for t in v))


def _nodes_in(x) -> list:
    out: list = []
    fx.node.map_arg(x, out.append)
    return out


def _schema_writes(node: fx.Node) -> Optional[list]:
    """Arguments an aten/custom OpOverload's schema marks as written (None: not an overload)."""
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    written = []
    for i, a in enumerate(schema.arguments):
        info = a.alias_info
        if info is None or not info.is_write:
            continue
        x = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
        written += [n for n in _nodes_in(x)]
    return written


_SIGNATURES: dict = {}


def _inplace_signature(target):
    """The signature of ``target`` if it has an ``inplace`` parameter, else None (cached)."""
    try:
        return _SIGNATURES[target]
    except (KeyError, TypeError):
        pass
    try:
        sig = inspect.signature(target)
        sig = sig if "inplace" in sig.parameters else None
    except (TypeError, ValueError):
        sig = None
    try:
        _SIGNATURES[target] = sig
    except TypeError:                          # unhashable target
        pass
    return sig


def _inplace_kwarg(node: fx.Node) -> bool:
    """``F.relu(x, inplace=True)`` and friends (keyword or positional)."""
    if node.kwargs.get("inplace") is True:
        return True
    sig = _inplace_signature(node.target)
    if sig is None:
        return False
    try:
        bound = sig.bind_partial(*node.args, **node.kwargs)
    except TypeError:
        return False
    return bound.arguments.get("inplace") is True


def written_inputs(node: fx.Node, owner: Optional[fx.GraphModule] = None) -> list:
    """The input nodes ``node`` writes in place ([] for a pure node)."""
    out = node.kwargs.get("out") if node.op in ("call_function", "call_method") else None
    written = [n for n in _nodes_in(out)] if out is not None else []
    if node.op == "call_method":
        name = node.target
        if name == "__setitem__" or (name.endswith("_") and not name.startswith("__")
                                     and name not in _NOT_DATA_WRITES):
            written.append(node.args[0])
    elif node.op == "call_function":
        t = node.target
        schema = _schema_writes(node)
        if schema is not None:
            written += schema
        elif t is operator.setitem:
            written.append(node.args[0])
        elif t in _INPLACE_OPERATORS:
            if _tensor_node(node.args[0]):
                written.append(node.args[0])
        elif not _OPERATOR_FUNCTIONS.get(id(t)):   # operator.and_ / or_ are not in place
            name = _name(t)
            if (name.endswith("_") and not name.startswith("__") and name not in _NOT_DATA_WRITES
                    and node.args):
                written.append(node.args[0])
            elif node.args and _inplace_kwarg(node):
                written.append(node.args[0])
    elif node.op == "call_module" and owner is not None and node.args:
        try:
            mod = owner.get_submodule(node.target)
        except AttributeError:
            mod = None
        if getattr(mod, "inplace", False) is True:
            written.append(node.args[0])
    return [w for w in written if isinstance(w, fx.Node)]


def aliased_inputs(node: fx.Node) -> list:
    """Input nodes whose storage ``node``'s result may share."""
    if node.op not in ("call_function", "call_method"):
        return []
    out = node.kwargs.get("out")
    alias = [n for n in _nodes_in(out)] if out is not None else []
    name = node.target if node.op == "call_method" else _name(node.target)
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_function" and getattr(node.target, "_schema", None) is not None:
        schema = node.target._schema
        sets = set()
        for r in schema.returns:
            if r.alias_info is not None:
                sets |= set(r.alias_info.before_set)
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and set(a.alias_info.before_set) & sets:
                x = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
                alias += _nodes_in(x)
        return alias
    if first is None:
        return alias
    if node.op == "call_function" and node.target is getattr:
        if len(node.args) > 1 and node.args[1] in _VIEW_NAMES:
            alias.append(first)
        return alias
    if node.op == "call_function" and node.target in _VIEW_FUNCTIONS:
        alias.append(first)
    elif name in _VIEW_NAMES:
        alias.append(first)
    elif written_inputs(node):               # an in-place op returns the tensor it wrote
        alias += written_inputs(node)
    return alias


class MutationInfo:
    """Writes and storage groups of ``graph`` as it is now (see the module docstring)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        owner = graph.owning_module
        self.pos: dict = {}
        self._parent: dict = {}
        self._written: dict = {}
        self.writes: list = []
        for i, n in enumerate(graph.nodes):
            self.pos[n] = i
            self._parent[n] = n
            w = written_inputs(n, owner)
            if w:
                self._written[n] = w
                self.writes.append(n)
            for a in aliased_inputs(n):
                self._union(n, a)
        self._members: dict = {}
        for n in graph.nodes:
            self._members.setdefault(self.group(n), []).append(n)
        self._group_writes: dict = {}
        for w in self.writes:
            for t in self._written[w]:
                g = self.group(t)
                lst = self._group_writes.setdefault(g, [])
                if w not in lst:
                    lst.append(w)

    # -- union-find over storage
    def _find(self, n):
        while self._parent[n] is not n:
            self._parent[n] = self._parent[self._parent[n]]
            n = self._parent[n]
        return n

    def _union(self, a, b) -> None:
        if b not in self._parent:
            return
        ra, rb = self._find(a), self._find(b)
        if ra is not rb:
            # the earlier node is the root: a group is named by its first member
            if self.pos.get(ra, 0) <= self.pos.get(rb, 0):
                self._parent[rb] = ra
            else:
                self._parent[ra] = rb

    # -- queries
    def group(self, n: fx.Node) -> fx.Node:
        """The storage group of ``n``, named by its first node."""
        return self._find(n)

    def members(self, g: fx.Node) -> list:
        return self._members.get(g, [])

    def written(self, w: fx.Node) -> list:
        return self._written.get(w, [])

    def is_write(self, n: fx.Node) -> bool:
        return n in self._written

    def is_view(self, n: fx.Node) -> bool:
        """Its result aliases an input and it writes nothing (creating a view reads no data)."""
        return not self.is_write(n) and bool(aliased_inputs(n))

    def group_writes(self, g: fx.Node) -> list:
        return self._group_writes.get(g, [])

    def has_writes(self, n: fx.Node) -> bool:
        return bool(self._group_writes.get(self.group(n)))

    def external(self, g: fx.Node) -> bool:
        """The storage outlives the graph: a graph input, a buffer or an attribute."""
        return any(m.op in ("placeholder", "get_attr") for m in self.members(g))

    def reads(self, n: fx.Node) -> set:
        """Groups whose data ``n`` reads. A view reads none of what it aliases (its users do),
        but does read its other tensor arguments (``x[idx]`` reads ``idx``)."""
        if n.op in ("placeholder", "get_attr"):
            return set()
        skip = set(aliased_inputs(n)) if self.is_view(n) else set()
        return {self.group(a) for a in n.all_input_nodes if a in self._parent and a not in skip}

    def readers(self, g: fx.Node) -> list:
        """Nodes reading the data of group ``g``, in order (writes to ``g`` included: they read
        before they write)."""
        out = []
        for m in self.members(g):
            for u in m.users:
                if u not in out and g in self.reads(u):
                    out.append(u)
        return sorted(out, key=self.pos.__getitem__)

    def writes_between(self, g: fx.Node, lo: int, hi: int) -> list:
        """Writes into ``g`` at positions ``lo <= pos < hi``."""
        return [w for w in self.group_writes(g) if lo <= self.pos[w] < hi]

    def foreign_writes(self, n: fx.Node) -> list:
        """Writes into ``n``'s storage that ``n``'s value does not account for: writes that are
        neither ``n`` itself nor among its ancestors. Evaluating ``n`` as a pure function of its
        inputs gives the tensor's contents at a read only if none lies before the read."""
        ws = [w for w in self.group_writes(self.group(n)) if w is not n]
        if not ws:
            return []
        anc = _closure(n.all_input_nodes, set())
        return [w for w in ws if w not in anc]


def _closure(starts, into: set) -> set:
    """``into`` plus ``starts`` and every node they depend on."""
    stack = list(starts)
    while stack:
        x = stack.pop()
        if x in into:
            continue
        into.add(x)
        stack.extend(x.all_input_nodes)
    return into


# ---------------------------------------------------------------------------- clean-up

_STATE_MODULES = ("torch._functorch", "torch._C", "torch.autograd", "torch.amp")
_STATE_WORDS = ("nesting", "_enter", "_exit", "_set_", "lazy_load")


def changes_state(n: fx.Node) -> bool:
    """A call made for its effect on PyTorch's global state, which FX's ``is_impure`` does not
    list: the vmap / grad transform levels Dynamo writes out when it inlines ``torch.vmap``
    (``_vmap_increment_nesting`` ... ``_vmap_decrement_nesting``; their results go unused, and
    without them ``_add_batch_dim`` fails at run time), grad / autocast mode switches."""
    if n.op != "call_function":
        return False
    name = getattr(n.target, "__name__", "") or ""
    mod = getattr(n.target, "__module__", "") or ""
    return mod.startswith(_STATE_MODULES) and any(w in name for w in _STATE_WORDS)


def eliminate_dead_code(gm: fx.GraphModule) -> bool:
    """``graph.eliminate_dead_code`` that keeps writes: a node stays if its value is used, if it
    has side effects (``is_impure`` or ``changes_state``), or if it writes storage that is
    observed (a graph input/buffer, or storage some surviving node reads). Returns whether
    anything was removed."""
    g = gm.graph
    info = MutationInfo(g)
    live: set = set()

    def keep(n: fx.Node) -> None:
        _closure([n], live)

    for n in g.nodes:
        if n.op in ("placeholder", "output") or changes_state(n) or (
                n.op == "call_function" and n.is_impure() and not info.is_write(n)):
            keep(n)
        elif n.op == "call_module" and n.is_impure():
            keep(n)
        elif info.is_write(n) and any(info.external(info.group(t)) for t in info.written(n)):
            keep(n)
    while True:
        observed = set()
        for n in live:
            observed |= info.reads(n) if not info.is_write(n) else {
                info.group(a) for a in n.all_input_nodes
                if a in info.pos and info.group(a) not in {info.group(t) for t in info.written(n)}}
        more = [w for w in info.writes if w not in live
                and any(info.group(t) in observed for t in info.written(w))]
        if not more:
            break
        for w in more:
            keep(w)
    dead = [n for n in g.nodes if n not in live]
    for n in reversed(dead):                   # users come later: erased first
        g.erase_node(n)
    return bool(dead)


def thread_writes(gm: fx.GraphModule, ctx=None) -> fx.GraphModule:
    """After ``y = x.op_(...)`` (which returns ``x`` itself), later users of ``x`` use ``y``:
    ``s.masked_fill_(m, v); p = s.softmax(-1)`` becomes ``p = y.softmax(-1)``. The same object
    either way, so the program is unchanged; data flow now shows the write (discovery parses
    ``masked_fill_`` like ``masked_fill`` only when it lies on the path)."""
    g = gm.graph
    info = MutationInfo(g)
    changed = False
    for w in info.writes:                       # in order: a write of a write threads on
        if w.op == "call_function" and w.target is operator.setitem:
            continue                            # returns None
        returned = aliased_inputs(w)
        written = written_inputs(w, gm)         # its arguments now (earlier writes threaded)
        if len(written) != 1 or written[0] not in returned:
            continue
        x = written[0]
        for u in list(x.users):
            if u is w or info.pos[u] < info.pos[w]:
                continue
            u.replace_input_with(x, w)
            changed = True
    if changed:
        gm.recompile()
    return gm


# ---------------------------------------------------------------------------- verifier

@dataclass
class Snapshot:
    """The writes of a graph before any pass ran, to check later graphs against."""

    pos: dict = field(default_factory=dict)           # node -> position
    writes: list = field(default_factory=list)        # write nodes, in order
    group_of: dict = field(default_factory=dict)      # node -> group name (its first node)
    members: dict = field(default_factory=dict)       # group name -> nodes


def snapshot(graph: fx.Graph) -> Snapshot:
    info = MutationInfo(graph)
    snap = Snapshot(pos=dict(info.pos), writes=list(info.writes))
    for n in graph.nodes:
        g = info.group(n)
        snap.group_of[n] = g
        snap.members.setdefault(g, []).append(n)
    return snap


READS_AS = "planner_reads_as"     # node.meta key: the original node a new node's reads stand for


def _anchor(r: fx.Node, info: MutationInfo, snap: "Snapshot", g, default):
    """The original node whose reads a new node ``r`` stands for, for group ``g``:
    ``meta[READS_AS]`` is a node, or ``{input: node}`` (the earliest node among the inputs in
    ``g``); else ``default`` (the next original node: a node inserted before it reads there)."""
    how = r.meta.get(READS_AS)
    if isinstance(how, fx.Node):
        return how
    if isinstance(how, dict):
        cands = [a for x, a in how.items() if x in info.pos and info.group(x) is g]
        if cands:
            return min(cands, key=lambda a: snap.pos.get(a, len(snap.pos)))
    return default


def check(graph: fx.Graph, snap: Snapshot) -> Optional[str]:
    """None if ``graph`` keeps ``snap``'s writes and their order relative to every read; else
    what is wrong."""
    info = MutationInfo(graph)
    now = info.pos
    for w in snap.writes:
        if w in now:
            continue
        alive = [m for m in snap.members.get(snap.group_of[w], []) if m in now]
        if alive:
            return (f"the in-place write {w.name} ({w.op} {_name(w.target)}) was removed while "
                    f"its tensor ({alive[0].name}) is still used")
    for w in info.writes:
        if w not in snap.pos:
            return f"a pass added the in-place write {w.format_node()}"
    nxt: dict = {}
    pending = []
    for n in graph.nodes:                     # each new node's next original node
        if n in snap.pos:
            for p in pending:
                nxt[p] = n
            pending = []
        else:
            pending.append(n)
    for ws in info._group_writes.values():
        for i, a in enumerate(ws):
            for b in ws[i + 1:]:
                if (now[a] < now[b]) != (snap.pos[a] < snap.pos[b]):
                    return f"the in-place writes {a.name} and {b.name} were reordered"
    for w in info.writes:
        for t in info.written(w):
            for r in info.readers(info.group(t)):
                if r is w:
                    continue
                anchor = r if r in snap.pos else _anchor(r, info, snap, info.group(t),
                                                          nxt.get(r))
                if anchor is None or anchor not in snap.pos:
                    continue
                before_now = now[r] < now[w]
                before_then = anchor is w or snap.pos[anchor] < snap.pos[w]
                if before_now != before_then:
                    side = "before" if before_then else "after"
                    return (f"{r.format_node()} reads {t.name} {'before' if before_now else 'after'} "
                            f"the in-place write {w.format_node()}, which the captured program "
                            f"ordered {side} it")
    return None
