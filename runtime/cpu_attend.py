"""The CPU implementation of ``sparse.attend``: SDPA for dense sites, the kept blocks only for
block policies.

The runtime's reference (``codegen.attention.reference``) scores every pair and masks the
dropped ones: correct, and on a CPU as slow as dense fp32 attention written in eager PyTorch.
This provider (registered by ``runtime.providers.register_all``, tried after the GPU kernels)

* serves the ``dense`` policy with ``F.scaled_dot_product_attention`` (the fused CPU kernel:
  a dense site costs what the model's own SDPA costs);
* serves block policies by gathering, per query block, the key blocks of its list (padded to
  the longest list of a chunk of query blocks) and applying the model's masks, the causal rule
  and the policy's token-level keep (``token_keep``, e.g. sink_window's exact window) on the
  gathered columns only (measured on 2 cores: about 9x SDPA's time per kept pair, so it gains
  below about 10% density; ``runtime.costmodel``'s CPU profile plans dense above that);
* reports the same per-query-head ``(allowed, kept)`` pair counts as the reference, so
  ``planner.inspect(m).sites[i].density`` keeps its meaning.

It declines (returns None, so the reference runs) what it does not compute exactly: score
modifiers other than additive / boolean masks, mask tensors with per-KV-head layouts, learned
sinks, non-CPU tensors, token-sparse policies. ``enabled(False)`` turns it off inside a block
(``SPARSE_PLANNER_KERNELS=reference`` everywhere).

    >>> from runtime import cpu_attend
    >>> with cpu_attend.enabled(False):          # doctest: +SKIP
    ...     y = cm(x)                             # the fp32 reference
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from codegen.attention.reference import MASKED_BELOW, mask_visible, visible_keys
from runtime import estimators
from runtime.dsa import keep_from_indices
from runtime.env import kernels_mode
from runtime.policies import SinkWindow
from runtime.rules import fix_empty_rows, lower_rules

NAME = "cpu_gather"
#: elements of one chunk's score tensor [B, H, nb, G, block, C*block] (fp32: 4 bytes each)
CHUNK_ELEMENTS = 48 * 2 ** 20
#: calls served / declined (for tests and logs)
COUNTS = {"served": 0, "declined": 0}

_STATE = threading.local()


def _active() -> bool:
    """On unless turned off here or ``SPARSE_PLANNER_KERNELS`` asks for the reference or for
    Triton (which, where it cannot run, leaves the reference with the reason shown)."""
    return getattr(_STATE, "off", 0) == 0 and kernels_mode() == "auto"


@contextlib.contextmanager
def enabled(on: bool = True):
    """Serve ``sparse.attend`` on CPU with this module (the default) or, with ``on=False``,
    not inside the block (nestable)."""
    if not on:
        _STATE.off = getattr(_STATE, "off", 0) + 1
    try:
        yield
    finally:
        if not on:
            _STATE.off -= 1


def _block_of(spec) -> int:
    return int(estimators.block_of(spec))


def _token_keep(spec, n_q: int, n_kv: int, device):
    """The policy's token-level keep ``keep(r0, r1) -> bool [b, h, rows, Nkv]``, or None."""
    tok = estimators.get(spec.policy).token_keep
    return None if tok is None else tok(spec, n_q, n_kv, device)


def _offset(causal: Optional[str], n_q: int, n_kv: int) -> int:
    return 0 if causal == "upper_left" else n_kv - n_q


def _mods_ok(spec, mod_tensors, b: int, hq: int) -> bool:
    """Only additive / boolean masks broadcastable from [1|B, 1|Hq, 1|Nq, Nkv]."""
    if len(spec.mods) != len(mod_tensors):
        return False
    for mod, t in zip(spec.mods, mod_tensors):
        if mod[0] not in ("add", "keep") or t.dim() > 4:
            return False
        t = _as4d(t)
        if t.shape[0] not in (1, b) or t.shape[1] not in (1, hq):
            return False
    return True


