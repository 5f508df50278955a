"""What a sparse site costs beside its attention kernel: for each catalogue policy, the time of
one call of its estimator and selection (``score`` then ``select``, as ``runtime.ops.site``
runs them) and of the whole site, against dense SDPA on the same tensors, at a few lengths and
GQA shapes. Host time (the Python and launch work until the call returns) and wall time
(until the GPU is done) are both reported: a short call is bound by the host.

    PYTHONPATH=. python benchmarks/site_overhead.py --out $OUT

Writes ``site_overhead_<card>.{json,md}``; a line fitted per policy through its estimator's
wall times (``fixed_us + pair_ps x B x Hq x NQB x NKB``) is what ``runtime.costmodel`` uses
for the estimator's cost (``EstimatorRates``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import planner  # noqa: E402,F401  (registers the sparse ops)
from runtime import estimators, ops  # noqa: E402
from runtime.spec import SiteSpec, register  # noqa: E402

SHAPES = {"9/3x64": (9, 3, 64), "32/8x128": (32, 8, 128)}
POLICIES = ["block_topk", "threshold", "vertical_slash", "quest", "auto", "sink_window",
            "longformer", "bigbird"]


def _timed(fn, reps: int, sync) -> tuple:
    """(host ms, wall ms): medians over ``reps`` calls, each after a synchronisation."""
    host, wall = [], []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
    host.sort()
    wall.sort()
    return host[len(host) // 2], wall[len(wall) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    card = ("h200" if "H200" in torch.cuda.get_device_name(dev) else "h100") \
        if dev.type == "cuda" else "cpu"
    import triton
    meta = dict(card=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
                torch=torch.__version__, triton=triton.__version__, dtype=str(dtype),
                date=time.strftime("%Y-%m-%d"),
                command="PYTHONPATH=. python benchmarks/site_overhead.py " + " ".join(sys.argv[1:]))
    rows = []
    with torch.no_grad():
        for shape in args.shapes.split(","):
            hq, hkv, d = SHAPES[shape]
            for n in [int(x) for x in args.lengths.split(",")]:
                q = torch.randn(1, hq, n, d, device=dev, dtype=dtype)
                k = torch.randn(1, hkv, n, d, device=dev, dtype=dtype)
                v = torch.randn(1, hkv, n, d, device=dev, dtype=dtype)
                sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,  # noqa
                                                              enable_gqa=True)
                sdpa()
                dense = _timed(sdpa, args.reps, sync)
                for pol in args.policies.split(","):
                    spec = SiteSpec(site=f"bench.{pol}", owner="bench",
                                    policy=planner.policy(pol), scale=d ** -0.5,
                                    causal="lower_right", gqa_group=hq // hkv)
                    key = register(spec)
                    est = estimators.get(spec.policy)

                    def estimate():
                        sc = est.score(q, k, [], spec) if est.score else None
                        return est.select(sc, q, k, spec) if est.select else None

                    site = lambda: ops.site(q, k, v, [], key)  # noqa: E731
                    site()
                    estimate()
                    e_host, e_wall = _timed(estimate, args.reps, sync)
                    s_host, s_wall = _timed(site, args.reps, sync)
                    b = int(getattr(spec.policy, "block", getattr(spec.policy, "page", 64)))
                    nb = -(-n // b)
                    row = dict(shape=shape, N=n, policy=pol, block=b,
                               block_pairs=hq * nb * nb, sdpa_ms=round(dense[1], 4),
                               est_host_ms=round(e_host, 4), est_wall_ms=round(e_wall, 4),
                               site_host_ms=round(s_host, 4), site_wall_ms=round(s_wall, 4))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    fits = {}
    for pol in dict.fromkeys(r["policy"] for r in rows):
        pts = [(r["block_pairs"], r["est_wall_ms"] * 1e3) for r in rows if r["policy"] == pol]
        n = len(pts)
        mx = sum(x for x, _ in pts) / n
        my = sum(y for _, y in pts) / n
        var = sum((x - mx) ** 2 for x, _ in pts)
        slope = max(0.0, sum((x - mx) * (y - my) for x, y in pts) / var) if var else 0.0
        fixed = max(0.0, my - slope * mx)
        fits[pol] = dict(fixed_us=round(fixed, 1), pair_ps=round(slope * 1e6, 2))
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"site_overhead_{card}")
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, fit=fits), f, indent=1)
    lines = [f"# A sparse site's cost beside its kernel ({meta['card']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, {dtype}, B=1, causal, each "
             f"policy's defaults; `{meta['command']}`", "",
             "est = the policy's score + select; site = the whole site as the executed graph "
             "runs it (`runtime.ops.site`, cost model off); host = until the call returns, "
             "wall = until the device is done; medians (ms).", "",
             "| shape | N | policy | SDPA | est host | est wall | site host | site wall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['N']} | {r['policy']} | {r['sdpa_ms']} | "
                     f"{r['est_host_ms']} | {r['est_wall_ms']} | {r['site_host_ms']} | "
                     f"{r['site_wall_ms']} |")
    lines += ["", "Fit of the estimator's wall time, fixed_us + pair_ps x (Hq x NQB x NKB):", "",
              "| policy | fixed us | ps per block pair |", "|---|---|---|"]
    lines += [f"| {p} | {f['fixed_us']} | {f['pair_ps']} |" for p, f in fits.items()]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-len(fits) - 2:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
