"""Kernel benchmark on one GPU: block-sparse prefill and token-sparse decode vs the baselines.

Prefill (bf16, B=1, H=16, D=128, causal, block 128): random top-k key blocks per query block
(diagonal kept) at ~3% and ~12% of causal, and the full causal list. Per case: ours,
FlexAttention (compiled) with the same lists, dense SDPA causal and the ideal = SDPA x density.
FlexAttention runs in each configuration it offers for the lists (``FLEX_VARIANTS``): every
listed block partial (``flex``), the blocks that need no token mask in its full-block list, as
``create_block_mask`` builds it (``flex_full_split``), and both again with the documented
``kernel_options`` that hold for these masks (``FLEX_OPTIONS``, suffix ``_opts``). ``flex_best``
(a derived row) is the fastest of them per case, naming which; ratios are given against it
and against the partial-only ``flex``.
Decode (B=8, H=16, D=128, one query, top-2048 distinct random keys per head): ours, dense SDPA,
torch gather + SDPA, and the bandwidth floor (selected K/V + index bytes / measured copy rate).
Every implementation is checked against the fp32 reference (subset of heads and rows) on
NaN-poisoned outputs before it is timed; times are ``triton.testing.do_bench`` medians.

    PYTHONPATH=. python benchmarks/kernels.py --out results_dir [--quick] [--sweep] [--head-dim 64]

``--quick``: N = 4096 and 16384, one decode length, no FlexAttention at 4096.
``--sweep``: also time a list of schedules per case (how the defaults were chosen).
``--head-dim``: the prefill cases' head dim (default 128; another value writes
``kernels_h100_d<D>.*``).
``--smoke``: tiny sizes, runs on the CPU through Triton's interpreter (checks this script).
``--report-only FILE.json``: recompute the derived rows (``flex_best``) and rewrite the JSON and
Markdown from measured rows alone (no device needed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

from codegen.block_sparse import block_sparse_attention_ref, to_flex_block_mask  # noqa: E402
from codegen.common import BlockSparseSpec, MaskMode, Schedule  # noqa: E402
from codegen.token_sparse import token_sparse_attention_ref  # noqa: E402
from runtime.kernels import block_sparse as bsk, token_sparse as tsk  # noqa: E402

DEV = "cuda"
DT = torch.bfloat16
BLOCK = 128
PREFILL_D = 128
ROWS = []


def rec(**row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def bench_ms(fn) -> float:
    return common.bench_ms(fn, warmup=25, rep=200, dry_run=DEV == "cpu")


def graph_ms(fn) -> float:
    """Median time of CUDA-graph replays of ``fn`` (no host launch overhead)."""
    return common.graph_ms(fn, dry_run=DEV == "cpu")


# ----------------------------------------------------------------------------- masks

def topk_block_lists(B, H, nb, keep, gen):
    """Random top-``keep`` causal key blocks per query block, diagonal always kept.

    Returns num int32 [B, H, nb] and idx int32 [B, H, nb, keep] (ascending, valid first)."""
    scores = torch.rand(B, H, nb, nb, device=DEV, generator=gen)              # [B, H, nb, nb]
    causal_b = torch.tril(torch.ones(nb, nb, device=DEV, dtype=torch.bool))
    scores = scores.masked_fill(~causal_b, -1.0)
    scores[..., torch.arange(nb), torch.arange(nb)] = 2.0
    idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values              # [B, H, nb, keep]
    valid = torch.gather(scores, -1, idx) >= 0                                # prefix per row
    return valid.sum(-1).to(torch.int32).contiguous(), idx.to(torch.int32).contiguous()


def full_causal_lists(B, H, nb):
    num = torch.arange(1, nb + 1, device=DEV, dtype=torch.int32).expand(B, H, nb).contiguous()
    idx = torch.arange(nb, device=DEV, dtype=torch.int32).expand(B, H, nb, nb).contiguous()
    return num, idx


def density_of(num, nb) -> float:
    return num.float().mean().item() / ((nb + 1) / 2)


# ----------------------------------------------------------------------------- checks

def check_prefill(name, fn_out, q, k, v, num, idx, tol=1e-2):
    """Compare ``fn_out`` [B, H, N, D] with the fp32 reference on heads {0, H-1}, the first
    256 and the last 512 query rows. Raises on NaN (unwritten output) or a large error."""
    if fn_out.isnan().any():
        raise RuntimeError(f"{name}: output holds NaN (unwritten elements?)")
    H, N = q.shape[1], q.shape[2]
    nb = N // BLOCK
    heads = [0, H - 1]
    errs = []
    for lo, hi in ((0, 256), (N - 512, N)):
        qb0, qb1 = lo // BLOCK, hi // BLOCK
        kv_hi = hi if lo == 0 else N               # prefix rows only see a key prefix
        ref, _ = block_sparse_attention_ref(
            q[:, heads, lo:hi], k[:, heads, :kv_hi], v[:, heads, :kv_hi],
            num[:, heads, qb0:qb1].contiguous(), idx[:, heads, qb0:qb1].contiguous(),
            block=BLOCK, scale=q.shape[-1] ** -0.5, causal=True)
        errs.append(common.rel_err(fn_out[:, heads, lo:hi], ref))
    err = max(errs)
    if not err <= tol:
        raise RuntimeError(f"{name}: relative error {err:.3e} > {tol} (nb={nb})")
    return err


# ----------------------------------------------------------------------------- prefill

SWEEP_BLOCK = [
    Schedule(128, 128, 8, 3, tma=True), Schedule(128, 128, 8, 2, tma=True),
    Schedule(128, 64, 8, 3, tma=True), Schedule(128, 64, 8, 3), Schedule(128, 32, 8, 4),
    Schedule(128, 128, 8, 3, MaskMode.ALWAYS, tma=True),
    Schedule(128, 128, 8, 2, tma=True, wgmma=True),
    Schedule(128, 128, 8, 2, tma=True, persistent=1, wgmma=True),
]


# FlexAttention's documented kernel_options (torch.nn.attention.flex_attention.FlexKernelOptions)
# that hold for these masks without changing the math: every query row keeps its diagonal block,
# so no row is fully masked (ROWS_GUARANTEED_SAFE); TMA loads on Hopper (USE_TMA, experimental).
# Tile sizes, warps and stages are left to its autotuning; BLOCKS_ARE_CONTIGUOUS does not hold
# for random lists and PRESCALE_QK changes the rounding.
FLEX_OPTIONS = {"ROWS_GUARANTEED_SAFE": True, "USE_TMA": True}

# (impl name, full-block split, kernel_options); the full causal list takes the split only
FLEX_VARIANTS = (("flex", False, None), ("flex_full_split", True, None),
                 ("flex_opts", False, FLEX_OPTIONS), ("flex_full_split_opts", True, FLEX_OPTIONS))
FLEX_NAMES = tuple(v[0] for v in FLEX_VARIANTS)


def flex_variants(full_causal: bool, options: bool) -> list:
    """The FlexAttention configurations timed for one case. The full causal list is measured
    with its full-block split only (as ``flex``: every block but the diagonal is full)."""
    if full_causal:
        out = [("flex", True, None)]
        return out + ([("flex_opts", True, FLEX_OPTIONS)] if options else [])
    return [v for v in FLEX_VARIANTS if options or v[2] is None]


def run_prefill(Ns, args, flex):
    B, H, D = 1, (2 if args.smoke else 16), PREFILL_D
    gen = torch.Generator(device=DEV).manual_seed(0)
    scale = D ** -0.5
    for N in Ns:
        q = torch.randn(B, H, N, D, device=DEV, dtype=DT, generator=gen)
        k = torch.randn(B, H, N, D, device=DEV, dtype=DT, generator=gen)
        v = torch.randn(B, H, N, D, device=DEV, dtype=DT, generator=gen)
        flops_causal = 4 * B * H * N * N * D / 2
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        sdpa_ms = bench_ms(sdpa)
        rec(case="prefill_causal", N=N, density=1.0, impl="sdpa", ms=sdpa_ms,
            tflops=flops_causal / sdpa_ms / 1e9)
        nb = N // BLOCK
        masks = [("full", 1.0, full_causal_lists(B, H, nb))]
        for label, keep in (("3%", max(1, nb // 64)), ("12%", max(2, nb // 16))):
            masks.append((label, None, topk_block_lists(B, H, nb, keep, gen)))
        for label, _, (num, idx) in masks:
            case = "prefill_causal" if label == "full" else "prefill_blocksparse"
            dens = density_of(num, nb)
            flops = flops_causal * dens
            out = torch.full_like(q, float("nan"))
            lse = torch.full((B, H, N), float("nan"), device=DEV)
            ours = lambda: bsk.block_sparse_attention(q, k, v, num, idx, block=BLOCK, scale=scale,  # noqa: E731
                                                     causal=True, out=out, lse=lse)
            spec = BlockSparseSpec(head_dim=D, v_head_dim=D, gqa_group=1, pack_gqa=False,
                                   lists_per_group=True, causal=True, dtype="bfloat16",
                                   block=BLOCK, stride_align=8)
            sched = bsk.default_block_sparse_schedule(spec, q.device, idx.shape[-1]).tag()
            try:
                ours()
                err = check_prefill(f"ours N={N} {label}", out, q, k, v, num, idx)
                ms = bench_ms(ours)
                rec(case=case, N=N, density=dens, impl="ours", ms=ms, tflops=flops / ms / 1e9,
                    rel_err=err, schedule=sched)
            except Exception as ex:  # keep measuring the other cases; the error is reported
                rec(case=case, N=N, density=dens, impl="ours", schedule=sched,
                    error=f"{type(ex).__name__}: {str(ex)[:300]}")
            if label != "full":
                rec(case=case, N=N, density=dens, impl="ideal", ms=sdpa_ms * dens)
            if args.sweep and (N >= 16384 or args.smoke):
                for sch in SWEEP_BLOCK:
                    try:
                        fn = lambda: bsk.block_sparse_attention(q, k, v, num, idx, block=BLOCK,  # noqa: E731
                                                               scale=scale, causal=True,
                                                               schedule=sch, out=out, lse=lse)
                        out.fill_(float("nan"))
                        fn()
                        e = check_prefill(f"sweep {sch}", out, q, k, v, num, idx)
                        rec(case="sweep_" + case, N=N, density=dens, impl=sch.tag(),
                            ms=bench_ms(fn), rel_err=e)
                    except Exception as ex:  # a schedule that does not compile or fit
                        rec(case="sweep_" + case, N=N, density=dens, impl=sch.tag(),
                            error=f"{type(ex).__name__}: {str(ex)[:200]}")
            if flex is None or (args.quick and N < 16384):
                continue
            for impl, split_full, opts in flex_variants(label == "full", not args.no_flex_options):
                try:
                    t0 = time.time()
                    bm = to_flex_block_mask(num, idx, block=BLOCK, n_q=N, n_kv=N, causal=True,
                                            split_full=split_full, exact_mask_mod=False)
                    build_s = time.time() - t0
                    call = lambda: flex(q, k, v, block_mask=bm, scale=scale,  # noqa: E731
                                        kernel_options=opts)
                    fo = call()
                    e = check_prefill(f"{impl} N={N} {label}", fo, q, k, v, num, idx)
                    ms = bench_ms(call)
                    rec(case=case, N=N, density=dens, impl=impl, ms=ms, tflops=flops / ms / 1e9,
                        rel_err=e, mask_build_s=round(build_s, 3), full_split=split_full,
                        kernel_options=opts or {})
                except Exception as ex:
                    rec(case=case, N=N, density=dens, impl=impl,
                        error=f"{type(ex).__name__}: {str(ex)[:300]}")
        if args.sweep and N == 16384 and PREFILL_D == 128:
            run_gqa_packing(gen)
        if args.smoke and args.sweep:
            run_gqa_packing(gen, n=512)
        torch.cuda.empty_cache()


def run_gqa_packing(gen, n=16384):
    """GQA 32 query / 8 KV heads: lists per group (packed programs) vs the same lists per head."""
    B, Hq, Hkv, N, D = 1, 32, 8, n, 128
    q = torch.randn(B, Hq, N, D, device=DEV, dtype=DT, generator=gen)
    k = torch.randn(B, Hkv, N, D, device=DEV, dtype=DT, generator=gen)
    v = torch.randn(B, Hkv, N, D, device=DEV, dtype=DT, generator=gen)
    num, idx = topk_block_lists(B, Hkv, N // BLOCK, max(2, N // BLOCK // 16), gen)
    dens = density_of(num, N // BLOCK)
    for impl, (n_, i_) in (("ours_packed", (num, idx)),
                           ("ours_per_head", (num.repeat_interleave(4, 1).contiguous(),
                                              idx.repeat_interleave(4, 1).contiguous()))):
        fn = lambda: bsk.block_sparse_attention(q, k, v, n_, i_, block=BLOCK, scale=D ** -0.5,  # noqa: E731
                                               causal=True)
        out, _ = fn()
        ref, _ = block_sparse_attention_ref(q[:, :4, -512:], k[:, :1], v[:, :1], num[:, :1, -4:],
                                            idx[:, :1, -4:], block=BLOCK, scale=D ** -0.5, causal=True)
        e = common.rel_err(out[:, :4, -512:], ref)
        if not e <= 1e-2:
            raise RuntimeError(f"{impl}: relative error {e:.3e}")
        ms = bench_ms(fn)
        rec(case="sweep_gqa32x8", N=N, density=dens, impl=impl, ms=ms,
            tflops=4 * B * Hq * N * N * D / 2 * dens / ms / 1e9, rel_err=e)


# ----------------------------------------------------------------------------- decode

SWEEP_TOKEN = [
    Schedule(16, 64, 2, 3, split=128), Schedule(16, 64, 2, 3, split=256),
    Schedule(16, 64, 4, 3, split=128), Schedule(16, 128, 4, 3, split=256),
    Schedule(16, 32, 2, 3, split=64), Schedule(16, 64, 2, 4, split=128),
    Schedule(16, 128, 4, 2, split=256),
]


def copy_bandwidth_gbps() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * 2**30 / ms / 1e6


def run_decode(Ns, args, copy_gbps):
    B, H, D, K = (2, 2, 128, 256) if args.smoke else (8, 16, 128, 2048)
    gen = torch.Generator(device=DEV).manual_seed(1)
    scale = D ** -0.5
    for N in Ns:
        q = torch.randn(B, H, 1, D, device=DEV, dtype=DT, generator=gen)
        k = torch.randn(B, H, N, D, device=DEV, dtype=DT, generator=gen)
        v = torch.randn(B, H, N, D, device=DEV, dtype=DT, generator=gen)
        # distinct random keys per (b, h), random order: [B, H, 1, K]
        idx = torch.rand(B, H, N, device=DEV, generator=gen).topk(K, dim=-1).indices
        idx = idx.to(torch.int32)[:, :, None, :].contiguous()
        sub = (slice(0, 2), slice(0, 4))
        ref, _ = token_sparse_attention_ref(q[sub], k[sub], v[sub], idx[sub], scale=scale)

        def check(name, o):
            if o.isnan().any():
                raise RuntimeError(f"{name}: output holds NaN (unwritten elements?)")
            e = common.rel_err(o[sub], ref)
            if not e <= 1e-2:
                raise RuntimeError(f"{name}: relative error {e:.3e}")
            return e

        byts = 2 * k.numel() * 2
        ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
        rec(case="decode", N=N, impl="sdpa_dense", ms=ms, GBps=byts / ms / 1e6)
        gidx = idx[:, :, 0, :].long()[..., None].expand(-1, -1, -1, D)

        def gather_attn():
            kg = torch.gather(k, 2, gidx)
            vg = torch.gather(v, 2, gidx)
            return F.scaled_dot_product_attention(q, kg, vg, scale=scale)

        e = check("gather", gather_attn())
        rec(case="decode", N=N, impl="torch_gather_sdpa", ms=bench_ms(gather_attn), rel_err=e)
        sel_bytes = B * H * K * (2 * D * 2 + 4) + 2 * q.numel() * 2
        rec(case="decode", N=N, impl="floor", ms=sel_bytes / copy_gbps / 1e6, bytes=sel_bytes)
        out = torch.full((B, H, 1, D), float("nan"), device=DEV, dtype=DT)
        lse = torch.full((B, H, 1), float("nan"), device=DEV)
        schedules = [None] + (SWEEP_TOKEN if args.sweep else [])
        for sch in schedules:
            fn = lambda: tsk.token_sparse_attention(q, k, v, idx, scale=scale, schedule=sch,  # noqa: E731
                                                   out=out, lse=lse)
            case = "decode" if sch is None else "sweep_decode"
            try:
                out.fill_(float("nan"))
                fn()
                e = check(f"ours {sch}", out)
                if sch is None:
                    ms = bench_ms(fn)
                    rec(case=case, N=N, impl="ours", ms=ms, GBps=sel_bytes / ms / 1e6, rel_err=e,
                        schedule=tsk.default_token_sparse_schedule(
                            tsk.TokenSparseSpec(D, D, 1, False, True, "bfloat16", 8), q.device,
                            B * H, K).tag())
                else:                       # GPU time alone: CUDA-graph replays
                    ms = graph_ms(fn)
                    rec(case=case, N=N, impl=sch.tag() + " (graph)", ms=ms,
                        GBps=sel_bytes / ms / 1e6, rel_err=e)
            except Exception as ex:
                rec(case=case, N=N, impl="ours" if sch is None else sch.tag(),
                    error=f"{type(ex).__name__}: {str(ex)[:200]}")
        # without the host's launch overhead: CUDA-graph replays of the same calls
        rec(case="decode", N=N, impl="torch_gather_sdpa_graph", ms=graph_ms(gather_attn))
        ours = lambda: tsk.token_sparse_attention(q, k, v, idx, scale=scale, out=out, lse=lse)  # noqa: E731
        out.fill_(float("nan"))
        ms = graph_ms(ours)
        e = check("ours (graph replays)", out)
        rec(case="decode", N=N, impl="ours_graph", ms=ms, GBps=sel_bytes / ms / 1e6, rel_err=e)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- report

def pick(case, N, impl, density=None, rows=None):
    for r in ROWS if rows is None else rows:
        if r["case"] == case and r["N"] == N and r["impl"] == impl and "ms" in r and (
                density is None or abs(r.get("density", 0) - density) < 1e-9):
            return r["ms"]
    return None


def with_flex_best(rows: list) -> list:
    """``rows`` without earlier derived rows, plus one ``flex_best`` row per prefill case that has
    a FlexAttention time: the fastest of its measured configurations (``of`` names it,
    ``compared`` lists those measured). Measured rows are left as they are."""
    out = [r for r in rows if not r.get("derived")]
    cases = {}
    for r in out:
        if r["case"] in ("prefill_blocksparse", "prefill_causal") and r["impl"] in FLEX_NAMES \
                and "ms" in r:
            cases.setdefault((r["case"], r["N"], round(r["density"], 12)), []).append(r)
    for (case, N, dens), cand in cases.items():
        best = min(cand, key=lambda r: r["ms"])
        out.append(dict(case=case, N=N, density=best["density"], impl="flex_best", ms=best["ms"],
                        of=best["impl"], compared=sorted(r["impl"] for r in cand), derived=True))
    return out


def fmt(x, f="{:.3f}"):
    return "—" if x is None else f.format(x)


def _best_of(r, rows) -> tuple:
    """(ms, configuration) of the flex_best row of ``r``'s case, else (None, "")."""
    for b in rows:
        if b["impl"] == "flex_best" and b["case"] == r["case"] and b["N"] == r["N"] and \
                abs(b["density"] - r["density"]) < 1e-9:
            return b["ms"], b["of"]
    return None, ""