def _as4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _mod_rows(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    t = _as4d(t)
    return t if t.shape[-2] == 1 else t[..., r0:r1, :]


def _pair_ok(spec, mod_tensors, n_q: int, n_kv: int, r0: int, r1: int) -> torch.Tensor:
    """bool [b, h, rows, Nkv]: pairs of query rows r0..r1 the model attends to."""
    ok = torch.ones(1, 1, r1 - r0, n_kv, dtype=torch.bool)
    for mod, t in zip(spec.mods, mod_tensors):
        t = _mod_rows(t, r0, r1)
        ok = ok & mask_visible(t, mod[0])
    if spec.causal is not None:
        pos = torch.arange(r0, r1)[:, None] + _offset(spec.causal, n_q, n_kv)
        ok = ok & (torch.arange(n_kv)[None, :] <= pos)
    return ok


def _allowed_per_head(spec, mod_tensors, B: int, Hq: int, n_q: int, n_kv: int) -> torch.Tensor:
    """fp64 [Hq]: pairs each query head attends to (summed over the batch)."""
    if not spec.mods:
        visible = float(visible_keys(spec.causal, n_q, n_kv).sum())
        return torch.full((Hq,), visible * B, dtype=torch.float64)
    total = torch.zeros(Hq, dtype=torch.float64)
    step = max(1, (1 << 24) // max(n_kv, 1))
    for r0 in range(0, n_q, step):
        ok = _pair_ok(spec, mod_tensors, n_q, n_kv, r0, min(r0 + step, n_q))
        ok = ok.expand(B, Hq if ok.shape[1] == 1 else ok.shape[1], *ok.shape[2:])
        total += ok.sum(dim=(0, 2, 3), dtype=torch.float64)
    return total


def provider(q, k, v, mod_tensors, counts, indices, spec):
    """``(out, (allowed, kept))`` for the cases computed exactly here, else None. A site's
    window and key validity are applied as boolean masks (``runtime.rules.lower_rules``);
    sinks are declined."""
    if not _active():
        return None
    site_spec, site_tensors = spec, mod_tensors
    lowered = lower_rules(spec, mod_tensors, q.shape[2], k.shape[2])
    if lowered is None:
        COUNTS["declined"] += 1
        return None
    spec, mod_tensors = lowered
    res = None
    if (q.device.type == "cpu" and q.dtype != torch.float64    # fp64 (gradchecks): reference
            and spec.causal in (None, "upper_left", "lower_right")
            and _mods_ok(spec, mod_tensors, q.shape[0], q.shape[1])
            and q.shape[1] % k.shape[1] == 0):
        try:
            if spec.policy.is_dense:
                res = _dense(q, k, v, mod_tensors, spec)
            elif getattr(spec.policy, "attend_kind", "") == "block" and counts.numel():
                res = _block_gather(q, k, v, mod_tensors, counts, indices, spec)
            elif (getattr(spec.policy, "attend_kind", "") == "token" and indices.numel()
                  and not spec.mods):
                res = _token_lists(q, k, v, indices, spec)
        except (KeyError, ImportError):
            res = None
    COUNTS["served" if res is not None else "declined"] += 1
    if res is not None and site_spec.kv_valid:          # rows no key is visible to
        out = fix_empty_rows(res[0], v, site_spec, site_spec.split(site_tensors)[2],
                             q.shape[2], k.shape[2])
        res = (out,) + tuple(res[1:])
    return res


def _dense(q, k, v, mod_tensors, spec):
    """SDPA with the site's masks and causal rule (density 1: every pair the model attends to;
    ``runtime.dispatch`` records it)."""
    B, Hq, n_q, _ = q.shape
    n_kv = k.shape[2]
    kw = {"enable_gqa": True} if Hq != k.shape[1] else {}
    if len(spec.mods) == 1 and spec.mods[0][0] == "keep" and spec.causal is None:
        # one boolean mask: SDPA takes it as it is (rows it empties give 0, as the reference)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_as4d(mod_tensors[0]).bool(),
                                             scale=spec.scale, **kw)
        return out, None
    off = _offset(spec.causal, n_q, n_kv)
    mask, is_causal, any_keep = None, False, False
    for mod, t in zip(spec.mods, mod_tensors):
        t = _as4d(t)
        if mod[0] == "keep":
            any_keep = True
            t = torch.zeros(t.shape, dtype=torch.float32).masked_fill(~t.to(torch.bool),
                                                                       float("-inf"))
        mask = t.float() if mask is None else mask + t.float()
    if spec.causal is not None:
        if mask is None and off == 0 and n_q == n_kv:
            is_causal = True
        elif off < n_kv - 1 or mask is not None:      # some row does not see every key
            pos = torch.arange(n_q)[:, None] + off
            causal = torch.zeros(n_q, n_kv).masked_fill(torch.arange(n_kv)[None, :] > pos,
                                                        float("-inf"))
            mask = causal if mask is None else mask + causal
            any_keep = True
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                         is_causal=is_causal, scale=spec.scale, **kw)
    if any_keep:                                  # rows whose every score is -inf give 0
        dead = ~torch.isfinite(mask.amax(dim=-1, keepdim=True))
        out = out.masked_fill(dead, 0.0)
    return out.to(q.dtype), None


