"""Policy values: the catalogue of frozen dataclasses, their validation, presets by name and
per-layer maps.

A policy says *what* a site keeps; the passes and the runtime decide *how*, reading the policy's
row (the class attributes and methods of ``Policy``) and its estimator (the class's entry in
``runtime.estimators.ESTIMATORS``). The user-facing constructors (``planner.policy(name,
**params)``, ``as_policy_map``) are in ``planner.policy``.

    >>> BlockTopK(block=64, topk=8).expected_density(n_q=4096, n_kv=4096)
    0.3076923076923077
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Optional


class Policy:
    """Base of every policy. Subclasses are frozen dataclasses with a ``name``.

    Besides its parameters, a policy class carries what the passes and the runtime read about
    it (its row): ``attend_kind``, ``is_dense``, ``adaptive``, ``expected_density``,
    ``token_window`` and ``cache_page``. Its estimator (score, select, list width, token-level
    keep) is the class's entry in ``runtime.estimators.ESTIMATORS``."""

    name: str = "?"
    #: which kernel family serves the attend step: "dense" | "block" | "token" (a token policy
    #: has ``topk`` keys per query row, chosen by a learned indexer: ``runtime.dsa``)
    attend_kind: str = "dense"
    #: every pair the model attends to: no selection, no cost-model choice
    is_dense: bool = False
    #: the density is known only after selection (the budget adapts to the input); under the
    #: cost model the run-time plan re-decides at the measured density (``runtime.plan``)
    adaptive: bool = False
    #: the model selects its keys itself (a trained indexer and top-k in its own code); the
    #: selection is the model's meaning, so the cost model never runs such a site densely
    native: bool = False

    def expected_density(self, n_q: int, n_kv: int) -> float:
        """Expected block density of the policy's budget at this shape, for planning (the
        measured density is what the report shows)."""
        return 1.0

    @property
    def token_window(self) -> Optional[tuple]:
        """(sink, window) of a token-level rule the block-sparse kernel applies itself (key j
        kept iff ``j < sink`` or ``pos - window < j``), None where the policy has none."""
        return None

    @property
    def cache_page(self) -> Optional[int]:
        """Where a captured graph appends the step's keys to a cache, the append is rewritten
        to ``sparse.append``, which keeps what the policy reads up to date: page summaries of
        this page size (``runtime.page_summaries``), or with 0 none (the indexer's keys,
        ``runtime.dsa``). None: the append stays as captured."""
        return None

    def __post_init__(self) -> None:
        # every construction validates: planner.policy(...), direct BlockTopK(...), and
        # dataclasses.replace (planner.policy(a_policy, **overrides)) all go through __init__
        self.validate()

    def validate(self) -> None:  # overridden where parameters have ranges
        pass

    def short(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}({fields})" if fields else self.name


def _visible_blocks(block: int, n_q: int, n_kv: int) -> float:
    """Mean causally visible key blocks per query block (all of them for one query row)."""
    nkb = max(1, math.ceil(n_kv / block))
    return max(1.0, (nkb + 1) / 2 if n_q > 1 else nkb)


