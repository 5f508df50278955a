"""Canonicalisation: rewrite spellings that hide attention into the plain ops discovery reads.

    einsum("bqhd,bkhd->bhqk", q, k)    ->  q.permute(..) @ k.permute(..).transpose(-2, -1)
    baddbmm(bias, q, kT, alpha=a)      ->  (q @ kT) * a + bias
    F.multi_head_attention_forward     ->  linear / views / F.scaled_dot_product_attention / linear
    torch._transformer_encoder_layer_fwd (nn.TransformerEncoderLayer fast path)
                                       ->  the layer's ops around F.scaled_dot_product_attention

Each rewrite is exact up to float rounding and leaves the node alone when its arguments fall
outside what it reproduces; a fused op left alone carries ``meta['planner_fused_reason']`` so
discovery reports it as a dense site with that reason.
"""
from __future__ import annotations

import operator
import string

import torch
import torch.fx as fx
import torch.nn.functional as F

from passes.graph import Emitter, arg, label, val


def canonicalize(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    rules = {"einsum": einsum_to_matmul, "baddbmm": baddbmm_to_matmul,
             "mha": open_multi_head_attention, "encoder_layer": open_encoder_layer}
    changed = False
    for n in list(gm.graph.nodes):
        rule = rules.get(label(n))
        if rule is not None:
            changed |= bool(rule(gm.graph, n))
    if changed:
        gm.recompile()
    return gm


def _replace(old: fx.Node, new: fx.Node) -> bool:
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)
    return True


# ---------------------------------------------------------------------------- einsum

def _expand_ellipsis(spec: str, rank: int, letters: str) -> str:
    if "..." not in spec:
        return spec
    n = rank - (len(spec) - 3)
    return spec.replace("...", letters[len(letters) - n:] if n else "")


def parse_einsum(eq: str, ranks: list) -> tuple[list, str] | None:
    """'bhqd,bhkd->bhqk' -> (['bhqd', 'bhkd'], 'bhqk'), ellipses expanded."""
    eq = eq.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != len(ranks):
        return None
    spare = "".join(c for c in string.ascii_uppercase if c not in eq)
    n_ell = max([r - (len(s) - 3) for s, r in zip(ins, ranks) if "..." in s] or [0])
    ell = spare[:n_ell]
    ins = [_expand_ellipsis(s, r, ell) for s, r in zip(ins, ranks)]
    if not arrow:
        once = sorted(c for c in set("".join(ins)) if "".join(ins).count(c) == 1 and c not in ell)
        out = ell + "".join(once)
    else:
        out = out.replace("...", ell)
    return ins, out


