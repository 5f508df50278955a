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
