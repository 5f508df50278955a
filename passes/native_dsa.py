"""Recognise DeepSeek Sparse Attention that a model computes itself, and MLA's decompression.

DeepSeek-V3.2 (``DeepseekV32Attention``) and GLM-MoE-DSA (``GlmMoeDsaAttention``) in
transformers 5.x select their keys in their own code; the captured graph of one layer reads::

    q_I    [B, S, H_I, d_I]   indexer queries (wq_b of the query latent, the indexer's RoPE)
    k_I    [B, T, d_I]        indexer keys (LayerNorm(wk x), RoPE; the cache's update_indexer)
    w      [B, S, H_I] fp32   weights_proj(x) * H_I**-0.5
    s      = relu(matmul(q_I.float(), k_I.mT.float().unsqueeze(1)) * c)      [B, S, H_I, T]
    I      = matmul(w.unsqueeze(-2), s).squeeze(-2)                            [B, S, T]
    I      = I + mask3d            (float mask)  |  I.masked_fill(~mask3d, -inf)  (bool mask)
    idx    = I.topk(K, dim=-1).indices.to(int32)
    drop   = ones([B, S, T], bool).scatter(-1, idx.long(), False).unsqueeze(1)
    mask   = base.masked_fill(drop, finfo.min)   |   base & ~drop
    out    = attention(q, k, v, mask)

``recognize`` reads that chain backwards from the site's one mask tensor and returns a
``NativeChain`` naming q_I, k_I, w, c, K, the mask the scores read and the base mask; the
rewrite (``passes.rewrite``) then runs the indexer and its top-k as the site's score/select and
attends over the selected keys only, with no ``[B, S, T]`` tensor on the kernel path.

``mla_latent`` recognises MLA's decompression (DeepSeek-V2/V3/V3.2, GLM-MoE-DSA,
``expand_kv``)::

    kv     = linear(c_kv, W_kvb).view(B, T, H, nope + dv).transpose(1, 2)
    k_nope, v = kv.split([nope, dv], dim=-1)
    k      = kv.new_empty(B, H, T, nope + rope); k[..., :nope].copy_(k_nope)
             k[..., nope:].copy_(k_rope.expand(-1, H, -1, -1))
    q      = cat((q_nope, q_rope), dim=-1)

so that the rewrite can run the absorbed form: ``q_nope @ W_UK`` attends to the latent rows
``[c_kv, k_rope]`` shared by every head, and the output is multiplied by ``W_UV``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from passes.graph import arg, const_scalar, fill_value, label, sym_expr, val

_MASKED = -1e30


@dataclass
class NativeChain:
    """The native DSA chain of one site (see the module docstring)."""

    q_i: fx.Node            # [B, S, H_I, d_I]
    k_i: fx.Node            # [B, T, d_I]
    w: fx.Node              # [B, S, H_I]
    scale: float            # c
    topk: int               # K
    mask3d: Optional[fx.Node]   # what the index scores read (None: no mask)
    mask_kind: str          # "add" | "keep" | ""
    base: Optional[fx.Node]     # the attention's mask without the index mask
    causal: Optional[str] = None    # base proved causal (its alignment); None: not proved
    all_visible: bool = False       # base proved to keep every pair (a decode step)
    note: str = ""


@dataclass
class MLALatent:
    """MLA's decompression feeding a site's k and v (see the module docstring)."""

    latent: fx.Node         # c_kv [B, 1, T, r] (the cache's keys when it has one)
    rope_k: fx.Node         # k_rope [B, 1, T, d_r]
    weight: fx.Node         # W_kvb [H * (nope + dv), r]
    q_nope: fx.Node         # [B, H, S, nope]
    q_rope: fx.Node         # [B, H, S, d_r]
    heads: int
    nope: int
    dv: int


def _strip(n, labels=("cast", "identity")):
    while isinstance(n, fx.Node) and label(n) in labels:
        n = n.args[0]
    return n


def _is(n, lab: str) -> bool:
    return isinstance(n, fx.Node) and label(n) == lab


def _other(n) -> str:
    return label(n) if isinstance(n, fx.Node) else type(n).__name__


def _index_mask(n) -> Optional[fx.Node]:
    """``ones(bool).scatter(-1, idx, False).unsqueeze(1)`` -> idx (the top-k node's indices)."""
    if not _is(n, "unsqueeze") or arg(n, 1, "dim") != 1:
        return None
    sc = n.args[0]
    if not (isinstance(sc, fx.Node) and label(sc) == "other:scatter"):
        return None
    base, dim = sc.args[0], arg(sc, 1, "dim")
    src = arg(sc, 3, "value", arg(sc, 3, "src"))
    if dim != -1 or src is not False or not _is(base, "full"):
        return None
    vb = val(base)
    if vb is None or vb.dtype != torch.bool or fill_value(base) not in (1, True):
        return None
    return arg(sc, 2, "index")


def _topk(idx) -> Optional[tuple]:
    """``scores.topk(K, dim=-1).indices`` (any casts) -> (scores node, K)."""
    idx = _strip(idx)
    if not (_is(idx, "getitem") and idx.args[1] == 1):
        if not (isinstance(idx, fx.Node) and idx.op == "call_function" and idx.target is getattr
                and idx.args[1] == "indices"):
            return None
    tk = idx.args[0]
    if not (isinstance(tk, fx.Node) and label(tk) in ("other:topk",)):
        return None
    k = _width(arg(tk, 1, "k"), tk.args[0])
    dim = arg(tk, 2, "dim", -1)
    largest = arg(tk, 3, "largest", True)
    if k is None or dim not in (-1,) or largest is not True:
        return None
    return tk.args[0], k


def _width(k, scores) -> Optional[int]:
    """The top-k width: an int, or ``min(K, T)`` of the scores' key length T (the models'
    ``min(index_topk, index_scores.shape[-1])``, a ``sym_min`` node once Dynamo traces the
    length symbolically) -> K; the runtime takes ``min(K, T)`` again."""
    if isinstance(k, int) and not isinstance(k, bool):
        return k
    if not (isinstance(k, fx.Node) and k.op == "call_function"
            and k.target in (torch.sym_min, min) and len(k.args) == 2):
        return None
    ints = [a for a in k.args if isinstance(a, int) and not isinstance(a, bool)]
    other = [a for a in k.args if isinstance(a, fx.Node)]
    vs = val(scores)
    if len(ints) != 1 or len(other) != 1 or vs is None:
        return None
    t = sym_expr(other[0])
    return ints[0] if t is not None and t == sym_expr(vs.shape[-1]) else None


def _masked_scores(s) -> Optional[tuple]:
    """``I + mask3d`` or ``I.masked_fill(~mask3d, -inf)`` -> (I, mask3d, kind)."""
    if _is(s, "add") and len(s.args) == 2:
        a, b = s.args
        va, vb = val(a), val(b)
        if va is not None and vb is not None and va.dim() == 3 and vb.dim() == 3:
            return a, b, "add"
    if _is(s, "masked_fill"):
        base, m, v = s.args[0], arg(s, 1, "mask"), arg(s, 2, "value")
        if _is(m, "not") and isinstance(v, (int, float)) and v <= _MASKED:
            return base, m.args[0], "keep"
    return s, None, ""


def _index_scores(s) -> Optional[tuple]:
    """``matmul(w.unsqueeze(-2), relu(matmul(q_I, k_I.mT.unsqueeze(1)) * c)).squeeze(-2)`` ->
    (q_I, k_I, w, c)."""
    if not (_is(s, "squeeze") and arg(s, 1, "dim") in (-2, 2)):
        return None
    mm = s.args[0]
    if not _is(mm, "matmul"):
        return None
    wu, r = mm.args[0], mm.args[1]
    if not (_is(wu, "unsqueeze") and arg(wu, 1, "dim") in (-2, 2)):
        return None
    w = wu.args[0]
    if not (isinstance(r, fx.Node) and label(r) in ("other:relu",)):
        return None
    sc = r.args[0]
    scale = 1.0
    if _is(sc, "mul"):
        a, b = sc.args
        c = const_scalar(b) if const_scalar(b) is not None else const_scalar(a)
        if c is None or c <= 0:
            return None
        sc = a if const_scalar(b) is not None else b
        scale = c
    if not _is(sc, "matmul"):
        return None
    qn, kt = sc.args
    qn = _strip(qn)
    kt = _strip(kt)
    if not (_is(kt, "unsqueeze") and arg(kt, 1, "dim") == 1):
        return None
    kt = _strip(kt.args[0])
    if not (_is(kt, "transpose") and sorted(a % 3 for a in kt.args[1:3]) == [1, 2]):
        return None
    k_i = kt.args[0]
    vq, vk, vw = val(qn), val(k_i), val(w)
    if vq is None or vk is None or vw is None or vq.dim() != 4 or vk.dim() != 3 or vw.dim() != 3:
        return None
    if vw.dtype != torch.float32 or vq.shape[-1] != vk.shape[-1] or vw.shape[-1] != vq.shape[2]:
        return None
    return qn, k_i, w, scale


def looks_native(mask) -> bool:
    """Whether ``mask`` hides what a scattered index mask says (the end of a DSA chain), so
    that a chain ``recognize`` rejects is worth reporting."""
    if _is(mask, "masked_fill"):
        return _index_mask(arg(mask, 1, "mask")) is not None
    if _is(mask, "and"):
        return any(_is(x, "not") and _index_mask(x.args[0]) is not None for x in mask.args[:2])
    return False


def recognize(mask: fx.Node) -> tuple[Optional[NativeChain], str]:
    """The native DSA chain ending in the attention mask ``mask``, or (None, why not)."""
    if _is(mask, "masked_fill"):
        base, drop, fill = mask.args[0], arg(mask, 1, "mask"), arg(mask, 2, "value")
        if not (isinstance(fill, (int, float)) and fill <= _MASKED):
            return None, "mask filled with a finite value"
    elif _is(mask, "and"):
        a, b = mask.args[:2]
        base, drop = (a, b.args[0]) if _is(b, "not") else (b, a.args[0]) if _is(a, "not") else (
            None, None)
        if drop is None:
            return None, f"mask {mask.name} is a conjunction without a negated index mask"
    else:
        return None, f"mask {mask.name} is {_other(mask)}, not masked_fill / and"
    idx = _index_mask(drop)
    if idx is None:
        return None, f"{_other(drop)} is not ones.scatter(-1, top-k, False).unsqueeze(1)"
    tk = _topk(idx)
    if tk is None:
        return None, "the scattered indices are not topk(..., dim=-1).indices"
    scores, topk = tk
    scores, mask3d, kind = _masked_scores(scores)
    got = _index_scores(scores)
    if got is None:
        return None, (f"the top-k reads {_other(scores)}, not the lightning indexer's "
                      "weighted ReLU head sum")
    q_i, k_i, w, scale = got
    return NativeChain(q_i, k_i, w, scale, topk, mask3d, kind, base), ""


def _split_of(n, i: int):
    """``split(x, sizes, dim=-1)[i]`` -> (x, sizes)."""
    if not (_is(n, "getitem") and n.args[1] == i):
        return None
    sp = n.args[0]
    if not (isinstance(sp, fx.Node) and "split" in str(sp.target)):
        return None
    sizes, dim = arg(sp, 1, "split_size_or_sections"), arg(sp, 2, "dim", 0)
    if not isinstance(sizes, (list, tuple)) or len(sizes) != 2 or dim != -1:
        return None
    return sp.args[0], tuple(sizes)


def mla_latent(q: fx.Node, k: fx.Node, v: fx.Node) -> tuple[Optional[MLALatent], str]:
    """MLA's decompression behind a site's q, k, v, or (None, why not)."""
    sv = _split_of(v, 1)
    if sv is None:
        return None, "v is not the second part of a split"
    kv, (nope, dv) = sv
    if not (_is(kv, "transpose") and sorted(kv.args[1:3]) == [1, 2]):
        return None, "the split K/V is not a [B, T, H, D] view transposed"
    view = kv.args[0]
    if not _is(view, "reshape"):
        return None, "the decompressed K/V is not a view of a projection"
    lin = view.args[0]
    if not (isinstance(lin, fx.Node) and lin.target is torch._C._nn.linear
            and arg(lin, 2, "bias") is None):
        return None, "the decompressed K/V is not a bias-free linear of the latent"
    latent, weight = lin.args[0], lin.args[1]
    vk, vl = val(k), val(latent)
    if vk is None or vl is None or vl.dim() != 4 or vl.shape[1] != 1:
        return None, "the latent is not [B, 1, T, r]"
    heads = vk.shape[1]
    # k: new_empty, its first nope features copied from the split's k_nope, the rest from an
    # expanded single-head rope key
    if not (isinstance(k, fx.Node) and k.op == "call_method" and k.target == "new_empty"):
        return None, "k is not assembled in place from k_nope and k_rope"
    nope_src = rope_src = None
    for u in k.users:
        if not (_is(u, "getitem") and isinstance(u.args[1], tuple)):
            continue
        sl = u.args[1][-1]
        if u.args[1][0] is not Ellipsis or not isinstance(sl, slice):
            continue
        for c in u.users:
            if not (isinstance(c, fx.Node) and c.op == "call_method" and c.target == "copy_"):
                continue
            if sl == slice(None, nope, None):
                nope_src = c.args[1]
            elif sl == slice(nope, None, None):
                rope_src = c.args[1]
    if nope_src is None or rope_src is None or _split_of(nope_src, 0) != (kv, (nope, dv)):
        return None, "k's parts are not k_nope of the same split and a rope key"
    if not _is(rope_src, "expand"):
        return None, "k's rope part is not one head expanded"
    rope_k = rope_src.args[0]
    vr = val(rope_k)
    if vr is None or vr.dim() != 4 or vr.shape[1] != 1:
        return None, "the rope key is not [B, 1, T, d_r]"
    if not (isinstance(q, fx.Node) and q.target is torch.cat):
        return None, "q is not cat((q_nope, q_rope), -1)"
    parts, dim = q.args[0], arg(q, 1, "dim", 0)
    if dim != -1 or len(parts) != 2:
        return None, "q is not cat((q_nope, q_rope), -1)"
    q_nope, q_rope = parts
    vqn, vqr = val(q_nope), val(q_rope)
    if vqn is None or vqr is None or vqn.shape[-1] != nope or vqr.shape[-1] != vr.shape[-1]:
        return None, "q's parts do not have k's nope / rope sizes"
    vw = val(weight)
    if vw is None or tuple(vw.shape) != (heads * (nope + dv), vl.shape[-1]):
        return None, "the projection's weight is not [H * (nope + dv), r]"
    return MLALatent(latent, rope_k, weight, q_nope, q_rope, heads, nope, dv), ""


