"""Where the host time of a compiled model's call goes: for each policy, the wall time of one
call against the original's, the CUDA kernels launched per call, and the Python functions
that took the most time (cProfile), written to ``<out>/host_<model>_<policy>.txt``. The
compiled model first sees ``--warm`` tokens, then ``--n`` (so it runs with a dynamic length,
as a model serving prompts of several lengths does).

    PYTHONPATH=. python benchmarks/host_profile.py --model smollm2-135m --n 4096 \\
        --policies dense,block_topk,auto --out /tmp/host
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import planner  # noqa: E402
from model_speed import MODELS, build  # noqa: E402


def launches(fn) -> tuple:
    """(CUDA kernels launched, GPU ms) in one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return len(ev), sum(e.device_time for e in ev) / 1e3


def wall_ms(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) * 1e3)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--warm", type=int, default=1024)
    ap.add_argument("--policies", default="dense,block_topk,auto")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    model = build(args.model, dev, torch.bfloat16)
    vocab = MODELS[args.model]["vocab_size"]
    ids = torch.randint(0, vocab, (1, args.n), device=dev)
    warm = torch.randint(0, vocab, (1, args.warm), device=dev)
    with torch.no_grad():
        runs = [("original", lambda: model(ids, use_cache=False), None)]
        for pol in args.policies.split(","):
            cm = planner.compile(model, policy=pol)
            cm(warm, use_cache=False)
            runs.append((pol, (lambda c: lambda: c(ids, use_cache=False))(cm), cm))
        for label, fn, cm in runs:
            fn()
            fn()
            ms = wall_ms(fn, args.reps)
            n_k, gpu_ms = launches(fn)
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(args.reps):
                fn()
            torch.cuda.synchronize()
            pr.disable()
            s = io.StringIO()
            st = pstats.Stats(pr, stream=s)
            st.sort_stats("tottime").print_stats(30)
            st.sort_stats("cumtime").print_stats(40)
            kern = ""
            if cm is not None:
                rep = planner.inspect(cm)
                kern = "; ".join(sorted({s.kernel or "-" for s in rep.sites}))
            line = (f"{label:12s} wall {ms:8.2f} ms  launches {n_k:6d}  gpu {gpu_ms:8.2f} ms"
                    f"  {kern}")
            print(line, flush=True)
            with open(os.path.join(args.out, f"host_{args.model}_{label}.txt"), "w") as f:
                f.write(line + "\n\n" + s.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
