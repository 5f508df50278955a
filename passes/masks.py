"""Mask settlement: what each modifier of a site is, and which masks become the kernels' rules.

Each modifier tensor is evaluated symbolically (``passes.index_eval.IndexEval``); a mask proved
to be exactly causal (or causal with a sliding window, or that and the key padding of a
``[B, N]`` graph input) is dropped from the modifiers and set as ``Match.causal`` /
``Match.window`` / ``Match.kv_valid`` instead (``settle_masks``). Anything not proved stays a
modifier tensor, with a note saying why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from passes.graph import label, sym_expr, val
from passes.index_eval import IndexEval, IndexFn, Opaque, to_bool
from passes.patterns import Match

MASKED = -1e30          # a modifier value at or below this excludes the pair (HF uses finfo.min)


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


def prove_visibility(kind: str, node: fx.Node, ev: IndexEval, n_q, n_kv,
                     reader=None) -> tuple[Optional[str], bool, str]:
    """What a mask tensor of kind "add" / "keep" is, for a rule that replaces it: (causal
    alignment or None, keeps every pair, note). Anything else (padding, a window, unproved)
    gives (None, False, why)."""
    f = _mask_fact((kind,), node, (), ev, n_q, n_kv, reader)
    if f.what == "causal" and f.pad is None:
        return f.align, False, f.note
    return None, f.what == "noop", f.note


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
