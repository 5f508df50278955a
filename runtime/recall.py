"""Recall of the attention mass: how much of each query row's dense attention probability falls
in the set of pairs a site's policy kept. Opt-in per compiled model (``enable(owner)``); a model
that did not ask pays one dict lookup per ``sparse.attend`` call.

For a recorded call the runtime samples query rows (one per query block of the map, plus the
last row; every row when there are few), computes their exact dense softmax in fp32 under the
site's own rules (modifiers, causality, window, key validity) and sums the probability of the
pairs the policy's lists keep (``runtime.rules.keep_of``, the same keep-set the reference
attends over). The cost is that of attending ``rows`` queries densely, whatever the length.

    recall[b, h, r] = sum_{j kept} p[b, h, r, j] / sum_j p[b, h, r, j]

(p over the keys; a learned sink logit, where the site has one, is not a key and is left out).
A row the model lets see no key is not counted. Besides the per-row recall, a recording keeps
maps for pictures (batch row 0): the dense block mass and the kept fraction per (query block,
key block) and head, and the last query row's probability and keep mask over every key.

    >>> enable("p0", rows=64)          # doctest: +SKIP
    >>> get("p0/model.layers.0.self_attn").recall          # doctest: +SKIP
"""
from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from codegen.attention.reference import MASKED_BELOW, apply_modifiers, positions_offset
from runtime import estimators
from runtime.rules import keep_of, reference_rules
from runtime.spec import SiteSpec

#: the map is at most this many blocks a side (larger maps pool several policy blocks)
MAP_CELLS = 128

_ACTIVE: dict[str, int] = {}              # owner -> sampled query rows per call
_RECORDS: dict[str, "Recording"] = {}     # stats key (owner/site) -> last call's recording
_LOCK = threading.Lock()


@dataclass
class Recording:
    """What ``observe`` measured on one call of one site.

    rows:        int64 [R] the sampled query rows (ascending; the last row is among them)
    row_recall:  float32 [B, Hq, R] kept share of each sampled row's dense attention mass
                 (NaN for a row that sees no key)
    block:       key/query block of the maps (the policy's block, or a multiple of it)
    block_mass:  float32 [Hq, NQB, NKB] dense attention mass of each key block, mean over the
                 sampled rows of the query block (batch row 0; NaN: no sampled row there)
    block_kept:  float32 [Hq, NQB, NKB] share of the attended pairs of the block (sampled rows)
                 that the policy kept (NaN where the model attends to none)
    last_prob:   float32 [Hq, Nkv] dense attention of the last query row (batch row 0)
    last_kept:   bool [Hq, Nkv] the pairs of that row the policy kept
    shape:       (B, Hq, Nq, Nkv)
    """

    rows: torch.Tensor
    row_recall: torch.Tensor
    block: int
    block_mass: torch.Tensor
    block_kept: torch.Tensor
    last_prob: torch.Tensor
    last_kept: torch.Tensor
    shape: tuple

    @property
    def recall_per_head(self) -> list:
        """Mean recall over the sampled rows (and batch rows), per query head."""
        return _nanmean(self.row_recall.transpose(0, 1).reshape(self.shape[1], -1)).tolist()

    @property
    def worst_per_head(self) -> list:
        """Lowest row recall, per query head."""
        return _nanmin(self.row_recall.transpose(0, 1).reshape(self.shape[1], -1)).tolist()

    @property
    def recall(self) -> float:
        """Mean recall over every sampled row of every head."""
        return float(_nanmean(self.row_recall.reshape(1, -1))[0])

    @property
    def worst(self) -> float:
        """Lowest recall of any sampled row of any head."""
        return float(_nanmin(self.row_recall.reshape(1, -1))[0])


def _nanmean(x: torch.Tensor) -> torch.Tensor:
    ok = ~torch.isnan(x)
    n = ok.sum(-1)
    s = torch.where(ok, x, torch.zeros_like(x)).sum(-1)
    return torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, float("nan")))


