"""Token-sparse (gather) attention in plain PyTorch (fp32): the reference for the Triton kernels.

Shapes: q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nkv, D]``, v ``[B, Hkv, Nkv, Dv]``, ``indices`` int32
``[B, Hs, Nq, K]`` with ``Hs`` = ``Hkv`` (one list per GQA group) or ``Hq`` (per head). Query row
``i`` attends exactly to the keys ``indices[b, hs, i, :]`` (any order, distinct); negative
entries are padding. No causal mask is implied. Rows with no valid index give out = 0,
lse = -inf.

Example::

    >>> q = torch.randn(2, 4, 1, 16); k = v = torch.randn(2, 2, 50, 16)
    >>> idx = torch.randint(0, 50, (2, 2, 1, 8), dtype=torch.int32)
    >>> out, lse = token_sparse_attention_ref(q, k, v, idx, scale=0.25)
    >>> out.shape, lse.shape
    (torch.Size([2, 4, 1, 16]), torch.Size([2, 4, 1]))
"""
from __future__ import annotations

import torch


def token_sparse_attention_ref(q, k, v, indices, *, scale: float):
    """Returns ``(out [B, Hq, Nq, Dv] in q.dtype, lse [B, Hq, Nq] fp32, natural log)``."""
    B, Hq, Nq, D = q.shape
    Hkv, Nkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if bool((indices >= Nkv).any()):
        raise ValueError(f"indices hold an entry >= Nkv={Nkv}")
    idx = indices.long().repeat_interleave(Hq // indices.shape[1], dim=1)   # [B, Hq, Nq, K]
    valid = idx >= 0
    safe = idx.clamp_min(0)
    kf = k.float().repeat_interleave(Hq // Hkv, dim=1)                       # [B, Hq, Nkv, D]
    vf = v.float().repeat_interleave(Hq // Hkv, dim=1)                       # [B, Hq, Nkv, Dv]
    Kn = idx.shape[-1]
    kg = torch.gather(kf, 2, safe.reshape(B, Hq, Nq * Kn, 1).expand(-1, -1, -1, D))
    vg = torch.gather(vf, 2, safe.reshape(B, Hq, Nq * Kn, 1).expand(-1, -1, -1, Dv))
    kg = kg.reshape(B, Hq, Nq, Kn, D)                                        # [B, Hq, Nq, K, D]
    vg = vg.reshape(B, Hq, Nq, Kn, Dv)                                       # [B, Hq, Nq, K, Dv]
    s = torch.einsum("bhqd,bhqkd->bhqk", q.float(), kg) * scale              # [B, Hq, Nq, K]
    s = s.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                         # -inf on empty rows
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhqk,bhqkd->bhqd", p, vg)
    return out.to(q.dtype), lse