def _density(kept_blocks: float, block: int, n_q: int, n_kv: int) -> float:
    """``kept_blocks`` per query block as a fraction of the visible ones."""
    return min(1.0, kept_blocks / _visible_blocks(block, n_q, n_kv))


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
    is_dense = True


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

    def expected_density(self, n_q: int, n_kv: int) -> float:
        return _density(math.ceil((self.window + self.sink) / 64) + 1, 64, n_q, n_kv)

    @property
    def token_window(self) -> Optional[tuple]:
        return (self.sink, self.window)


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

    def expected_density(self, n_q: int, n_kv: int) -> float:
        return _density(self.topk + self.sink_blocks + self.local_blocks, self.block, n_q, n_kv)


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
    adaptive = True

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

    def expected_density(self, n_q: int, n_kv: int) -> float:
        # adaptive: a planning guess only
        return min(1.0, 0.3 + 2 / _visible_blocks(self.block, n_q, n_kv))


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
    adaptive = True

    def validate(self) -> None:
        for p, lo in (("last_q", 1), ("n_vertical", 0), ("n_slash", 0), ("block", 1),
                      ("sink_tokens", 0), ("local_tokens", 0)):
            _check_int(self.name, p, getattr(self, p), lo)

    def expected_density(self, n_q: int, n_kv: int) -> float:
        lines = math.ceil((self.n_vertical + 2 * self.n_slash) / self.block) + 2
        return _density(lines, self.block, n_q, n_kv)


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

    def expected_density(self, n_q: int, n_kv: int) -> float:
        pages = math.ceil(self.budget / self.page) + self.sink_pages + self.local_pages
        return _density(pages, self.page, n_q, n_kv)

    @property
    def cache_page(self) -> Optional[int]:
        return self.page


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

    def expected_density(self, n_q: int, n_kv: int) -> float:
        return _density(math.ceil((self.window + self.global_tokens) / self.block) + 1, self.block,
                        n_q, n_kv)

    @property
    def token_window(self) -> Optional[tuple]:
        return (self.global_tokens, self.window)


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

    def expected_density(self, n_q: int, n_kv: int) -> float:
        b = self.block
        kept = (2 * math.ceil(self.window / b) + 1 + math.ceil(self.global_tokens / b)
                + self.random_blocks)
        return _density(kept, b, n_q, n_kv)


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

    def expected_density(self, n_q: int, n_kv: int) -> float:
        return min(1.0, self.target_density + 2 / _visible_blocks(self.block, n_q, n_kv))


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

    def expected_density(self, n_q: int, n_kv: int) -> float:
        visible = max(1.0, (n_kv + 1) / 2 if n_q > 1 else n_kv)
        return min(1.0, self.topk / visible)

    @property
    def cache_page(self) -> Optional[int]:
        return 0                          # the indexer reads the cached keys themselves


@dataclass(frozen=True)
class NativeDSA(Policy):
    """DeepSeek Sparse Attention as a model computes it itself (DeepSeek-V3.2, GLM-MoE-DSA):
    discovery recognises the model's lightning indexer, top-k and index mask
    (``passes.native_dsa``) and the site runs them with the model's own indexer weights
    (``runtime.native_dsa``). Sites recognised so get this policy under ``dense`` and ``dsa``
    (the model's top-k; the model's output is the sparse one; ``dense`` keeps the model's
    per-head K/V, ``dsa`` runs MLA absorbed); passing a value of it as the policy sets the
    options below. Not a preset: it has no meaning where the model has no
    indexer (such a site stays dense, with the reason).

    topk:     keys per query; 0 = the model's own ``index_topk`` (the default)
    fp8:      score with q_I / k_I rounded to float8 e4m3 with one scale per row (per query
              head and per key), as DeepSeek's FP8 indexer does; off by default
    absorb:   run MLA in its absorbed form where the site is MLA (queries times W_UK attend
              to the latent cache, the output times W_UV), instead of the per-head K/V the model
              decompresses
    score_scale, mask: set by discovery: the indexer's q.k scale; the attention mask under
              the index mask: "causal" (proved bottom-right causal) or "all" (proved to keep
              every pair), where the fused kernel needs no mask tensor; "add" (float) or
              "keep" (boolean) where it was not proved and the scores read it; "" none
    """

    topk: int = 0
    fp8: bool = False
    absorb: bool = True
    score_scale: float = 1.0
    mask: str = ""
    name = "dsa_native"
    attend_kind = "token"
    native = True

    def validate(self) -> None:
        _check_int(self.name, "topk", self.topk, 0)
        if self.mask not in ("", "add", "keep", "causal", "all"):
            raise ValueError(f"policy {self.name!r}: 'mask' must be '', 'add', 'keep', "
                             f"'causal' or 'all', got {self.mask!r}")

    def expected_density(self, n_q: int, n_kv: int) -> float:
        visible = max(1.0, (n_kv + 1) / 2 if n_q > 1 else n_kv)
        return min(1.0, max(self.topk, 1) / visible)

    def short(self) -> str:
        return f"dsa (native) top-{self.topk or 'model'}{', fp8' if self.fp8 else ''}"


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