def _nanmin(x: torch.Tensor) -> torch.Tensor:
    m = torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x).amin(-1)
    return torch.where(torch.isinf(m), torch.full_like(m, float("nan")), m)


def enable(owner: str, rows: int = 64) -> None:
    """Record every call of the sites of compiled model ``owner`` (``rows`` sampled query rows
    per call; at least one per query block of the map and the last row are always taken)."""
    if int(rows) < 1:
        raise ValueError(f"recall recording needs rows >= 1, got {rows}")
    with _LOCK:
        _ACTIVE[owner] = int(rows)


def disable(owner: str) -> None:
    with _LOCK:
        _ACTIVE.pop(owner, None)


def active(owner: str) -> bool:
    return owner in _ACTIVE


def rows_of(owner: str) -> Optional[int]:
    """Sampled rows per call of ``owner``'s recording, None when it records nothing."""
    return _ACTIVE.get(owner)


def get(stats_key: str) -> Optional[Recording]:
    """The last recorded call of the site ``owner/site`` (None if none was recorded)."""
    return _RECORDS.get(stats_key)


def reset(prefix: str = "") -> None:
    with _LOCK:
        for name in [n for n in _RECORDS if n.startswith(prefix)]:
            del _RECORDS[name]


def map_block(spec: SiteSpec, n_q: int, n_kv: int) -> int:
    """Block of the recorded maps: the policy's block (64 for token policies), doubled until
    the map has at most ``MAP_CELLS`` blocks a side."""
    b = estimators.block_of(spec) if spec.policy.attend_kind == "block" else 64
    while max(n_q, n_kv) > b * MAP_CELLS:
        b *= 2
    return b


