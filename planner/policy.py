"""Sparsity policies: frozen dataclasses, presets by name, per-layer maps.

A policy says *what* a site keeps; the passes and the runtime decide *how*.

Example::

    >>> import planner
    >>> planner.policy("block_topk", block=64, topk=8)
    BlockTopK(block=64, topk=8, sink_blocks=1, local_blocks=1)
    >>> planner.policy("sink_window", window=128)
    SinkWindow(sink=4, window=128)
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Mapping, Union


class Policy:
    """Base of every policy. Subclasses are frozen dataclasses with a ``name``."""

    name: str = "?"
    #: which kernel family serves the attend step: "dense" | "block" | "token"
    attend_kind: str = "dense"

    def __post_init__(self) -> None:
        # every construction validates: planner.policy(...), direct BlockTopK(...), and
        # dataclasses.replace (planner.policy(a_policy, **overrides)) all go through __init__
        self.validate()

    def validate(self) -> None:  # overridden where parameters have ranges
        pass

    def short(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}({fields})" if fields else self.name


def _check_int(policy: str, param: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"policy {policy!r}: parameter {param!r} must be an int >= {minimum}, "
                        f"got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"policy {policy!r}: parameter {param!r} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class Dense(Policy):
    """Every pair the model attends to: the pipeline's identity check."""

    name = "dense"
    attend_kind = "dense"


@dataclass(frozen=True)
class SinkWindow(Policy):
    """StreamingLLM (Xiao et al., 2023): the first ``sink`` tokens plus the last ``window``
    positions up to and including the query's own. Training-free, static."""

    sink: int = 4
    window: int = 1024
    name = "sink_window"
    attend_kind = "block"

    def validate(self) -> None:
        _check_int(self.name, "sink", self.sink, 0)
        _check_int(self.name, "window", self.window, 1)


@dataclass(frozen=True)
class BlockTopK(Policy):
    """Block routing (MoBA, Lu et al. 2025; MInference block-sparse): keys and queries are
    mean-pooled per ``block``; each query block keeps the ``topk`` key blocks whose pooled
    score is highest (the scores of the query heads of one GQA group are pooled together, so
    the group shares its blocks), plus ``sink_blocks`` first blocks and ``local_blocks``
    blocks ending at the query's own position, always."""

    block: int = 64
    topk: int = 32
    sink_blocks: int = 1
    local_blocks: int = 1
    name = "block_topk"
    attend_kind = "block"

    def validate(self) -> None:
        _check_int(self.name, "block", self.block, 1)
        _check_int(self.name, "topk", self.topk, 0)
        _check_int(self.name, "sink_blocks", self.sink_blocks, 0)
        _check_int(self.name, "local_blocks", self.local_blocks, 0)
        if self.topk + self.sink_blocks + self.local_blocks < 1:
            raise ValueError(f"policy {self.name!r}: topk + sink_blocks + local_blocks must be >= 1, "
                             f"got {self.topk} + {self.sink_blocks} + {self.local_blocks}")


def _check_float(policy: str, param: str, value, lo: float, hi: float, lo_open: bool = True):
    rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"policy {policy!r}: parameter {param!r} must be a number in {rng}, "
                        f"got {value!r} ({type(value).__name__})")
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        raise ValueError(f"policy {policy!r}: parameter {param!r} must be in {rng}, got {value}")


@dataclass(frozen=True)
class Threshold(Policy):
    """Adaptive budget (FlexPrefill, Lai et al. 2025; XAttention, Xu et al. 2025): per GQA group
    and query block, the fewest key blocks whose *estimated* attention mass reaches ``gamma``.
    The estimate averages the pooled-q x pooled-k block softmax with the last query block's true
    attention mass per key block. ``min_budget``/``max_budget`` bound the number of blocks chosen
    besides the forced sink/local blocks (``max_budget=0`` means no bound). Density varies per
    head and per input."""

    gamma: float = 0.9
    block: int = 64
    min_budget: int = 1
    max_budget: int = 0
    sink_blocks: int = 1
    local_blocks: int = 1
    name = "threshold"
    attend_kind = "block"

    def validate(self) -> None:
        _check_float(self.name, "gamma", self.gamma, 0.0, 1.0)
        _check_int(self.name, "block", self.block, 1)
        _check_int(self.name, "min_budget", self.min_budget, 0)
        _check_int(self.name, "max_budget", self.max_budget, 0)
        _check_int(self.name, "sink_blocks", self.sink_blocks, 0)
        _check_int(self.name, "local_blocks", self.local_blocks, 0)
        if self.max_budget and self.min_budget > self.max_budget:
            raise ValueError(f"policy {self.name!r}: parameter 'min_budget' ({self.min_budget}) "
                             f"must be <= 'max_budget' ({self.max_budget})")


