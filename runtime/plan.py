"""The dense-or-sparse decision, per call shape: the one place that makes it.

``decide`` weighs dense attention against the policy's sparse path with the cost model
(``runtime.costmodel``): for block policies, the attention kernel at the expected density plus
the estimator and selection that would have to run first (``EstimatorRates``). The passes ask it at the captured shape (``passes.schedule``: the
report's estimates, and a static site planned as SDPA); a site compiled with
``cost_model="auto"`` asks ``choose`` on every call, memoised per (site, Nq, Nkv, device).
``variant`` gives the kernel schedule the cost model picked for the sparse path (tiles, warps,
stages; the split of decode lists), which the providers launch. Block policies are costed at
the expected density of their budget at this shape (``Policy.expected_density``); token-list
policies (``dsa``) with their indexer and top-k (``runtime.costmodel.token_site_seconds``);
adaptive policies are re-decided at the density their selection measured
(``dense_at_measured_density``). Where the device has no sparse kernels, the policy is always
followed: the reference *is* the policy's definition.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Optional

import torch

from codegen.select.reference import structural_blocks
from runtime import costmodel as cm


#: the sparse path is taken only where it is estimated at least this much cheaper than dense:
#: a wrong dense choice forgoes a small gain, a wrong sparse one makes the model slower
SPARSE_MARGIN = 0.1


@dataclass(frozen=True)
class Decision:
    """``choice``: "dense" (dense attention is estimated cheaper, or exactly what the policy
    computes) or "policy"; the estimated seconds of a dense and a sparse call, and the sparse
    path's cheapest candidate (``runtime.costmodel``; None: the kernel's default schedule)."""

    choice: str
    dense_s: Optional[float] = None
    sparse_s: Optional[float] = None
    candidate: Optional[str] = None


def decide(policy, profile, *, B: int, Hq: int, Hkv: int, Nq: int, Nkv: int, D: int,
           dtype=torch.bfloat16, density: Optional[float] = None) -> Decision:
    """Dense or the policy's sparse path for one call shape on ``profile``; a block policy is
    costed at ``density`` (a measured one) or else at its expected density at this shape.

    A dense policy, or a device without sparse kernels, follows the policy (the estimates are
    still given); a token list covering every visible key is dense attention, exactly.

        >>> from runtime import costmodel as cm, policies
        >>> decide(policies.BlockTopK(topk=8), cm.PROFILES["h100"], B=1, Hq=16, Hkv=16,
        ...        Nq=65536, Nkv=65536, D=128).choice
        'policy'
    """
    if min(Nq, Nkv, B, Hq, D) == 0:
        return Decision("policy")
    shape = dict(B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nkv=Nkv, D=D)
    dense, cand, sparse = _estimates(policy, profile, dtype, density, **shape)
    if policy.attend_kind != "token" and Nq == Nkv:
        # prefill shapes: scaled by what whole sites measured on this card
        f_dense, f_sparse = _calibration(type(policy), profile, Hq, D, dtype)
        if f_dense:
            dense *= cm.interp_log(f_dense, Nkv)
            sparse *= cm.interp_log(f_sparse, Nkv)
    if policy.is_dense or not profile.sparse_kernels:
        return Decision("policy", dense, sparse)
    if policy.attend_kind == "token" and Nkv <= policy.topk:
        return Decision("dense", dense, sparse)
    return Decision("dense" if dense <= sparse * (1 + SPARSE_MARGIN) else "policy", dense,
                    sparse, cand)


def _estimates(policy, profile, dtype, density, **shape) -> tuple:
    """(dense seconds, sparse candidate, sparse seconds) of the analytic cost model."""
    dense = cm.estimate("dense_sdpa", profile, rho=1.0, **shape)
    if policy.attend_kind == "token":
        # the indexer, its top-k and the gather attention (an indexer being trained is
        # followed regardless: runtime.dispatch)
        cand, sparse = cm.token_site_seconds(profile, topk=policy.topk, dtype=dtype, **shape)
        return dense, cand, sparse
    Nq, Nkv = shape["Nq"], shape["Nkv"]
    cand, sparse = cm.best(profile, "block_sparse", dtype=dtype,
                           rho=policy.expected_density(Nq, Nkv) if density is None
                           else density,
                           block=int(getattr(policy, "block", 64)), **shape)
    if density is None:            # the estimator has not run yet: its cost counts too
        sparse += profile.estimators.seconds(
            policy.name, B=shape["B"], Hq=shape["Hq"], Nq=Nq, Nkv=Nkv,
            block=int(getattr(policy, "block", getattr(policy, "page", 64))))
    return dense, cand, sparse


@functools.lru_cache(maxsize=256)
def _calibration(cls, profile, Hq: int, D: int, dtype) -> tuple:
    """((N, measured / estimated dense), ...), ((N, measured / estimated sparse site), ...) at
    the measured shape nearest (Hq, D) for the policy class at its defaults (what
    ``benchmarks/site_overhead.py`` ran); ((), ()) where nothing was measured."""
    try:
        ref = cls()
    except TypeError:
        return (), ()
    pts, m = profile.calibration.neighbours(ref.name, Hq, D)
    if not pts:
        return (), ()
    f_dense, f_sparse = [], []
    for n, sdpa_s, site_s, host_s in pts:
        d, _, s = _estimates(ref, profile, dtype, None, B=1, Hq=m[0], Hkv=m[1], Nq=n, Nkv=n,
                             D=m[2])
        f_dense.append((n, sdpa_s / d))
        # host-bound alone: the device time is unknown below the wall (see SiteCalibration);
        # an adaptive policy waits for its selection's count on the host, so its host time
        # holds the device's and its wall is what a model pays
        bound = ref.adaptive or site_s >= 1.5 * host_s
        f_sparse.append((n, site_s / s if bound else min(1.0, site_s / s)))
    return tuple(f_dense), tuple(f_sparse)


@functools.lru_cache(maxsize=4096)
def _choose(key: str, n_q: int, n_kv: int, device: str, policy, shapes: tuple,
            dtype=torch.bfloat16) -> Decision:
    """``decide`` on the device's profile, memoised per site and call shape."""
    b, hq, hkv, d = shapes
    return decide(policy, cm.profile_for(device), B=b, Hq=hq, Hkv=hkv, Nq=n_q, Nkv=n_kv, D=d,
                  dtype=dtype)


