"""DeepSeek Sparse Attention at run time: the per-site lightning indexer, where its parameters
live, the ``dsa`` selection, and the recorder the training losses read.

Indexer (DeepSeek-V3.2-Exp report, eq. 1): ``I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s])``.
The report computes ``q_I`` and ``w`` from the query token's hidden state and ``k_I`` from the
key token's. A rewritten site only sees its own q, k, v (the hidden state of an attention call is
often not reachable in the captured graph, e.g. behind a fused QKV projection), so here the
indexer reads the site's q and k through learned projections::

    q_I = q_flat @ W_q   [B, Nq, H_I, d_I]      q_flat = q as [B, Nq, Hq * D]
    w   = q_flat @ W_w + b_w   [B, Nq, H_I]      (fp32)
    k_I = k_flat @ W_k   [B, Nkv, d_I]           k_flat = k as [B, Nkv, Hkv * D]

Cost: ``Nq * Hq * D * H_I * (d_I + 1) + Nkv * Hkv * D * d_I`` multiply-adds per call, small
next to attention. Because q and k already carry the model's rotary embedding, the indexer sees
positions; ``rope`` adds one of its own on the leading indexer dims.

Decoding: ``k_I`` of the cached keys is kept with the cache (``index_keys``), like quest's page
summaries. The rewrite turns a dsa site's key append ``cat([past, new], dim=-2)`` into
``sparse.append``, which extends the kept ``k_I`` of ``past`` by the new tokens' projections
(``extend_keys``; ``B * n_new * Hkv * D * d_I`` multiply-adds instead of ``Nkv`` rows per step
and layer), at ``B * Nkv * d_I`` elements of memory. Kept keys are found by the identity of the
keys tensor, its length, the indexer and the version of its key weights, so a keys tensor
without them, or an indexer changed by a training step, gets them recomputed in full: the
answer never depends on whether they were kept.

Initialisation: ``k_I`` is a random Johnson-Lindenstrauss projection of the keys and every
``q_I`` head the matching projection of the scaled queries averaged over all heads (plus small noise so
heads can diverge), so an untrained indexer already ranks keys roughly by the head-averaged
attention logit; ``w`` starts at ``1 / H_I``.

Parameters live in an ``IndexerBank`` (one ``LightningIndexer`` per site) that
``planner.compile`` registers on the compiled model as ``sparse_indexers``: they appear in
``parameters()`` and ``state_dict()``. An indexer is created at the first call of its site
(shapes are known then); ``load_state_dict`` creates the ones it finds in the dict.
"""
from __future__ import annotations

import collections
import contextlib
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from codegen.attention.reference import positions_offset
from runtime.kernels import indexer as indexer_kernels
from runtime.tensor_notes import TensorNotes

_INFO = ("hq", "hkv", "head_dim", "index_heads", "index_dim", "rope")


def _rotate(x: torch.Tensor, pos: torch.Tensor, dims: int) -> torch.Tensor:
    """Rotary embedding (base 10000) on the first ``dims`` features of ``x [..., N, d]``;
    ``pos`` [N] absolute positions."""
    half = dims // 2
    inv = 1.0 / (10000.0 ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    ang = pos.to(torch.float32)[:, None] * inv[None, :]                 # [N, half]
    cos, sin = ang.cos(), ang.sin()
    r = x[..., :dims].float()
    a, b = r[..., :half], r[..., half:]
    rot = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x.dtype)
    return torch.cat([rot, x[..., dims:]], dim=-1)


