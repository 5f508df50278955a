"""Timing and error helpers shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time


def bench_ms(fn, *, warmup: int, rep: int, dry_run: bool = False) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``: ``warmup`` and ``rep`` in ms).
    ``dry_run`` (CPU smoke runs of a script): one timed call, the number means nothing."""
    if dry_run:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def events_ms(fn, *, reps: int, warmup: int = 1, dry_run: bool = False) -> float:
    """Median milliseconds of ``reps`` calls of ``fn``, each timed by its own CUDA events after
    ``warmup`` untimed calls (a count of calls, for calls too long for ``bench_ms``'s time
    budgets). ``dry_run``: as in ``bench_ms``."""
    if dry_run:
        return bench_ms(fn, warmup=0, rep=0, dry_run=True)
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def device_kernels(prof, steps: int) -> list:
    """The device kernels of a ``torch.profiler`` run of ``steps`` calls, most time first:
    ``(name, ms per call, launches per call)``. Operators, which carry their kernels' device
    time too, are left out, so the times sum to the device's busy time once."""
    def dev(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    kernels = [e for e in prof.key_averages()
               if str(getattr(e, "device_type", "")).endswith("CUDA") and dev(e)]
    return [(e.key[:80], dev(e) / 1e3 / steps, e.count // steps)
            for e in sorted(kernels, key=dev, reverse=True)]


def graph_ms(fn, *, dry_run: bool = False) -> float:
    """Median milliseconds of CUDA-graph replays of ``fn`` (the GPU work without the host's
    launches; ``triton.testing.do_bench_cudagraph``). ``dry_run``: as in ``bench_ms``."""
    if dry_run:
        return bench_ms(fn, warmup=0, rep=0, dry_run=True)
    from triton.testing import do_bench_cudagraph
    return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
