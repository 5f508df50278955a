"""The pattern functions: one candidate of the graph -> a ``Match`` (or ``NoMatch``, why not).

``match_sdpa`` reads a scaled_dot_product_attention call, ``match_matmul_softmax`` a
``q @ k^T -> softmax -> @ v`` chain in any of its spellings, ``match_fused`` a fused attention
op that stays dense. The operand helpers strip what models put around q, k and v (transposes,
constant scales, ``repeat_kv``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from passes.graph import (arg, const_scalar, label, rank_of, runtime_scalar, shape_of, sym_expr,
                          val)
from passes.mutation import written_inputs
from passes.scores import NoMatch, Scores, chain_to, score_path, walk_probs, walk_scores


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
    native: Optional[object] = None    # the model's own DSA chain (passes.native_dsa.NativeChain)
    native_note: str = ""              # a DSA index mask that was not recognised: why


# ---------------------------------------------------------------------------- operands

def _is_last_two_transpose(n: fx.Node) -> bool:
    lab = label(n)
    rank = rank_of(n.args[0]) if n.args else None
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
        if isinstance(n, int) and n > 1 and dim in (1, -3) and rank_of(base) == 4:
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
    sb, sx = shape_of(base), shape_of(x)
    if len(sb) != 4 or len(sx) != 4 or sx[2:] != sb[2:] or not (sx[1] / sb[1]).is_integer:
        return x, 1
    return base, int(sx[1] / sb[1])


def _gqa(q: fx.Node, k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node, int]:
    """Un-repeat keys/values; keys with one head broadcast over all query heads (Falcon MQA)."""
    kb, gk = strip_repeat_kv(k)
    vb, gv = strip_repeat_kv(v)
    if gk == gv and gk > 1:
        return kb, vb, gk
    sq, sk, sv = shape_of(q), shape_of(k), shape_of(v)
    if len(sq) == len(sk) == len(sv) == 4 and sk[1] == 1 and sv[1] == 1 and sq[1] != 1:
        return k, v, int(sq[1])
    return k, v, 1


def _check_4d(q, k, v, group: int) -> Optional[str]:
    for nm, n in (("q", q), ("k", k), ("v", v)):
        r = rank_of(n)
        if r != 4:
            return f"{nm} has rank {r} (expected [B, H, N, D] or [B*H, N, D])"
    sq, sk = shape_of(q), shape_of(k)
    if sq[0] != sk[0]:
        return f"q batch {sq[0]} and k batch {sk[0]} differ (broadcast batch)"
    if sq[1] != sk[1] * group:
        return f"q heads {sq[1]} != k heads {sk[1]} x group {group}"
    return None


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


def _pack_mods(m: Match, st: Scores) -> None:
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
    s_chain = score_path(sm.args[0], mm1)
    st = walk_scores(s_chain, mm1)
    p_chain = walk_probs(sm, mm2, sink=st.sink is not None)
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
    rank = rank_of(q)
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
    lse = _lse_sink(m, sm, mm2) if rank == 4 else []
    vo, vq = val(m.out), val(q)
    if vo is not None and vq is not None and vo.dtype != vq.dtype:      # e.g. fp32 p @ v.float()
        m.out_fix = tuple(m.out_fix) + (("to", vo.dtype),)
    inside = set(s_chain + p_chain + st.extra + [sm, mm2] + lse)
    for n in [mm1, sm] + s_chain + p_chain:
        others = [u for u in n.users if u not in inside]
        if others:
            m.fallback = (f"attention weights ({n.name}) are also used by "
                          f"{', '.join(u.name for u in others)}; they would have to be "
                          f"materialised, so the site stays dense")
            break
    return m


def _lse_sink(m: Match, sm: fx.Node, mm2: fx.Node) -> list:
    """A learned sink applied after attention (Granite-SWA): ``lse = logsumexp(s, -1)`` of the
    softmax's input and ``o = (softmax(s) @ v) * sigmoid(lse - sink.view(1, -1, 1))
    .unsqueeze(-1)``, casts allowed between. Since sigmoid(lse - c) = Z / (Z + e^c) with
    Z = sum(e^s), that is softmax over s with one more logit ``sink_h`` in its denominator: the
    GPT-OSS sink. Sets ``m.sink`` (the [H] tensor) and ``m.out`` (the product) and returns the
    chain's nodes; returns [] (``m`` unchanged) where the scores feed no such chain."""
    s = sm.args[0]
    lses = [u for u in s.users if label(u) == "logsumexp"]
    if m.sink is not None or len(lses) != 1 or len(mm2.users) != 1:
        return []
    lse, rank = lses[0], rank_of(s)
    dim = arg(lse, 1, "dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if not isinstance(dim, int) or dim % rank != rank - 1 or arg(lse, 2, "keepdim", False):
        return []

    def next_of(n, skip=("cast",)):
        while n is not None and len(n.users) == 1:
            u = next(iter(n.users))
            if label(u) not in skip:
                return u
            chain.append(u)
            n = u
        return None

    chain = [lse]
    sub = next_of(lse, ())
    if sub is None or label(sub) != "sub" or sub.args[0] is not lse:
        return []
    col = sub.args[1]
    base = col
    while isinstance(base, fx.Node) and label(base) in ("reshape", "cast", "identity"):
        base = base.args[0]
    sc, scol = shape_of(s), shape_of(col)
    if (not isinstance(base, fx.Node) or rank_of(base) != 1 or shape_of(base)[0] != sc[1]
            or scol is None or len(scol) != 3 or scol[0] != 1 or scol[2] != 1):
        return []
    chain += [sub] + chain_to(col, base)
    sig = next_of(sub)
    if sig is None or label(sig) != "sigmoid":
        return []
    chain.append(sig)
    uns = next_of(sig)
    if uns is None or label(uns) != "unsqueeze" or arg(uns, 1, "dim") not in (-1, rank - 1):
        return []
    chain.append(uns)
    mul = next_of(uns)
    if mul is None or label(mul) != "mul" or set(mul.args[:2]) != {mm2, chain[-1]}:
        return []
    m.sink, m.out = base, mul
    m.pattern += "+lse_sink"
    return chain + [mm2]


def _layout_3d(m: Match, st: Scores) -> None:
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
        st_ = shape_of(t)
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
