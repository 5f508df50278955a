"""State the passes share while compiling one captured graph."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from runtime.policies import PolicyMap


@dataclass
class SiteRecord:
    """A site as the passes saw it (the Report adds what the runtime measured)."""

    name: str
    pattern: str
    policy: str
    status: str                        # "rewritten" | "dense-fallback"
    reason: str = ""
    spec_key: Optional[str] = None
    graph: int = 0                     # which captured graph (0, 1, ... in capture order)
    node: str = ""
    shapes: str = ""
    gqa_group: int = 1
    causal: Optional[str] = None
    mods: tuple = ()
    schedule: str = ""                 # the cost model's choice at the captured shape
    est_dense_ms: Optional[float] = None
    est_sparse_ms: Optional[float] = None
    crossover: Optional[float] = None  # sequence length above which sparse is estimated faster
    kernel_planned: Optional[str] = None  # set when the plan replaced the site's ops at compile time
    rules: str = ""                    # the model's window / sinks / key validity, as discovered
    evict: str = ""                    # the eviction policy, or why the site's cache is not evicted


@dataclass
class PassContext:
    policies: "PolicyMap"
    owner: str
    graph_index: int = 0
    example_inputs: Any = None
    verify: bool = True
    cost_model: str = "auto"           # "auto": dense where cheaper per call shape; "off"
    matches: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)
    sites: list = field(default_factory=list)       # SiteRecord, filled by rewrite
    matched_patterns: set = field(default_factory=set)
    mutation_baseline: Any = None      # passes.mutation.Snapshot of the captured graph
    evictions: Any = None              # PolicyMap of eviction policies (runtime.eviction), or None
    n_layers: Optional[int] = None     # the model's layer count (per-layer eviction budgets)
