"""Reference attention (fp32, chunked over queries) with score modifiers and a keep-set.

Shapes: q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nkv, D]``, v ``[B, Hkv, Nkv, Dv]``,
``Hq = G * Hkv`` (G = GQA group; query head h reads key head ``h // G``).

Score modifiers are applied in order to ``s = scale * q @ k^T`` exactly as the model did:
  ("add",)        s = s + t                (additive float mask, ALiBi, position bias)
  ("keep",)       s = where(t, s, -inf)    (SDPA boolean mask: True = attend)
  ("fill", v)     s = s.masked_fill(t, v)  (``masked_fill`` spelling: True = replaced)
  ("softcap", c)  s = c * tanh(s / c)      (no tensor)
``causal`` is None, "upper_left" (query i sees keys j <= i, SDPA ``is_causal``) or
"lower_right" (query i sits at position i + Nkv - Nq: KV-cache alignment).

Two optional extras of current models:
  ``kv_start`` / ``kv_end`` int ``[B]``: batch row b keeps only keys
      ``kv_start[b] <= j < kv_end[b]`` (left / right padded batches), masked like causality
      masks (query rows keep their padded positions; either bound may be given alone).
  ``sinks`` float ``[Hq]``: a learned logit per query head (GPT-OSS) appended to every score
      row of that head, in the units of the modified scores (no scale applied), the softmax
      taken over ``[scores..., sink]`` and the sink column dropped: the row's weights sum to
      ``1 - exp(sink - lse)`` and ``lse = log(sum_j exp(s_j) + exp(sink))``.

Example::

    >>> q = k = v = torch.randn(1, 2, 5, 8)
    >>> out, lse = attention_reference(q, k, v, scale=8 ** -0.5, causal="upper_left")
    >>> out.shape, lse.shape
    (torch.Size([1, 2, 5, 8]), torch.Size([1, 2, 5]))
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

# A pair whose modified score is at or below this counts as masked (HF masks use finfo.min).
MASKED_BELOW = -1e30

def mask_visible(t: torch.Tensor, kind: str) -> torch.Tensor:
    """bool, ``t``'s shape: the pairs a mask modifier lets through (``"keep"``: a boolean mask,
    True = attend; ``"add"``: an additive mask, above ``MASKED_BELOW``)."""
    return t.to(torch.bool) if kind == "keep" else t.float() > MASKED_BELOW


KeepFn = Callable[[int, int], torch.Tensor]  # (row0, row1) -> bool [B, Hs, row1-row0, Nkv]


def positions_offset(causal: Optional[str], n_q: int, n_kv: int) -> int:
    """Absolute position of query row 0 (queries are rows ``offset .. offset + n_q - 1``)."""
    return 0 if causal == "upper_left" else n_kv - n_q


def visible_keys(causal: Optional[str], n_q: int, n_kv: int, device=None) -> torch.Tensor:
    """int64 ``[Nq]``: how many keys each query row may attend to under the causal rule."""
    if causal is None:
        return torch.full((n_q,), n_kv, dtype=torch.int64, device=device)
    rows = torch.arange(n_q, device=device) + positions_offset(causal, n_q, n_kv) + 1
    return rows.clamp(0, n_kv)


def apply_modifiers(s: torch.Tensor, mods: Sequence[tuple], tensors: Sequence[torch.Tensor],
                    rows: slice) -> torch.Tensor:
    """Apply score modifiers to fp32 scores ``s`` [B, H, rows, Nkv] (query rows ``rows``)."""
    ti = 0
    for mod in mods:
        kind = mod[0]
        if kind == "softcap":
            cap = float(mod[1])
            s = torch.tanh(s / cap) * cap
            continue
        t = tensors[ti]
        ti += 1
        if t.dim() >= 2 and t.shape[-2] != 1:
            t = t[..., rows, :]
        if kind == "add":
            s = s + t.to(torch.float32)
        elif kind == "keep":
            s = s.masked_fill(~t.to(torch.bool), float("-inf"))
        elif kind == "fill":
            s = s.masked_fill(t.to(torch.bool), float(mod[1]))
        else:
            raise ValueError(f"unknown score modifier {mod!r}; expected add/keep/fill/softcap")
    if ti != len(tensors):
        raise ValueError(f"{len(tensors)} modifier tensors given, modifiers {list(mods)} use {ti}")
    return s


def check_sinks(fn: str, sinks, hq: int, device) -> torch.Tensor:
    """``sinks`` as a float tensor ``[Hq]`` on ``device`` (raises naming what is wrong)."""
    if (not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point()
            or tuple(sinks.shape) != (hq,)):
        got = (f"{sinks.dtype} {list(sinks.shape)}" if isinstance(sinks, torch.Tensor)
               else type(sinks).__name__)
        raise ValueError(f"{fn}: sinks must be a float tensor [{hq}] (one logit per query "
                         f"head), got {got}")
    if sinks.device != torch.device(device):
        raise ValueError(f"{fn}: sinks is on {sinks.device}, q is on {device}")
    return sinks


def key_range_mask(fn: str, kv_start, kv_end, b: int, n_kv: int,
                   device) -> Optional[torch.Tensor]:
    """bool ``[B, 1, 1, Nkv]``, True where key ``j`` lies outside ``[kv_start[b], kv_end[b])``
    (a missing bound: 0 / Nkv), or None when neither bound is given."""
    if kv_start is None and kv_end is None:
        return None
    key = torch.arange(n_kv, device=device)
    out = torch.zeros(b, n_kv, dtype=torch.bool, device=device)
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        if t is None:
            continue
        if (not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex()
                or t.dtype == torch.bool or tuple(t.shape) != (b,)):
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be an integer tensor [{b}] (one bound per batch "
                             f"row), got {got}")
        if t.device != torch.device(device):
            raise ValueError(f"{fn}: {name} is on {t.device}, q is on {device}")
        t = t.to(device=device, dtype=torch.int64)[:, None]
        out |= (key[None, :] < t) if name == "kv_start" else (key[None, :] >= t)
    return out[:, None, None, :]


def _expand_heads(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, Hs, ...] -> [B, Hq, ...] with query head h reading row h // (Hq // Hs)."""
    hs = x.shape[1]
    if hs == hq:
        return x
    if hs == 1:
        return x.expand(x.shape[0], hq, *x.shape[2:])
    return x.repeat_interleave(hq // hs, dim=1)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                        mods: Sequence[tuple] = (), mod_tensors: Sequence[torch.Tensor] = (),
                        causal: Optional[str] = None, keep: Optional[KeepFn] = None,
                        chunk: int = 1024, stats: Optional[dict] = None,
                        sinks: Optional[torch.Tensor] = None,
                        kv_start: Optional[torch.Tensor] = None,
                        kv_end: Optional[torch.Tensor] = None, window: int = 0):
    """Softmax attention over the pairs that survive modifiers, causality, the window, the key
    ranges and ``keep``, with an optional learned sink per head (module docstring).

    ``sinks``: float ``[Hq]``; ``kv_start`` / ``kv_end``: integer ``[B]`` (runtime values);
    ``window > 0``: a query at position p sees only keys j > p - window (a sliding window; the
    positions follow ``causal``'s alignment, bottom-right without it). Pairs the window hides
    are not counted as attended in ``stats``, like those the causal rule hides.
    Returns ``(out [B, Hq, Nq, Dv] in q.dtype, lse [B, Hq, Nq] fp32)``. Rows that keep no key
    give out = 0, lse = -inf (lse = the head's sink with ``sinks``). If ``stats`` is a dict, it
    receives per-head counts of the pairs the model attends to (``allowed``; keys outside the
    ranges are not allowed) and of those kept (``kept``), as float64 [Hq] tensors.
    """
    B, Hq, Nq, D = q.shape
    Nkv = k.shape[2]
    if Hq % k.shape[1] != 0:
        raise ValueError(f"query heads {Hq} are not a multiple of key heads {k.shape[1]}")
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32   # fp64 for gradchecks
    # [B, 1, 1, Nkv] (True = outside the batch row's key range) or None
    outside = key_range_mask("attention_reference", kv_start, kv_end, B, Nkv, q.device)
    sink = None                                                        # [Hq, 1, 1] or None
    if sinks is not None:
        sink = check_sinks("attention_reference", sinks, Hq, q.device).to(cdt)[:, None, None]
    kf = _expand_heads(k, Hq).to(cdt)
    vf = _expand_heads(v, Hq).to(cdt)
    out = torch.empty(B, Hq, Nq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    off = positions_offset(causal, Nq, Nkv)
    kv_pos = torch.arange(Nkv, device=q.device)
    allowed_n = torch.zeros(Hq, dtype=torch.float64, device=q.device)
    kept_n = torch.zeros(Hq, dtype=torch.float64, device=q.device)
    for r0 in range(0, Nq, chunk):
        r1 = min(r0 + chunk, Nq)
        s = torch.matmul(q[:, :, r0:r1].to(cdt), kf.transpose(-1, -2)) * scale
        s = apply_modifiers(s, mods, mod_tensors, slice(r0, r1)).to(cdt)
        q_pos = torch.arange(r0, r1, device=q.device) + off
        if causal is not None:
            s = s.masked_fill(kv_pos[None, :] > q_pos[:, None], float("-inf"))
        if window:
            s = s.masked_fill(kv_pos[None, :] <= q_pos[:, None] - window, float("-inf"))
        if outside is not None:
            s = s.masked_fill(outside, float("-inf"))
        allowed = s > MASKED_BELOW
        if keep is not None:
            kp = _expand_heads(keep(r0, r1), Hq)
            s = s.masked_fill(~kp, float("-inf"))
            if stats is not None:
                kept_n += (allowed & kp).sum(dim=(0, 2, 3)).to(torch.float64)
        elif stats is not None:
            kept_n += allowed.sum(dim=(0, 2, 3)).to(torch.float64)
        if stats is not None:
            allowed_n += allowed.sum(dim=(0, 2, 3)).to(torch.float64)
        m = s.amax(dim=-1, keepdim=True)
        if sink is not None:                    # one more key of score sink[h] and value 0
            m = torch.maximum(m, sink)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m_safe)
        denom = p.sum(dim=-1, keepdim=True)
        if sink is not None:
            denom = denom + torch.exp(sink - m_safe)
        o = torch.matmul(p, vf) / denom.clamp_min(1e-30)
        o = torch.where(denom > 0, o, torch.zeros_like(o))
        out[:, :, r0:r1] = o.to(q.dtype)
        lse[:, :, r0:r1] = (m_safe + torch.log(denom)).squeeze(-1)
    if stats is not None:
        stats["allowed"] = allowed_n
        stats["kept"] = kept_n
    return out, lse