class LightningIndexer(nn.Module):
    """One site's indexer: ``forward(q, k, causal_offset)`` -> ``(q_I [B, Nq, H_I, d_I],
    w [B, Nq, H_I] fp32, k_I [B, Nkv, d_I])`` in q's dtype (``w`` fp32)."""

    def __init__(self, hq: int, hkv: int, head_dim: int, index_heads: int, index_dim: int,
                 rope: int = 0, scale: float = 1.0, device=None):
        super().__init__()
        if hq % hkv:
            raise ValueError(f"query heads {hq} are not a multiple of key heads {hkv}")
        self.hq, self.hkv, self.head_dim = hq, hkv, head_dim
        self.index_heads, self.index_dim, self.rope = index_heads, index_dim, rope
        f32 = dict(device=device, dtype=torch.float32)
        self.wq = nn.Parameter(torch.empty(index_heads * index_dim, hq * head_dim, **f32))
        self.wk = nn.Parameter(torch.empty(index_dim, hkv * head_dim, **f32))
        self.ww = nn.Parameter(torch.empty(index_heads, hq * head_dim, **f32))
        self.bw = nn.Parameter(torch.empty(index_heads, **f32))
        self.register_buffer("shape_info", torch.tensor(
            [hq, hkv, head_dim, index_heads, index_dim, rope], dtype=torch.int64, device=device))
        self.reset_parameters(scale)

    @torch.no_grad()
    def reset_parameters(self, scale: float = 1.0) -> None:
        hi, di, d, g = self.index_heads, self.index_dim, self.head_dim, self.hq // self.hkv
        dev = self.wq.device
        # k_I = sum_c R_c^T k_c; q_I,j = sum_h R_{c(h)}^T q_h * scale / Hq (+ noise per head)
        r = torch.randn(self.hkv, di, d, device=dev) / math.sqrt(di)      # R_c^T  [dI, D]
        self.wk.copy_(r.permute(1, 0, 2).reshape(di, self.hkv * d))
        # q_I . k_I ~ sum_c sum_{h in c} scale * q_h . k_c / Hq: the head-averaged logit
        base = torch.cat([r[h // g] for h in range(self.hq)], dim=1) * (scale / self.hq)
        noise = torch.randn(hi, di, self.hq * d, device=dev) * (base.std() * 0.1)
        self.wq.copy_((base[None] + noise).reshape(hi * di, self.hq * d))
        self.ww.zero_()
        self.bw.fill_(1.0 / hi)

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """A clear error when ``q`` / ``k`` do not have the heads and head dim it was built for."""
        got = (q.shape[1], k.shape[1], q.shape[3])
        if got != (self.hq, self.hkv, self.head_dim) or k.shape[3] != self.head_dim:
            raise ValueError(f"indexer built for q heads {self.hq}, k heads {self.hkv}, head dim "
                             f"{self.head_dim}; called with {got[0]}, {got[1]}, {got[2]}")

    def queries(self, q: torch.Tensor, offset: int = 0):
        """``(q_I [B, Nq, H_I, d_I], w [B, Nq, H_I] fp32)``; query ``t`` sits at position
        ``t + offset`` (for ``rope``)."""
        B, Hq, Nq, D = q.shape
        qf = q.transpose(1, 2).reshape(B, Nq, Hq * D)
        q_i = F.linear(qf, self.wq.to(q.dtype)).view(B, Nq, self.index_heads, self.index_dim)
        w = F.linear(qf.float(), self.ww, self.bw)
        if self.rope:
            qpos = torch.arange(Nq, device=q.device) + offset
            q_i = _rotate(q_i.transpose(1, 2), qpos, self.rope).transpose(1, 2)
        return q_i, w

    def keys(self, k: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``k_I [B, Nkv, d_I]`` in k's dtype; key ``s`` sits at position ``s + start``."""
        B, Hkv, Nkv, D = k.shape
        kf = k.transpose(1, 2).reshape(B, Nkv, Hkv * D)
        k_i = F.linear(kf, self.wk.to(k.dtype))
        if self.rope:
            k_i = _rotate(k_i, torch.arange(Nkv, device=k.device) + start, self.rope)
        return k_i

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        self.check(q, k)
        q_i, w = self.queries(q, offset)
        return q_i, w, self.keys(k.to(q.dtype))

    def scores(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Differentiable fp32 index scores ``[B, Nq, Nkv]`` (no mask applied)."""
        q_i, w, k_i = self(q, k, offset)
        dots = torch.einsum("bthd,bsd->bths", q_i.float(), k_i.float())
        return torch.einsum("bth,bths->bts", w, torch.relu(dots))


def _module_key(site: str) -> str:
    return site.replace(".", "__")


class IndexerBank(nn.Module):
    """The indexers of one compiled model, keyed by site (``.`` in site names becomes ``__``)."""

    def __init__(self):
        super().__init__()
        self.sites = nn.ModuleDict()
        self._names: dict = {}             # module key -> site name
        self._preloaded: dict = {}         # site name -> indexer state_dict (see preload)

    def get(self, site: str) -> Optional[LightningIndexer]:
        key = _module_key(site)
        return self.sites[key] if key in self.sites else None

    def ensure(self, site: str, q: torch.Tensor, k: torch.Tensor, policy, scale: float):
        key = _module_key(site)
        if key not in self.sites:
            want = (q.shape[1], k.shape[1], q.shape[3], policy.index_heads, policy.index_dim,
                    policy.rope)
            with torch.no_grad():
                ix = LightningIndexer(*want, scale, device=q.device)
                state = self._preload_for(site)
                if state is not None:
                    got = tuple(int(x) for x in state["shape_info"].tolist())
                    if got != want:
                        raise ValueError(
                            f"preloaded indexer for site {site!r} has (q heads, k heads, head "
                            f"dim, index heads, index dim, rope) = {got}; the site and policy "
                            f"need {want}")
                    ix.load_state_dict(state)
                self.sites[key] = ix
            self._names[key] = site
        return self.sites[key]

    def export(self) -> dict:
        """``{site name: indexer state_dict}`` (CPU tensors), for ``preload`` elsewhere."""
        return {self._names.get(k, k): {n: t.detach().cpu() for n, t in m.state_dict().items()}
                for k, m in self.sites.items()}

    def preload(self, states: dict) -> None:
        """Indexer weights to use when a site is first seen, keyed by site name; a saved name
        matches a site whose name equals it or ends with ``"." + name`` (the same model
        wrapped in another module)."""
        self._preloaded.update(states)

    def _preload_for(self, site: str):
        for name, state in self._preloaded.items():
            if site == name or site.endswith("." + name) or name.endswith("." + site):
                return state
        return None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        pre = prefix + "sites."
        for name, t in state_dict.items():
            if name.startswith(pre) and name.endswith(".shape_info"):
                key = name[len(pre):-len(".shape_info")]
                if key not in self.sites:
                    info = dict(zip(_INFO, (int(x) for x in t.tolist())))
                    self.sites[key] = LightningIndexer(**info, device=t.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


#: owner -> bank, weakly: the Backend (and the compiled model) hold their bank
_BANKS: "weakref.WeakValueDictionary[str, IndexerBank]" = weakref.WeakValueDictionary()


def register_bank(owner: str, bank: IndexerBank) -> None:
    _BANKS[owner] = bank


def bank_for(owner: str) -> IndexerBank:
    bank = _BANKS.get(owner)
    if bank is None:
        bank = IndexerBank()
        register_bank(owner, bank)
    return bank


# ----------------------------------------------------------------------------- recording
@dataclass
class SiteRecord:
    """What one call of a dsa site saw: the site's q and k (detached), the selected token
    lists (sparse mode; None in dense mode), the causal offset and the indexer."""
    site: str
    q: torch.Tensor
    k: torch.Tensor
    indices: Optional[torch.Tensor]
    offset: int
    scale: float
    indexer: LightningIndexer
    causal: bool = True
    topk: int = 0


@dataclass
class _Recorder:
    mode: str                      # "dense": attend densely (warm-up); "sparse": top-k on
    records: list = field(default_factory=list)


_LOCAL = threading.local()


def active_recorder() -> Optional[_Recorder]:
    return getattr(_LOCAL, "recorder", None)


@contextlib.contextmanager
def recording(mode: str):
    """Within the block, every dsa site records a ``SiteRecord``; ``mode="dense"`` makes the
    sites attend densely (the indexer warm-up stage), ``"sparse"`` keeps the top-k."""
    if mode not in ("dense", "sparse"):
        raise ValueError(f"recording mode must be 'dense' or 'sparse', got {mode!r}")
    prev = active_recorder()
    _LOCAL.recorder = rec = _Recorder(mode)
    try:
        yield rec
    finally:
        _LOCAL.recorder = prev


def dense_mode() -> bool:
    rec = active_recorder()
    return rec is not None and rec.mode == "dense"


# ----------------------------------------------------------------------------- kept keys
@dataclass
class _KeptKeys:
    indexer: "weakref.ref[LightningIndexer]"
    version: int                   # of the indexer's key weights when these were computed
    tokens: int
    buf: torch.Tensor              # [B, capacity, d_I]; rows [:tokens] are valid


_KEPT = TensorNotes()
#: rows projected in full / by extension, extensions that found the past's keys (tests, reports)
KEY_COUNTERS: collections.Counter = collections.Counter()


def _kept_for(k: torch.Tensor, indexer: LightningIndexer, take: bool = False):
    note = _KEPT.get(k)
    if (note is None or note.indexer() is not indexer or note.version != indexer.wk._version
            or note.tokens != k.shape[2] or note.buf.shape[0] != k.shape[0]
            or note.buf.dtype != k.dtype):
        return None
    if take:
        _KEPT.pop(k)
    return note


def index_keys(indexer: LightningIndexer, k: torch.Tensor) -> torch.Tensor:
    """``indexer.keys(k)`` (no gradient), kept with ``k`` for later calls and for
    ``extend_keys``: a keys tensor seen before (or made by ``sparse.append`` from one) is not
    projected again."""
    note = _kept_for(k, indexer)
    if note is None:
        with torch.no_grad():
            k_i = indexer.keys(k)
        KEY_COUNTERS["rows"] += k.shape[0] * k.shape[2]
        note = _KeptKeys(weakref.ref(indexer), indexer.wk._version, k.shape[2], k_i)
        _KEPT.put(k, note)
    return note.buf[:, :note.tokens]


def extend_keys(past: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` is ``past`` followed by new keys: when ``past`` has kept index keys, give
    ``out`` them extended by the new keys' projections (moved, not copied: the buffer grows by
    doubling)."""
    note = _KEPT.get(past)
    ix = None if note is None else note.indexer()
    if ix is None or past.shape[:2] != out.shape[:2] or _kept_for(past, ix, take=True) is None:
        return
    n_past, n = past.shape[2], out.shape[2]
    buf = note.buf
    if buf.shape[1] < n:
        grown = buf.new_empty((buf.shape[0], max(n, 2 * buf.shape[1]), buf.shape[2]))
        grown[:, :n_past] = buf[:, :n_past]
        buf = grown
    with torch.no_grad():
        buf[:, n_past:n] = ix.keys(out[:, :, n_past:], start=n_past)
    KEY_COUNTERS["rows"] += out.shape[0] * (n - n_past)
    KEY_COUNTERS["extensions"] += 1
    _KEPT.put(out, _KeptKeys(note.indexer, note.version, n, buf))


# ----------------------------------------------------------------------------- selection
def select(scores, q: torch.Tensor, k: torch.Tensor, spec):
    """``(counts, indices)`` for ``sparse.select``: counts empty, indices int32
    ``[B, 1, Nq, topk]`` (one list per query shared by every head; -1 = padding)."""
    pol = spec.policy
    B, _, n_q, _ = q.shape
    off = positions_offset(spec.causal, n_q, k.shape[2])
    indexer = bank_for(spec.owner).ensure(spec.site, q, k, pol, spec.scale)
    rec = active_recorder()
    if rec is not None and rec.mode == "dense":       # warm-up: attend densely, lists unused
        idx = torch.full((B, 1, n_q, pol.topk), -1, dtype=torch.int32, device=q.device)
    else:
        with torch.no_grad():
            indexer.check(q, k)
            q_i, w = indexer.queries(q.detach(), off)
            k_i = index_keys(indexer, k if k.dtype == q.dtype else k.to(q.dtype))
            idx = topk_indices(q_i, w, k_i, pol.topk, causal=spec.causal is not None,
                               offset=off).unsqueeze(1)                    # [B, 1, Nq, topk]
    if rec is not None:
        rec.records.append(SiteRecord(spec.site, q.detach(), k.detach(),
                                      None if rec.mode == "dense" else idx, off, spec.scale,
                                      indexer, spec.causal is not None, pol.topk))
    return q.new_empty(0, dtype=torch.int32), idx


def no_lists(q: torch.Tensor, k: torch.Tensor, spec):
    """``select``'s result for a call the cost model runs densely: lists of padding only (the
    attention ignores them), the indexer made (its parameters belong to the model) but not
    run."""
    made(q, k, spec)
    idx = torch.full((q.shape[0], 1, q.shape[2], spec.policy.topk), -1, dtype=torch.int32,
                     device=q.device)
    return q.new_empty(0, dtype=torch.int32), idx


def made(q: torch.Tensor, k: torch.Tensor, spec) -> None:
    """Make the site's indexer (its parameters belong to the model) without running it: what a
    call the cost model runs densely does in place of ``select``."""
    bank_for(spec.owner).ensure(spec.site, q, k, spec.policy, spec.scale)


def topk_indices(q_i, w, k_i, topk: int, *, causal: bool, offset: int) -> torch.Tensor:
    """int32 ``[B, Nq, topk]``: each query's best ``topk`` visible keys by index score (the
    fused Triton scorer + selection where it runs, else the PyTorch reference)."""
    n_q, n_kv = q_i.shape[1], k_i.shape[1]
    if causal and offset != n_kv - n_q:
        raise ValueError(f"dsa selection supports bottom-right causal alignment only "
                         f"(offset {offset}, Nq {n_q}, Nkv {n_kv})")
    if q_i.dtype == torch.float64:              # (gradient checks) rank in fp32, like the kernel
        q_i, k_i = q_i.float(), k_i.float()
    return indexer_kernels.indexer_topk(q_i, w, k_i, topk, causal=causal)


def keep_from_indices(indices: torch.Tensor, n_kv: int):
    """``keep(r0, r1)`` for ``attention_reference``: bool ``[B, Hs, r1 - r0, Nkv]`` marking each
    row's listed keys (``indices [B, Hs, Nq, K]``, -1 = padding)."""
    def keep(r0: int, r1: int) -> torch.Tensor:
        idx = indices[:, :, r0:r1].long()
        valid = idx >= 0
        m = torch.zeros(*idx.shape[:3], n_kv + 1, dtype=torch.bool, device=idx.device)
        m.scatter_(-1, torch.where(valid, idx, n_kv), True)
        return m[..., :n_kv]
    return keep
