"""KV-cache eviction: policies that decide what the cache keeps at all, and the compaction.

Masking a key out of attention saves compute; evicting it from the cache saves memory. An
eviction policy is a frozen dataclass with a ``budget``: a ratio in (0, 1] of the cached length
or a token count (an ``int`` >= 1), per layer ``budget_for(layer, n_layers, n)`` and per head
(``select``). After a prefill (``sparse.evict`` in the rewritten graph, ``passes.rewrite``) a
site scores the keys it just cached, keeps ``budget`` of them per KV head and returns the
compacted K/V, which the graph stores in the model's cache instead of the full tensors; later
calls append to the kept set and attend over it. Keys already carry their rotary embedding, so
a kept key keeps its position; the model's new tokens take their positions from the caller.

    >>> import torch
    >>> k = torch.randn(1, 2, 10, 4)
    >>> idx, counts = select(StreamingLLM(budget=6, sink=2), q=k, k=k, v=k, scale=0.5, gqa=1)
    >>> idx[0, 0].tolist()
    [0, 1, 6, 7, 8, 9]

Shapes: q [B, Hq, Nq, D] (the prefill's queries: the last ones are the observation window),
k [B, Hkv, N, D], v [B, Hkv, N, Dv]; the kept indices [B, Hkv, M] ascending, M = the largest
per-head count; ``counts`` [B, Hkv] is None where every head keeps M (Ada-KV's per-head budgets
differ: slots past a head's count repeat its last kept key and are masked when attending).
"""
from __future__ import annotations

import contextlib
import threading
from fractions import Fraction
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F

from runtime.tensor_notes import TensorNotes

Budget = Union[int, float]


def _check_budget(name: str, budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"eviction policy {name!r}: 'budget' must be a ratio in (0, 1] (float) or a "
                        f"token count >= 1 (int), got {budget!r} ({type(budget).__name__})")
    if isinstance(budget, float) and not (0.0 < budget <= 1.0):
        raise ValueError(f"eviction policy {name!r}: a ratio 'budget' must be in (0, 1], got "
                         f"{budget} (a token count is an int)")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"eviction policy {name!r}: 'budget' must be >= 1 token (or a ratio in "
                         f"(0, 1]), got {budget}: a cache cannot keep no key")


def _frac(x: float) -> Fraction:
    return Fraction(x).limit_denominator(1 << 20)