def einsum_to_matmul(g: fx.Graph, n: fx.Node) -> bool:
    """Two-operand einsum with one contracted, one free index per operand and shared batch
    indices, in any layout.

    Seen in timm/CLIP/Stable-Diffusion attention (``einsum('b i d, b j d -> b i j')``), the
    Perceiver and hand-written BQHD code (``einsum('bqhd,bkhd->bhqk')``, ``'bhqk,bkhd->bqhd'``).
    The right operand becomes ``[..., N, D].transpose(-2, -1)`` when its contracted index is
    last (a key), else ``[..., N, D]`` (a value).
    """
    eq, ops = n.args[0], list(n.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or len(ops) != 2 or not all(isinstance(o, fx.Node) for o in ops):
        return False
    vals = [val(o) for o in ops]
    if any(v is None for v in vals):
        return False
    parsed = parse_einsum(eq, [v.dim() for v in vals])
    if parsed is None:
        return False
    (a, b), out = parsed
    if any(len(set(s)) != len(s) for s in (a, b, out)):
        return False
    batch = [c for c in out if c in a and c in b]
    contr = [c for c in a if c in b and c not in out]
    fa = [c for c in out if c in a and c not in b]
    fb = [c for c in out if c in b and c not in a]
    if (len(contr), len(fa), len(fb)) != (1, 1, 1):
        return False
    if set(a) != set(batch + contr + fa) or set(b) != set(batch + contr + fb) or \
            set(out) != set(batch + fa + fb):
        return False
    em = Emitter(g, n)

    def to(x, spec, want):
        perm = [spec.index(c) for c in want]
        return x if perm == list(range(len(perm))) else em.method("permute", x, *perm)

    lhs = to(ops[0], a, batch + fa + contr)
    if b[-1] == contr[0]:
        rhs = em.method("transpose", to(ops[1], b, batch + fb + contr), -2, -1)
    else:
        rhs = to(ops[1], b, batch + contr + fb)
    res = em.call(torch.matmul, lhs, rhs)
    res = to(res, "".join(batch + fa + fb), list(out))
    return _replace(n, res)


# ---------------------------------------------------------------------------- baddbmm

def baddbmm_to_matmul(g: fx.Graph, n: fx.Node) -> bool:
    """``baddbmm(bias, q, kT, beta=b, alpha=a)`` -> ``(q @ kT) * a + bias * b``.

    Seen in Bloom (``alibi.baddbmm(batch1=q, batch2=kT, beta=1, alpha=1/sqrt(d))``) and in
    ``F.multi_head_attention_forward`` with weights (mask as the bias).
    """
    inp, b1, b2 = arg(n, 0, "input"), arg(n, 1, "batch1"), arg(n, 2, "batch2")
    beta, alpha = n.kwargs.get("beta", 1), n.kwargs.get("alpha", 1)
    if not all(isinstance(x, fx.Node) for x in (inp, b1, b2)):
        return False
    if not isinstance(beta, (int, float)) or not isinstance(alpha, (int, float)):
        return False
    em = Emitter(g, n)
    res = em.call(torch.matmul, b1, b2)
    if alpha != 1:
        res = em.call(operator.mul, res, alpha)
    if beta != 0:
        bias = inp if beta == 1 else em.call(operator.mul, inp, beta)
        res = em.call(operator.add, res, bias)
    return _replace(n, res)


# ---------------------------------------------------------------------------- fused modules

_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
             "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
             "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
             "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
             "static_k", "static_v", "average_attn_weights", "is_causal")
_MHA_DEFAULTS = {"training": True, "need_weights": True, "use_separate_proj_weight": False,
                 "average_attn_weights": True, "is_causal": False, "add_zero_attn": False}


def _fused_refusal(n: fx.Node, what: str, reason: str) -> bool:
    n.meta["planner_fused_reason"] = f"{what} stays fused: {reason}"
    return False


def _heads_view(em: Emitter, x: fx.Node, heads: int, seq_first: bool) -> fx.Node:
    """[L, N, E] (seq_first) or [N, L, E] -> [N, H, L, E/H]."""
    x = em.method("unflatten", x, -1, (heads, -1))
    return em.method("permute", x, 1, 2, 0, 3) if seq_first else em.method("transpose", x, 1, 2)


def _float_mask(em: Emitter, m: fx.Node, dtype) -> fx.Node:
    """``F._canonical_mask``: a boolean mask (True = masked) becomes 0 / -inf."""
    vm = val(m)
    if vm is not None and vm.dtype == torch.bool:
        z = em.call(torch.zeros_like, m, dtype=dtype)
        return em.method("masked_fill", z, m, float("-inf"))
    return m


