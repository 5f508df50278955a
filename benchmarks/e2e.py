"""End to end on one GPU: the built-in GPT (SDPA attention, bf16, 16 heads x 128) at long
context, original vs planner.compile with dense and with sparse policies.

    PYTHONPATH=. python benchmarks/e2e.py --out benchmarks/results

Reports per N: ms per forward (do_bench median), speed vs the original, the max |logit|
difference to the original and the policy's measured density. Writes e2e_<card>.json/.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

import planner  # noqa: E402
from planner.models import GPTConfig, TinyGPT  # noqa: E402


def bench_ms(fn) -> float:
    return common.bench_ms(fn, warmup=5, rep=40)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--lengths", default="4096,16384,65536")
    args = ap.parse_args()
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)
    import triton
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d"), command="PYTHONPATH=. python benchmarks/e2e.py",
                model="TinyGPT 4 layers, 16 heads x 128, SDPA causal attention, bf16, random weights")
    rows = []
    policies = {"dense": "dense",
                "block_topk(block=128, topk=16)": planner.policy("block_topk", block=128, topk=16),
                "sink_window(sink=128, window=2048)": planner.policy("sink_window", sink=128,
                                                                     window=2048)}
    torch.manual_seed(0)
    for n in [int(x) for x in args.lengths.split(",")]:
        m = TinyGPT(GPTConfig(n_layer=4, n_head=16, n_embd=2048, block_size=n, use_sdpa=True))
        m = m.to(dev, torch.bfloat16).eval()
        ids = torch.randint(0, 256, (1, n), device=dev)
        with torch.no_grad():
            ref = m(ids).float()
            t0 = bench_ms(lambda: m(ids))
            rows.append(dict(N=n, impl="original (SDPA)", ms=t0, speed=1.0))
            for name, pol in policies.items():
                cm = planner.compile(m, policy=pol)
                os.environ["SPARSE_PLANNER_DENSITY"] = "1"      # measure density once
                out = cm(ids).float()
                os.environ["SPARSE_PLANNER_DENSITY"] = "0"      # no host sync while timing
                rep = planner.inspect(cm)
                dens = [s.density for s in rep.sites if s.density is not None]
                t = bench_ms(lambda: cm(ids))
                rows.append(dict(N=n, impl=name, ms=t, speed=t0 / t,
                                 max_abs_logit_diff=float((out - ref).abs().max()),
                                 density=sum(dens) / len(dens) if dens else None,
                                 kernels=sorted({str(s.kernel) for s in rep.sites}),
                                 schedule=rep.sites[0].schedule))
                print(json.dumps(rows[-1]), flush=True)
        del m
        torch.cuda.empty_cache()
    tag = "h200" if "H200" in card else "h100"
    with open(os.path.join(args.out, f"e2e_{tag}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# End to end on {card}", "", f"{meta['model']}; torch {meta['torch']}, triton "
             f"{meta['triton']}, {meta['date']}. Command: `{meta['command']}`.", "",
             "| N | impl | ms | speed vs original | density | max abs logit diff | kernel | schedule |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = "-" if r.get("density") is None else f"{r['density']:.3f}"
        lines.append(f"| {r['N']} | {r['impl']} | {r['ms']:.3f} | {r['speed']:.2f}x | {d} | "
                     f"{r.get('max_abs_logit_diff', 0):.3g} | {', '.join(r.get('kernels', []))} | "
                     f"{r.get('schedule', '')} |")
    with open(os.path.join(args.out, f"e2e_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
