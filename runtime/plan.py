"""Run-time schedule choice: dense or the policy's sparse path, per call shape.

A site compiled with ``cost_model="auto"`` asks ``choose`` on every call; the answer is memoised
per (site, Nq, Nkv, device). ``variant`` gives the kernel schedule the cost model picked for the
sparse path (tiles, warps, stages; the split of decode lists), which the providers launch.
Block policies are costed at the expected density of their budget at this shape
(``planner.costmodel.expected_density``); token-list policies (``dsa``) with their indexer and
top-k (``planner.costmodel.token_site_seconds``). Where the device has no sparse kernels, the
policy is always followed: the reference *is* the policy's definition.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4096)
def _choose(key: str, n_q: int, n_kv: int, device: str, policy, shapes: tuple,
            dtype=torch.bfloat16) -> tuple:
    """(choice, dense seconds, sparse seconds, sparse candidate) for one call shape; the
    candidate is the cost model's cheapest schedule variant of the policy's kernel family."""
    from planner import costmodel as cm
    prof = cm.profile_for(device)
    b, hq, hkv, d = shapes
    if policy.name == "dense" or not prof.sparse_kernels or min(n_q, n_kv, b, hq, d) == 0:
        return ("policy", None, None, None)
    if policy.attend_kind == "token":
        # a token list covering every visible key is dense attention, exactly. Otherwise the
        # indexer, its top-k and the gather attention against dense attention: where dense is
        # cheaper it runs (an indexer being trained is followed regardless: runtime.dispatch)
        if n_kv <= policy.topk:
            return ("dense", None, None, None)
        dense = cm.estimate("dense_sdpa", prof, B=b, Hq=hq, Hkv=hkv, Nq=n_q, Nkv=n_kv, D=d,
                            rho=1.0)
        cand, sparse = cm.token_site_seconds(prof, B=b, Hq=hq, Hkv=hkv, Nq=n_q, Nkv=n_kv, D=d,
                                             topk=policy.topk, dtype=dtype)
        return ("dense" if dense <= sparse else "policy", dense, sparse, cand)
    rho = cm.expected_density(policy, n_q, n_kv)
    block = int(getattr(policy, "block", 64))
    dense = cm.estimate("dense_sdpa", prof, B=b, Hq=hq, Hkv=hkv, Nq=n_q, Nkv=n_kv, D=d, rho=1.0)
    cand, sparse = cm.best(prof, "block_sparse", dtype=dtype, B=b, Hq=hq, Hkv=hkv, Nq=n_q,
                           Nkv=n_kv, D=d, rho=rho, block=block)
    return ("dense" if dense <= sparse else "policy", dense, sparse, cand)


def _decide(spec, q: torch.Tensor, k: torch.Tensor) -> tuple:
    dev = str(q.device) if q.device.type != "cuda" else f"cuda:{q.device.index or 0}"
    return _choose(spec.key, q.shape[2], k.shape[2], dev, spec.policy,
                   (q.shape[0], q.shape[1], k.shape[1], q.shape[3]), q.dtype)


def choose(spec, q: torch.Tensor, k: torch.Tensor) -> str:
    """"dense" when the cost model says dense is cheaper at this shape, else "policy"."""
    if spec.schedule != "auto":
        return "policy"
    return _decide(spec, q, k)[0]


def variant(spec, q: torch.Tensor, k: torch.Tensor):
    """The kernel schedule variant (``planner.costmodel.Variant``) the cost model picked for
    this call shape, or None (cost model off, no fitted variants: the kernel's default)."""
    if spec.schedule != "auto":
        return None
    from planner import costmodel as cm
    cand = _decide(spec, q, k)[3]
    return cm.variant(cand) if cand else None


#: policies whose density is only known after selection (adaptive budgets)
ADAPTIVE = ("threshold", "vertical_slash")


def dense_at_measured_density(spec, q: torch.Tensor, k: torch.Tensor, counts: torch.Tensor,
                              block: int) -> tuple:
    """For adaptive policies under ``cost_model="auto"``: (run dense?, measured block density).

    The measured density is the fraction of the causally visible key blocks the selection
    kept (one host sync). Dense runs when the cost model estimates it cheaper at that
    density, e.g. a threshold policy that had to keep 80% of the blocks."""
    if spec.schedule != "auto" or spec.policy.name not in ADAPTIVE or not counts.numel():
        return False, None
    from planner import costmodel as cm
    prof = cm.profile_for(q.device)
    if not prof.sparse_kernels:
        return False, None
    from codegen.select.reference import structural_blocks
    n_q, n_kv = q.shape[2], k.shape[2]
    visible = float(structural_blocks(n_q, n_kv, spec.causal, block).sum())
    rho = float(counts.sum()) / (visible * counts.shape[0] * counts.shape[1])
    shape = dict(B=q.shape[0], Hq=q.shape[1], Hkv=k.shape[1], Nq=n_q, Nkv=n_kv, D=q.shape[3])
    dense = cm.estimate("dense_sdpa", prof, rho=1.0, **shape)
    _, sparse = cm.best(prof, "block_sparse", rho=rho, block=block, dtype=q.dtype, **shape)
    return dense <= sparse, rho
