"""Context-parallel sparse prefill (``runtime.context_parallel``): equality with the
single-device run, bytes moved beside dense ring attention, and (GPU) time.

CPU (gloo, local processes; what a machine without GPUs runs)::

    PYTHONPATH=. python benchmarks/context_parallel.py --out benchmarks/results

For 2 and 4 ranks and each shape, every policy (dense, block_topk, threshold) runs sharded
and once on one device: ``dense`` must give SDPA's output, the sparse policies the
single-device block lists (compared exactly) and output. Per run: the bytes each rank
received (pooled keys and estimates, block-id lists, K/V blocks) beside what ring attention
moves at the same sharding (every other rank's K/V passes through each rank: (R-1)/R of K/V
per rank), and the block density. Writes ``context_parallel_cpu.{json,md}``.

GPU (NCCL, one process per GPU; written for a multi-GPU machine, not run yet)::

    PYTHONPATH=. python benchmarks/context_parallel.py --device cuda --world 2,4,8 \\
        --lengths 131072,524288 --policies block_topk,threshold --out $OUT

The same equality check at ``--check-length`` first, then per length the sparse path's time
against PyTorch's ring attention over SDPA (``torch.distributed.tensor.experimental.
context_parallel``, head-tail load balancing: the same sharding) with the same q/k/v; bytes;
scaling efficiency = t(1 GPU) / (R x t(R GPUs)) of the sparse path, where one GPU fits the
length. Writes ``context_parallel_<card>x<R>.{json,md}``.

Inputs: standard normal q, k, v plus, with ``--hot`` > 0, a direction shared by every query and
added to that fraction of key blocks (the few blocks every query favours that make a sparse
policy's estimate meaningful; plain noise gives near-uniform attention).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from runtime.context_parallel import (Sharding, context_parallel_attention,  # noqa: E402
                                      ring_kv_bytes, single_device)
from runtime.policies import PRESETS, Policy  # noqa: E402


# ------------------------------------------------------------------------------ launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, backend, timeout_s, out_dir, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    import torch.distributed as dist
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        res = fn(rank, world, *args)
        torch.save(res, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, backend: str = "gloo", timeout_s: float = 120.0,
              deadline_s: Optional[float] = None):
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined in one process group
    (``backend``, rendezvous on 127.0.0.1 at a free port); returns their results by rank.
    A rank's exception is raised here with its traceback. ``timeout_s`` is the process group's
    timeout (a collective some rank never joins fails after it); a run past ``deadline_s``
    (default ``timeout_s`` + 30) kills the processes and raises TimeoutError. ``fn`` must be
    importable (module level)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(fn, world, free_port(), backend, timeout_s,
                                               out_dir, args),
                                 nprocs=world, join=False, start_method="spawn")
        limit = timeout_s + 30 if deadline_s is None else deadline_s
        deadline = time.monotonic() + limit
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_ranks: {fn.__name__} on {world} ranks still running "
                                       f"after {limit:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False)
                for r in range(world)]


# ------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """One sharded call: the policy and the shape [B, Hq / Hkv, N, D] of its inputs."""

    policy: Policy
    n: int
    block: int = 64
    b: int = 1
    hq: int = 4
    hkv: int = 2
    d: int = 32
    causal: bool = True
    seed: int = 0
    hot: float = 0.0
    dtype: str = "float32"
    kernels: str = ""          # SPARSE_PLANNER_KERNELS for the call ("" = as the process has it)

    @property
    def id(self) -> str:
        return (f"{self.policy.name}-B{self.b}-H{self.hq}/{self.hkv}-N{self.n}-D{self.d}-"
                f"blk{self.block}{'' if self.causal else '-noncausal'}"
                f"{'-' + self.kernels if self.kernels else ''}")


def inputs(case: Case, device="cpu", on_device: bool = False):
    """q [B, Hq, N, D], k, v [B, Hkv, N, D] from ``case.seed`` (the same on every rank), drawn
    on the CPU and moved (the same numbers on any device), or with ``on_device`` drawn there
    (fast at long lengths; the numbers differ from the CPU's)."""
    g = torch.Generator(device if on_device else "cpu").manual_seed(case.seed)
    dev = dict(device=device) if on_device else {}
    q = torch.randn(case.b, case.hq, case.n, case.d, generator=g, **dev)
    k = torch.randn(case.b, case.hkv, case.n, case.d, generator=g, **dev)
    v = torch.randn(case.b, case.hkv, case.n, case.d, generator=g, **dev)
    if case.hot > 0:
        u = torch.randn(case.b, case.hkv, 1, case.d, generator=g, **dev)
        u = u / u.norm(dim=-1, keepdim=True) * 2 * case.d ** 0.5     # [B, Hkv, 1, D]
        nb = -(-case.n // case.block)
        hot = torch.rand(case.b, case.hkv, nb, generator=g, **dev) < case.hot
        rows = hot.repeat_interleave(case.block, dim=-1)[..., :case.n, None]
        k = k + rows * u
        q = q + 0.5 * u.repeat_interleave(case.hq // case.hkv, dim=1)
    dt = getattr(torch, case.dtype)
    return tuple(t.to(device=device, dtype=dt) for t in (q, k, v))


def check_worker(rank: int, world: int, cases, device: str = "cpu"):
    """Per case: this rank's output, block lists and bytes (run under ``run_ranks``)."""
    from runtime.kernels.launch import kernels_enabled
    out = []
    for case in cases:
        q, k, v = inputs(case, device)
        lay = Sharding(case.n, world, case.block)
        ql, kl, vl = (lay.shard(t, rank) for t in (q, k, v))
        with _kernels_mode(case.kernels):
            res = context_parallel_attention(ql, kl, vl, case.policy, lay, causal=case.causal)
            kernel = kernels_enabled(ql)
        out.append({"out": res.out.cpu(), "counts": [c.cpu() for c in res.counts],
                    "indices": [i.cpu() for i in res.indices], "recv": dict(res.bytes.recv),
                    "sent": dict(res.bytes.sent), "ring": ring_kv_bytes(lay, rank, kl, vl),
                    "triton_attend": kernel})
    return out


@contextlib.contextmanager
def _kernels_mode(mode: str):
    """``SPARSE_PLANNER_KERNELS=mode`` inside the block ("" leaves it as it is)."""
    old = os.environ.get("SPARSE_PLANNER_KERNELS")
    if mode:
        os.environ["SPARSE_PLANNER_KERNELS"] = mode
    try:
        yield
    finally:
        if mode:
            if old is None:
                os.environ.pop("SPARSE_PLANNER_KERNELS")
            else:
                os.environ["SPARSE_PLANNER_KERNELS"] = old


def global_lists(lay: Sharding, per_rank, key: str) -> torch.Tensor:
    """Every rank's per-chunk lists (rank r: its chunks r and 2R-1-r) in sequence order."""
    parts = {}
    for r, res in enumerate(per_rank):
        for (s, _), t in zip(lay.chunks(r), res[key]):
            parts[s] = t
    return torch.cat([parts[s] for s in sorted(parts)], dim=2)


def compare(case: Case, world: int, per_rank, device="cpu") -> dict:
    """Sharded vs single-device results of one case (the single-device run on ``device``, the
    ranks' device type), and its bytes."""
    lay = Sharding(case.n, world, case.block)
    q, k, v = inputs(case, device)
    with _kernels_mode(case.kernels):
        counts, idx, want = (None if t is None else t.cpu() for t in single_device(
            q, k, v, case.policy, block=case.block, causal=case.causal))
    got = lay.unshard([r["out"] for r in per_rank])
    row = {"case": case.id, "world": world, "policy": case.policy.short(), "n": case.n,
           "max_abs_err": (got.float() - want.float()).abs().max().item()}
    c_got, i_got = global_lists(lay, per_rank, "counts"), global_lists(lay, per_rank, "indices")
    if counts is not None:
        row["lists_equal"] = bool(torch.equal(c_got, counts) and torch.equal(i_got, idx))
        row["rows_differing"] = int((c_got != counts).sum() + ((i_got != idx).any(-1)
                                                               & (c_got == counts)).sum())
    nb = lay.num_blocks
    allowed = (torch.arange(nb)[None, :] <= torch.arange(nb)[:, None]).sum().item() \
        if case.causal else nb * nb
    row["block_density"] = c_got.sum().item() / (allowed * c_got.shape[0] * c_got.shape[1])
    recv = [sum(r["recv"].values()) for r in per_rank]
    row.update({"recv_bytes_per_rank": recv, "recv_bytes_total": sum(recv),
                "recv_by_kind": {kd: sum(r["recv"][kd] for r in per_rank)
                                 for kd in per_rank[0]["recv"]},
                "ring_bytes_per_rank": [r["ring"] for r in per_rank],
                "ring_bytes_total": sum(r["ring"] for r in per_rank)})
    row["bytes_vs_ring"] = row["recv_bytes_total"] / row["ring_bytes_total"]
    return row


# ------------------------------------------------------------------------------ CPU run
def cpu_cases(args) -> list[Case]:
    return [Case(_policy(p, args, n), n, block=args.block, hq=args.heads, hkv=args.kv_heads,
                 d=args.head_dim, seed=args.seed, hot=args.hot)
            for n in args.lengths for p in args.policies]


def _policy(name: str, args, n: int) -> Policy:
    """``name`` at length ``n``: block_topk keeps ``--topk`` blocks, or ``--density`` of the
    blocks a query block sees on average under the causal rule."""
    if name == "dense":
        return PRESETS[name]()
    if name == "block_topk":
        topk = args.topk or max(1, round(args.density * (-(-n // args.block) + 1) / 2))
        return PRESETS[name](block=args.block, topk=topk)
    if name == "threshold":
        return PRESETS[name](block=args.block, gamma=args.gamma)
    raise SystemExit(f"--policies: {name!r} is not run under context parallelism; "
                     f"expected dense, block_topk or threshold")


def _machine(device: str) -> dict:
    import triton
    meta = {"torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(),
            "command": "PYTHONPATH=. python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
            "date": datetime.date.today().isoformat()}
    if device == "cuda":
        meta["card"] = torch.cuda.get_device_name()
    else:
        meta["card"] = (f"CPU ({platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} cores shared by the ranks)")
    return meta


def run_cpu(args) -> dict:
    cases = cpu_cases(args)
    rows, wall = [], {}
    for world in args.world:
        t0 = time.perf_counter()
        per_rank = run_ranks(check_worker, world, cases, backend="gloo", timeout_s=args.timeout)
        wall[world] = round(time.perf_counter() - t0, 1)
        for i, case in enumerate(cases):
            rows.append(compare(case, world, [r[i] for r in per_rank]))
            print(_line(rows[-1]), flush=True)
    return {**_machine("cpu"), "backend": "gloo", "inputs": _inputs_note(args),
            "ranks_wall_s": wall, "rows": rows}


def _inputs_note(args) -> str:
    return (f"B=1, {args.heads} q heads / {args.kv_heads} kv heads, D={args.head_dim}, fp32, "
            f"block {args.block}, causal; standard normal plus a shared direction on "
            f"{args.hot:.0%} of key blocks (seed {args.seed})")


def _line(row) -> str:
    eq = row.get("lists_equal")
    return (f"R={row['world']} {row['case']:<44} err={row['max_abs_err']:.2e} "
            f"lists={'-' if eq is None else eq} density={row['block_density']:.3f} "
            f"recv={row['recv_bytes_total']:>10} ring={row['ring_bytes_total']:>10} "
            f"ratio={row['bytes_vs_ring']:.3f}")


def write(res: dict, out: str, stem: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Context-parallel sparse prefill ({res['card']})", "",
             f"torch {res['torch']}, triton {res['triton']}, python {res['python']}, "
             f"{res['date']}; `{res['command']}`", "",
             f"Backend {res['backend']}; inputs: {res['inputs']}.", "",
             "bytes: what all ranks received together (pooled keys and estimates + block-id "
             "lists + K/V blocks); ring: what ring attention moves at the same sharding (each "
             "rank receives every other rank's K/V); err: max abs difference from the "
             "single-device output (dense: SDPA); lists: block lists equal to the "
             "single-device estimator's. dense fetches the blocks its queries can see (the "
             "causal prefix), not every other shard as the ring does.", ""]
    if "rows" in res:
        lines += ["| R | N | policy | block density | lists equal | max abs err | bytes | "
                  "of which K/V | ring bytes | bytes / ring |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            eq = r.get("lists_equal")
            lines.append(f"| {r['world']} | {r['n']} | {r['policy']} | {r['block_density']:.3f} "
                         f"| {'-' if eq is None else eq} | {r['max_abs_err']:.1e} | "
                         f"{r['recv_bytes_total']} | {r['recv_by_kind']['kv']} | "
                         f"{r['ring_bytes_total']} | {r['bytes_vs_ring']:.3f} |")
    if "timings" in res:
        lines += ["", "| R | N | policy | sparse ms | ring SDPA ms | speed-up | bytes / ring | "
                  "scaling eff. |", "|---|---|---|---|---|---|---|---|"]
        for r in res["timings"]:
            eff = r.get("scaling_efficiency")
            lines.append(f"| {r['world']} | {r['n']} | {r['policy']} | {r['sparse_ms']:.2f} | "
                         f"{r['ring_ms']:.2f} | {r['ring_ms'] / r['sparse_ms']:.2f} | "
                         f"{r['bytes_vs_ring']:.3f} | {'-' if eff is None else f'{eff:.2f}'} |")
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------ GPU run
def _ms(fn, reps: int, device) -> float:
    """Median wall milliseconds of ``fn`` over ``reps`` calls, every rank in step (barrier)."""
    import torch.distributed as dist
    fn()                                                     # warm-up (kernel compiles)
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(sorted(times)[len(times) // 2], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)                 # the slowest rank's time
    return t.item()


def time_worker(rank: int, world: int, cases, reps: int, rotate: str = "allgather"):
    """Per case: the sparse path's and ring SDPA's time (ms, slowest rank) and bytes.
    ``rotate``: how PyTorch's context parallel passes K/V ("allgather", its default, or
    "alltoall": the ring proper)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._attention import set_rotate_method
    set_rotate_method(rotate)
    mesh = init_device_mesh("cuda", (world,))
    out = []
    for case in cases:
        out.append(_time_case(case, rank, world, mesh, reps))
        torch.cuda.empty_cache()
    return out


def _time_case(case: Case, rank: int, world: int, mesh, reps: int) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.tensor.experimental import context_parallel
    dev = torch.device("cuda", rank)
    q, k, v = inputs(case, dev, on_device=True)
    lay = Sharding(case.n, world, case.block)
    ql, kl, vl = (lay.shard(t, rank) for t in (q, k, v))
    box = {}

    def sparse():
        box["res"] = context_parallel_attention(ql, kl, vl, case.policy, lay)
    sparse_ms = _ms(sparse, reps, dev)
    recv = torch.tensor(box.pop("res").bytes.received, device=dev)
    dist.all_reduce(recv)
    ring = torch.tensor(ring_kv_bytes(lay, rank, kl, vl), device=dev)
    dist.all_reduce(ring)
    # ring attention over SDPA: PyTorch shards the buffers in place (head-tail balancing);
    # SDPA's flash kernel takes no GQA groups, so the ring moves K/V repeated per query head
    # (the bytes above count them once per KV head, as the sparse path moves them)
    g = case.hq // case.hkv
    kr, vr = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    with context_parallel(mesh, buffers=[q, kr, vr], buffer_seq_dims=[2, 2, 2]):
        ring_ms = _ms(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True),
                      reps, dev)
    return {"case": case.id, "world": world, "n": case.n, "policy": case.policy.short(),
            "sparse_ms": sparse_ms, "ring_ms": ring_ms, "recv_bytes_total": recv.item(),
            "ring_bytes_total": ring.item(), "bytes_vs_ring": recv.item() / ring.item()}


def one_gpu_ms(case: Case, reps: int):
    """The sparse path on one GPU (no communication), for scaling; None where it does not fit."""
    try:
        q, k, v = inputs(case, "cuda", on_device=True)
        torch.cuda.synchronize()
        _one_gpu(q, k, v, case)                                   # warm-up (compiles)
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _one_gpu(q, k, v, case)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    except torch.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()


def _one_gpu(q, k, v, case: Case):
    """score -> select -> the Triton block-sparse kernel, as one GPU runs the site."""
    from runtime import estimators
    from runtime.kernels.block_sparse import block_sparse_attention
    from runtime.spec import SiteSpec
    spec = SiteSpec(site="bench.cp", owner="bench", policy=case.policy, scale=case.d ** -0.5,
                    causal="lower_right", gqa_group=case.hq // case.hkv, block=case.block)
    est = estimators.get(case.policy)
    c, i = est.select(est.score(q, k, [], spec), q, k, spec)
    return block_sparse_attention(q, k, v, c, i, block=case.block, scale=spec.scale, causal=True)


def run_gpu(args) -> list[dict]:
    """One result per ``--world``: the check at ``--check-length``, then the timings."""
    n_gpu = torch.cuda.device_count()
    results = []
    for world in args.world:
        if world > n_gpu:
            print(f"R={world}: skipped, {n_gpu} GPUs here", flush=True)
            continue
        names = ["dense"] + [p for p in args.policies if p != "dense"]
        chk = [Case(_policy(p, args, args.check_length), args.check_length, block=args.block,
                    hq=args.heads, hkv=args.kv_heads, d=args.head_dim, seed=args.seed,
                    hot=args.hot, dtype="float32") for p in names]
        per_rank = run_ranks(check_worker, world, chk, "cuda", backend="nccl",
                             timeout_s=args.timeout, deadline_s=args.budget_s)
        rows = [compare(c, world, [r[i] for r in per_rank], "cuda") for i, c in enumerate(chk)]
        for r in rows:
            print(_line(r), flush=True)
        cases = [Case(_policy(p, args, n), n, block=args.block, hq=args.heads,
                      hkv=args.kv_heads, d=args.head_dim, seed=args.seed, hot=args.hot,
                      dtype=args.dtype) for n in args.lengths for p in args.policies
                 if p != "dense"]
        timings = run_ranks(time_worker, world, cases, args.reps, args.rotate, backend="nccl",
                            timeout_s=args.timeout, deadline_s=args.budget_s)[0]
        for t, case in zip(timings, cases):
            one = one_gpu_ms(case, args.reps)
            t["one_gpu_ms"] = one
            t["scaling_efficiency"] = None if one is None else one / (world * t["sparse_ms"])
            print(f"R={world} N={t['n']} {t['policy']}: sparse {t['sparse_ms']:.2f} ms, ring "
                  f"{t['ring_ms']:.2f} ms, bytes/ring {t['bytes_vs_ring']:.3f}", flush=True)
        results.append({**_machine("cuda"), "backend": "nccl", "world": world,
                        "inputs": _inputs_note(args) + f", timed in {args.dtype}; ring: "
                                  f"PyTorch context_parallel, rotate method {args.rotate}",
                        "rows": rows, "timings": timings})
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--world", default=None, help="rank counts (cpu: 2,4; cuda: 2,4,8)")
    ap.add_argument("--lengths", default=None, help="cpu: 4096,4000; cuda: 131072,524288")
    ap.add_argument("--policies", default="dense,block_topk,threshold")
    ap.add_argument("--block", type=int, default=None, help="cpu: 64; cuda: 128")
    ap.add_argument("--topk", type=int, default=None, help="block_topk's topk (default: "
                    "--density of the blocks a query block sees on average)")
    ap.add_argument("--density", type=float, default=None, help="cpu: 0.1; cuda: 0.05")
    ap.add_argument("--gamma", type=float, default=0.9)
    ap.add_argument("--heads", type=int, default=None, help="cpu: 4; cuda: 16")
    ap.add_argument("--kv-heads", type=int, default=None, help="cpu: 2; cuda: 16")
    ap.add_argument("--head-dim", type=int, default=None, help="cpu: 32; cuda: 128")
    ap.add_argument("--hot", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", help="cuda timings' dtype")
    ap.add_argument("--check-length", type=int, default=4096, help="cuda equality check's N")
    ap.add_argument("--rotate", default="allgather", choices=("allgather", "alltoall"),
                    help="PyTorch context_parallel's K/V rotation (cuda)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="the process groups' timeout: a collective waiting longer fails")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="kill a group's processes after this long (default: timeout + 30)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    pick = lambda v, cpu, cuda: v if v is not None else (cuda if gpu else cpu)   # noqa: E731
    args.world = [int(x) for x in pick(args.world, "2,4", "2,4,8").split(",")]
    args.lengths = [int(x) for x in pick(args.lengths, "4096,4000", "131072,524288").split(",")]
    args.policies = args.policies.split(",")
    args.block = pick(args.block, 64, 128)
    args.heads, args.kv_heads = pick(args.heads, 4, 16), pick(args.kv_heads, 2, 16)
    args.head_dim = pick(args.head_dim, 32, 128)
    args.density = pick(args.density, 0.1, 0.05)
    if not gpu:
        res = run_cpu(args)
        if args.out:
            write(res, args.out, "context_parallel_cpu")
        bad = [r["case"] for r in res["rows"] if r["max_abs_err"] > 1e-4
               or r.get("lists_equal") is False]
        if bad:
            print(f"not equal to the single-device run: {bad}", file=sys.stderr)
        return 1 if bad else 0
    for res in run_gpu(args):
        card = res["card"].lower().replace("nvidia ", "").split()[0]
        if args.out:
            write(res, args.out, f"context_parallel_{card}x{res['world']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
