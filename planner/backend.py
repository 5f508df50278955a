"""The Dynamo backend: one pipeline for ``planner.compile`` and ``torch.compile(backend=...)``.

    >>> import torch, planner
    >>> be = planner.backend(policy="dense")
    >>> f = torch.compile(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), -1) @ v, backend=be)
    >>> x = torch.randn(1, 2, 8, 4)
    >>> bool(torch.allclose(f(x, x, x), torch.softmax(x @ x.transpose(-2, -1), -1) @ x, atol=1e-6))
    True
"""
from __future__ import annotations

import copy
import itertools
import os
import threading
import warnings
from typing import Optional

import torch.fx as fx

from passes import PassContext, run_pipeline
from planner.policy import PolicyLike, PolicyMap, as_policy_map
from planner.report import Report, Site, UnmatchedSoftmax
from runtime import stats
from runtime.cache import KERNELS

_IDS = itertools.count()


class Backend:
    """Callable ``(gm, example_inputs) -> callable`` for Dynamo, holding what it compiled."""

    def __init__(self, policy: PolicyLike = None, *, verify: bool = True, cost_model: str = "auto"):
        if cost_model not in ("auto", "off"):
            raise ValueError(f"cost_model must be 'auto' or 'off', got {cost_model!r}")
        self.cost_model = cost_model
        self.policies: PolicyMap = as_policy_map(policy)
        self.owner = f"p{next(_IDS)}"
        self.verify = verify
        self.graphs: list[fx.GraphModule] = []
        self.records: dict = {}            # site name -> SiteRecord (latest capture wins)
        self.unmatched: dict = {}          # (site, node) -> UnmatchedSoftmax
        self.matched_patterns: set = set()
        self._lock = threading.Lock()
        self.indexers = None               # IndexerBank of the trainable (dsa) sites
        if any(pol.name == "dsa" for _, pol in self.policies.rules):
            from runtime.dsa import IndexerBank, register_bank
            self.indexers = IndexerBank()
            register_bank(self.owner, self.indexers)

    def __call__(self, gm: fx.GraphModule, example_inputs):
        with self._lock:
            idx = len(self.graphs)
            ctx = PassContext(policies=self.policies, owner=self.owner, graph_index=idx,
                              example_inputs=example_inputs, verify=self.verify,
                              cost_model=self.cost_model)
            captured = copy.deepcopy(gm.graph)    # passes edit in place; a failure restores it
            try:
                gm = run_pipeline(gm, ctx)
            except Exception as e:             # never break the user's model: run it as captured
                if os.environ.get("PLANNER_STRICT", "0") == "1":
                    raise
                gm.graph = captured
                gm.recompile()
                self.graphs.append(gm)
                self.unmatched[("<graph>", f"graph{idx}")] = UnmatchedSoftmax(
                    f"graph{idx}", "<whole graph>",
                    f"planner passes failed, graph left as captured: {type(e).__name__}: {e}", idx)
                warnings.warn(f"sparse-planner: passes failed on graph {idx}, running it unchanged: "
                              f"{type(e).__name__}: {e}")
                return gm.forward
            self.graphs.append(gm)
            for rec in ctx.sites:
                self.records[rec.name] = rec
            for u in ctx.unmatched:
                self.unmatched[(u.site, u.node)] = UnmatchedSoftmax(u.node, u.site, u.reason, idx)
            self.matched_patterns |= ctx.matched_patterns
        return gm.forward

    def check_patterns(self) -> None:
        """Raise if a per-layer pattern matched no site (call after the first forward)."""
        if len(self.policies.rules) == 1 and self.policies.rules[0][0] == "*":
            return
        if not self.records:
            return
        unused = [p for p, _ in self.policies.rules if p not in self.matched_patterns]
        if unused:
            names = sorted(self.records)
            raise ValueError(f"policy pattern(s) {unused} match no attention site; the sites are: "
                             f"{names[:12]}{' ...' if len(names) > 12 else ''}")

    def report(self) -> Report:
        sites = []
        for name, rec in self.records.items():
            st = stats.get(f"{self.owner}/{name}") if rec.status == "rewritten" else None
            sites.append(Site(
                name=name, pattern=rec.pattern,
                shapes=(st.shapes if st and st.shapes else rec.shapes), policy=rec.policy,
                status=rec.status, reason=rec.reason,
                density=st.density if st else None,
                density_per_head=st.density_per_head if st else None,
                calls=st.calls if st else 0,
                kernel=st.kernel if st else rec.kernel_planned, graph=rec.graph,
                schedule=rec.schedule, est_dense_ms=rec.est_dense_ms,
                est_sparse_ms=rec.est_sparse_ms, crossover=rec.crossover,
                rules=(st.rules if st and st.calls else rec.rules)))
        return Report(sites, list(self.unmatched.values()), list(self.graphs), KERNELS.stats())


_DEFAULT: Optional[Backend] = None


def sparse_planner_backend(gm: fx.GraphModule, example_inputs):
    """``torch.compile(model, backend="sparse_planner")``: the default policy."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Backend()
    return _DEFAULT(gm, example_inputs)


def default_backend() -> Optional[Backend]:
    return _DEFAULT


def backend(policy: PolicyLike = None, **kw) -> Backend:
    """A Dynamo backend applying ``policy``: ``torch.compile(m, backend=planner.backend("dense"))``."""
    return Backend(policy, **kw)


def register() -> None:
    from torch._dynamo import list_backends, register_backend
    if "sparse_planner" not in list_backends(exclude_tags=()):
        register_backend(sparse_planner_backend, name="sparse_planner")