def _sym_max(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else torch.sym_max(a, b)


def _sym_min(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else torch.sym_min(a, b)


def tokens(budget: Budget, n) -> int:
    """Tokens a budget keeps of ``n`` (at least 1): ``ceil(ratio * n)`` or the count. Integer
    arithmetic only, so a symbolic ``n`` (a traced graph's length) gives the same count."""
    if isinstance(budget, int):
        return budget
    r = _frac(budget)
    return _sym_max(1, (n * r.numerator + r.denominator - 1) // r.denominator)


class Eviction:
    """Base of the eviction policies (frozen dataclasses with a ``name`` and a ``budget``)."""

    name: str = "?"
    budget: Budget = 0.2
    #: heads of one layer may keep different counts (the cache is padded to the largest)
    per_head_budgets: bool = False

    def __post_init__(self) -> None:
        _check_budget(self.name, self.budget)
        self.validate()

    def validate(self) -> None:
        pass

    def budget_for(self, layer: Optional[int], n_layers: Optional[int], n: int) -> int:
        """Tokens kept per KV head at ``layer`` of a prefill of ``n`` tokens."""
        return tokens(self.budget, n)

    def width(self, layer: Optional[int], n_layers: Optional[int], n) -> int:
        """Slots per head of the compacted cache (``n`` where nothing is evicted)."""
        return _sym_min(n, self.budget_for(layer, n_layers, n))

    def scores(self, q, k, v, scale: float, gqa: int) -> torch.Tensor:
        """Importance of each cached key per KV head, float32 [B, Hkv, N]; +inf = always kept."""
        raise NotImplementedError

    def short(self) -> str:
        import dataclasses
        fields = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}({fields})"


def _check(name: str, param: str, value, lo, integer=True) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else \
        (isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok or value < lo:
        raise ValueError(f"eviction policy {name!r}: parameter {param!r} must be "
                         f"{'an int' if integer else 'a number'} >= {lo}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# attention probabilities of a few queries (observation windows, the last query)

def window_probs(q: torch.Tensor, k: torch.Tensor, scale: float, gqa: int, rows: int,
                 chunk: int = 0) -> torch.Tensor:
    """Softmax attention of the last ``rows`` queries over every key, causal (the queries are
    the last ``rows`` positions of the prefill): float32 [B, Hkv, G, rows, N]."""
    b, hq, nq, d = q.shape
    n = k.shape[2]
    rows = min(rows, nq)
    qw = q[:, :, nq - rows:].float().reshape(b, hq // gqa, gqa, rows, d)
    s = torch.einsum("bhgrd,bhnd->bhgrn", qw, k.float()) * scale          # [B, Hkv, G, w, N]
    pos = torch.arange(n - rows, n, device=k.device)
    s = s.masked_fill(torch.arange(n, device=k.device)[None, :] > pos[:, None], float("-inf"))
    return torch.softmax(s, dim=-1)


def accumulated_attention(q: torch.Tensor, k: torch.Tensor, scale: float, gqa: int,
                          chunk: int = 256) -> torch.Tensor:
    """H2O's score: the attention each key received, summed over every query of the prefill
    (causal) and the query heads of its GQA group: float32 [B, Hkv, N]. Queries in chunks of
    ``chunk`` rows (memory B x Hq x chunk x N)."""
    b, hq, nq, d = q.shape
    n = k.shape[2]
    acc = torch.zeros(b, hq // gqa, n, device=k.device, dtype=torch.float32)
    kf = k.float()
    off = n - nq
    for r0 in range(0, nq, chunk):
        r1 = min(nq, r0 + chunk)
        qc = q[:, :, r0:r1].float().reshape(b, hq // gqa, gqa, r1 - r0, d)
        s = torch.einsum("bhgrd,bhnd->bhgrn", qc, kf) * scale
        pos = torch.arange(off + r0, off + r1, device=k.device)
        s = s.masked_fill(torch.arange(n, device=k.device)[None, :] > pos[:, None], float("-inf"))
        acc += torch.softmax(s, dim=-1).sum(dim=(2, 3))
    return acc


def _pool(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average pooling along the last axis, same length (SnapKV's clustering of votes)."""
    if kernel <= 1:
        return x
    shp = x.shape
    y = F.avg_pool1d(x.reshape(-1, 1, shp[-1]), kernel, stride=1, padding=kernel // 2,
                     count_include_pad=False)
    return y.reshape(shp)


# ---------------------------------------------------------------------------------------------
# the policies

@dataclass(frozen=True)
class StreamingLLM(Eviction):
    """StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention
    Sinks"): keep the first ``sink`` tokens (attention sinks) and the most recent
    ``budget - sink``; no scores."""

    budget: Budget = 0.2
    sink: int = 4
    name = "streaming_llm"

    def validate(self) -> None:
        _check(self.name, "sink", self.sink, 0)

    def scores(self, q, k, v, scale, gqa):
        b, h, n = k.shape[0], k.shape[1], k.shape[2]
        pos = torch.arange(n, device=k.device, dtype=torch.float32)
        s = pos.clone()                                  # recent first
        s[: self.sink] = float("inf")
        return s.expand(b, h, n).contiguous()


@dataclass(frozen=True)
class H2O(Eviction):
    """H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
    Large Language Models"): the keys with the largest accumulated attention (summed over every
    query of the prefill and the query heads sharing the KV head) plus the most recent tokens;
    ``recent`` is the fraction of the budget given to recent tokens (the paper splits it
    evenly)."""

    budget: Budget = 0.2
    recent: float = 0.5
    name = "h2o"

    def validate(self) -> None:
        if not (isinstance(self.recent, (int, float)) and 0.0 <= self.recent <= 1.0):
            raise ValueError(f"eviction policy {self.name!r}: 'recent' must be in [0, 1], "
                             f"got {self.recent!r}")

    def scores(self, q, k, v, scale, gqa, m: Optional[int] = None):
        s = accumulated_attention(q, k, scale, gqa)
        n = k.shape[2]
        r = int(round(self.recent * (m if m is not None else n)))
        if r > 0:
            s[..., n - r:] = float("inf")
        return s


@dataclass(frozen=True)
class SnapKV(Eviction):
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before
    Generation"): the last ``window`` queries of the prompt (the observation window) vote with
    their attention over the prefix (mean over the window, then over the query heads of the GQA
    group), votes are average-pooled over ``kernel`` neighbours, and each KV head keeps its top
    keys plus the window itself."""

    budget: Budget = 0.2
    window: int = 64
    kernel: int = 5
    name = "snapkv"

    def validate(self) -> None:
        _check(self.name, "window", self.window, 1)
        _check(self.name, "kernel", self.kernel, 1)

    def votes(self, q, k, v, scale, gqa) -> torch.Tensor:
        p = window_probs(q, k, scale, gqa, self.window)             # [B, Hkv, G, w, N]
        return _pool(p.mean(dim=3), self.kernel).mean(dim=2)       # [B, Hkv, N]

    def scores(self, q, k, v, scale, gqa):
        s = self.votes(q, k, v, scale, gqa)
        w = min(self.window, q.shape[2], k.shape[2])
        s[..., k.shape[2] - w:] = float("inf")
        return s


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
    Information Funneling"): SnapKV's selection with per-layer budgets in an arithmetic
    sequence, largest at the bottom layer and smallest at the top: top = avg / ``beta``,
    bottom = 2 avg - top (so the mean over layers is the budget ``avg``)."""

    beta: float = 20.0
    name = "pyramidkv"

    def validate(self) -> None:
        super().validate()
        _check(self.name, "beta", self.beta, 1, integer=False)

    def budget_for(self, layer, n_layers, n):
        avg = tokens(self.budget, n)
        if layer is None or not n_layers or n_layers < 2:
            return avg
        # budget_l = avg * c_l, c_l = (2 - 1/beta) - layer (2 - 2/beta) / (L - 1), rounded
        beta = _frac(self.beta)
        c = (2 - 1 / beta) - Fraction(layer) * (2 - 2 / beta) / (n_layers - 1)
        return _sym_max(1, (avg * c.numerator * 2 + c.denominator) // (2 * c.denominator))


@dataclass(frozen=True)
class AdaKV(SnapKV):
    """Ada-KV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
    Allocation for Efficient LLM Inference"): the layer keeps ``Hkv x budget`` keys in all,
    chosen as the top SnapKV scores across its heads jointly, so heads whose attention is
    concentrated give budget to heads whose attention is spread; each head first keeps its own
    top ``floor x budget`` keys (the paper's safeguard)."""

    floor: float = 0.2
    cap: float = 2.0
    name = "adakv"
    per_head_budgets = True

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.floor, (int, float)) and 0.0 <= self.floor <= 1.0):
            raise ValueError(f"eviction policy {self.name!r}: 'floor' must be in [0, 1], "
                             f"got {self.floor!r}")
        _check(self.name, "cap", self.cap, 1, integer=False)

    def width(self, layer, n_layers, n):
        """A cache tensor is rectangular: every head of the layer gets ``cap x budget`` slots
        (a head keeps at most that many; padding masked), so the memory is that width."""
        c = _frac(self.cap)
        m = self.budget_for(layer, n_layers, n)
        return _sym_min(n, (m * c.numerator + c.denominator - 1) // c.denominator)


@dataclass(frozen=True)
class TOVA(Eviction):
    """TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): keep the keys with the
    highest attention from the last query, averaged over every query head of the layer (one
    kept set for all heads), in one step after the prefill."""

    budget: Budget = 0.2
    name = "tova"

    def scores(self, q, k, v, scale, gqa):
        p = window_probs(q, k, scale, gqa, 1)[:, :, :, 0]          # [B, Hkv, G, N]
        s = p.mean(dim=(1, 2), keepdim=True).squeeze(2)            # [B, 1, N]
        s = s.expand(k.shape[0], k.shape[1], k.shape[2]).clone()
        s[..., -1] = float("inf")
        return s


@dataclass(frozen=True)
class ValueSnapKV(AdaKV):
    """SnapKV's observation-window votes weighted by the value norm, with Ada-KV's per-head
    budgets: a key's contribution to the output is its attention times its value, so a key with
    a small ``||v||_1`` matters less for the same attention (VATP, Guo et al., 2024, "Attention
    Score is not All You Need for Token Importance Indicator in KV Cache Reduction: Value Also
    Matters"); the first ``sink`` tokens are always kept (attention sinks, StreamingLLM)."""

    sink: int = 4
    name = "snapkv_value"

    def validate(self) -> None:
        super().validate()
        _check(self.name, "sink", self.sink, 0)

    def votes(self, q, k, v, scale, gqa):
        s = super().votes(q, k, v, scale, gqa)
        return s * v.float().abs().sum(dim=-1)

    def scores(self, q, k, v, scale, gqa):
        s = super().scores(q, k, v, scale, gqa)
        s[..., : self.sink] = float("inf")
        return s


#: eviction presets by name (``planner.compile(..., evict="snapkv")``)
EVICTIONS: dict[str, type] = {c.name: c for c in (StreamingLLM, H2O, SnapKV, PyramidKV, AdaKV,
                                                  TOVA, ValueSnapKV)}


def eviction(name, **params) -> Eviction:
    """Build an eviction policy by name (or copy one with overrides)."""
    import dataclasses
    if isinstance(name, Eviction):
        return dataclasses.replace(name, **params) if params else name
    if name not in EVICTIONS:
        raise ValueError(f"unknown eviction policy {name!r}; valid names: "
                         f"{', '.join(sorted(EVICTIONS))}")
    cls = EVICTIONS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    if set(params) - known:
        raise TypeError(f"eviction policy {name!r} has no parameter(s) "
                        f"{sorted(set(params) - known)}; valid: {sorted(known)}")
    return cls(**params)


# ---------------------------------------------------------------------------------------------
# selection and compaction

def select(pol: Eviction, q, k, v, scale: float, gqa: int, layer: Optional[int] = None,
           n_layers: Optional[int] = None):
    """Kept indices ``[B, Hkv, M]`` (ascending) and per-head ``counts`` [B, Hkv] (None where
    every head keeps M); ``(None, None)`` where the budget covers every key."""
    n = k.shape[2]
    m = pol.budget_for(layer, n_layers, n)
    if m >= n:
        return None, None
    s = pol.scores(q, k, v, scale, gqa, m) if isinstance(pol, H2O) else \
        pol.scores(q, k, v, scale, gqa)
    if not pol.per_head_budgets:
        idx = s.topk(m, dim=-1).indices
        return idx.sort(dim=-1).values, None
    return _adaptive(pol, s, m, pol.width(layer, n_layers, n))


def _adaptive(pol: AdaKV, s: torch.Tensor, m: int, w: int):
    """Ada-KV's allocation: each head its top ``floor * m`` (at least one key: a head with none
    would attend to nothing), then the layer's remaining ``H * m - H * safe`` slots to the best
    remaining scores over all heads, no head taking more than ``w`` (the padded width). Equal
    scores (SnapKV's window keys all score +inf) go to the lower head, then the head's earlier
    rank: a head's own safeguard keys come first whatever their score."""
    b, h, n = s.shape
    safe = min(m, max(1, int(pol.floor * m)))
    order = s.argsort(dim=-1, descending=True, stable=True)        # per head, ties by position
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=s.device)
                                            .expand_as(order))
    tier = torch.where(rank < safe, 2, torch.where(rank < w, 1, 0)).reshape(b, h * n)
    # the flat keys by (tier desc, score desc, head, rank): stable sorts, last key first
    o = (order + n * torch.arange(h, device=s.device)[:, None]).reshape(b, h * n)
    by_score = s.reshape(b, h * n).gather(-1, o).argsort(dim=-1, descending=True, stable=True)
    o = o.gather(-1, by_score)
    o = o.gather(-1, tier.gather(-1, o).argsort(dim=-1, descending=True, stable=True))
    keep = torch.zeros(b, h * n, dtype=torch.bool, device=s.device)
    keep.scatter_(-1, o[:, :h * m], True)
    keep = keep.reshape(b, h, n)
    counts = keep.sum(-1)                                          # [B, H], each in [safe, w]
    mx = w
    # ascending kept positions first, then the dropped ones; the first ``mx`` columns
    pos = torch.arange(n, device=s.device).expand(b, h, n)
    order = torch.where(keep, pos, pos + n).sort(dim=-1).values[..., :mx]
    last = order.gather(-1, (counts - 1).unsqueeze(-1))
    idx = torch.where(order >= n, last, order)                     # pad: repeat the last kept key
    return idx, counts


def compact(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, h, idx[b, h, :]]``: [B, H, N, D] -> [B, H, M, D] (a new contiguous tensor)."""
    return x.gather(2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def keep(pol: Eviction, q, k, v, scale: float, gqa: int, layer: Optional[int] = None,
         n_layers: Optional[int] = None) -> tuple:
    """(k, v) a cache keeps under ``pol`` (copies of the full ones where the budget covers
    every key; per-head counts noted on the keys) and ``select``'s ``(idx, counts)``."""
    idx, counts = select(pol, q, k, v, scale, gqa, layer, n_layers)
    if idx is None:
        return k.clone(), v.clone(), None, None
    k2, v2 = compact(k, idx), compact(v, idx)
    if counts is not None:
        note_counts(k2, counts)
    return k2, v2, idx, counts


# ---------------------------------------------------------------------------------------------
# per-head valid lengths of padded caches (Ada-KV), kept with the keys tensor

_VALID = TensorNotes()


def note_counts(k: torch.Tensor, counts: torch.Tensor) -> None:
    """Head h of ``k`` holds ``counts[b, h]`` kept keys, then padding up to the eviction's
    largest count, then whatever was appended since (all valid)."""
    _VALID.put(k, (counts, k.shape[2]))


def extend(past: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = ``past`` followed by new tokens: it inherits past's padding."""
    note = _VALID.get(past) if past.dim() == 4 else None
    if note is not None:
        _VALID.put(out, note)


def key_valid(k: torch.Tensor) -> Optional[torch.Tensor]:
    """Bool [B, Hkv, N] of the real keys of a padded cache (None: every key is real)."""
    note = _VALID.get(k)
    if note is None:
        return None
    counts, mx = note
    n = k.shape[2]
    pos = torch.arange(n, device=k.device)
    return (pos < counts.unsqueeze(-1)) | (pos >= mx)


# ---------------------------------------------------------------------------------------------
# what inspect shows

@dataclass
class EvictRecord:
    policy: str
    before: int = 0                    # cached tokens per head before
    after: int = 0                     # tokens per head after (the padded width for Ada-KV)
    bytes_before: int = 0
    bytes_after: int = 0
    per_head: Optional[list] = None    # kept count per KV head (batch 0)
    kept: Optional[torch.Tensor] = None  # kept indices [B, Hkv, M] of the last eviction
    evictions: int = 0
    note: str = ""

    @property
    def freed(self) -> int:
        return self.bytes_before - self.bytes_after


_RECORDS: dict[str, EvictRecord] = {}
_LOCK = threading.Lock()


def record(key: str, rec: EvictRecord) -> None:
    with _LOCK:
        old = _RECORDS.get(key)
        rec.evictions = (old.evictions if old else 0) + 1
        _RECORDS[key] = rec


def get_record(key: str) -> Optional[EvictRecord]:
    return _RECORDS.get(key)


_CAPTURE: Optional[dict] = None


@contextlib.contextmanager
def capturing() -> Iterator[dict]:
    """Keep what every site's eviction reads while the block runs: ``{site: (q, k, v, scale,
    gqa, layer, n_layers)}`` (the last call of each site). ``select`` on those values gives any
    other policy's kept keys for the same prefill (the prefill attends densely whatever the
    policy, so its K/V do not depend on it): one prefill serves every policy and budget (the
    eviction-quality harness).

    >>> with capturing() as got:                                   # doctest: +SKIP
    ...     compiled(ids, past_key_values=cache)
    >>> q, k, v, scale, gqa, layer, n_layers = got["model.layers.0.self_attn"]  # doctest: +SKIP
    """
    global _CAPTURE
    prev, _CAPTURE = _CAPTURE, {}
    try:
        yield _CAPTURE
    finally:
        _CAPTURE = prev


def run(pol: Eviction, q, k, v, scale: float, gqa: int, layer, n_layers, key: str):
    """Evict: the compacted (k, v) (copies of the full ones where nothing is evicted) and the
    record for ``inspect``."""
    if _CAPTURE is not None:
        _CAPTURE[key] = (q, k, v, scale, gqa, layer, n_layers)
    n = k.shape[2]
    nbytes = k.numel() * k.element_size() + v.numel() * v.element_size()
    k2, v2, idx, counts = keep(pol, q, k, v, scale, gqa, layer, n_layers)
    if idx is None:
        record(key, EvictRecord(pol.short(), n, n, nbytes, nbytes,
                                note=f"budget {pol.budget_for(layer, n_layers, n)} >= cached "
                                     f"length {n}: nothing evicted"))
        return k2, v2
    per_head = (counts[0].tolist() if counts is not None else [idx.shape[2]] * k.shape[1])
    record(key, EvictRecord(pol.short(), n, idx.shape[2], nbytes,
                            k2.numel() * k2.element_size() + v2.numel() * v2.element_size(),
                            per_head=per_head, kept=idx.detach().to("cpu")))
    return k2, v2
