"""State the passes share while compiling one captured graph."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from planner.policy import PolicyMap


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


@dataclass
class PassContext:
    policies: PolicyMap
    owner: str
    graph_index: int = 0
    example_inputs: Any = None
    verify: bool = True
    matches: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)
    sites: list = field(default_factory=list)       # SiteRecord, filled by rewrite
    matched_patterns: set = field(default_factory=set)