def sample_rows(n_q: int, rows: int, block: int, seed: int) -> torch.Tensor:
    """int64 [R]: every row if ``n_q <= rows``; else ``rows // n_blocks`` (at least 1) rows
    drawn per query block of ``block`` rows (seeded), plus the last row, ascending."""
    if n_q <= rows:
        return torch.arange(n_q)
    nqb = -(-n_q // block)
    per = max(1, rows // nqb)
    g = torch.Generator().manual_seed(seed)
    picked = [torch.tensor([n_q - 1])]
    for qb in range(nqb):
        lo, hi = qb * block, min((qb + 1) * block, n_q)
        n = min(per, hi - lo)
        picked.append(lo + torch.randperm(hi - lo, generator=g)[:n])
    return torch.unique(torch.cat(picked))


def observe(spec: SiteSpec, q: torch.Tensor, k: torch.Tensor, mod_tensors, counts: torch.Tensor,
            indices: torch.Tensor) -> None:
    """Record this call of ``spec``'s site if its owner asked (``enable``); lists as
    ``sparse.attend`` runs them (empty lists of a site run densely: recall 1)."""
    rows = _ACTIVE.get(spec.owner)
    if rows is None or q.shape[2] == 0 or k.shape[2] == 0:
        return
    rec = measure(spec, q, k, mod_tensors, counts, indices, rows=rows)
    with _LOCK:
        _RECORDS[spec.stats_key] = rec


@torch.no_grad()
def measure(spec: SiteSpec, q: torch.Tensor, k: torch.Tensor, mod_tensors, counts: torch.Tensor,
            indices: torch.Tensor, *, rows: int = 64,
            row_index: Optional[torch.Tensor] = None) -> Recording:
    """Recall and maps of one call: q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nkv, D]``, the site's
    ``mods`` list, the policy's lists. ``row_index`` (int64 [R]) overrides the sampled rows."""
    B, Hq, Nq, _ = q.shape
    Nkv = k.shape[2]
    blk = map_block(spec, Nq, Nkv)
    if row_index is None:
        row_index = sample_rows(Nq, rows, blk, zlib.crc32(spec.site.encode()))
    r = row_index.to(q.device)
    R = r.numel()
    g = Hq // k.shape[1]
    kf = k.detach().float().repeat_interleave(g, dim=1)                      # [B, Hq, Nkv, D]
    s = torch.matmul(q.detach()[:, :, r].float(), kf.transpose(-1, -2)) * spec.scale  # [B,Hq,R,Nkv]
    mods, tensors, _ = reference_rules(spec, mod_tensors, Nkv)
    s = apply_modifiers(s, mods, tensors, r).float()
    pos = r[:, None] + positions_offset(spec.causal, Nq, Nkv)                 # [R, 1]
    j = torch.arange(Nkv, device=q.device)[None, :]
    if spec.causal is not None:
        s = s.masked_fill(j > pos, float("-inf"))
    if spec.window:
        s = s.masked_fill(j <= pos - spec.window, float("-inf"))
    allowed = s > MASKED_BELOW                                                # [B, Hq, R, Nkv]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(allowed, p, torch.zeros_like(p))       # rows seeing no key: all zero
    keep = keep_of(spec, counts, indices, Nq, Nkv, q.device)
    if keep is None:
        kept = allowed
    else:
        kk = torch.cat([keep(int(i), int(i) + 1) for i in r.tolist()], dim=2)  # [B, Hs, R, Nkv]
        kept = allowed & kk.expand(B, -1, -1, -1).repeat_interleave(Hq // kk.shape[1], dim=1)
    total = p.sum(-1)
    row_recall = torch.where(allowed.any(-1), (p * kept).sum(-1) / total.clamp_min(1e-30),
                             torch.full_like(total, float("nan")))
    mass, kept_frac = _maps(p[0], allowed[0], kept[0], r, blk, Nq, Nkv)
    last = r.numel() - 1 if int(r[-1]) == Nq - 1 else None
    last_prob = p[0, :, last] if last is not None else torch.zeros(Hq, Nkv, device=q.device)
    last_kept = kept[0, :, last] if last is not None else torch.zeros(Hq, Nkv, dtype=torch.bool,
                                                                      device=q.device)
    return Recording(rows=r.cpu(), row_recall=row_recall.cpu(), block=blk,
                     block_mass=mass.cpu(), block_kept=kept_frac.cpu(),
                     last_prob=last_prob.cpu(), last_kept=last_kept.cpu(),
                     shape=(B, Hq, Nq, Nkv))


def _maps(p, allowed, kept, r, blk: int, n_q: int, n_kv: int) -> tuple:
    """Per head: (mass [Hq, NQB, NKB], kept share [Hq, NQB, NKB]) from the sampled rows' p,
    allowed and kept ``[Hq, R, Nkv]``."""
    Hq, R, _ = p.shape
    nqb, nkb = -(-n_q // blk), -(-n_kv // blk)
    pad = nkb * blk - n_kv

    def per_key_block(x):                                     # [Hq, R, Nkv] -> [Hq, R, NKB]
        x = torch.nn.functional.pad(x.float(), (0, pad))
        return x.reshape(Hq, R, nkb, blk).sum(-1)

    qb = (r // blk).long()
    onehot = torch.zeros(nqb, R, device=p.device)
    onehot[qb, torch.arange(R, device=p.device)] = 1.0        # [NQB, R]
    n_rows = onehot.sum(1)                                    # sampled rows per query block
    mass = torch.einsum("qr,hrk->hqk", onehot, per_key_block(p)) / n_rows.clamp_min(1)[None, :, None]
    mass = torch.where(n_rows[None, :, None] > 0, mass, torch.full_like(mass, float("nan")))
    n_allowed = torch.einsum("qr,hrk->hqk", onehot, per_key_block(allowed))
    n_kept = torch.einsum("qr,hrk->hqk", onehot, per_key_block(kept))
    frac = torch.where(n_allowed > 0, n_kept / n_allowed.clamp_min(1),
                       torch.full_like(n_kept, float("nan")))
    return mass, frac