def markdown(meta, rows=None) -> str:
    rows = ROWS if rows is None else rows
    lines = [f"# Kernel benchmark: {meta['card']}",
             "",
             f"torch {meta['torch']}, triton {meta['triton']}, bf16, `{meta['command']}`; "
             f"device copy {meta['copy_GBps']:.0f} GB/s. Times are do_bench medians (ms).",
             "",
             f"## Block-sparse causal prefill (B=1, H=16, D={PREFILL_D}, block 128)",
             "",
             "FlexAttention with the same lists in each configuration it offers: `flex`, every "
             "listed block partial (a token mask on each); `flex (full-block split)`, the blocks "
             "that need no token mask in its full-block list, as `create_block_mask` builds it; "
             "`_opts`, the same with the kernel_options "
             + ", ".join(f"`{k}={v}`" for k, v in FLEX_OPTIONS.items())
             + ". `flex best`: the fastest measured configuration of the row (named); "
             "`not measured`: the run did not time that configuration.",
             "",
             "| N | density | ours | TFLOP/s | flex | flex (full-block split) | flex best | "
             "SDPA dense | ideal | flex / ours | flex best / ours | ours / ideal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    nm = "not measured"
    for r in rows:
        if r["case"] != "prefill_blocksparse" or r["impl"] != "ours" or "ms" not in r:
            continue
        N, d = r["N"], r["density"]
        fl = pick(r["case"], N, "flex", d, rows)
        fs = pick(r["case"], N, "flex_full_split", d, rows)
        best, of = _best_of(r, rows)
        ideal, sd = pick(r["case"], N, "ideal", d, rows), pick("prefill_causal", N, "sdpa", rows=rows)
        best_cell = f"{fmt(best)} ({of})" if best is not None else "—"
        lines.append(f"| {N} | {d:.1%} | {r['ms']:.3f} | {r['tflops']:.0f} | {fmt(fl)} | "
                     f"{fmt(fs) if fs is not None else nm} | {best_cell} | {fmt(sd)} | "
                     f"{fmt(ideal)} | {fmt(fl and fl / r['ms'], '{:.2f}x')} | "
                     f"{fmt(best and best / r['ms'], '{:.2f}x')} | "
                     f"{fmt(ideal and r['ms'] / ideal, '{:.0%}')} |")
    opts = [x for x in rows if x["case"] == "prefill_blocksparse" and x["impl"].endswith("_opts")]
    if not opts:
        lines += ["", "The `_opts` configurations were not measured in this run."]
    lines += ["", "## Full causal prefill (same shapes)", "",
              "FlexAttention: the full causal list with its full-block split (every block but the "
              "diagonal is full); `flex best` adds the `_opts` configuration where it was measured.",
              "",
              "| N | ours | TFLOP/s | flex (full-block split) | flex best | SDPA | SDPA TFLOP/s | "
              "ours / SDPA |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["case"] != "prefill_causal" or r["impl"] != "ours" or "ms" not in r:
            continue
        N = r["N"]
        sd = [x for x in rows if x["case"] == "prefill_causal" and x["N"] == N and x["impl"] == "sdpa"][0]
        fl = pick("prefill_causal", N, "flex", rows=rows)
        best, of = _best_of(r, rows)
        lines.append(f"| {N} | {r['ms']:.3f} | {r['tflops']:.0f} | {fmt(fl)} | "
                     f"{fmt(best)}{f' ({of})' if best is not None else ''} | {sd['ms']:.3f} | "
                     f"{sd['tflops']:.0f} | {r['ms'] / sd['ms']:.2f} |")
    lines += ["", "## Token-sparse decode (B=8, H=16, D=128, top-2048 keys per head)", "",
              "Eager launches (do_bench), and CUDA-graph replays (do_bench_cudagraph) where the host "
              "launch overhead is gone.", "",
              "| N | ours | GB/s | SDPA dense | gather + SDPA | floor | gather / ours | ours / floor | "
              "ours (graph) | gather (graph) | gather / ours (graph) | ours (graph) / floor |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["case"] != "decode" or r["impl"] != "ours" or "ms" not in r:
            continue
        N = r["N"]
        g, fl, sd = pick("decode", N, "torch_gather_sdpa", rows=rows), pick("decode", N, "floor", rows=rows), pick("decode", N, "sdpa_dense", rows=rows)
        og, gg = pick("decode", N, "ours_graph", rows=rows), pick("decode", N, "torch_gather_sdpa_graph", rows=rows)
        lines.append(f"| {N} | {r['ms']:.4f} | {r['GBps']:.0f} | {fmt(sd, '{:.4f}')} | {fmt(g, '{:.4f}')} | "
                     f"{fmt(fl, '{:.4f}')} | {fmt(g and g / r['ms'], '{:.2f}x')} | "
                     f"{fmt(fl and r['ms'] / fl, '{:.2f}x')} | {fmt(og, '{:.4f}')} | {fmt(gg, '{:.4f}')} | "
                     f"{fmt(og and gg and gg / og, '{:.2f}x')} | {fmt(og and fl and og / fl, '{:.2f}x')} |")
    sweeps = [r for r in rows if r["case"].startswith("sweep")]
    if sweeps:
        lines += ["", "## Schedule sweep", "", "| case | N | density | schedule | ms |", "|---|---|---|---|---|"]
        for r in sweeps:
            lines.append(f"| {r['case']} | {r['N']} | {r.get('density', 0):.1%} | {r['impl']} | "
                         f"{fmt(r.get('ms'), '{:.4f}') if 'ms' in r else r.get('error', '')} |")
    errors = [r for r in rows if "error" in r and not r["case"].startswith("sweep")]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r['case']} N={r['N']} {r['impl']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-flex", action="store_true", help="do not time FlexAttention")
    ap.add_argument("--no-flex-options", action="store_true",
                    help="time FlexAttention without the _opts (kernel_options) configurations")
    ap.add_argument("--report-only", metavar="JSON",
                    help="recompute the derived rows of a results JSON and rewrite it and its "
                         "Markdown in place (no device needed)")
    ap.add_argument("--prefill-n", type=int, nargs="*", help="override the prefill lengths")
    ap.add_argument("--decode-n", type=int, nargs="*", help="override the decode lengths")
    ap.add_argument("--head-dim", type=int, default=128, help="head dim of the prefill cases")
    args = ap.parse_args()
    global DEV, DT, PREFILL_D
    if args.report_only:
        return rewrite_report(args.report_only)
    PREFILL_D = args.head_dim
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        DEV, DT = "cpu", torch.float16
        args.quick = True
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA device (or --smoke on the CPU)")
    import triton
    torch.backends.cuda.matmul.allow_tf32 = False
    meta = dict(card=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)",
                prefill_head_dim=PREFILL_D,
                torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), command="python " + " ".join(sys.argv))
    print(json.dumps(meta), flush=True)
    try:
        if args.smoke or args.no_flex:
            raise RuntimeError("not requested")
        from torch import _dynamo
        from torch.nn.attention.flex_attention import flex_attention
        _dynamo.config.cache_size_limit = 64
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as ex:  # noqa: BLE001
        print("FlexAttention unavailable:", ex, flush=True)
        flex = None
    t0 = time.time()
    meta["copy_GBps"] = copy_bandwidth_gbps() if DEV == "cuda" else 1.0
    rec(case="ceiling", N=0, impl="device_copy", GBps=meta["copy_GBps"])
    try:
        if not args.skip_prefill:
            Ns = [512] if args.smoke else [4096, 16384] if args.quick else [4096, 16384, 65536]
            run_prefill(args.prefill_n or Ns, args, flex)
        if not args.skip_decode:
            Ns = [4096] if args.smoke else [131072] if args.quick else [32768, 131072]
            run_decode(args.decode_n or Ns, args, meta["copy_GBps"])
    finally:                                # whatever was measured is written out
        meta["wall_s"] = round(time.time() - t0, 1)
        write_results(args, meta)


def write_results(args, meta):
    os.makedirs(args.out, exist_ok=True)
    stem = "kernels_h100" + ("" if PREFILL_D == 128 else f"_d{PREFILL_D}")
    rows = with_flex_best(ROWS)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = markdown(meta, rows)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(md)
    print(md, flush=True)


def rewrite_report(path: str) -> int:
    """Recompute the derived rows of ``path`` (a results JSON of this script) and rewrite it and
    the Markdown beside it; the measured rows and the run's metadata stay as they are."""
    global PREFILL_D
    with open(path) as f:
        data = json.load(f)
    meta = data["meta"]
    PREFILL_D = meta.get("prefill_head_dim", 128)
    rows = with_flex_best(data["rows"])
    meta["derived_rows"] = ("flex_best: the fastest FlexAttention configuration measured per "
                            "prefill case, computed from the measured rows by `python "
                            "benchmarks/kernels.py --report-only`")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(markdown(meta, rows))
    print(f"rewrote {path} and its .md: {sum(r.get('derived', False) for r in rows)} derived rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
