"""DeepSeek Sparse Attention as the model computes it (``policies.NativeDSA``): the model's own
lightning indexer and top-k, run by the site's ``sparse.score`` / ``sparse.select``.

``sparse.score(q_I, k_I, [w, mask3d], key)`` returns the selected keys, int32 ``[B, S, K]``
(the fused indexer never materialises the scores): ``q_I [B, S, H_I, d_I]``, ``k_I [B, T, d_I]``
(the model's indexer keys, its cache's ``update_indexer`` output when decoding), ``w [B, S,
H_I]`` fp32 (``weights_proj(x) * H_I**-0.5``), ``mask3d [B, S, T]`` the mask the model's index
scores read. Keys the mask hides are -1 (the model selects them when a row sees fewer than K
keys, and its attention mask hides them again), so the lists hold exactly the pairs the model
attends to. ``sparse.select`` only adds the list-head axis: ``[B, 1, S, K]``.

Two paths, one answer:

* **reference** (CPU, or where the kernels do not run): the model's own operations in the
  model's order (``matmul`` of the fp32 q_I and k_I, times c, ReLU, the weighted head sum as a
  matmul, the model's mask tensor, ``torch.topk``), so the scores are bit-identical and
  ``torch.topk`` breaks ties exactly as the model's call does: the same function on the same
  values. (Its order among equal scores is not documented; on the CPU, among 23 equal scores it
  keeps an unsorted set such as [7, 3, 5, ...]. Ties are common here: a key whose dot products
  are negative for every indexer head scores exactly 0.) ``tests/test_native_dsa.py`` checks the
  very same lists, with every score tied.
* **kernel** (CUDA, or the Triton interpreter): the fused indexer + top-k of
  ``runtime.kernels.indexer`` on ``w * c`` (``relu(c a) = c relu(a)`` for c > 0), with the
  causal rule instead of the mask where discovery proved the mask causal (or all-visible): no
  ``[B, S, T]`` tensor. It keeps the model's set wherever the K-th and (K+1)-th scores of a row
  differ; among scores equal at the boundary it keeps the newer key (the kernel's rule), where
  the model's ``torch.topk`` may keep another key of the same score; its fp32 head sum may also
  round differently from the model's matmul, which matters only for scores equal to the last
  bit. The selected scores are the same either way.

FP8 (``NativeDSA.fp8``): q_I and k_I are rounded to float8 e4m3 with one scale per row
(``amax / 448`` over the last dim: per query head, per key) and back before scoring, as
DeepSeek's FP8 indexer stores them; the scores then come from those values. It is a numerics
option (its recall against the bf16 sets is measured in ``benchmarks/dsa_native.py``); the
kernels still read 16-bit values.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from codegen.attention.reference import mask_visible
from runtime.kernels import indexer as indexer_kernels
from runtime.kernels.launch import kernels_enabled

FP8_MAX = 448.0            # largest finite float8 e4m3fn value

_RECORD: Optional[dict] = None


@contextlib.contextmanager
def recording() -> Iterator[dict]:
    """Keep every native site's selected lists while the block runs: ``{site: [int32
    [B, S, K], ...]}`` in call order (tests compare them with the model's own top-k).

    >>> with recording() as rec:                                   # doctest: +SKIP
    ...     compiled(ids)
    >>> rec["model.layers.0.self_attn"][0].shape                   # doctest: +SKIP
    torch.Size([1, 23, 2048])
    """
    global _RECORD
    prev, _RECORD = _RECORD, {}
    try:
        yield _RECORD
    finally:
        _RECORD = prev


def fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float8 e4m3 with one scale per row (last dim), back in ``x``'s dtype."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return ((xf / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def visible(mask3d: torch.Tensor, kind: str) -> torch.Tensor:
    """bool ``[B, S, T]``: the pairs the model's mask lets through."""
    return mask_visible(mask3d, kind)


def index_topk_reference(q_i, k_i, w, scale: float, topk: int, mask3d, kind: str) -> torch.Tensor:
    """int32 ``[B, S, topk]``: the model's top-k, computed with the model's operations (see the
    module docstring), hidden keys and missing columns -1.

    >>> q = torch.randn(1, 5, 2, 8); k = torch.randn(1, 5, 8); w = torch.randn(1, 5, 2)
    >>> m = torch.ones(5, 5).tril().bool()[None]
    >>> (index_topk_reference(q, k, w, 0.35, 3, m, "keep")[0, 0] >= 0).sum().item()
    1
    """
    s = torch.matmul(q_i.float(), k_i.transpose(-1, -2).float().unsqueeze(1)) * scale  # [B,S,H,T]
    s = torch.relu(s)
    scores = torch.matmul(w.unsqueeze(-2), s).squeeze(-2)                              # [B,S,T]
    if mask3d is not None:
        if kind == "keep":
            scores = scores.masked_fill(~mask3d, float("-inf"))
        else:
            scores = scores + mask3d
    n = min(topk, scores.shape[-1])
    idx = scores.topk(n, dim=-1).indices                                                # [B,S,n]
    if mask3d is not None:
        seen = visible(mask3d, kind).expand_as(scores).gather(-1, idx)
        idx = torch.where(seen, idx, -1)
    out = torch.full((*idx.shape[:2], topk), -1, dtype=torch.int32, device=idx.device)
    out[..., :n] = idx.to(torch.int32)
    return out


def score(q_i, k_i, tensors, spec) -> torch.Tensor:
    """``sparse.score`` of a native site: the selected keys, int32 ``[B, S, K]``."""
    pol = spec.policy
    w = tensors[0]
    mask3d = tensors[1] if len(tensors) > 1 else None
    if pol.fp8:
        q_i, k_i = fp8_rows(q_i), fp8_rows(k_i)
    rule = pol.mask
    if kernels_enabled(q_i) and (rule in ("causal", "all") or mask3d is None):
        causal = rule == "causal" and q_i.shape[1] > 1     # bottom-right: one row sees all
        k_i = k_i if k_i.dtype == q_i.dtype else k_i.to(q_i.dtype)
        out = indexer_kernels.indexer_topk(q_i, w.float() * pol.score_scale, k_i, pol.topk,
                                           causal=causal)
    else:
        if mask3d is None and rule == "causal":
            # the rewrite dropped the model's mask (proved causal) for the kernels: rebuild it
            n_q, n_kv = q_i.shape[1], k_i.shape[1]
            pos = torch.arange(n_q, device=q_i.device)[:, None] + (n_kv - n_q)
            mask3d = (torch.arange(n_kv, device=q_i.device)[None, :] <= pos)[None]  # [1, S, T]
            rule = "keep"
        kind = "keep" if rule == "keep" or (mask3d is not None and mask3d.dtype == torch.bool) \
            else "add"
        out = index_topk_reference(q_i, k_i, w, pol.score_scale, pol.topk, mask3d, kind)
    if _RECORD is not None:
        _RECORD.setdefault(spec.site, []).append(out.detach().clone())
    return out


def score_shape(q_i, k_i, spec) -> tuple:
    return (q_i.shape[0], q_i.shape[1], spec.policy.topk)


def fix_unseen_rows(out: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                    spec) -> torch.Tensor:
    """Rows whose list holds no key (the model's mask hides every key of the row: a
    left-padded row's first queries) give what the model computed there. Under an additive
    finite mask (``finfo.min``, eager attention: ``spec.empty_rows == "mean"``) every score of
    such a row is the same huge negative number, so the softmax is uniform over all ``T`` keys
    and the row is the mean of v; under a boolean mask the attention gives 0 (as here already).

    out ``[B, H, S, Dv]``, v ``[B, Hkv, T, Dv]``, indices ``[B, 1, S, K]`` (-1 = none).
    """
    if spec.empty_rows != "mean" or not indices.numel():
        return out
    rows = (indices < 0).all(dim=-1)                                    # [B, 1, S]
    if not bool(rows.any()):
        return out
    g = out.shape[1] // v.shape[1]
    mean = v.float().mean(dim=2).repeat_interleave(g, dim=1)            # [B, H, Dv]
    return torch.where(rows[..., None], mean[:, :, None, :].to(out.dtype), out)


def select(scores, q, k, spec):
    """``(counts, indices)``: counts empty, the lists ``[B, 1, S, K]`` shared by every head."""
    return q.new_empty(0, dtype=torch.int32), scores.to(torch.int32).unsqueeze(1).clone()
