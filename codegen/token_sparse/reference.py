"""Token-sparse (gather) attention in plain PyTorch (fp32): the reference for the Triton kernels.

Shapes: q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nkv, D]``, v ``[B, Hkv, Nkv, Dv]``, ``indices`` int32
``[B, Hs, Nq, K]`` with ``Hs`` = 1 (one list per query row shared by every head, as in
DeepSeek Sparse Attention), ``Hkv`` (one list per GQA group) or ``Hq`` (per head). Query row
``i`` attends exactly to the keys ``indices[b, hs, i, :]`` (any order, distinct); negative
entries are padding. No causal mask is implied. ``kv_start`` / ``kv_end`` (int ``[B]``,
optional): entries of batch row ``b`` outside ``[kv_start[b], kv_end[b])`` are skipped like
padding (padded batches). ``sinks`` (float ``[Hq]``, optional): a learned logit per query head
taking part in the softmax as one more key of value 0 (GPT-OSS), in the units of
the modified scores: ``lse = log(sum_j exp(s_j) + exp(sinks[h]))``. ``softcap`` (c > 0; 0 =
none) and ``mask`` / ``mask_kind`` (broadcastable to ``[B, Hq, Nq, Nkv]``, read at the listed
keys: "add" float added, values <= -1e30 masked; "keep" bool, False masked) modify the scores
``s = scale * q . k`` first: ``c * tanh(s / c)``, then the mask
(``codegen.block_sparse.mask_blocks``). Rows with no valid (unmasked) entry give out = 0,
lse = -inf (lse = ``sinks[h]`` with sinks). Math runs in fp32 (fp64 for fp64
inputs, so that ``gradcheck`` can use it); ``token_sparse_attention_ref`` is differentiable by
autograd, and ``token_sparse_attention_bwd_ref`` writes the backward out explicitly.

Example::

    >>> q = torch.randn(2, 4, 1, 16); k = v = torch.randn(2, 2, 50, 16)
    >>> idx = torch.randint(0, 50, (2, 1, 1, 8), dtype=torch.int32)
    >>> out, lse = token_sparse_attention_ref(q, k, v, idx, scale=0.25)
    >>> out.shape, lse.shape
    (torch.Size([2, 4, 1, 16]), torch.Size([2, 4, 1]))
    >>> dq, dk, dv = token_sparse_attention_bwd_ref(q, k, v, idx, out, lse, torch.ones_like(out),
    ...                                             scale=0.25)
"""
from __future__ import annotations

import torch

from codegen.attention.reference import check_sinks, key_range_mask
from codegen.block_sparse.mask_blocks import apply_mask_and_cap, broadcast_mask


