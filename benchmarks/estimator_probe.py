"""Launch knobs of the Triton estimator and selection kernels on one GPU.

Times (``do_bench`` medians) at B=1, H=16, D=128, bf16, causal: ``pool_blocks`` of q and k
(block 64) with rows-per-step x warps; ``block_topk_select`` (block 64, topk 32) with each warp
count, one partial sort vs rounds of max; the same selection at Quest's width (page 16, top 128
pages); ``quest_page_bounds`` with pages per tile x warps; ``last_rows_lines`` (64 rows) and
``auto_block_scores`` and ``auto_criterion``; the selections by counting passes (``bisect``),
also with ``auto``'s budgets (10% of each query block's allowed blocks); the lines' prefix
sums; the pooled product by torch (fp32) and by ``pooled_dots``. Every
variant's output is compared with the default's (``same``).

    PYTHONPATH=. python benchmarks/estimator_probe.py --out DIR     # DIR/estimators_<card>.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime.kernels import select as sk  # noqa: E402


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
    def bench(fn, rep=50):
        return do_bench(fn, warmup=10, rep=rep, return_mode="median")

    def variant(kernel, n, fn, ref, same_fn, rep=50, **knobs):
        try:
            got = fn()
            same = bool(same_fn(got, ref))
            ms = bench(fn, rep)
        except Exception as e:                       # e.g. no tl.topk, out of resources
            print(f"{kernel} {knobs}: {type(e).__name__}: {e}"[:300])
            return
        rows_out.append(dict(kernel=kernel, N=n, ms=ms, same=same, **knobs))

    def equal(a, b):
        if isinstance(a, tuple):
            return all(torch.equal(x, y) for x, y in zip(a, b))
        return torch.equal(a, b)

    def close(a, b):
        return torch.allclose(a, b, rtol=1e-5, atol=1e-5)

    for n in (int(x) for x in args.Ns.split(",")):
        q = torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref_q = sk.pool_blocks(q, 64)
        for rows in (32, 64):
            for warps in (1, 2):
                for bpp in (1, 4):
                    sch = sk.SelectSchedule(rows=rows, num_warps=warps, blocks_per_program=bpp)
                    variant("pool q+k", n, lambda: (sk.pool_blocks(q, 64, schedule=sch),
                                                    sk.pool_blocks(k, 64, schedule=sch))[0],
                        ref_q, close, rows=rows, warps=warps, per_program=bpp)
        variant("pool q+k (torch mean)", n, lambda: (
            q.unflatten(2, (n // 64, 64)).mean(3, dtype=torch.float32),
            k.unflatten(2, (n // 64, 64)).mean(3, dtype=torch.float32))[0], ref_q, close)
        dots = torch.matmul(ref_q, sk.pool_blocks(k, 64).transpose(-1, -2))
        kw = dict(scale=128 ** -0.5, topk=32, sink_blocks=1, local_blocks=1)
        ref = sk.block_topk_select(dots, n, n, "lower_right", 64, **kw)
        for srt, s32 in ((False, False), (True, False), (True, True)):
            for warps in ((2,) if not srt else (1, 2, 4)):
                for rpp in (1, 4):
                    variant("select (sorted fp32)" if s32 else "select (sorted)" if srt
                            else "select (rounds)", n,
                            lambda: sk.block_topk_select(
                                dots, n, n, "lower_right", 64, schedule=sk.SelectSchedule(
                                    num_warps=warps, sorted_select=srt, rows_per_program=rpp,
                                    sort32=s32), **kw),
                            ref, equal, warps=warps, per_program=rpp)
        for warps in (1, 2, 4):
            for rpp in (1, 4):
                variant("select (bisect)", n, lambda: sk.block_topk_select(
                    dots, n, n, "lower_right", 64, schedule=sk.SelectSchedule(
                        num_warps=warps, bisect=True, rows_per_program=rpp), **kw),
                    ref, equal, warps=warps, per_program=rpp)
        # auto's selection: a budget of 10% of each query block's allowed blocks
        from runtime.estimators import _budgets
        budget, budget_max = _budgets(n, n, "lower_right", 64, 0.1, dots.device)
        bkw = dict(scale=1.0, topk=n // 64, sink_blocks=1, local_blocks=1, budget=budget,
                   budget_max=budget_max)
        ref_a = sk.block_topk_select(dots, n, n, "lower_right", 64,
                                     schedule=sk.SelectSchedule(bisect=False), **bkw)
        for bis in (False, True):
            for warps in (1, 2, 4):
                variant("select budget 10% (bisect)" if bis else "select budget 10% (sorted fp32)",
                        n, lambda: sk.block_topk_select(
                            dots, n, n, "lower_right", 64,
                            schedule=sk.SelectSchedule(num_warps=warps, bisect=bis), **bkw),
                        ref_a, equal, warps=warps)
        pk_ = sk.pool_blocks(k, 64)
        variant("pooled matmul (torch fp32)", n, lambda: torch.matmul(ref_q, pk_.transpose(-1, -2)),
                None, lambda a, b: True)
        for prec in ("tf32x3", "ieee"):
            variant(f"pooled_dots ({prec})", n, lambda: sk.pooled_dots(
                ref_q, pk_, n_q=n, n_kv=n, causal="lower_right", block=64,
                schedule=sk.SelectSchedule(precision=prec)),
                dots, lambda a, b: bool(torch.allclose(a[a > float("-inf")], b[a > float("-inf")],
                                                       rtol=1e-5, atol=1e-5)))
        # Quest: page bounds and the selection of 128 pages of 16 keys
        ref_b = sk.quest_page_bounds(q, k, page=16, causal="lower_right")
        for tile in (64, 128):
            for warps in (4, 8):
                variant("quest bounds", n, lambda: sk.quest_page_bounds(
                    q, k, page=16, causal="lower_right",
                    schedule=sk.SelectSchedule(pages_per_tile=tile, num_warps=warps)),
                    ref_b, close, rep=20, tile=tile, warps=warps)
        qkw = dict(scale=1.0, topk=128, sink_blocks=0, local_blocks=1)
        ref_s = sk.block_topk_select(ref_b, n, n, "lower_right", 16,
                                     schedule=sk.SelectSchedule(sorted_select=True), **qkw)
        for s32 in (False, True):
            for warps in (4, 8):
                variant("quest select (sorted fp32)" if s32 else "quest select (sorted)", n,
                        lambda: sk.block_topk_select(
                            ref_b, n, n, "lower_right", 16, schedule=sk.SelectSchedule(
                                num_warps=warps, sorted_select=True, sort32=s32), **qkw),
                        ref_s, equal, rep=10, warps=warps)
        for warps in (4, 8, 16):
            variant("quest select (bisect)", n, lambda: sk.block_topk_select(
                ref_b, n, n, "lower_right", 16,
                schedule=sk.SelectSchedule(num_warps=warps, bisect=True), **qkw), ref_s,
                equal, rep=10, warps=warps)
        from codegen.select.reference import select_topk_blocks
        variant("quest select (torch)", n, lambda: select_topk_blocks(
            ref_b, n, n, "lower_right", 16, topk=128, sink_blocks=0, local_blocks=1),
            ref_s, equal, rep=10)
        ref_b = ref_s = None
        # line statistics of the last 64 rows, and the auto block scores
        lines_ = sk.last_rows_lines(q, k, scale=128 ** -0.5, causal="lower_right", last_q=64)
        for tpp in (4, 8, 16, 32):
            variant("last_rows_lines", n, lambda: sk.last_rows_lines(
                q, k, scale=128 ** -0.5, causal="lower_right", last_q=64,
                schedule=sk.SelectSchedule(tiles_per_program=tpp)), lines_, close, rows=64, per_program=tpp)
        for tpp in (8, 16):
            variant("last_rows_lines + pool k (fused)", n, lambda: sk.last_rows_lines(
                q, k, scale=128 ** -0.5, causal="lower_right", last_q=64, pool_block=64,
                schedule=sk.SelectSchedule(tiles_per_program=tpp))[1], pk_, close, rows=64, per_program=tpp)
            variant("last_rows_lines, then pool_blocks(k)", n, lambda: (sk.last_rows_lines(
                q, k, scale=128 ** -0.5, causal="lower_right", last_q=64,
                schedule=sk.SelectSchedule(tiles_per_program=tpp)),
                sk.pool_blocks(k, 64))[1], pk_, close, rows=64, per_program=tpp)
        variant("line prefix sums (torch cumsum + pad)", n, lambda: torch.nn.functional.pad(
            lines_.cumsum(-1), (1, 0)), None, lambda a, b: True)
        variant("line prefix sums (line_prefix_sums)", n, lambda: sk.line_prefix_sums(lines_),
                torch.nn.functional.pad(lines_.cumsum(-1), (1, 0)),
                lambda a, b: bool(torch.allclose(a, b, rtol=1e-5, atol=1e-4)))
        aware = torch.zeros(1, 16, dtype=torch.bool, device="cuda")
        aware[:, ::2] = True
        variant("auto_block_scores", n, lambda: sk.auto_block_scores(
            ref_q, pk_, lines_, aware, n_q=n, causal="lower_right", block=64, scale=128 ** -0.5),
            None, lambda a, b: True)
        variant("auto_criterion", n, lambda: sk.auto_criterion(
            dots[:, :, -1:], lines_, n_q=n, causal="lower_right", block=64, scale=128 ** -0.5,
            tau=0.1), None, lambda a, b: True)
    for r in rows_out:
        print(json.dumps(r), flush=True)
    lines = [f"# Estimator / selection kernel knobs on {card}", "",
             f"torch {torch.__version__}, triton {triton.__version__}; B=1, H=16, D=128, bf16, "
             "causal; block_topk: block 64, topk 32; quest: page 16, top 128 pages, `tile` = "
             "pages per tile; `per program`: blocks / rows / tiles one program handles. `do_bench` medians (ms); `same`: output identical to the default "
             "launch (pooling, quest bounds: allclose).", "",
             "Command: `PYTHONPATH=. python benchmarks/estimator_probe.py "
             + " ".join(sys.argv[1:]) + "`", "", "| kernel | N | rows | tile | warps | per program | ms | same |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['N']} | {r.get('rows', '')} | {r.get('tile', '')} | "
              f"{r.get('warps', '')} | {r.get('per_program', '')} | {r['ms']:.4f} | "
              f"{r['same']} |" for r in rows_out]
    os.makedirs(args.out, exist_ok=True)
    tag = "h200" if "H200" in card else "h100" if "H100" in card else "gpu"
    with open(os.path.join(args.out, f"estimators_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"estimators_{tag}.json"), "w") as f:
        json.dump(dict(card=card, torch=torch.__version__, triton=triton.__version__,
                       command="PYTHONPATH=. python benchmarks/estimator_probe.py "
                       + " ".join(sys.argv[1:]), rows=rows_out), f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
