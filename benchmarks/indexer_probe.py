"""Lightning-indexer probe on one GPU: is the fused score + top-k kernel exact, and how fast.

    PYTHONPATH=. python benchmarks/indexer_probe.py --out results_dir [--lengths 16384,65536]
                                                    [--no-sweep]

1. Checks (bf16 unless named): the Triton ``indexer_topk`` against the PyTorch reference at
   N<=4096 (causal and not, fp16, fp32, Nq < Nkv, topk > visible, all-tied scores, 16 heads
   of 128), then on sampled rows (reference scores of those rows only) at decode (B=4, one
   query, 131072 keys) and at every timed length. Rows are compared as sets: a key may differ
   only where its reference score is within 1e-4 (relative to the row's largest |score|) of
   the row's k-th best score; counts, duplicates and hidden keys must be exact.
2. Times (CUDA events, 3 warm-ups, median of 10) at B=1, Nq=Nkv=N, H_I=4, d_I=64, topk=2048,
   causal, bf16: ``indexer_topk`` and its phases (threshold estimate, write sweep, selection),
   the score work as TFLOP/s (2 * H_I * d_I per visible pair, one sweep) beside the measured
   bf16 GEMM rate; dense causal SDPA with 16 heads x 128 (what DSA replaces); the naive path
   (reference scores + ``torch.topk``) at N <= 16384 only.
3. Sweep (unless ``--no-sweep``): the same call under a few other schedules.
``--smoke``: tiny sizes, fp16 for bf16, on the CPU through Triton's interpreter (checks this
script, not the GPU).
Writes ``indexer_<card>.json`` and ``indexer_<card>.md`` to ``--out``; every case catches and
prints its own exception.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from codegen.indexer.reference import (indexer_scores_ref, indexer_topk_ref,  # noqa: E402
                                       visible_counts)
from runtime.kernels import indexer as ik  # noqa: E402

H_I, D_I, TOPK = 4, 64, 2048
BF16 = torch.bfloat16
DEV = "cuda"
SMOKE = False
SWEEP = [ik.IndexerSchedule(block_m=m, block_n=n, num_warps=wp, num_stages=st, sample_stride=ss,
                            stack_heads=sh)
         for m, n, wp, st, ss, sh in [(64, 64, 4, 2, 16, False), (128, 32, 8, 2, 16, False)]] + [
    ik.IndexerSchedule(block_m=64, block_n=32, finish_warps=fw) for fw in (2, 8)]


def sch_tag(s: ik.IndexerSchedule) -> str:
    return (f"m{s.block_m}-n{s.block_n}-w{s.num_warps}-s{s.num_stages}-stride{s.sample_stride}"
            + ("-stacked" if s.stack_heads else "")
            + (f"-finish-w{s.finish_warps}" if s.finish_warps else ""))


def inputs(B, nq, nkv, dtype, seed=0, heads=H_I, dim=D_I):
    """q_idx [B, Nq, H_I, d_I], w [B, Nq, H_I] (a fifth negative on average), k_idx [B, Nkv, d_I]."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, nq, heads, dim, device=DEV, dtype=dtype, generator=g)
    w = torch.rand(B, nq, heads, device=DEV, generator=g) - 0.2
    k = torch.randn(B, nkv, dim, device=DEV, dtype=dtype, generator=g)
    return q, w, k


def row_scores(q, w, k, rows, causal):
    """fp32 reference scores [B, len(rows), Nkv] of the given query rows only."""
    s = indexer_scores_ref(q[:, rows], w[:, rows], k, causal=False)
    if causal:
        vis = visible_counts(q.shape[1], k.shape[1], True, q.device)[rows]
        s = s.masked_fill(torch.arange(k.shape[1], device=q.device)[None, :] >= vis[:, None],
                          float("-inf"))
    return s


