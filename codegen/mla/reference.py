"""MLA in its absorbed form, in plain PyTorch (fp32): the reference of the token-sparse MLA
kernel (``sparse_kernel.py``) and of the planner's absorbed rewrite.

DeepSeek-V2/V3/V3.2 and GLM-MoE-DSA decompress a latent ``c [T, r]`` (r = kv_lora_rank = 512)
into per-head keys and values with ``W_kvb = [W_UK; W_UV]`` (per head ``[nope + dv, r]``)::

    k_h = [c W_UK_h^T, k_rope]       v_h = c W_UV_h^T

so ``q_h . k_h = (q_nope_h W_UK_h) . c + q_rope_h . k_rope``: with the query absorbed
(``q_lat_h = q_nope_h W_UK_h``, r wide) every head attends to the same row ``[c, k_rope]``
(r + d_r = 576 wide) and the same value ``c`` (512 wide), and the head's output is
``o_h = (softmax . c) W_UV_h^T``. (DeepSeek-V2 paper, arXiv:2405.04434, section 2.1.2.)

Shapes (``sparse_mla_reference``): ``q [B, S, H, Dk]`` absorbed queries (latent then rope
parts), ``kv [B, T, Dk]`` the latent rows ``[c, k_rope]``, ``indices [B, S, K]`` int (-1 or
out of range: no key), values are ``kv[..., :dv]``. Returns ``out [B, S, H, dv]`` (fp32) and
``lse [B, S, H]`` (natural log; -inf and out 0 for a row with no key).

Example::

    >>> q = torch.randn(1, 3, 4, 24); kv = torch.randn(1, 5, 24)
    >>> idx = torch.tensor([[[0, -1], [0, 1], [2, 0]]])
    >>> out, lse = sparse_mla_reference(q, kv, idx, scale=0.2, dv=16)
    >>> tuple(out.shape), tuple(lse.shape)
    ((1, 3, 4, 16), (1, 3, 4))
"""
from __future__ import annotations

import torch


def sparse_mla_reference(q, kv, indices, *, scale: float, dv: int):
    """Attention of every head over the row's listed keys (see the module docstring)."""
    B, S, H, D = q.shape
    T = kv.shape[1]
    idx = indices.long()
    ok = (idx >= 0) & (idx < T)                                            # [B, S, K]
    rows = torch.gather(kv.float(), 1, idx.clamp(0, max(T - 1, 0)).reshape(B, -1, 1)
                        .expand(-1, -1, D)).view(B, S, -1, D)              # [B, S, K, D]
    s = torch.einsum("bshd,bskd->bshk", q.float(), rows) * scale           # [B, S, H, K]
    s = s.masked_fill(~ok[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                       # [B, S, H]
    p = torch.exp(s - lse[..., None].clamp(min=-1e30)).nan_to_num(0.0)
    out = torch.einsum("bshk,bskd->bshd", p, rows[..., :dv])
    return out, lse


def split_kv_b(w_kvb: torch.Tensor, heads: int, nope: int, dv: int):
    """``(W_UK [H, nope, r], W_UV [H, dv, r])`` of ``kv_b_proj.weight [H * (nope + dv), r]``."""
    w = w_kvb.view(heads, nope + dv, w_kvb.shape[-1])
    return w[:, :nope], w[:, nope:]


def absorb_query(q_nope, q_rope, w_uk):
    """Absorbed queries ``[B, S, H, r + d_r]`` of ``q_nope [B, S, H, nope]``, ``q_rope
    [B, S, H, d_r]`` and ``W_UK [H, nope, r]``."""
    q_lat = torch.einsum("bshn,hnr->bshr", q_nope, w_uk)
    return torch.cat([q_lat, q_rope.to(q_lat.dtype)], dim=-1)


def expand_output(o_lat, w_uv):
    """Per-head outputs ``[B, S, H, dv]`` of latent outputs ``o_lat [B, S, H, r]``."""
    return torch.einsum("bshr,hvr->bshv", o_lat, w_uv.to(o_lat.dtype))


def decompressed_reference(q_nope, q_rope, c, k_rope, w_kvb, indices, *, scale: float,
                           nope: int, dv: int):
    """The model's form: per-head K/V decompressed from ``c [B, T, r]`` (and ``k_rope
    [B, T, d_r]`` shared by every head), attention over the listed keys; ``[B, S, H, dv]``."""
    H = q_nope.shape[2]
    kvh = torch.einsum("btr,hvr->bthv", c.float(), w_kvb.float().view(H, nope + dv, -1))
    k = torch.cat([kvh[..., :nope], k_rope.float()[:, :, None].expand(-1, -1, H, -1)], -1)
    v = kvh[..., nope:]                                                    # [B, T, H, dv]
    q = torch.cat([q_nope, q_rope], -1).float()                            # [B, S, H, D]
    T = c.shape[1]
    idx = indices.long()
    ok = (idx >= 0) & (idx < T)
    s = torch.einsum("bshd,bthd->bsht", q, k) * scale
    keep = torch.zeros(*idx.shape[:2], T, dtype=torch.bool, device=idx.device)
    keep.scatter_(-1, idx.clamp(0, T - 1), ok)
    s = s.masked_fill(~keep[:, :, None, :], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bsht,bthv->bshv", p, v)
