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
import threading
import warnings
import weakref
from typing import Optional

import torch.fx as fx

from passes import PassContext, register as register_passes, run_pipeline
from passes.lower import lower_for_eager
from planner.defaults import DEFAULTS, check_remainder
from planner.policy import PolicyLike, PolicyMap, as_eviction_map, as_policy_map
from planner.report import Report, Site, UnmatchedSoftmax, budget_note
from runtime import env, eviction, ops, recall, stats
from runtime.cache import KERNELS
from runtime.env import kernels_mode
from runtime.guard import CallGuard
from runtime.spec import lookup

_IDS = itertools.count()

class Backend:
    """Callable ``(gm, example_inputs) -> callable`` for Dynamo, holding what it compiled."""

    def __init__(self, policy: PolicyLike = None, *, verify: bool = True,
                 cost_model: Optional[str] = None, evict=None, n_layers: Optional[int] = None,
                 remainder: Optional[str] = None, record: Optional[str] = None,
                 record_rows: int = 64):
        if record not in (None, "recall"):
            raise ValueError(f"record must be None or 'recall', got {record!r}")
        if cost_model is None:
            cost_model = DEFAULTS["cost_model"]
        self.remainder = check_remainder(DEFAULTS["remainder"] if remainder is None
                                         else remainder)
        self.remainder_notes: list = []    # graphs Inductor could not compile, and why
        if cost_model not in ("auto", "off"):
            raise ValueError(f"cost_model must be 'auto' or 'off', got {cost_model!r}")
        kernels_mode()                     # a bad SPARSE_PLANNER_KERNELS fails here, not mid-call
        self.cost_model = cost_model
        self.policies: PolicyMap = as_policy_map(policy)
        # calls timed against all-dense where sites ran sparse (runtime.guard): planner.compile
        # sets call_check for its wrapper; else each captured graph gets a check of its own
        self.checking = cost_model == "auto" and not all(
            pol.is_dense for _, pol in self.policies.rules)
        self.checks: list[CallGuard] = []
        self.call_check: Optional[CallGuard] = None
        self.evictions = as_eviction_map(evict)
        self.n_layers = n_layers
        self.owner = f"p{next(_IDS)}"
        if record == "recall":             # every call of every site measures its recall
            recall.enable(self.owner, record_rows)
        self.verify = verify
        self.graphs: list[fx.GraphModule] = []
        self.records: dict = {}            # site name -> SiteRecord (latest capture wins)
        self.unmatched: dict = {}          # (site, node) -> UnmatchedSoftmax
        self.matched_patterns: set = set()
        self._lock = threading.Lock()
        self._warned_dropout = False
        self.indexers = None               # IndexerBank of the trainable (dsa) sites
        # token-list policies choose their keys with a learned indexer per site (runtime.dsa)
        if any(pol.attend_kind == "token" for _, pol in self.policies.rules):
            from runtime.dsa import IndexerBank, register_bank
            self.indexers = IndexerBank()
            register_bank(self.owner, self.indexers)

    def __call__(self, gm: fx.GraphModule, example_inputs):
        with self._lock:
            idx = len(self.graphs)
            ctx = PassContext(policies=self.policies, owner=self.owner, graph_index=idx,
                              example_inputs=example_inputs, verify=self.verify,
                              cost_model=self.cost_model, evictions=self.evictions,
                              n_layers=self.n_layers)
            captured = copy.deepcopy(gm.graph)    # passes edit in place; a failure restores it
            try:
                gm = run_pipeline(gm, ctx)
            except Exception as e:             # never break the user's model: run it as captured
                if env.planner_strict():
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
            self._warn_dropout(ctx)
        runner = lower_for_eager(gm)
        fn = runner.forward
        if self.remainder == "inductor":
            fn = self._inductor(gm, example_inputs, idx) or runner.forward
        if not self.checking or self.call_check is not None:
            return fn
        return _checked_graph(fn, example_inputs, self.new_check())

    def new_check(self) -> CallGuard:
        """A call check whose measurements ``inspect`` lists."""
        check = CallGuard()
        self.checks.append(check)
        return check

    def _inductor(self, gm: fx.GraphModule, example_inputs, idx: int):
        """The rewritten graph compiled by Inductor: the sparse ops stay opaque calls (their
        fake impls give Inductor the shapes), the rest of the model is fused. None where
        Inductor fails (the graph then runs eagerly; the reason is in ``planner.inspect``)."""
        from torch._inductor.compile_fx import compile_fx
        try:
            return compile_fx(gm, example_inputs)
        except Exception as e:
            if env.planner_strict():
                raise
            note = f"graph{idx}: Inductor failed, ran eagerly: {type(e).__name__}: {e}"
            self.remainder_notes.append(note[:500])
            warnings.warn(f"sparse-planner: {note[:300]}")
            return None

    def _warn_dropout(self, ctx: PassContext) -> None:
        """Once per compiled model: the sites left dense because attention dropout is active
        (training mode), which would otherwise only show in ``planner.inspect``."""
        if self._warned_dropout:
            return
        hit = {r.name: r.reason for r in ctx.sites
               if r.status != "rewritten" and "dropout p=" in r.reason}
        for u in ctx.unmatched:
            if "dropout p=" in u.reason:
                hit.setdefault(u.site, u.reason.split(" (")[0])
        if not hit:
            return
        self._warned_dropout = True
        names = sorted(hit)
        reasons = sorted(set(hit.values()))
        warnings.warn(
            f"sparse-planner: {len(names)} attention site(s) run dense, not with the policy, "
            f"because attention dropout is active in training mode ({'; '.join(reasons)}): "
            f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}. They follow the policy "
            "in eval mode (model.eval()) or with the attention dropout set to 0; "
            "planner.inspect lists each site's reason", stacklevel=2)

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
        sites, recordings = [], {}
        for name, rec in self.records.items():
            st = stats.get(f"{self.owner}/{name}") if rec.status == "rewritten" else None
            rc = recall.get(f"{self.owner}/{name}") if rec.status == "rewritten" else None
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
                rules=(st.rules if st and st.calls and st.rules else rec.rules),
                recall=rc.recall if rc else None, recall_worst=rc.worst if rc else None,
                recall_per_head=rc.recall_per_head if rc else None,
                **self._eviction_fields(name, rec)))
            if rc is not None:
                recordings[name] = rc
        notes = self._density_notes(sites)
        if self.remainder == "inductor":
            notes.append(f"the ops outside attention: compiled by Inductor "
                         f"({len(self.graphs) - len(self.remainder_notes)} of "
                         f"{len(self.graphs)} graph(s))")
        return Report(sites, list(self.unmatched.values()), list(self.graphs), KERNELS.stats(),
                      notes=notes + self.remainder_notes
                      + [n for check in self.checks for n in check.notes()],
                      recordings=recordings)

    def _eviction_fields(self, name: str, rec) -> dict:
        """What ``inspect`` shows of a site's eviction: its last eviction (the runtime's record)
        or why none ran."""
        if self.evictions is None:
            return {}
        want = self.evictions.lookup(name)[0]
        if want is None:
            return {}
        ev = eviction.get_record(f"{self.owner}/{name}")
        if ev is None:
            why = rec.evict if rec.status == "rewritten" else \
                f"unevicted: the site is not rewritten ({rec.reason})"
            return {"evict": why or "unevicted"}
        text = ev.policy + (f"; {ev.note}" if ev.note else "")
        return {"evict": text, "cache_before": ev.before, "cache_after": ev.after,
                "bytes_freed": ev.freed, "kept_per_head": ev.per_head, "kept": ev.kept}

    def _density_notes(self, sites: list) -> list:
        """When every site a sparse policy governs measured density 1.0 on its last call, say
        why (the policy's budget against the length, or the cost model's choice)."""
        sparse = []
        for s in sites:
            rec = self.records[s.name]
            if s.status != "rewritten" or s.density is None or not rec.spec_key:
                continue
            pol = lookup(rec.spec_key).policy
            if not pol.is_dense:
                sparse.append((s, pol))
        if not sparse or any(s.density < 1.0 - 1e-9 for s, _ in sparse):
            return []
        notes = {}
        for s, pol in sparse:
            st = stats.get(f"{self.owner}/{s.name}")
            kernel = s.kernel or ""
            if "cost model: dense" in kernel:
                text = ("the cost model ran it densely at this length (estimated faster than "
                        "the sparse kernels; cost_model='off' always follows the policy)")
            elif "dsa warm-up" in kernel:
                continue
            elif st is None or st.tensors is None:
                continue
            else:
                text = budget_note(pol, int(st.tensors[1][2]))
            notes.setdefault(text, []).append(s.name)
        head = "every sparse site kept every pair on its last call (density 1.000)"
        return [f"{head}: {text} ({_names(names)})" for text, names in notes.items()]


