"""Launch knobs of the ``block_topk`` estimator and selection kernels on one GPU.

Times (``do_bench`` medians) at B=1, H=16, D=128, bf16, block 64, topk 32, causal:
``pool_blocks`` of q and k with rows-per-step x warps, and ``block_topk_select`` with each
warp count; every variant's output is compared with the default's (must be identical).

    PYTHONPATH=. python benchmarks/block_topk_probe.py --out DIR     # DIR/block_topk_<card>.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime import triton_kernels as tk  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--Ns", default="16384,65536")
    args = ap.parse_args()
    import triton
    from triton.testing import do_bench
    card = torch.cuda.get_device_name()
    rows_out, lines = [], []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in (int(x) for x in args.Ns.split(",")):
        q = torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref_q = tk.pool_blocks(q, 64)
        for rows in (16, 32, 64):
            for warps in (2, 4, 8):
                got = tk.pool_blocks(q, 64, rows=rows, num_warps=warps)
                same = bool(torch.allclose(got, ref_q, rtol=1e-5, atol=1e-6))
                ms = do_bench(lambda: (tk.pool_blocks(q, 64, rows=rows, num_warps=warps),
                                       tk.pool_blocks(k, 64, rows=rows, num_warps=warps)),
                              warmup=10, rep=50, return_mode="median")
                rows_out.append(dict(kernel="pool q+k", N=n, rows=rows, warps=warps, ms=ms,
                                     same=same))
        dots = torch.matmul(ref_q, tk.pool_blocks(k, 64).transpose(-1, -2))
        kw = dict(scale=128 ** -0.5, topk=32, sink_blocks=1, local_blocks=1)
        ref = tk.block_topk_select(dots, n, n, "lower_right", 64, **kw)
        for srt in (False, True):
            for warps in (1, 2, 4, 8):
                try:
                    got = tk.block_topk_select(dots, n, n, "lower_right", 64, num_warps=warps,
                                               sorted_select=srt, **kw)
                    same = all(torch.equal(a, b) for a, b in zip(got, ref))
                    ms = do_bench(lambda: tk.block_topk_select(
                        dots, n, n, "lower_right", 64, num_warps=warps, sorted_select=srt, **kw),
                        warmup=10, rep=50, return_mode="median")
                except Exception as e:               # e.g. no tl.topk in this Triton
                    print(f"select sorted={srt} warps={warps}: {type(e).__name__}: {e}")
                    continue
                rows_out.append(dict(kernel="select (sorted)" if srt else "select (rounds)",
                                     N=n, warps=warps, ms=ms, same=same))
        ms = do_bench(lambda: torch.matmul(ref_q, ref_q.transpose(-1, -2)), warmup=10, rep=50,
                      return_mode="median")
        rows_out.append(dict(kernel="pooled matmul", N=n, ms=ms, same=True))
    for r in rows_out:
        print(json.dumps(r), flush=True)
    lines = [f"# block_topk estimator / selection knobs on {card}", "",
             f"torch {torch.__version__}, triton {triton.__version__}; B=1, H=16, D=128, bf16, "
             "block 64, topk 32, causal. `do_bench` medians (ms); `same`: output identical to "
             "the default launch.", "",
             "Command: `PYTHONPATH=. python benchmarks/block_topk_probe.py "
             + " ".join(sys.argv[1:]) + "`", "", "| kernel | N | rows | warps | ms | same |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['N']} | {r.get('rows', '')} | {r.get('warps', '')} | "
              f"{r['ms']:.4f} | {r['same']} |" for r in rows_out]
    os.makedirs(args.out, exist_ok=True)
    tag = "h200" if "H200" in card else "h100" if "H100" in card else "gpu"
    with open(os.path.join(args.out, f"block_topk_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"block_topk_{tag}.json"), "w") as f:
        json.dump(dict(card=card, torch=torch.__version__, triton=triton.__version__,
                       command="PYTHONPATH=. python benchmarks/block_topk_probe.py "
                       + " ".join(sys.argv[1:]), rows=rows_out), f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