def open_multi_head_attention(g: fx.Graph, n: fx.Node) -> bool:
    """``F.multi_head_attention_forward`` -> in-projection, head views, SDPA, out-projection.

    Dynamo keeps ``nn.MultiheadAttention``'s call as this one opaque node. It is opened when its
    attention weights are not used (``need_weights=False``, or unused): the SDPA branch of the
    PyTorch function, including ``key_padding_mask`` / ``attn_mask`` merging and ``is_causal``.
    """
    what = "nn.MultiheadAttention (F.multi_head_attention_forward)"
    a = {nm: arg(n, i, nm, _MHA_DEFAULTS.get(nm)) for i, nm in enumerate(_MHA_ARGS)}
    q_in, k_in, v_in = a["query"], a["key"], a["value"]
    vq, vk = val(q_in), val(k_in)
    H = a["num_heads"]
    uses = {u: u.args[1] for u in n.users if label(u) == "getitem"}
    if len(uses) != len(n.users):
        return _fused_refusal(n, what, "its result is used as a tuple")
    weight_users = [w for u, i in uses.items() if i == 1 for w in u.users]
    if weight_users:
        return _fused_refusal(n, what, f"need_weights=True and the attention weights are used "
                                       f"by {', '.join(w.name for w in weight_users)} (pass "
                                       f"need_weights=False to let the planner rewrite it)")
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        return _fused_refusal(n, what, "bias_k/bias_v/add_zero_attn append a key")
    if a["static_k"] is not None or a["static_v"] is not None:
        return _fused_refusal(n, what, "static_k/static_v are given")
    if a["training"] and a["dropout_p"]:
        return _fused_refusal(n, what, f"attention dropout p={a['dropout_p']} is active")
    if vq is None or vk is None or vq.dim() != 3 or not isinstance(H, int):
        return _fused_refusal(n, what, "unbatched input or unknown shapes")
    E = vq.shape[-1]
    if not isinstance(E, int):
        return _fused_refusal(n, what, f"embedding dim {E} is symbolic")
    em = Emitter(g, n)
    if not a["use_separate_proj_weight"]:
        w, b = a["in_proj_weight"], a["in_proj_bias"]
        if q_in is k_in and k_in is v_in:
            proj = em.method("unflatten", em.call(F.linear, q_in, w, b), -1, (3, E))
            q, k, v = (em.call(operator.getitem, proj, (Ellipsis, i, slice(None)))
                       for i in range(3))
        else:
            ws = [em.call(operator.getitem, w, slice(i * E, (i + 1) * E)) for i in range(3)]
            bs = [em.call(operator.getitem, b, slice(i * E, (i + 1) * E)) if b is not None else None
                  for i in range(3)]
            q, k, v = (em.call(F.linear, x, wi, bi)
                       for x, wi, bi in zip((q_in, k_in, v_in), ws, bs))
    else:
        b = a["in_proj_bias"]
        bs = [em.call(operator.getitem, b, slice(i * E, (i + 1) * E)) if b is not None else None
              for i in range(3)]
        q, k, v = (em.call(F.linear, x, wi, bi) for x, wi, bi in
                   zip((q_in, k_in, v_in), (a["q_proj_weight"], a["k_proj_weight"],
                                            a["v_proj_weight"]), bs))
    q, k, v = (_heads_view(em, x, H, seq_first=True) for x in (q, k, v))     # [N, H, L, D]
    kpm, am = a["key_padding_mask"], a["attn_mask"]
    causal = bool(a["is_causal"]) and kpm is None and not a["need_weights"]
    if causal:
        am = None
    elif am is not None:
        am = _float_mask(em, am, vq.dtype)
        am = em.method("unsqueeze", am, 0) if val(am).dim() == 2 else am        # [1|N*H, L, S]
    if kpm is not None:
        kpm = _float_mask(em, kpm, vq.dtype)
        kpm = em.method("unsqueeze", em.method("unsqueeze", kpm, 1), 1)         # [N, 1, 1, S]
        kpm = em.method("flatten", em.method("expand", kpm, -1, H, -1, -1), 0, 1)  # [N*H, 1, S]
        am = kpm if am is None else em.call(operator.add, am, kpm)
    if am is not None:
        am = (em.method("unsqueeze", am, 0) if val(am).shape[0] == 1
              else em.method("unflatten", am, 0, (-1, H)))                       # [N|1, H|1, L, S]
    o = em.call(F.scaled_dot_product_attention, q, k, v, attn_mask=am, dropout_p=0.0,
                is_causal=causal)
    o = em.method("flatten", em.method("permute", o, 2, 0, 1, 3), -2)             # [L, N, E]
    o = em.call(F.linear, o, a["out_proj_weight"], a["out_proj_bias"])
    for u, i in list(uses.items()):
        if i == 0:
            u.replace_all_uses_with(o)
        g.erase_node(u)
    g.erase_node(n)
    return True


