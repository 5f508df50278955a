"""Run-time schedule choice: dense or the policy's sparse path, per call shape.

A site compiled with ``cost_model="auto"`` asks ``choose`` on every call; the answer is memoised
per (site, Nq, Nkv, device). The expected density comes from the policy's budget at this shape
(``planner.costmodel.expected_density``); where the device has no sparse kernels (the CPU runs
the fp32 reference, which computes every score), the policy is always followed: the reference
*is* the policy's definition.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4096)
def _choose(key: str, n_q: int, n_kv: int, device: str, policy, shapes: tuple) -> tuple:
    from planner import costmodel as cm
    prof = cm.profile_for(device)
    if policy.name == "dense" or not prof.sparse_kernels:
        return ("policy", None, None)
    if policy.attend_kind == "token":
        # a token list covering every visible key is dense attention, exactly; longer
        # contexts follow the policy (its selection is learned, not a cost trade-off)
        return ("dense" if n_kv <= policy.topk else "policy", None, None)
    b, hq, hkv, d = shapes
    rho = cm.expected_density(policy, n_q, n_kv)
    block = int(getattr(policy, "block", 64))
    dense = cm.estimate("dense_sdpa", prof, B=b, Hq=hq, Hkv=hkv, Nq=n_q, Nkv=n_kv, D=d, rho=1.0)
    sparse = cm.estimate("block_sparse", prof, B=b, Hq=hq, Hkv=hkv, Nq=n_q, Nkv=n_kv, D=d,
                         rho=rho, block=block)
    return ("dense" if dense <= sparse else "policy", dense, sparse)


def choose(spec, q: torch.Tensor, k: torch.Tensor) -> str:
    """"dense" when the cost model says dense is cheaper at this shape, else "policy"."""
    if spec.schedule != "auto":
        return "policy"
    dev = str(q.device) if q.device.type != "cuda" else f"cuda:{q.device.index or 0}"
    return _choose(spec.key, q.shape[2], k.shape[2], dev, spec.policy,
                   (q.shape[0], q.shape[1], k.shape[1], q.shape[3]))[0]


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
    sparse = cm.estimate("block_sparse", prof, rho=rho, block=block, **shape)
    return dense <= sparse, rho
