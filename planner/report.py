"""``planner.inspect(m)`` -> Report: one row per attention site, the rewritten code, and
every softmax left alone with the reason."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

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
    evict: str = ""                    # the eviction policy, or why the cache is not evicted
    cache_before: Optional[int] = None  # cached tokens per head before the last eviction
    cache_after: Optional[int] = None   # ... and after (the padded width for per-head budgets)
    bytes_freed: Optional[int] = None   # K/V bytes the last eviction freed
    kept_per_head: Optional[list] = None  # kept tokens per KV head (batch row 0)
    kept: Optional[object] = None       # kept indices [B, Hkv, M] of the last eviction (CPU)
    recall: Optional[float] = None     # kept share of the dense attention mass (sampled rows,
    recall_worst: Optional[float] = None   # mean and lowest row), last recorded call; None
    recall_per_head: Optional[list] = None  # unless recorded (record="recall")

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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def budget_note(pol, n_kv: int) -> str:
    """Why ``pol`` (a Policy) kept every pair of a call with ``n_kv`` keys: its budget against
    the length, and which parameter to lower. "" for the dense policy."""
    name = getattr(pol, "name", "?")
    at = f"at N={n_kv}"
    if name == "dense":
        return ""
    if name == "block_topk":
        nb = pol.topk + pol.sink_blocks + pol.local_blocks
        keys = nb * pol.block
        why = (f"block_topk keeps topk={pol.topk} + sink_blocks={pol.sink_blocks} + local_blocks="
               f"{pol.local_blocks} = {nb} blocks of {pol.block} = {keys} keys per query block")
        fix = "use a smaller topk or block"
        covers = nb >= _cdiv(n_kv, pol.block)
    elif name == "threshold":
        nb = pol.min_budget + pol.sink_blocks + pol.local_blocks
        why = (f"threshold keeps per query block the fewest blocks of {pol.block} whose estimated "
               f"mass reaches gamma={pol.gamma}, at least min_budget={pol.min_budget} + "
               f"sink_blocks={pol.sink_blocks} + local_blocks={pol.local_blocks} = {nb} blocks")
        fix = "use a smaller block or gamma"
        covers = nb >= _cdiv(n_kv, pol.block)
    elif name == "vertical_slash":
        why = (f"vertical_slash keeps n_vertical={pol.n_vertical} columns and n_slash={pol.n_slash}"
               f" diagonals (+ sink_tokens={pol.sink_tokens}, local_tokens={pol.local_tokens}), "
               f"run as blocks of {pol.block}")
        fix = "use smaller n_vertical / n_slash or block"
        covers = max(pol.n_vertical, pol.n_slash, pol.sink_tokens + pol.local_tokens) >= n_kv
    elif name == "quest":
        pages = _cdiv(pol.budget, pol.page)
        nb = pages + pol.sink_pages + pol.local_pages
        why = (f"quest keeps budget={pol.budget} tokens = {pages} pages of {pol.page} (+ sink_pages="
               f"{pol.sink_pages}, local_pages={pol.local_pages}) = {nb * pol.page} keys per query")
        fix = "use a smaller budget"
        covers = nb >= _cdiv(n_kv, pol.page)
    elif name == "auto":
        nkb = _cdiv(n_kv, pol.block)
        nb = math.ceil(pol.target_density * nkb) + pol.sink_blocks + pol.local_blocks
        why = (f"auto keeps ceil(target_density={pol.target_density} x {nkb} key blocks) + "
               f"sink_blocks={pol.sink_blocks} + local_blocks={pol.local_blocks} = {nb} blocks "
               f"of {pol.block} per query block")
        fix = "use a smaller block"
        covers = nb >= nkb
    elif name == "sink_window":
        why = (f"sink_window keeps sink={pol.sink} + window={pol.window} = {pol.sink + pol.window}"
               " keys per query")
        fix = "use a smaller window"
        covers = pol.sink + pol.window >= n_kv
    elif name == "longformer":
        why = (f"longformer keeps window={pol.window} + global_tokens={pol.global_tokens} = "
               f"{pol.window + pol.global_tokens} keys per query")
        fix = "use a smaller window"
        covers = pol.window + pol.global_tokens >= n_kv
    elif name == "bigbird":
        keys = pol.window + pol.global_tokens + pol.random_blocks * pol.block
        why = (f"bigbird keeps window={pol.window} + global_tokens={pol.global_tokens} + "
               f"random_blocks={pol.random_blocks} blocks of {pol.block} = {keys} keys per query")
        fix = "use a smaller window, global_tokens or block"
        covers = keys >= n_kv
    elif name == "dsa":
        why = f"dsa keeps topk={pol.topk} keys per query"
        fix = "use a smaller topk"
        covers = pol.topk >= n_kv
    else:
        return f"{name} kept every pair {at}"
    if covers:
        return f"{why}: {at} that is every key; {fix}"
    return f"{why}: {at} it kept every pair of this input; {fix} for a sparser selection"


class Report:
    """Printable summary of what the planner did to a model."""

    def __init__(self, sites: list, unmatched: list, graphs: list, cache_stats: dict,
                 notes: Sequence[str] = (), recordings: Optional[dict] = None):
        self.sites: list[Site] = sites
        # site name -> runtime.recall.Recording of its last recorded call (record="recall")
        self.recordings: dict = dict(recordings or {})
        self._unmatched: list[UnmatchedSoftmax] = unmatched
        self._graphs = graphs
        self.cache = cache_stats
        self.notes: list[str] = list(notes)     # hints printed under the table

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
            row = [s.name, s.pattern, s.shapes, s.rules or "-", s.policy, s.status, dens]
            if self.recordings:
                row.append("-" if s.recall is None else
                           f"{s.recall:.3f} (worst {s.recall_worst:.2f})")
            rows.append(row + [s.calls, s.kernel or "-", s.schedule or "-", est, cross, s.reason])
        head = ["site", "pattern", "shapes", "rules", "policy", "status", "density"]
        if self.recordings:
            head.append("recall")
        return tabulate(rows, headers=head + ["calls", "kernel", "schedule",
                                              "est ms dense/sparse", "crossover N", "reason"])

    def plot(self, kind: str = "grid", path: Optional[str] = None, **kw):
        """A picture of the recorded call (``record="recall"``; matplotlib, the ``plot``
        extra): ``kind="blocks"`` one site's block map per head (``site=`` a name, default the
        first recorded; ``heads=`` a list), ``"grid"`` density and recall by layer and head,
        ``"needle"`` whether each layer kept the key positions ``spans=[(start, end), ...]``
        for the last query row. Returns the matplotlib Figure; ``path`` also saves it (PNG)."""
        from planner import pictures
        return pictures.plot(self, kind, path, **kw)

    def to_html(self, path: str, *, title: str = "sparse-planner: what each site kept",
                **kw) -> str:
        """Write a self-contained page (tables and PNGs beside it, no server needed) of the
        recorded call to ``path``; returns the path."""
        from planner import pictures
        return pictures.write_page(path, [("", self)], title=title, **kw)

    def eviction_table(self) -> str:
        """Per site with an eviction policy: cache length before/after, bytes freed, the
        policy, the kept tokens per KV head ("" when no site has one)."""
        rows = []
        for s in self.sites:
            if not s.evict:
                continue
            heads = "-"
            if s.kept_per_head:
                lo, hi = min(s.kept_per_head), max(s.kept_per_head)
                heads = str(lo) if lo == hi else f"{lo}..{hi} ({'/'.join(map(str, s.kept_per_head))})"
            rows.append([s.name, s.evict, "-" if s.cache_before is None else s.cache_before,
                         "-" if s.cache_after is None else s.cache_after,
                         "-" if s.bytes_freed is None else s.bytes_freed, heads])
        if not rows:
            return ""
        return tabulate(rows, headers=["site", "eviction", "cache before", "cache after",
                                       "bytes freed", "kept per head"])

    def __str__(self) -> str:
        if not self._graphs and not self.sites and not self._unmatched:
            return ("no graph captured yet: call the compiled model first (planner.inspect "
                    "reports the sites of the graphs its calls captured, and what the last "
                    "call measured)")
        n_rw = sum(s.status == "rewritten" for s in self.sites)
        head = (f"{len(self.sites)} attention sites, {n_rw} rewritten, "
                f"{len(self._unmatched)} softmax left alone, {len(self._graphs)} graph(s)")
        out = [head, self.table()]
        ev = self.eviction_table()
        if ev:
            out.append("KV-cache eviction:\n" + ev)
        if self._unmatched:
            out.append("unmatched:\n" + "\n".join(f"  {u}" for u in self._unmatched))
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)

    __repr__ = __str__
