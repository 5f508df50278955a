"""Sparse attention past one device, with ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

**Head parallel.** A model whose attention projections are sharded by heads with DTensor
(``parallelize_module``: q/k/v column-wise, the output projection row-wise) and then compiled
by ``planner.compile`` runs each site on the rank's local heads: the sparse ops see plain local
tensors [B, Hq/R, N, D] / [B, Hkv/R, N, D], every policy estimates and selects per GQA group,
so no communication is added to the model's own (the row-wise projection's all-reduce), and
``planner.inspect`` on each rank reports its local shapes. ``parallelize_heads`` builds that
plan for modules with ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` (Hugging Face
attention), checking that no GQA group is split; ``shard_heads`` is the same cut for tensors.
The indexer of ``dsa`` reads every head's queries, so ``dsa`` is not head-local.

**Context parallel** (sparse prefill): ``Sharding`` and ``context_parallel_attention`` from
``runtime.context_parallel``: queries and K/V sharded along the sequence (head-tail load
balancing), selections from pooled keys gathered from every rank, then only the selected K/V
blocks fetched from their owners. Function level: a compiled model's sites are not yet
rewritten to it.

Example (every rank)::

    >>> mesh = init_device_mesh("cuda", (dist.get_world_size(),))        # doctest: +SKIP
    >>> m = planner.compile(parallelize_heads(model, mesh), policy="block_topk")  # doctest: +SKIP
    >>> y = m(x); print(planner.inspect(m))                                # doctest: +SKIP
"""
from __future__ import annotations

import torch

from runtime.context_parallel import (SUPPORTED, CommBytes, CPResult, Sharding,  # noqa: F401
                                      context_parallel_attention, ring_kv_bytes, single_device)

__all__ = ["Sharding", "context_parallel_attention", "CommBytes", "CPResult", "ring_kv_bytes",
           "single_device", "shard_heads", "parallelize_heads"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def shard_heads(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of the ``x.shape[dim]`` heads (q [B, Hq, N, D] and
    k / v [B, Hkv, N, D] cut alike keep each GQA group on one rank).

        >>> shard_heads(torch.zeros(1, 8, 5, 4), rank=1, world=2).shape
        torch.Size([1, 4, 5, 4])
    """
    h = x.shape[dim]
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_heads: rank {rank} outside [0, {world})")
    if h % world:
        raise ValueError(f"shard_heads: {h} heads along dim {dim} do not split over {world} "
                         f"ranks; expected a multiple of {world} (a GQA group must stay on one "
                         f"rank: shard the key heads, whose count divides the query heads')")
    per = h // world
    return x.narrow(dim, rank * per, per)


def parallelize_heads(model: torch.nn.Module, mesh, names=PROJECTIONS) -> torch.nn.Module:
    """Shard every attention module's heads over ``mesh`` (1-d) with
    ``torch.distributed.tensor.parallel.parallelize_module``: the q / k / v projections
    column-wise, the output projection row-wise (``names``: their attribute names). A module
    with a ``head_dim`` attribute is checked: its key heads must be a multiple of the mesh
    size. Returns ``model`` (changed in place); compile it afterwards."""
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    world = mesh.size()
    plan = {}
    for path, mod in model.named_modules():
        if not all(isinstance(getattr(mod, n, None), torch.nn.Linear) for n in names):
            continue
        hd = getattr(mod, "head_dim", None)
        if hd:
            for n in names[:3]:
                heads = getattr(mod, n).out_features // hd
                if heads % world:
                    raise ValueError(f"parallelize_heads: {path}.{n} has {heads} heads of "
                                     f"{hd}, not a multiple of the mesh size {world}")
        pre = f"{path}." if path else ""
        plan.update({pre + n: ColwiseParallel() for n in names[:3]})
        plan[pre + names[3]] = RowwiseParallel()
    if not plan:
        raise ValueError(f"parallelize_heads: no module of {type(model).__name__} has all of "
                         f"{list(names)} as Linear children")
    return parallelize_module(model, mesh, plan)