def _gathered(q, k, v, indices, kv_start=None, kv_end=None):
    """Per query head: the gathered key/value rows and which entries are valid (not padding,
    inside the batch row's key range).

    Returns ``(idx [B, Hq, Nq, K] int64 clamped to >= 0, valid [B, Hq, Nq, K] bool,
    kg [B, Hq, Nq, K, D], vg [B, Hq, Nq, K, Dv])`` in the compute dtype."""
    B, Hq, Nq, D = q.shape
    Hkv, Nkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if indices.shape[1] not in (1, Hkv, Hq):
        raise ValueError(f"indices.shape[1] must be 1, Hkv={Hkv} or Hq={Hq}, got {indices.shape[1]}")
    if bool((indices >= Nkv).any()):
        raise ValueError(f"indices hold an entry >= Nkv={Nkv}")
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    idx = indices.long().repeat_interleave(Hq // indices.shape[1], dim=1)   # [B, Hq, Nq, K]
    valid = idx >= 0
    outside = key_range_mask("token_sparse_attention_ref", kv_start, kv_end, B, Nkv, q.device)
    if outside is not None:                      # entries outside the batch row's key range
        out_b = outside[:, 0, 0]                                             # [B, Nkv]
        valid &= ~torch.gather(out_b, 1, idx.clamp_min(0).reshape(B, -1)).reshape(idx.shape)
    safe = idx.clamp_min(0)
    kf = k.to(ct).repeat_interleave(Hq // Hkv, dim=1)                        # [B, Hq, Nkv, D]
    vf = v.to(ct).repeat_interleave(Hq // Hkv, dim=1)                        # [B, Hq, Nkv, Dv]
    Kn = idx.shape[-1]
    kg = torch.gather(kf, 2, safe.reshape(B, Hq, Nq * Kn, 1).expand(-1, -1, -1, D))
    vg = torch.gather(vf, 2, safe.reshape(B, Hq, Nq * Kn, 1).expand(-1, -1, -1, Dv))
    return (safe, valid, kg.reshape(B, Hq, Nq, Kn, D),                       # [B, Hq, Nq, K, D]
            vg.reshape(B, Hq, Nq, Kn, Dv))                                   # [B, Hq, Nq, K, Dv]


def token_sparse_attention_ref(q, k, v, indices, *, scale: float, sinks=None, kv_start=None,
                               kv_end=None, softcap: float = 0.0, mask=None,
                               mask_kind: str = "add"):
    """Returns ``(out [B, Hq, Nq, Dv] in q.dtype, lse [B, Hq, Nq] fp32, natural log)``."""
    safe, valid, kg, vg = _gathered(q, k, v, indices, kv_start, kv_end)
    s = torch.einsum("bhqd,bhqkd->bhqk", q.to(kg.dtype), kg) * scale          # [B, Hq, Nq, K]
    if mask is not None:                         # the mask at the listed keys: [B, Hq, Nq, K]
        B, Hq, Nq, _ = q.shape
        mask = broadcast_mask("token_sparse_attention_ref", mask, mask_kind,
                              (B, Hq, Nq, k.shape[2]), q.device)
        mask = torch.gather(mask, -1, safe)
    s = apply_mask_and_cap(s, softcap=softcap, mask=mask, mask_kind=mask_kind)
    s = s.masked_fill(~valid, float("-inf"))
    if sinks is None:
        lse = torch.logsumexp(s, dim=-1)                                     # -inf on empty rows
    else:                                                                    # sink column appended
        B, Hq, Nq, _ = s.shape
        col = check_sinks("token_sparse_attention_ref", sinks, Hq, q.device).to(s.dtype)
        lse = torch.logsumexp(torch.cat([s, col[:, None, None].expand(B, Hq, Nq, 1)], -1), -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhqk,bhqkd->bhqd", p, vg)
    return out.to(q.dtype), lse


def token_sparse_attention_bwd_ref(q, k, v, indices, out, lse, dout, *, scale: float,
                                   kv_start=None, kv_end=None):
    """Gradients of ``out`` w.r.t. q, k, v from the forward's ``out`` and ``lse``, by the
    flash-attention formulas. Returns ``(dq, dk, dv)`` shaped and typed like q, k, v.
    ``kv_start`` / ``kv_end``: the forward's key ranges (forwards without ``softcap`` or
    ``mask``: their gradients are not written here). A forward with ``sinks`` needs nothing
    more: the sink is a key of value 0, so it enters only through ``lse`` (P below sums to
    less than 1) and ``delta`` is unchanged; no gradient of the sinks is computed.

    P = exp(S * scale - lse), dV[idx] += Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP - rowsum(dO ⊙ O)),
    dQ = scale * dS K, dK[idx] += scale * dSᵀ Q: scatter-adds over the gathered positions, the
    query heads of a GQA group adding into their KV head; padding and empty rows add nothing.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    safe, valid, kg, vg = _gathered(q, k, v, indices, kv_start, kv_end)
    ct, Kn = kg.dtype, safe.shape[-1]
    qf, o, do = q.to(ct), out.to(ct), dout.to(ct)
    lse = lse.to(ct)
    has = torch.isfinite(lse)                                                # [B, Hq, Nq]
    s = torch.einsum("bhqd,bhqkd->bhqk", qf, kg) * scale                     # [B, Hq, Nq, K]
    keep = valid & has[..., None]
    p = torch.where(keep, torch.exp(s - torch.where(has, lse, 0.0)[..., None]), 0.0)
    dp = torch.einsum("bhqd,bhqkd->bhqk", do, vg)                            # [B, Hq, Nq, K]
    delta = (do * o).sum(-1)                                                 # [B, Hq, Nq]
    ds = p * (dp - delta[..., None])                                         # [B, Hq, Nq, K]
    dq = torch.einsum("bhqk,bhqkd->bhqd", ds, kg) * scale                    # [B, Hq, Nq, D]
    dkg = ds[..., None] * qf[:, :, :, None, :] * scale                       # [B, Hq, Nq, K, D]
    dvg = p[..., None] * do[:, :, :, None, :]                                # [B, Hq, Nq, K, Dv]

    def scatter(rows, width):                                                # -> [B, Hkv, Nkv, width]
        acc = torch.zeros(B, Hq, Nkv, width, dtype=ct, device=q.device)
        pos = safe.reshape(B, Hq, Nq * Kn, 1).expand(-1, -1, -1, width)
        acc.scatter_add_(2, pos, rows.masked_fill(~keep[..., None], 0.0).reshape(B, Hq, Nq * Kn, width))
        return acc.reshape(B, Hkv, Hq // Hkv, Nkv, width).sum(2)

    return dq.to(q.dtype), scatter(dkg, D).to(k.dtype), scatter(dvg, Dv).to(v.dtype)
