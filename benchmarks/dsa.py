"""DeepSeek Sparse Attention forward/backward on one GPU vs dense SDPA (bf16, B=1, H=16, D=128).

Per N in {16384, 65536}, causal, top-k 2048, indexer H_I x d_I (default 4 x 64):
  * ``dsa_fwd``: the whole DSA forward as a compiled site runs it — indexer projections of the
    site's q/k (``runtime.dsa.LightningIndexer``), fused index scoring + top-k
    (``runtime.kernels.indexer.indexer_topk``, no N x N tensor) and token-sparse attention over
    the lists (one list per query shared by all heads);
  * its parts: ``indexer_proj``, ``indexer_topk``, ``sparse_attend``;
  * ``dense_sdpa``: ``F.scaled_dot_product_attention(is_causal=True)`` (16 KV heads, the
    flash kernel);
  * backward: ``sparse_bwd`` (token-sparse attention backward, from the saved lse) and
    ``dense_bwd`` (SDPA backward), each timed as forward+backward minus forward;
  * ``naive_indexer`` at 16384: all N x N scores in torch and ``torch.topk`` (the baseline the
    fused selection replaces).
KV layouts: ``mqa`` (one K/V head shared by the 16 query heads, as DSA runs on MLA) and ``mha``
(16 K/V heads). Before timing, the top-k is checked against the reference at a small size and
the attention against the fp32 reference on a subset of rows, on NaN-poisoned outputs.
Decode: one query per sequence, B=8, cache 131072: indexer + top-k + split-K gather attention.

    PYTHONPATH=. python benchmarks/dsa.py --out DIR        # writes DIR/dsa_h100.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

from codegen.token_sparse import token_sparse_attention_ref  # noqa: E402
from runtime import dsa as dsa_rt  # noqa: E402
from runtime.kernels import indexer as ik, indexer_rows, token_sparse as tsk  # noqa: E402
from runtime.dsa import LightningIndexer  # noqa: E402

DEV = "cuda"
DT = torch.bfloat16
ROWS = []


def rec(**row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def bench_ms(fn) -> float:
    return common.bench_ms(fn, warmup=10, rep=100, dry_run=DEV == "cpu")


def check_topk(args, gen):
    """Triton top-k vs the reference on a small case (set equality up to near-ties)."""
    from codegen.indexer import indexer_scores_ref, indexer_topk_ref
    n = 2048 if DEV == "cuda" else 96
    k = min(args.topk, n // 4)
    qi = torch.randn(1, n, args.index_heads, args.index_dim, device=DEV, generator=gen).to(DT)
    w = torch.randn(1, n, args.index_heads, device=DEV, generator=gen)
    ki = torch.randn(1, n, args.index_dim, device=DEV, generator=gen).to(DT)
    got = ik.indexer_topk(qi, w, ki, k, causal=True)
    ref = indexer_topk_ref(qi, w, ki, k, causal=True)
    sc = indexer_scores_ref(qi, w, ki, causal=True)[0]
    bad = 0
    for t in range(n):
        a = set(x for x in got[0, t].tolist() if x >= 0)
        b = set(x for x in ref[0, t].tolist() if x >= 0)
        if a != b:
            kth = sc[t, sorted(b, key=lambda s: -float(sc[t, s]))[-1]]
            diff = a ^ b
            if any(abs(float(sc[t, s] - kth)) > 1e-3 * max(1.0, abs(float(kth))) for s in diff):
                bad += 1
    rec(case="check", impl="indexer_topk", N=n, topk=k, rows_differing=bad)
    return bad == 0


_FLOOR = {}


def gather_floor_kernel():
    """A kernel with the gather attention's memory traffic and none of its math: program ``t``
    loads the K and V rows of query ``t``'s index list, tile by tile, and adds them up. Its time
    is what reading the selected rows costs (from L2 when K/V fit there, as one MQA head of
    65536 x 128 bf16 K and V does: 32 MB)."""
    if "k" not in _FLOOR:
        import triton
        import triton.language as tl

        @triton.jit
        def gather_sum(K, V, IDX, OUT, n_idx, D: tl.constexpr, BN: tl.constexpr):
            t = tl.program_id(0).to(tl.int64)
            offs_n = tl.arange(0, BN)
            offs_d = tl.arange(0, D)
            acc = tl.zeros([BN, D], tl.float32)
            for j in range(0, n_idx, BN):
                ids = tl.load(IDX + t * n_idx + j + offs_n, mask=j + offs_n < n_idx, other=-1)
                ok = ids >= 0
                rows = ids.to(tl.int64)[:, None] * D + offs_d[None, :]
                acc += tl.load(K + rows, mask=ok[:, None], other=0.0).to(tl.float32)
                acc += tl.load(V + rows, mask=ok[:, None], other=0.0).to(tl.float32)
            tl.store(OUT + t * D + offs_d, tl.sum(acc, 0))
        _FLOOR["k"] = gather_sum
    return _FLOOR["k"]


def gather_floor(k, v, idx):
    """Time (ms) of the best of a few schedules of ``gather_floor_kernel`` over MQA ``k``,
    ``v`` [1, 1, N, D] and ``idx`` [1, 1, N, n_idx], after checking its sums on a few rows."""
    N, D = k.shape[-2:]
    n_idx = idx.shape[-1]
    kern = gather_floor_kernel()
    k2, v2, ix = k[0, 0].contiguous(), v[0, 0].contiguous(), idx[0, 0].contiguous()
    out = torch.full((N, D), float("nan"), device=k.device)
    best = None
    for bn, warps, stages in ((64, 4, 2), (64, 8, 3), (128, 8, 2), (32, 4, 3)):
        def go():
            kern[(N,)](k2, v2, ix, out, n_idx, D=D, BN=bn, num_warps=warps, num_stages=stages)
        go()
        rows = torch.linspace(0, N - 1, 8, device=k.device).long()
        sel = ix[rows].long()
        ref = torch.stack([(k2[r[r >= 0]].float() + v2[r[r >= 0]].float()).sum(0) for r in sel])
        if common.rel_err(out[rows], ref) > 1e-3:
            raise RuntimeError(f"gather floor kernel sums differ at bn={bn}")
        ms = bench_ms(go)
        if best is None or ms < best[0]:
            best = (ms, f"{bn}/{warps}w/{stages}s")
    return best


def run_prefill(N, layout, args, gen):
    H, D = 16, 128
    hkv = 1 if layout == "mqa" else H
    q = torch.randn(1, H, N, D, device=DEV, dtype=DT, generator=gen)
    k = torch.randn(1, hkv, N, D, device=DEV, dtype=DT, generator=gen)
    v = torch.randn(1, hkv, N, D, device=DEV, dtype=DT, generator=gen)
    scale = D ** -0.5
    ix = LightningIndexer(H, hkv, D, args.index_heads, args.index_dim, 0, scale, device=DEV)
    base = dict(N=N, layout=layout, topk=args.topk, index=f"{args.index_heads}x{args.index_dim}")

    def proj():
        return ix(q, k, 0)

    with torch.no_grad():
        q_i, w, k_i = proj()
        idx = ik.indexer_topk(q_i, w, k_i, args.topk, causal=True)[:, None]

    def select():
        return ik.indexer_topk(q_i, w, k_i, args.topk, causal=True)

    def attend():
        return tsk.token_sparse_attention(q, k, v, idx, scale=scale)

    def full():
        a, b, c = proj()
        ii = ik.indexer_topk(a, b, c, args.topk, causal=True)[:, None]
        return tsk.token_sparse_attention(q, k, v, ii, scale=scale)

    # correctness of the attention on a subset of rows, poisoned outputs
    out = torch.full((1, H, N, D), float("nan"), device=DEV, dtype=DT)
    lse = torch.full((1, H, N), float("nan"), device=DEV)
    tsk.token_sparse_attention(q, k, v, idx, scale=scale, out=out, lse=lse)
    rows = torch.linspace(0, N - 1, 48 if DEV == "cuda" else 8, device=DEV).long()
    ref, _ = token_sparse_attention_ref(q[:, :, rows], k, v, idx[:, :, rows], scale=scale)
    err = common.rel_err(out[:, :, rows], ref)
    rec(case="check", impl="sparse_attend", **base, rel_err=err, nan=bool(out.isnan().any()))
    with torch.no_grad():
        for name, fn in (("indexer_proj", proj), ("indexer_topk", select),
                         ("sparse_attend", attend), ("dsa_fwd", full)):
            runs = sorted(bench_ms(fn) for _ in range(3))   # three medians: run-to-run spread
            rec(case="fwd", impl=name, **base, ms=runs[1], ms_runs=runs)
    if layout == "mqa":
        ms, sch = gather_floor(k, v, idx)
        rec(case="fwd", impl="gather_floor", **base, ms=ms, schedule=sch,
            gathered_gb=round(2 * N * args.topk * D * k.element_size() / 1e9, 2))
    if layout == "mha":
        rec(case="fwd", impl="dense_sdpa", **base,
            ms=bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
    else:
        ke, ve = k.expand(1, H, N, D).contiguous(), v.expand(1, H, N, D).contiguous()
        rec(case="fwd", impl="dense_sdpa", **base,
            ms=bench_ms(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True)))
    if args.no_backward:
        return
    try:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        go = torch.randn_like(q)

        def sparse_fb():
            o = tsk.token_sparse_attention_fn(qg, kg, vg, idx, scale=scale)
            o.backward(go)

        def sparse_f():
            with torch.no_grad():
                tsk.token_sparse_attention_fn(qg, kg, vg, idx, scale=scale)
        fb, f = bench_ms(sparse_fb), bench_ms(sparse_f)
        rec(case="bwd", impl="sparse_bwd", **base, ms=fb - f, fwd_bwd_ms=fb)
    except Exception as e:                                   # report, keep the campaign going
        rec(case="bwd", impl="sparse_bwd", **base, error=f"{type(e).__name__}: {e}"[:300])
    kd = k if layout == "mha" else k.expand(1, H, N, D).contiguous()
    vd = v if layout == "mha" else v.expand(1, H, N, D).contiguous()
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, kd, vd))
    go = torch.randn_like(q)

    def dense_fb():
        F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).backward(go)

    def dense_f():
        with torch.no_grad():
            F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
    fb, f = bench_ms(dense_fb), bench_ms(dense_f)
    rec(case="bwd", impl="dense_bwd", **base, ms=fb - f, fwd_bwd_ms=fb)


def run_naive(N, args, gen):
    qi = torch.randn(1, N, args.index_heads, args.index_dim, device=DEV, dtype=DT, generator=gen)
    w = torch.randn(1, N, args.index_heads, device=DEV, generator=gen)
    ki = torch.randn(1, N, args.index_dim, device=DEV, dtype=DT, generator=gen)
    mask = torch.ones(N, N, device=DEV, dtype=torch.bool).triu(1)

    def naive():
        s = torch.einsum("bthd,bsd->bths", qi, ki).relu()
        s = torch.einsum("bths,bth->bts", s.float(), w).masked_fill(mask, float("-inf"))
        return s.topk(args.topk, dim=-1).indices

    rec(case="fwd", impl="naive_indexer", N=N, topk=args.topk,
        index=f"{args.index_heads}x{args.index_dim}", ms=bench_ms(naive))


def run_decode(args, gen, B=8, N=131072):
    H, D = 16, 128
    q = torch.randn(B, H, 1, D, device=DEV, dtype=DT, generator=gen)
    k = torch.randn(B, 1, N, D, device=DEV, dtype=DT, generator=gen)
    v = torch.randn(B, 1, N, D, device=DEV, dtype=DT, generator=gen)
    ix = LightningIndexer(H, 1, D, args.index_heads, args.index_dim, 0, D ** -0.5, device=DEV)
    base = dict(N=N, B=B, layout="mqa", topk=args.topk)

    def step():
        a, b, c = ix(q, k, N - 1)
        ii = ik.indexer_topk(a, b, c, args.topk, causal=True)[:, None]
        return tsk.token_sparse_attention(q, k, v, ii, scale=D ** -0.5)

    with torch.no_grad():
        rec(case="decode", impl="dsa_step", **base, ms=bench_ms(step))
        a, b, c = ix(q, k, N - 1)
        ii = ik.indexer_topk(a, b, c, args.topk, causal=True)[:, None]
        # the step's parts: the indexer's projections, its selection, the gather attention;
        # the selection also through the previous path (materialised fp32 score rows)
        rec(case="decode", impl="step_indexer_proj", **base, ms=bench_ms(lambda: ix(q, k, N - 1)))
        rec(case="decode", impl="step_topk", **base,
            ms=bench_ms(lambda: ik.indexer_topk(a, b, c, args.topk, causal=True)))
        def topk_score_rows():
            return indexer_rows.top_of_rows(
                indexer_rows.few_row_scores(a, b, c, causal=True),
                indexer_rows.visible_counts(1, N, True, a.device), args.topk)

        want = topk_score_rows()
        got = ik.indexer_topk(a, b, c, args.topk, causal=True)
        rec(case="check", impl="decode_topk", N=N,
            rows_differing=int((got.sort(-1).values != want.sort(-1).values).any(-1).sum()))
        rec(case="decode", impl="step_topk_score_rows", **base, ms=bench_ms(topk_score_rows))
        # the step as a compiled site runs it: k_I of the cache kept with it (dsa.index_keys),
        # extended by the step's token instead of re-projecting all N rows
        dsa_rt.index_keys(ix, k)

        def step_kept():
            qi, wi = ix.queries(q, N - 1)
            ix.keys(k[:, :, -1:], N - 1)           # what extending the kept keys by one costs
            ii = ik.indexer_topk(qi, wi, dsa_rt.index_keys(ix, k), args.topk,
                                              causal=True)[:, None]
            return tsk.token_sparse_attention(q, k, v, ii, scale=D ** -0.5)

        qi, wi = ix.queries(q, N - 1)
        kept = ik.indexer_topk(qi, wi, dsa_rt.index_keys(ix, k), args.topk, causal=True)
        rec(case="check", impl="decode_kept_keys", N=N,
            rows_differing=int((kept.sort(-1).values != got.sort(-1).values).any(-1).sum()))
        rec(case="decode", impl="dsa_step_kept_keys", **base, ms=bench_ms(step_kept))
        rec(case="decode", impl="step_attend", **base,
            ms=bench_ms(lambda: tsk.token_sparse_attention(q, k, v, ii, scale=D ** -0.5)))
        ke, ve = k.expand(B, H, N, D), v.expand(B, H, N, D)

        def dense():
            return F.scaled_dot_product_attention(q, ke, ve)

        rec(case="decode", impl="dense_sdpa", **base, ms=bench_ms(dense))
        # the GPU work alone (CUDA-graph replays): the eager steps above include the host's
        # launches, which at this size can hide what a step saves on the device
        if DEV == "cuda":
            for name, fn in (("dsa_step", step), ("dsa_step_kept_keys", step_kept),
                             ("dense_sdpa", dense)):
                try:
                    rec(case="decode_graph", impl=name, **base, ms=common.graph_ms(fn))
                except Exception as e:                    # report, keep the campaign going
                    rec(case="decode_graph", impl=name, **base,
                        error=f"{type(e).__name__}: {e}"[:300])


def run_attend_sweep(N, gen):
    """Gather-attention schedules at one MQA shape (how the default was checked)."""
    from codegen.common import Schedule
    H, D = 16, 128
    q = torch.randn(1, H, N, D, device=DEV, dtype=DT, generator=gen)
    k = torch.randn(1, 1, N, D, device=DEV, dtype=DT, generator=gen)
    v = torch.randn(1, 1, N, D, device=DEV, dtype=DT, generator=gen)
    # random rows per query (timing only: repeats allowed, causality not needed)
    idx = torch.randint(0, N, (1, 1, N, 2048), device=DEV, generator=gen, dtype=torch.int32)
    for bn in (16, 32, 64):
        for warps in (2, 4, 8):
            for stages in (2, 3, 4):
                sch = Schedule(block_m=16, block_n=bn, num_warps=warps, num_stages=stages)
                try:
                    ms = bench_ms(lambda: tsk.token_sparse_attention(q, k, v, idx, scale=D ** -0.5,
                                                                    schedule=sch))
                    rec(case="sweep", impl="sparse_attend", N=N, block_n=bn, warps=warps,
                        stages=stages, ms=ms)
                except Exception as e:
                    rec(case="sweep", impl="sparse_attend", N=N, block_n=bn, warps=warps,
                        stages=stages, error=f"{type(e).__name__}: {e}"[:200])
    rec(case="sweep", impl="sparse_attend_default", N=N,
        ms=bench_ms(lambda: tsk.token_sparse_attention(q, k, v, idx, scale=D ** -0.5)))


def markdown(meta) -> str:
    def get(case, impl, **kw):
        for r in ROWS:
            if r.get("case") == case and r.get("impl") == impl and all(r.get(a) == b
                                                                      for a, b in kw.items()):
                return r.get("ms")
        return None

    f = lambda x: "–" if x is None else f"{x:.3f}"                         # noqa: E731
    lines = [f"# DSA on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; bf16, B=1, H=16, D=128, causal, "
             f"top-k {meta['topk']}, indexer {meta['index_heads']} heads x {meta['index_dim']} "
             f"dims. Times: `triton.testing.do_bench` medians (ms); forward parts: the middle of three "
             f"such medians (all three in the JSON, `ms_runs`).", "",
             f"Command: `{meta['command']}`", ""]
    if any(r.get("case") == "fwd" for r in ROWS):
        lines += ["| N | KV | proj | top-k (fused) | sparse attend | **DSA fwd** | dense SDPA | "
                  "dense / DSA | sparse bwd | dense bwd | dense bwd / sparse bwd |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in meta["Ns"]:
        for lay in ("mqa", "mha"):
            kw = dict(N=n, layout=lay)
            d, s = get("fwd", "dense_sdpa", **kw), get("fwd", "dsa_fwd", **kw)
            sb, db = get("bwd", "sparse_bwd", **kw), get("bwd", "dense_bwd", **kw)
            if s is None and d is None:
                continue
            lines.append(
                f"| {n} | {lay} | {f(get('fwd', 'indexer_proj', **kw))} | "
                f"{f(get('fwd', 'indexer_topk', **kw))} | {f(get('fwd', 'sparse_attend', **kw))} | "
                f"**{f(s)}** | {f(d)} | {'–' if not (d and s) else f'{d / s:.2f}x'} | {f(sb)} | "
                f"{f(db)} | {'–' if not (sb and db) else f'{db / sb:.2f}x'} |")
    spread = [r for r in ROWS if r.get("impl") == "dsa_fwd" and r.get("ms_runs")]
    if spread:
        lines += ["", "DSA fwd, the three medians per case: " + "; ".join(
            f"N={r['N']} {r['layout']}: " + " / ".join(f"{x:.2f}" for x in r["ms_runs"])
            for r in spread) + " ms."]
    fl = [r for r in ROWS if r.get("impl") == "gather_floor" and r.get("ms")]
    if fl:
        def floor_text(r):
            att = get("fwd", "sparse_attend", N=r["N"], layout="mqa")
            return (f"N={r['N']}: {r['ms']:.3f} ms for {r['gathered_gb']} GB "
                    f"({r['gathered_gb'] / r['ms']:.1f} TB/s, {r['schedule']}), sparse attend / "
                    f"floor {f(att)} / {r['ms']:.3f} = "
                    + ("–" if att is None else f"{att / r['ms']:.2f}x"))
        lines += ["", "Gather floor (the attention's K/V row reads alone, no math; MQA, best of "
                      "4 schedules): " + "; ".join(floor_text(r) for r in fl) + "."]
    nv = [r for r in ROWS if r.get("impl") == "naive_indexer"]
    if nv:
        r = nv[0]
        fused = get("fwd", "indexer_topk", N=r["N"], layout="mqa")
        lines += ["", f"Naive indexer (all N x N scores + torch.topk) at N={r['N']}: "
                      f"{f(r.get('ms'))} ms vs fused top-k {f(fused)} ms."]
    dec = {r["impl"]: r.get("ms") for r in ROWS if r.get("case") == "decode"}
    if dec:
        lines += ["", f"Decode (B=8, one query, cache 131072, MQA): DSA step (indexer + top-k + "
                      f"gather attention) {f(dec.get('dsa_step'))} ms, dense SDPA "
                      f"{f(dec.get('dense_sdpa'))} ms."]
        if dec.get("dsa_step_kept_keys") is not None:
            lines += [f"With the indexer keys kept with the cache (as a compiled site decodes: "
                      f"the step projects its own token only): "
                      f"{f(dec.get('dsa_step_kept_keys'))} ms, "
                      f"{dec['dense_sdpa'] / dec['dsa_step_kept_keys']:.2f}x faster than dense."]
        gr = {r["impl"]: r.get("ms") for r in ROWS if r.get("case") == "decode_graph"}
        if gr.get("dsa_step") and gr.get("dsa_step_kept_keys") and gr.get("dense_sdpa"):
            lines += [f"CUDA-graph replays (the GPU work without the host's launches): DSA step "
                      f"{f(gr['dsa_step'])} ms, with the kept indexer keys "
                      f"{f(gr['dsa_step_kept_keys'])} ms, dense SDPA {f(gr['dense_sdpa'])} ms: "
                      f"{gr['dense_sdpa'] / gr['dsa_step'] :.2f}x and "
                      f"{gr['dense_sdpa'] / gr['dsa_step_kept_keys']:.2f}x faster than dense."]
        if dec.get("step_topk") is not None:
            lines += [f"Its parts, timed alone: indexer projections "
                      f"{f(dec.get('step_indexer_proj'))} ms, top-k "
                      f"{f(dec.get('step_topk'))} ms (through materialised fp32 score rows: "
                      f"{f(dec.get('step_topk_score_rows'))} ms), gather attention "
                      f"{f(dec.get('step_attend'))} ms."]
    checks = [r for r in ROWS if r.get("case") == "check"]
    lines += ["", "Checks before timing: " + "; ".join(
        f"{r['impl']} N={r['N']}" + (f" rel_err {r['rel_err']:.2e}" if "rel_err" in r else "")
        + (f" rows differing {r['rows_differing']}" if "rows_differing" in r else "")
        for r in checks)]
    sw = sorted((r for r in ROWS if r.get("case") == "sweep" and "ms" in r
                 and r["impl"] == "sparse_attend"), key=lambda r: r["ms"])
    if sw:
        dflt = [r for r in ROWS if r.get("impl") == "sparse_attend_default"]
        lines += ["", f"Gather-attention schedules at N={sw[0]['N']} (MQA, random rows per query), "
                      "fastest first: "
                      + ", ".join(f"n{r['block_n']}/w{r['warps']}/s{r['stages']} {r['ms']:.2f}"
                                  for r in sw[:6])
                      + (f"; default {dflt[0]['ms']:.2f} ms" if dflt else "") + "."]
    errs = [r for r in ROWS if "error" in r]
    if errs:
        lines += ["", "Errors: " + "; ".join(f"{r['impl']} N={r.get('N')}: {r['error']}"
                                             for r in errs)]
    return "\n".join(lines) + "\n"


def main():
    global DEV
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--Ns", default="16384,65536")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--index-heads", type=int, default=4)
    ap.add_argument("--index-dim", type=int, default=64)
    ap.add_argument("--layouts", default="mqa,mha")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="only the decode step")
    ap.add_argument("--sweep-attend", type=int, default=0,
                    help="also time gather-attention schedules at this N (MQA, one shared list)")
    ap.add_argument("--name", default=None, help="file stem (default dsa_<card>)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes on the CPU through Triton's interpreter (checks this script)")
    args = ap.parse_args()
    global DT
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"      # the kernels load lazily, after this
        DEV, DT = "cpu", torch.float16
        args.Ns, args.topk, args.index_dim = "128", 16, 16
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/dsa.py needs a CUDA device (or --smoke)")
    import triton
    gen = torch.Generator(device=DEV).manual_seed(0)
    Ns = [] if args.decode_only else [int(x) for x in args.Ns.split(",")]
    card = torch.cuda.get_device_name() if DEV == "cuda" else "cpu-interpreter"
    if args.name is None:
        args.name = "dsa_" + ("h200" if "H200" in card else "h100" if "H100" in card else
                              "smoke" if DEV == "cpu" else "gpu")
    meta = dict(device=card, torch=torch.__version__,
                triton=triton.__version__, topk=args.topk, index_heads=args.index_heads,
                index_dim=args.index_dim, Ns=Ns, host=platform.node(),
                command="PYTHONPATH=. python benchmarks/dsa.py " + " ".join(sys.argv[1:]))
    print(json.dumps(meta), flush=True)
    ok = check_topk(args, gen)
    for n in Ns:
        for lay in args.layouts.split(","):
            try:
                run_prefill(n, lay, args, gen)
            except Exception as e:
                traceback.print_exc()
                rec(case="fwd", impl="dsa_fwd", N=n, layout=lay, error=f"{type(e).__name__}: {e}"[:300])
            torch.cuda.empty_cache()
    try:
        if Ns:
            run_naive(min(Ns), args, gen)
    except Exception as e:
        rec(case="fwd", impl="naive_indexer", N=min(Ns), error=f"{type(e).__name__}: {e}"[:300])
    if not args.no_decode:
        try:
            run_decode(args, gen, *((2, 256) if DEV == "cpu" else ()))
        except Exception as e:
            traceback.print_exc()
            rec(case="decode", impl="dsa_step", error=f"{type(e).__name__}: {e}"[:300])
    if args.sweep_attend:
        try:
            run_attend_sweep(args.sweep_attend, gen)
        except Exception as e:
            traceback.print_exc()
            rec(case="sweep", impl="sparse_attend", error=f"{type(e).__name__}: {e}"[:300])
    meta["topk_check_ok"] = ok
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as fh:
        json.dump({"meta": meta, "rows": ROWS}, fh, indent=1)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as fh:
        fh.write(markdown(meta))
    print(markdown(meta))


if __name__ == "__main__":
    main()