def _decide(spec, q: torch.Tensor, k: torch.Tensor) -> Decision:
    dev = str(q.device) if q.device.type != "cuda" else f"cuda:{q.device.index or 0}"
    return _choose(spec.key, q.shape[2], k.shape[2], dev, spec.policy,
                   (q.shape[0], q.shape[1], k.shape[1], q.shape[3]), q.dtype)


_ALL_DENSE = contextvars.ContextVar("sparse_planner_all_dense", default=False)
_sparse_runs = [0]


@contextlib.contextmanager
def all_dense():
    """Within this block every site under ``cost_model="auto"`` runs dense (``runtime.guard``'s
    dense trial of a call)."""
    token = _ALL_DENSE.set(True)
    try:
        yield
    finally:
        _ALL_DENSE.reset(token)


def note_sparse_run() -> None:
    """A site call took a sparse path (``runtime.dispatch``); ``sparse_runs`` counts them."""
    _sparse_runs[0] += 1


def sparse_runs() -> int:
    """How many site calls took a sparse path in this process so far."""
    return _sparse_runs[0]


def choose(spec, q: torch.Tensor, k: torch.Tensor) -> str:
    """"dense" when the cost model says dense is cheaper at this shape (or ``all_dense`` is
    on), else "policy"."""
    if spec.schedule != "auto":
        return "policy"
    if _ALL_DENSE.get():
        return "dense"
    return _decide(spec, q, k).choice


def variant(spec, q: torch.Tensor, k: torch.Tensor):
    """The kernel schedule variant (``runtime.costmodel.Variant``) the cost model picked for
    this call shape, or None (cost model off, no fitted variants: the kernel's default)."""
    if spec.schedule != "auto":
        return None
    cand = _decide(spec, q, k).candidate
    return cm.variant(cand) if cand else None


def dense_at_measured_density(spec, q: torch.Tensor, k: torch.Tensor, counts: torch.Tensor,
                              block: int) -> tuple:
    """For adaptive policies under ``cost_model="auto"``: (run dense?, measured block density).

    The measured density is the fraction of the causally visible key blocks the selection
    kept (one host sync). Dense runs when the cost model estimates it cheaper at that
    density, e.g. a threshold policy that had to keep 80% of the blocks."""
    if spec.schedule != "auto" or not spec.policy.adaptive or not counts.numel():
        return False, None
    prof = cm.profile_for(q.device)
    if not prof.sparse_kernels:
        return False, None
    n_q, n_kv = q.shape[2], k.shape[2]
    visible = float(structural_blocks(n_q, n_kv, spec.causal, block).sum())
    rho = float(counts.sum()) / (visible * counts.shape[0] * counts.shape[1])
    d = decide(spec.policy, prof, B=q.shape[0], Hq=q.shape[1], Hkv=k.shape[1], Nq=n_q, Nkv=n_kv,
               D=q.shape[3], dtype=q.dtype, density=rho)
    return d.choice == "dense", rho