def _token_lists(q, k, v, indices, spec):
    """Token lists (dsa): SDPA under the lists' keep mask (the lists already respect the
    causal rule). kept = listed pairs, allowed = causally visible pairs, per query head."""
    B, Hq, n_q, _ = q.shape
    n_kv = k.shape[2]
    keep = keep_from_indices(indices, n_kv)(0, n_q)                     # [B, Hs, Nq, Nkv]
    mask = torch.zeros(keep.shape, dtype=torch.float32).masked_fill(~keep, float("-inf"))
    kw = {"enable_gqa": True} if Hq != k.shape[1] else {}
    if keep.shape[1] not in (1, Hq):
        mask = mask.repeat_interleave(Hq // keep.shape[1], dim=1)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                         scale=spec.scale, **kw)
    out = out.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    kept = keep.sum(dim=(0, 2, 3)).to(torch.float64)
    kept = kept.repeat_interleave(Hq // keep.shape[1]) if keep.shape[1] != Hq else kept
    allowed = _allowed_per_head(spec, [], B, Hq, n_q, n_kv)
    return out.to(q.dtype), (allowed, kept)


def _tile(t: torch.Tensor, B: int, H: int, nb: int, block: int,
          kidx: torch.Tensor) -> torch.Tensor:
    """Gather a row-chunk map ``t`` [b, h, rows|1, Nkv] (h in {1, H, H*G}) at the chunk's key
    columns ``kidx`` int64 [B, H, nb, CB]: [B, H, nb, g, block|1, CB], g = h // H or 1."""
    t = _as4d(t)
    b, h, rows, n_kv = t.shape
    g = h // H if h > 1 else 1
    t = t.reshape(b, 1 if h == 1 else H, g, rows, n_kv)
    if rows != 1:
        pad = nb * block - rows
        if pad:
            t = torch.cat([t, t.new_zeros(b, t.shape[1], g, pad, n_kv)], dim=3)
        t = t.reshape(b, t.shape[1], g, nb, block, n_kv).transpose(2, 3)
        r = block
    else:
        t = t.reshape(b, t.shape[1], 1, g, 1, n_kv)
        r = 1
    t = t.expand(B, H, nb, g, r, n_kv)
    idx = kidx[:, :, :, None, None, :].expand(B, H, nb, g, r, kidx.shape[-1])
    return torch.gather(t, 5, idx)


def _sink_window_at(pol, pos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """sink_window's token rule at given (query position, key position) pairs (broadcast):
    the same rule as its ``token_keep`` row map (``codegen.select.reference.window_keep_fn``)."""
    return (kpos < pol.sink) | ((pos - kpos).abs() < pol.window)


#: token-level keep rules evaluated only at the gathered pairs (else the policy's row map over
#: every key is built and gathered); tests check each against the policy's ``token_keep``
_TOKEN_KEEP_AT = {SinkWindow: _sink_window_at}


def _visible_lists(counts, indices, block: int, n_q: int, n_kv: int, causal):
    """Drop listed key blocks no query of the block can see (causal), keeping the layout:
    listed first, ascending, -1 after. counts [B, H, NQB], indices [B, H, NQB, NKB]."""
    if causal is None:
        return counts, indices
    nqb, width = indices.shape[2], indices.shape[3]
    last = (torch.arange(nqb) * block + block).clamp(max=n_q) - 1 + _offset(causal, n_q, n_kv)
    slot = torch.arange(width)
    keep = (slot < counts[..., None]) & (indices * block <= last[:, None]) & (indices >= 0)
    if bool((keep == (slot < counts[..., None])).all()):
        return counts, indices
    order = torch.where(keep, slot, width + slot).argsort(dim=-1)
    new = torch.gather(indices, -1, order)
    n = keep.sum(dim=-1)
    return n, torch.where(slot < n[..., None], new, torch.full_like(new, -1))


def _block_gather(q, k, v, mod_tensors, counts, indices, spec):
    """Attention over the listed key blocks of each query block, chunk by chunk of query blocks.

    Per chunk of ``nb`` query blocks padded to ``C`` listed blocks: keys/values gathered to
    [B, H, nb, C*block, D], queries of a GQA group stacked to [B, H, nb, G*block, D]."""
    B, Hq, Nq, D = q.shape
    Hkv, Nkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    Hs = counts.shape[1]
    block = _block_of(spec)
    if (Hs % Hkv and Hkv % Hs) or Hq % max(Hs, Hkv) or counts.shape[2] != -(-Nq // block):
        return None
    H = max(Hs, Hkv)                        # heads owning both a block list and a key head
    G = Hq // H                             # query heads per list
    if Hs < H:
        counts = counts.repeat_interleave(H // Hs, dim=1)
        indices = indices.repeat_interleave(H // Hs, dim=1)
    kf, vf = k.float(), v.float()
    if Hkv < H:
        kf, vf = kf.repeat_interleave(H // Hkv, dim=1), vf.repeat_interleave(H // Hkv, dim=1)
    tok = None if type(spec.policy) in _TOKEN_KEEP_AT else _token_keep(spec, Nq, Nkv, q.device)
    off = _offset(spec.causal, Nq, Nkv)
    nqb = counts.shape[2]
    qf = q.float().reshape(B, H, G, Nq, D)
    out = torch.empty(B, H, G, nqb * block, Dv, dtype=torch.float32)
    kept = torch.zeros(H, G, dtype=torch.float64)
    has_add = any(m[0] == "add" for m in spec.mods)
    counts, indices = _visible_lists(counts.long(), indices.long(), block, Nq, Nkv, spec.causal)
    widest = counts.amax(dim=(0, 1)).tolist()                          # per query block
    slots = torch.arange(block)
    i0 = 0
    while i0 < nqb:
        C, i1 = max(widest[i0], 1), i0 + 1
        while i1 < nqb and (B * H * G * (i1 + 1 - i0) * block * max(C, widest[i1]) * block
                            <= CHUNK_ELEMENTS):
            C, i1 = max(C, widest[i1]), i1 + 1
        nb, CB = i1 - i0, C * block
        r0, r1 = i0 * block, min(i1 * block, Nq)
        # key positions of the listed blocks: [B, H, nb, CB]; unlisted slots are invalid
        idx = indices[:, :, i0:i1, :C].long()
        listed = torch.arange(C)[None, None, None, :] < counts[:, :, i0:i1, None]
        kpos = (idx.clamp_min(0)[..., None] * block + slots).reshape(B, H, nb, CB)
        valid = listed[..., None].expand(B, H, nb, C, block).reshape(B, H, nb, CB) & (kpos < Nkv)
        kpos = kpos.clamp_max(Nkv - 1)
        flat = kpos.reshape(B, H, nb * CB, 1)
        ks = torch.gather(kf, 2, flat.expand(-1, -1, -1, D)).reshape(B, H, nb, CB, D)
        vs = torch.gather(vf, 2, flat.expand(-1, -1, -1, Dv)).reshape(B, H, nb, CB, Dv)
        qc = qf.new_zeros(B, H, G, nb * block, D)
        qc[:, :, :, :r1 - r0] = qf[:, :, :, r0:r1]
        qc = qc.reshape(B, H, G, nb, block, D).transpose(2, 3).reshape(B, H, nb, G * block, D)
        s = torch.matmul(qc, ks.transpose(-1, -2)).mul_(spec.scale)
        s = s.view(B, H, nb, G, block, CB)
        # keep map [B, H, nb, 1|G, block, CB]: listed, real row, the model's masks in order,
        # causal rule, the policy's token-level keep
        row = torch.arange(i0, i1)[:, None] * block + slots[None, :]     # [nb, block]
        ok = valid[:, :, :, None, None, :] & (row < Nq)[:, None, :, None]
        if spec.causal is not None:
            ok = ok & (kpos[:, :, :, None, None, :] <= (row + off)[:, None, :, None])
        for mod, t in zip(spec.mods, mod_tensors):
            tt = _tile(_mod_rows(t, r0, r1), B, H, nb, block, kpos)
            if mod[0] == "add":
                s = s + tt.float()
            else:
                ok = ok & tt.to(torch.bool)
        fast = _TOKEN_KEEP_AT.get(type(spec.policy))
        if fast is not None:
            ok = ok & fast(spec.policy, (row + off)[:, None, :, None], kpos[:, :, :, None, None, :])
        elif tok is not None:
            t = tok(r0, r1)
            if t.dim() != 4 or t.shape[1] not in (1, H, Hq) or t.shape[0] not in (1, B):
                return None
            ok = ok & _tile(t.to(torch.bool), B, H, nb, block, kpos)
        # kept pairs: kept and attended by the model (score above MASKED_BELOW after its
        # additive masks, as the reference counts them); the softmax runs over every kept pair
        counted = ok & (s > MASKED_BELOW) if has_add else ok
        n = counted.sum(dim=(0, 2, 4, 5), dtype=torch.float64)           # [H, 1|G]
        kept += n if n.shape[1] == G else n.expand(H, G)
        s.masked_fill_(~ok, float("-inf"))                             # ok broadcasts over G
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp_(s.sub_(m))
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p.view(B, H, nb, G * block, CB), vs)           # [B, H, nb, G*blk, Dv]
        o = o.view(B, H, nb, G, block, Dv) / denom.clamp_min(1e-30)      # empty rows: 0
        o = o.transpose(2, 3).reshape(B, H, G, nb * block, Dv)
        out[:, :, :, r0:r0 + nb * block] = o
        i0 = i1
    allowed = _allowed_per_head(spec, mod_tensors, B, Hq, Nq, Nkv)
    out = out[:, :, :, :Nq].reshape(B, Hq, Nq, Dv)
    return out.to(q.dtype), (allowed, kept.reshape(Hq))