def compare_rows(got, scores, topk, rtol=1e-4) -> dict:
    """got int32 [B, r, topk] (any order, -1 = none), scores fp32 [B, r, Nkv] -> mismatch counts."""
    B, r, nkv = scores.shape
    finite = torch.isfinite(scores)
    want = finite.sum(-1).clamp(max=topk)                                      # [B, r]
    valid = got >= 0
    g = torch.where(valid, got, nkv).long()
    srt = g.sort(-1).values
    sel = torch.zeros(B, r, nkv + 1, dtype=torch.bool, device=got.device).scatter_(-1, g, True)
    sel = sel[..., :nkv]
    kth = torch.topk(scores, min(topk, nkv), dim=-1).values.gather(
        -1, (want - 1).clamp(min=0)[..., None])                                # [B, r, 1]
    tol = rtol * scores.masked_fill(~finite, 0).abs().amax(-1, keepdim=True).clamp(min=1e-30)
    return dict(rows=B * r,
                bad_count=int((valid.sum(-1) != want).sum()),
                duplicates=int(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] < nkv)).any(-1).sum()),
                hidden=int((sel & ~finite).sum()),
                wrong_in=int((sel & finite & (scores < kth - tol)).sum()),      # clearly below k-th
                wrong_out=int((~sel & finite & (scores > kth + tol)).sum()))    # clearly above it


def passed(res: dict) -> bool:
    return (res["bad_count"] == 0 and res["duplicates"] == 0 and res["hidden"] == 0
            and res["wrong_in"] == 0 and res["wrong_out"] == 0 and res.get("exact_equal", True))


def check_full(B, nq, nkv, dtype, topk, causal, zero_w=False, heads=H_I, dim=D_I) -> dict:
    q, w, k = inputs(B, nq, nkv, dtype, seed=nq + nkv + topk, heads=heads, dim=dim)
    if zero_w:
        w.zero_()
    got = ik.indexer_topk(q, w, k, topk, causal=causal)
    res = compare_rows(got, indexer_scores_ref(q, w, k, causal=causal), topk)
    if zero_w:            # every score ties: exactly the newest visible keys
        g = torch.where(got < 0, 1 << 30, got).sort(-1).values
        g = torch.where(g == 1 << 30, -1, g).int()
        res["exact_equal"] = bool(torch.equal(g, indexer_topk_ref(q, w, k, topk, causal=causal)))
    return res


def check_sampled(q, w, k, got, topk, causal, n_rows=256) -> dict:
    nq = q.shape[1]
    rows = torch.unique(torch.cat([torch.randint(0, nq, (n_rows,), device=DEV),
                                   torch.tensor([0, nq - 1], device=DEV)]))
    return compare_rows(got[:, rows], row_scores(q, w, k, rows, causal), topk)


def time_ms(fn, reps=10, warmup=3) -> float:
    # SMOKE: a CPU dry run of the script's logic (no meaningful times)
    return common.events_ms(fn, reps=reps, warmup=warmup, dry_run=SMOKE)


def phases_ms(q, w, k, topk, causal, sch=None) -> dict:
    """Median ms of the threshold estimate, the write sweep and the selection of one call,
    and how many rows the estimate missed (those take the exact refinement)."""
    sch = sch or ik.default_schedule(q.shape[2], q.shape[3], q.device)
    run = ik._IndexerRun(q, w, k, topk, causal, sch)
    out = torch.empty((run.B, run.Nq, topk), device=DEV, dtype=torch.int32)
    buf = torch.empty((run.R, run.C), device=DEV, dtype=torch.int64)
    cnt = torch.zeros(run.R, device=DEV, dtype=torch.int32)
    sure = torch.zeros(run.R, device=DEV, dtype=torch.int32)
    lo = run.estimate()
    res = dict(estimate_ms=time_ms(run.estimate),
               write_ms=time_ms(lambda: run.write(lo, buf, cnt, out, sure)),
               finish_ms=time_ms(lambda: run.finish(buf, cnt, out, sure)))
    fail = (cnt < run.want) | (cnt > run.C)
    res["missed_rows"] = int(fail.sum())
    if res["missed_rows"]:
        cnt0 = cnt.clone()

        def resolve():
            c = cnt0.clone()
            lo_p, hi_p = run.refine(lo, c, fail)
            top = torch.iinfo(torch.int64).max
            run.write(torch.where(fail, lo_p, top), buf, c, out, sure,
                      hi=torch.where(fail, hi_p, top), blocks=run._blocks(fail))
        res["refine_ms"] = time_ms(resolve)
        rows = fail.nonzero()[:, 0]
        res["direct_ms"] = time_ms(lambda: run.direct(rows))
        res["direct_used"] = bool(res["missed_rows"] * run.spec.heads * run.Nkv
                                  <= ik.DIRECT_ELEMS)
    # floor of any sweep: scores of every visible key, reduced to a row max / min
    theta = torch.zeros((run.R, run.sch.thresholds), device=DEV)
    res["score_sweep_ms"] = time_ms(lambda: run.count(theta, 1, counts=False, stats=True))
    res["mean_candidates"] = round(float(cnt.float().mean()), 1)
    return res


