"""``planner.inspect(m)`` -> Report: one row per attention site, the rewritten code, and
every softmax left alone with the reason."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tabulate import tabulate


@dataclass
class Site:
    """One attention site of a compiled model."""

    name: str                  # module path, e.g. model.layers.0.self_attn
    pattern: str               # how it was spelled: sdpa, matmul_softmax+repeat_kv, ...
    shapes: str                # q/k/v shapes and dtype (last call if it ran, else at capture)
    policy: str                # the policy applied (short form)
    status: str                # "rewritten" | "dense-fallback"
    reason: str = ""           # why it stays dense ("" when rewritten)
    density: Optional[float] = None   # kept / attended pairs on the last call (1.0 = all)
    density_per_head: Optional[list] = None
    calls: int = 0
    kernel: Optional[str] = None
    graph: int = 0
    schedule: str = ""                 # cost model's choice at the captured shape
    est_dense_ms: Optional[float] = None
    est_sparse_ms: Optional[float] = None
    crossover: Optional[float] = None  # length above which sparse is estimated faster
    rules: str = ""                    # the model's own rules the kernels apply: sliding window,
                                       # learned sinks, per-row key lengths (padding)

    @property
    def density_spread(self) -> Optional[tuple]:
        if not self.density_per_head:
            return None
        return min(self.density_per_head), max(self.density_per_head)


@dataclass
class UnmatchedSoftmax:
    node: str
    site: str
    reason: str
    graph: int = 0

    def __str__(self) -> str:
        return f"graph {self.graph} {self.node} ({self.site}): {self.reason}"


class Report:
    """Printable summary of what the planner did to a model."""

    def __init__(self, sites: list, unmatched: list, graphs: list, cache_stats: dict):
        self.sites: list[Site] = sites
        self._unmatched: list[UnmatchedSoftmax] = unmatched
        self._graphs = graphs
        self.cache = cache_stats

    def unmatched(self) -> list:
        """Softmax nodes that were not rewritten, each with the reason."""
        return list(self._unmatched)

    def graph_code(self, graph: Optional[int] = None) -> str:
        """The rewritten fx code (all captured graphs, or graph number ``graph``)."""
        sel = self._graphs if graph is None else [self._graphs[graph]]
        parts = []
        for i, gm in enumerate(sel):
            idx = i if graph is None else graph
            parts.append(f"# ---- captured graph {idx} ----\n{gm.code.strip()}\n")
        return "\n".join(parts)

    def site_code(self, name: str) -> str:
        """The rewritten nodes that belong to one site's module, one per line."""
        import re
        from passes.graph import module_path
        lines = []
        for i, gm in enumerate(self._graphs):
            nodes = [n for n in gm.graph.nodes
                     if n.op == "call_function" and module_path(n) == name.split("#")[0]]
            if nodes:
                lines = [f"# graph {i}"]
                for n in nodes:
                    text = re.sub(r"\[num_users=\d+\] = ", "= ", n.format_node())
                    lines.append(text.replace("call_function[target=", "").replace("](args = ", "("))
        return "\n".join(lines)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site named {name!r}; sites: {[s.name for s in self.sites]}")

    def table(self) -> str:
        rows = []
        for s in self.sites:
            dens = "-" if s.density is None else f"{s.density:.3f}"
            spread = s.density_spread
            if spread and spread[1] - spread[0] > 1e-3:
                dens += f" [{spread[0]:.2f}..{spread[1]:.2f}]"
            est = ("-" if s.est_dense_ms is None else
                   f"{s.est_dense_ms:.3g}/{s.est_sparse_ms:.3g}")
            cross = "-" if s.crossover is None else f"{s.crossover:.0f}"
            rows.append([s.name, s.pattern, s.shapes, s.rules or "-", s.policy, s.status, dens,
                         s.calls, s.kernel or "-", s.schedule or "-", est, cross, s.reason])
        return tabulate(rows, headers=["site", "pattern", "shapes", "rules", "policy", "status",
                                       "density", "calls", "kernel", "schedule",
                                       "est ms dense/sparse", "crossover N", "reason"])

    def __str__(self) -> str:
        n_rw = sum(s.status == "rewritten" for s in self.sites)
        head = (f"{len(self.sites)} attention sites, {n_rw} rewritten, "
                f"{len(self._unmatched)} softmax left alone, {len(self._graphs)} graph(s)")
        out = [head, self.table()]
        if self._unmatched:
            out.append("unmatched:\n" + "\n".join(f"  {u}" for u in self._unmatched))
        return "\n".join(out)

    __repr__ = __str__