@dataclass(frozen=True)
class VerticalSlash(Policy):
    """MInference (Jiang et al., 2024): the attention of the last ``last_q`` queries over all
    keys gives column sums (vertical lines) and sums along diagonals (slash lines); the top
    ``n_vertical`` columns and ``n_slash`` diagonals are kept, with the first ``sink_tokens``
    columns and the ``local_tokens`` nearest diagonals forced. Executed at block granularity:
    a key block is kept for a query block when a chosen line passes through it."""

    last_q: int = 64
    n_vertical: int = 1000
    n_slash: int = 1000
    block: int = 64
    sink_tokens: int = 4
    local_tokens: int = 64
    name = "vertical_slash"
    attend_kind = "block"

    def validate(self) -> None:
        for p, lo in (("last_q", 1), ("n_vertical", 0), ("n_slash", 0), ("block", 1),
                      ("sink_tokens", 0), ("local_tokens", 0)):
            _check_int(self.name, p, getattr(self, p), lo)


@dataclass(frozen=True)
class Quest(Policy):
    """Quest (Tang et al., 2024), query-aware page selection: per ``page`` of keys the channel-wise
    min/max; a query's page score is the upper bound sum_d max(q_d max_d, q_d min_d); each query
    (block of ``page`` queries in prefill) attends to its top ``ceil(budget / page)`` pages plus
    ``sink_pages`` first and ``local_pages`` own pages. Nothing is evicted. Where the captured
    graph appends the step's keys to a cache (``cat([past, new], dim=-2)``, e.g. Hugging Face
    ``DynamicCache``), the page min/max are kept with the cache and extended by the new tokens
    only (``runtime.page_summaries``) instead of re-read from all of K every decode step."""

    page: int = 16
    budget: int = 2048
    sink_pages: int = 0
    local_pages: int = 1
    name = "quest"
    attend_kind = "block"

    @property
    def block(self) -> int:
        return self.page

    def validate(self) -> None:
        _check_int(self.name, "page", self.page, 1)
        _check_int(self.name, "budget", self.budget, 1)
        _check_int(self.name, "sink_pages", self.sink_pages, 0)
        _check_int(self.name, "local_pages", self.local_pages, 0)
        if self.budget < self.page:
            raise ValueError(f"policy {self.name!r}: parameter 'budget' ({self.budget} tokens) must "
                             f"be >= 'page' ({self.page}), i.e. at least one page")


@dataclass(frozen=True)
class Longformer(Policy):
    """Longformer (Beltagy et al., 2020), static: a sliding ``window`` plus ``global_tokens`` that
    every query sees and that see every key."""

    window: int = 512
    global_tokens: int = 16
    block: int = 64
    name = "longformer"
    attend_kind = "block"

    def validate(self) -> None:
        _check_int(self.name, "window", self.window, 1)
        _check_int(self.name, "global_tokens", self.global_tokens, 0)
        _check_int(self.name, "block", self.block, 1)


@dataclass(frozen=True)
class BigBird(Policy):
    """BigBird (Zaheer et al., 2020), static block pattern: window blocks, global blocks and
    ``random_blocks`` random blocks per query block (fixed by ``seed``)."""

    window: int = 192
    global_tokens: int = 64
    random_blocks: int = 3
    seed: int = 0
    block: int = 64
    name = "bigbird"
    attend_kind = "block"

    def validate(self) -> None:
        for p, lo in (("window", 0), ("global_tokens", 0), ("random_blocks", 0), ("seed", 0),
                      ("block", 1)):
            _check_int(self.name, p, getattr(self, p), lo)


@dataclass(frozen=True)
class Auto(Policy):
    """Adaptive per-head choice between estimators, aiming at ``target_density`` of the attended
    pairs. Criterion (computed on the input, per GQA group): the Jensen-Shannon divergence
    between the last query block's pooled-q x pooled-k block estimate and its true attention
    mass per key block. At most ``tau`` (nats): the head is query-aware and ranks blocks by the
    pooled estimate (block_topk); above: it ranks blocks by the vertical/slash line mass of the
    last queries (vertical_slash). Each query block keeps ceil(target_density x its allowed
    blocks), forced sink/local blocks included."""

    target_density: float = 0.1
    block: int = 64
    tau: float = 0.1
    sink_blocks: int = 1
    local_blocks: int = 1
    name = "auto"
    attend_kind = "block"

    def validate(self) -> None:
        _check_float(self.name, "target_density", self.target_density, 0.0, 1.0)
        _check_int(self.name, "block", self.block, 1)
        _check_float(self.name, "tau", self.tau, 0.0, 0.6931471805599453, lo_open=False)
        _check_int(self.name, "sink_blocks", self.sink_blocks, 0)
        _check_int(self.name, "local_blocks", self.local_blocks, 0)