def gemm_tflops() -> float:
    n = 256 if SMOKE else 8192
    a = torch.randn(n, n, device=DEV, dtype=BF16)
    b = torch.randn(n, n, device=DEV, dtype=BF16)
    return 2 * n ** 3 / (time_ms(lambda: a @ b) * 1e-3) / 1e12


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--lengths", default="16384,65536")
    ap.add_argument("--naive-max", type=int, default=16384)
    ap.add_argument("--no-sweep", action="store_true", help="skip the schedule sweep")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU interpreter")
    args = ap.parse_args()
    global DEV, SMOKE, BF16, TOPK
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["SPARSE_PLANNER_KERNELS"] = "triton"
        DEV, SMOKE, BF16, TOPK = "cpu", True, torch.float16, 16
        args.lengths = "160"
    import triton
    card = torch.cuda.get_device_name() if DEV == "cuda" else "CPU interpreter"
    big, mid, dec = (4096, 2048, 131072) if not SMOKE else (96, 64, 700)
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d"), command="PYTHONPATH=. python benchmarks/indexer_probe.py " + " ".join(sys.argv[1:]),
                config=f"B=1, H_I={H_I}, d_I={D_I}, topk={TOPK}, causal, {str(BF16)[6:]}")
    print(meta, flush=True)
    checks, timings = [], []

    def guarded(name, fn, into):
        t0 = time.perf_counter()
        try:
            res = dict(case=name, **fn())
            res["ok"] = passed(res) if "bad_count" in res else res.get("ok", True)
        except Exception as e:                   # noqa: BLE001 - report every case
            traceback.print_exc()
            res = dict(case=name, ok=False, error=f"{type(e).__name__}: {e}")
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        print(res, flush=True)
        into.append(res)
        return res

    gemm = guarded("bf16 GEMM 8192^3", lambda: dict(tflops=gemm_tflops()), timings).get("tflops")
    for name, a in [(f"N{big} causal", (1, big, big, BF16, TOPK, True)),
                    (f"B2 N{big} non-causal", (2, big, big, BF16, TOPK, False)),
                    (f"N{big} fp16 topk {TOPK // 16}", (1, big, big, torch.float16, TOPK // 16, True)),
                    (f"N{big} fp32 topk {2 * TOPK}", (1, big, big, torch.float32, 2 * TOPK, True)),
                    (f"Nq{big // 4} Nkv{big + big // 4} topk 1", (1, big // 4, big + big // 4, BF16, 1, True)),
                    (f"N{mid} topk {big} (> visible)", (1, mid, mid, BF16, big, True))]:
        guarded(name, lambda a=a: check_full(*a), checks)
    guarded(f"N{big} all scores tied (w=0)", lambda: check_full(1, big, big, BF16, TOPK, True,
                                                                zero_w=True), checks)
    guarded(f"H_I=16 d_I=128 N{mid} topk {TOPK // 4}", lambda: check_full(
        1, mid, mid, BF16, TOPK // 4, True, heads=16, dim=128), checks)

    def decode():
        q, w, k = inputs(4, 1, dec, BF16, seed=7)
        got = ik.indexer_topk(q, w, k, TOPK, causal=True)
        res = check_sampled(q, w, k, got, TOPK, True)
        res["ms"] = time_ms(lambda: ik.indexer_topk(q, w, k, TOPK, causal=True))
        return res
    guarded(f"decode B4 Nkv{dec}", decode, checks)

    lengths = [int(x) for x in args.lengths.split(",")]
    for n in lengths:
        q, w, k = inputs(1, n, n, BF16, seed=n)
        guarded(f"N{n} sampled rows", lambda: check_sampled(
            q, w, k, ik.indexer_topk(q, w, k, TOPK, causal=True), TOPK, True), checks)

        def timed(n=n, q=q, w=w, k=k):
            ms = time_ms(lambda: ik.indexer_topk(q, w, k, TOPK, causal=True))
            tf = 2 * H_I * D_I * n * (n + 1) / 2 / (ms * 1e-3) / 1e12
            return dict(N=n, ms=ms, score_tflops=tf, **phases_ms(q, w, k, TOPK, True))
        guarded(f"indexer_topk N={n}", timed, timings)

        def sdpa(n=n):
            qd, kd, vd = (torch.randn(1, 16, n, 128, device=DEV, dtype=BF16) for _ in range(3))
            return dict(N=n, ms=time_ms(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)))
        guarded(f"dense causal SDPA 16x128 N={n}", sdpa, timings)
        torch.cuda.empty_cache()
        if n <= args.naive_max:
            guarded(f"naive scores + torch.topk N={n}", lambda: dict(N=n, ms=time_ms(
                lambda: torch.topk(indexer_scores_ref(q, w, k, causal=True), TOPK, dim=-1))), timings)
        del q, w, k
        torch.cuda.empty_cache()

    if not args.no_sweep:
        for n in lengths:
            q, w, k = inputs(1, n, n, BF16, seed=n)
            for sch in SWEEP:
                def one(sch=sch, q=q, w=w, k=k):
                    fn = lambda: ik.indexer_topk(q, w, k, TOPK, causal=True, schedule=sch)  # noqa: E731
                    ok = passed(check_sampled(q, w, k, fn(), TOPK, True, n_rows=64))
                    return dict(N=q.shape[1], ms=time_ms(fn), ok=ok,
                                **phases_ms(q, w, k, TOPK, True, sch))
                guarded(f"sweep N={n} {sch_tag(sch)}", one, timings)
            del q, w, k
            torch.cuda.empty_cache()

    os.makedirs(args.out, exist_ok=True)
    tag = card.replace("NVIDIA ", "").split()[0].lower()
    with open(os.path.join(args.out, f"indexer_{tag}.json"), "w") as f:
        json.dump(dict(meta=meta, checks=checks, timings=timings), f, indent=1)
    lines = [f"# Lightning indexer on {card}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; {meta['config']}; "
             f"`{meta['command']}`", "", "| check | ok | rows | detail |", "|---|---|---|---|"]
    for c in checks:
        detail = c.get("error") or ", ".join(
            f"{k_}={c[k_]}" for k_ in ("bad_count", "duplicates", "hidden", "wrong_in", "wrong_out",
                                       "exact_equal", "ms") if k_ in c)
        lines.append(f"| {c['case']} | {c['ok']} | {c.get('rows', '')} | {detail} |")
    lines += ["", f"bf16 GEMM rate: {gemm:.0f} TFLOP/s" if gemm else "", "",
              "| timing | ms | score TFLOP/s | estimate / write / finish ms | missed rows | "
              "mean candidates |", "|---|---|---|---|---|---|"]
    for t in timings:
        if "tflops" in t:
            continue
        if "error" in t:
            lines.append(f"| {t['case']} | error: {t['error']} | | | | |")
            continue
        ph = (f"{t['estimate_ms']:.2f} / {t['write_ms']:.2f} / {t['finish_ms']:.2f} "
              f"(score sweep {t['score_sweep_ms']:.2f}; exact resolution of missed rows: "
              f"refinement {t.get('refine_ms', 0):.2f}"
              + (f", direct scoring {t['direct_ms']:.2f}"
                 + (" (used)" if t.get("direct_used") else "") if "direct_ms" in t else "")
              + ")" if "write_ms" in t else "")
        tf = f"{t['score_tflops']:.0f}" if "score_tflops" in t else ""
        ok = "" if t.get("ok", True) else " (WRONG RESULT)"
        lines.append(f"| {t['case']}{ok} | {t['ms']:.2f} | {tf} | {ph} | {t.get('missed_rows', '')} | "
                     f"{t.get('mean_candidates', '')} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"indexer_{tag}.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if all(c.get("ok") for c in checks + timings) else 1


if __name__ == "__main__":
    sys.exit(main())