def _names(names: list) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


_DEFAULT: Optional[Backend] = None
# one Backend per torch.compile(..., backend="sparse_planner") call: id of the object Dynamo
# holds for that call (torch.compile's per-call wrapper) -> (weak reference to it, Backend)
_PER_COMPILE: dict[int, tuple] = {}
_PER_COMPILE_LOCK = threading.Lock()


#: recompiles one compile may make of one code object (prefill and decode shapes, graph breaks)
RECOMPILES_PER_COMPILE = 64
_COMPILES = {"all": 0, "shared": 0}


def note_compile(isolated: bool) -> dict:
    """Count one more compile and raise Dynamo's recompile limits in proportion, so that the
    n-th compile of one model class in a process (a policy sweep) still captures its graphs.

    Dynamo keeps compiled graphs per code object: every compile of one model class adds cache
    entries to the same ``forward``. An ``isolated`` compile (``torch.compile(...,
    isolate_recompiles=True, recompile_limit=...)``) has its own entries and its own limit,
    so only the global cap across them, ``accumulated_recompile_limit``, grows with the number
    of compiles; a shared one (the registered string backend) also counts against
    ``recompile_limit``, which then grows by 8 entries per compile. Returns the counts."""
    import torch
    _COMPILES["all"] += 1
    if not isolated:
        _COMPILES["shared"] += 1
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILES_PER_COMPILE, 8 * _COMPILES["shared"])
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit,
                                          4 * RECOMPILES_PER_COMPILE,
                                          RECOMPILES_PER_COMPILE * _COMPILES["all"])
    return dict(_COMPILES)