@dataclass(frozen=True)
class DSA(Policy):
    """DeepSeek Sparse Attention (DeepSeek-V3.2-Exp report), natively trainable: a lightning
    indexer scores I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s]) with ``index_heads``
    heads of ``index_dim`` dims and one shared indexer key per token; each query attends to
    its ``topk`` best keys (causal; a query with at most ``topk`` visible keys attends to all
    of them; ties go to the more recent key). The indexer is a small module per site whose
    parameters live in the compiled model (``state_dict`` key prefix ``sparse_indexers.``); it
    reads the site's own q and k through learned projections (``runtime.dsa``), so no second
    KV cache is needed when decoding. ``rope``: leading indexer dims given a rotary position
    embedding of their own (0 = none; the site's q and k usually carry RoPE already).
    Train it with ``planner.train``: a dense warm-up (KL to the main attention), then sparse."""

    topk: int = 2048
    index_heads: int = 4
    index_dim: int = 64
    rope: int = 0
    name = "dsa"
    attend_kind = "token"

    def validate(self) -> None:
        _check_int(self.name, "topk", self.topk, 1)
        _check_int(self.name, "index_heads", self.index_heads, 1)
        _check_int(self.name, "index_dim", self.index_dim, 1)
        _check_int(self.name, "rope", self.rope, 0)
        if self.rope > self.index_dim or self.rope % 2:
            raise ValueError(f"policy {self.name!r}: parameter 'rope' must be an even number "
                             f"<= index_dim ({self.index_dim}), got {self.rope}")


#: presets looked up by name; each maps to the class built with its defaults
PRESETS: dict[str, type] = {
    "dense": Dense,
    "sink_window": SinkWindow,
    "block_topk": BlockTopK,
    "threshold": Threshold,
    "vertical_slash": VerticalSlash,
    "quest": Quest,
    "longformer": Longformer,
    "bigbird": BigBird,
    "auto": Auto,
    "dsa": DSA,
}

DEFAULT_POLICY = "block_topk"


def policy(name: str, **params: Any) -> Policy:
    """Build a policy by preset name, overriding its defaults with ``params``.

    >>> policy("dense")
    Dense()
    """
    if isinstance(name, Policy):
        _check_known(name.name, type(name), params)
        # replace() builds a new instance through __init__, so __post_init__ validates it
        return dataclasses.replace(name, **params) if params else name
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown policy {name!r}; valid names: {', '.join(sorted(PRESETS))}")
    cls = PRESETS[name]
    _check_known(name, cls, params)
    return cls(**params)                   # validated in __post_init__


def _check_known(name: str, cls: type, params: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - known
    if unknown:
        raise TypeError(f"policy {name!r} has no parameter(s) {sorted(unknown)}; "
                        f"valid: {sorted(known) or 'none'}")


PolicyLike = Union[str, Policy, Mapping[str, Union[str, Policy]], None]


@dataclass(frozen=True)
class PolicyMap:
    """Ordered (glob pattern, policy) pairs; the first pattern matching a site name wins.

    Site names are module paths such as ``model.layers.3.self_attn``.
    """

    rules: tuple[tuple[str, Policy], ...]

    def lookup(self, site_name: str) -> tuple[Policy | None, str | None]:
        for pattern, pol in self.rules:
            if fnmatch.fnmatchcase(site_name, pattern):
                return pol, pattern
        return None, None

    def short(self) -> str:
        return "{" + ", ".join(f"{p!r}: {pol.short()}" for p, pol in self.rules) + "}"


def as_policy_map(spec: PolicyLike) -> PolicyMap:
    """Normalise what users pass as ``policy=`` into a PolicyMap."""
    if spec is None:
        spec = DEFAULT_POLICY
    if isinstance(spec, PolicyMap):
        return spec
    if isinstance(spec, (str, Policy)):
        return PolicyMap((("*", policy(spec)),))
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError("policy map is empty; give at least one {'pattern': policy} entry")
        rules = []
        for pattern, pol in spec.items():
            if not isinstance(pattern, str):
                raise TypeError(f"policy map keys must be glob strings, got {pattern!r}")
            rules.append((pattern, policy(pol)))
        return PolicyMap(tuple(rules))
    raise TypeError(f"policy must be a name, a Policy or a {{pattern: policy}} map, got {spec!r}")
