"""What the ranks of tests/test_context_parallel.py run, in a module that imports neither
planner nor the test module (each rank is a fresh process: ``import planner`` alone costs
seconds on a CPU, and 4 ranks share the cores)."""
from __future__ import annotations

import os

import torch

from benchmarks.context_parallel import Case, check_worker
from runtime.context_parallel import Sharding, context_parallel_attention
from runtime.policies import BlockTopK, Dense, Threshold

#: PLANNER_TEST_SEED draws fresh inputs (as conftest's per-test seeds do)
SEED = int(os.environ.get("PLANNER_TEST_SEED", "0"))


def cases(world: int) -> list[Case]:
    s = SEED * 1000 + world * 100
    if world == 2:
        return [
            # N=1000: 16 blocks of 64, the last of 40 tokens; GQA groups of 2
            Case(Dense(), 1000, block=64, hq=4, hkv=2, d=32, seed=s + 1),
            Case(BlockTopK(block=64, topk=3), 1000, block=64, hq=4, hkv=2, d=32, seed=s + 2,
                 hot=0.1),
            # MHA (the logits path), N=777: 25 blocks of 32, chunks of 7/6/6/6 blocks, D=20
            Case(BlockTopK(block=32, topk=2, sink_blocks=0, local_blocks=2), 777, block=32,
                 hq=3, hkv=3, d=20, seed=s + 3),
            Case(Threshold(block=64, gamma=0.8), 1000, block=64, hq=6, hkv=2, d=24, seed=s + 4,
                 hot=0.1),
            Case(Threshold(block=16, gamma=0.9, max_budget=5), 645, block=16, hq=4, hkv=4,
                 d=16, causal=False, seed=s + 5),
            Case(Dense(), 645, block=16, hq=4, hkv=1, d=16, causal=False, seed=s + 6),
            # low density: 64 blocks, 2 chosen + sink + local of about 32 visible
            Case(BlockTopK(block=64, topk=2), 4096, block=64, hq=4, hkv=2, d=32, seed=s + 7,
                 hot=0.05),
            # the Triton attend (as on CUDA; here Triton's interpreter), its lists compared
            # with the single-device run's Triton estimator
            Case(BlockTopK(block=32, topk=2), 300, block=32, hq=4, hkv=2, d=16, seed=s + 8,
                 kernels="triton"),
        ]
    return [
        Case(Dense(), 999, block=32, hq=4, hkv=2, d=32, seed=s + 1),
        Case(BlockTopK(block=32, topk=3), 999, block=32, b=2, hq=6, hkv=3, d=32, seed=s + 2),
        Case(BlockTopK(block=64, topk=2, sink_blocks=2), 1000, block=64, hq=2, hkv=2, d=24,
             seed=s + 3, hot=0.1),
        Case(Threshold(block=32, gamma=0.85), 999, block=32, hq=4, hkv=1, d=16, seed=s + 4,
             hot=0.1),
        Case(BlockTopK(block=64, topk=2), 4096, block=64, hq=4, hkv=2, d=32, seed=s + 7,
             hot=0.05),
    ]


def errors(rank: int, world: int) -> dict:
    """The messages of calls a process group of ``world`` ranks must refuse."""
    q = torch.randn(1, 2, 1000, 16)
    lay = Sharding(1000, world, 64)
    ql = lay.shard(q, rank)
    calls = {
        "world": lambda: context_parallel_attention(
            ql, ql, ql, "dense", Sharding(1000, world + 1, 64)),
        "length": lambda: context_parallel_attention(q, q, q, "dense", lay),
        "policy": lambda: context_parallel_attention(ql, ql, ql, "vertical_slash", lay),
        "block": lambda: context_parallel_attention(ql, ql, ql, BlockTopK(block=32), lay),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def worker(rank: int, world: int, cases, head_policies=()) -> dict:
    """The context-parallel ``cases``, the refused calls, then (with ``head_policies``) the
    head-parallel model under each policy: one process group serves them all."""
    out = {"cases": check_worker(rank, world, cases), "errors": errors(rank, world)}
    if head_policies:
        out["heads"] = head_parallel(rank, world, head_policies)
    return out


def llama(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, attn_implementation="sdpa")
    torch.manual_seed(SEED)
    return LlamaForCausalLM(cfg).eval()


def head_parallel(rank: int, world: int, policies) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    import planner
    from planner.distributed import parallelize_heads
    base = llama(2)
    tp = llama(2)
    tp.load_state_dict(base.state_dict())
    mesh = init_device_mesh("cpu", (world,))
    parallelize_heads(tp, mesh)
    x = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(SEED))
    out = {}
    for pol in policies:
        with torch.no_grad():
            want = planner.compile(base, policy=pol, cost_model="off")(x).logits
            cm = planner.compile(tp, policy=pol, cost_model="off")
            got = cm(x).logits
        sites = planner.inspect(cm).sites
        out[pol.name] = {"err": (got - want).abs().max().item(),
                         "shapes": sorted({s.shapes for s in sites}),
                         "rewritten": sum(s.status == "rewritten" for s in sites)}
    try:
        parallelize_heads(llama(1), mesh)
        out["split_group"] = None
    except ValueError as e:
        out["split_group"] = str(e)
    return out


def hang(rank: int, world: int) -> None:
    """Rank 0 waits in a collective that rank 1 never joins."""
    import time

    import torch.distributed as dist
    if rank == 0:
        dist.barrier()
    else:
        time.sleep(120)