_TEL_ARGS = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight",
             "proj_bias", "use_gelu", "norm_first", "eps", "norm_weight_1", "norm_bias_1",
             "norm_weight_2", "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2",
             "ffn_bias_2", "mask", "mask_type")


def open_encoder_layer(g: fx.Graph, n: fx.Node) -> bool:
    """``torch._transformer_encoder_layer_fwd`` (``nn.TransformerEncoderLayer`` in eval under
    no_grad, batch_first) -> the layer's ops: norms, packed in-projection, SDPA, out-projection,
    residuals, feed-forward (ReLU or GELU). Masks: ``mask_type`` 0 ([L, S]), 1 (key padding
    [B, S]) and 2 ([B, H, L, S]), True or -inf = masked."""
    what = "nn.TransformerEncoderLayer fast path (torch._transformer_encoder_layer_fwd)"
    a = {nm: arg(n, i, nm) for i, nm in enumerate(_TEL_ARGS)}
    src, E, H = a["src"], a["embed_dim"], a["num_heads"]
    vs = val(src)
    mask, mask_type = a["mask"], a["mask_type"]
    ranks = {0: 2, 1: 2, 2: 4}            # [L, S] attn mask, [B, S] key padding, [B, H, L, S]
    if mask is not None and (val(mask) is None or ranks.get(mask_type) != val(mask).dim()):
        return _fused_refusal(n, what, f"mask_type={mask_type} with a mask of shape "
                                       f"{list(getattr(val(mask), 'shape', []))} is not reproduced")
    if vs is None or vs.dim() != 3 or not isinstance(E, int) or not isinstance(H, int):
        return _fused_refusal(n, what, "nested-tensor or unbatched input")
    em = Emitter(g, n)
    if mask is not None:
        mask = _float_mask(em, mask, vs.dtype)
        if mask_type == 1:                                                 # [B, S] -> [B, 1, 1, S]
            mask = em.method("unsqueeze", em.method("unsqueeze", mask, 1), 1)

    def norm(x, i):
        return em.call(F.layer_norm, x, (E,), a[f"norm_weight_{i}"], a[f"norm_bias_{i}"], a["eps"])

    h = norm(src, 1) if a["norm_first"] else src
    proj = em.method("unflatten", em.call(F.linear, h, a["qkv_weight"], a["qkv_bias"]), -1, (3, E))
    q, k, v = (_heads_view(em, em.call(operator.getitem, proj, (Ellipsis, i, slice(None))), H,
                           seq_first=False) for i in range(3))                  # [N, H, L, D]
    o = em.call(F.scaled_dot_product_attention, q, k, v, attn_mask=mask)
    o = em.method("flatten", em.method("transpose", o, 1, 2), -2)             # [N, L, E]
    x = em.call(operator.add, src, em.call(F.linear, o, a["proj_weight"], a["proj_bias"]))
    if not a["norm_first"]:
        x = norm(x, 1)
    f = norm(x, 2) if a["norm_first"] else x
    f = em.call(F.linear, f, a["ffn_weight_1"], a["ffn_bias_1"])
    f = em.call(F.gelu if a["use_gelu"] else F.relu, f)
    x = em.call(operator.add, x, em.call(F.linear, f, a["ffn_weight_2"], a["ffn_bias_2"]))
    if not a["norm_first"]:
        x = norm(x, 2)
    return _replace(n, x)