def compiles_made() -> int:
    """Compiles counted by ``note_compile`` in this process."""
    return _COMPILES["all"]


def _innermost(callback):
    """The backend object Dynamo was given for one compile (``torch.compile`` wraps a string
    backend in a new object per call), found through its ``_torchdynamo_orig_backend`` chain."""
    from torch._dynamo.eval_frame import innermost_backend
    return innermost_backend(callback)


def _compiling_backend():
    """The backend object of the compile Dynamo is running now (None outside one)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        fn = InstructionTranslator.current_tx().output.compiler_fn
    except (AttributeError, ImportError):
        return None
    return None if fn is None else _innermost(fn)


def _checked_graph(fn, example_inputs, check: CallGuard):
    """A captured graph's calls through the whole-call check (``runtime.guard``), for
    ``torch.compile(backend="sparse_planner")`` and ``planner.backend()``, which have no wrapper
    around the model's call as ``planner.compile`` has: one check per graph, keyed on its
    inputs other than parameters (found once, here)."""
    import torch
    keep = [i for i, x in enumerate(example_inputs)
            if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter)]

    def run(*args):
        return check(lambda: fn(*args), tuple(args[i] for i in keep if i < len(args)), {})
    return run


def backend_for_compile(key) -> Backend:
    """The Backend holding what ``torch.compile(..., backend="sparse_planner")`` captured for
    the compile whose Dynamo backend object is ``key`` (created on first use). Without such an
    object (Dynamo called the registered function directly) one process-wide Backend."""
    global _DEFAULT
    with _PER_COMPILE_LOCK:
        if key is None or key is sparse_planner_backend:
            if _DEFAULT is None:
                _DEFAULT = Backend()
            return _DEFAULT
        entry = _PER_COMPILE.get(id(key))
        if entry is not None and entry[0]() is key:
            return entry[1]
        be = Backend()
        note_compile(isolated=False)

        def forget(ref, i=id(key)):
            if _PER_COMPILE.get(i, (None,))[0] is ref:
                del _PER_COMPILE[i]
        _PER_COMPILE[id(key)] = (weakref.ref(key, forget), be)
        return be


class _PerCompileBackend:
    """``torch.compile(model, backend="sparse_planner")``: the default policy, with one Backend
    (sites, graphs, stats) per ``torch.compile`` call, so ``planner.inspect`` of one compiled
    model shows its own sites only.

    Dynamo reuses a graph compiled for one ``torch.compile`` call in another call of the same
    code when their backends compare equal (its BACKEND_MATCH guard; ``torch.compile`` wraps a
    string backend in a new object per call that compares equal when the registered backends
    do). This backend compares equal to nothing but itself as the same object, so each call
    captures its own graphs (as ``planner.compile``, whose Backend objects are distinct) and
    two models of one class never share sites or statistics."""

    __name__ = "sparse_planner_backend"

    def __call__(self, gm: fx.GraphModule, example_inputs):
        return backend_for_compile(_compiling_backend())(gm, example_inputs)

    def __eq__(self, other) -> bool:
        return False            # identical objects still match: Dynamo compares by identity first

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "sparse_planner_backend"


sparse_planner_backend = _PerCompileBackend()


def default_backend() -> Optional[Backend]:
    """The process-wide Backend used when Dynamo calls the registered backend directly."""
    return _DEFAULT


def backend(policy: PolicyLike = None, **kw) -> Backend:
    """A Dynamo backend applying ``policy``: ``torch.compile(m, backend=planner.backend("dense"))``."""
    return Backend(policy, **kw)


def register() -> None:
    """Everything sparse-planner adds to the process, in one place; each step is idempotent.
    ``import planner`` runs it (planner/__init__.py), so any use of the package, the
    ``torch_dynamo_backends`` entry point included, finds it done:

    - the ``sparse`` custom ops and the attend providers (``runtime.ops.register``);
    - Dynamo keeps ``torch._safe_softmax`` in the captured graph (``passes.register``);
    - ``torch.compile(..., backend="sparse_planner")`` (the string backend).
    """
    from torch._dynamo import list_backends, register_backend
    ops.register()
    register_passes()
    if "sparse_planner" not in list_backends(exclude_tags=()):
        register_backend(sparse_planner_backend, name="sparse_planner")
