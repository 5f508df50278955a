"""Per-policy cost on one GPU: estimator (sparse.score), selection (sparse.select), attend
(sparse.attend) and total, at each policy's default parameters, vs dense SDPA.

    PYTHONPATH=. python benchmarks/policies.py --out benchmarks/results [--quick]

bf16, B=1, H=16, D=128, causal prefill, N in {16384, 65536}; quest also as a decode step
(one query over an N-token cache, B=8). Every sparse output is checked against a fp32
reference on the last 256 query rows before timing. Writes policies_<card>.json/.md.
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
os.environ.setdefault("SPARSE_PLANNER_DENSITY", "0")      # no host sync inside timed calls

import planner  # noqa: E402
import runtime.ops  # noqa: E402,F401
from codegen.select.reference import block_keep_fn  # noqa: E402
from runtime import estimators  # noqa: E402
from runtime.kernels import select as sk  # noqa: E402
from runtime.providers import _pairs_kept  # noqa: E402
from runtime.spec import SiteSpec, register  # noqa: E402

POLICIES = ["block_topk", "threshold", "vertical_slash", "auto", "quest", "sink_window",
            "longformer", "bigbird"]
DYNAMIC = {"block_topk", "threshold", "vertical_slash", "auto", "quest"}


def bench_ms(fn) -> float:
    return common.bench_ms(fn, warmup=25, rep=100)


def check_rows(q, k, v, out, counts, idx, spec, rows: int = 256) -> float:
    """Relative error of ``out`` on the last ``rows`` query rows vs a fp32 reference."""
    B, H, N, D = q.shape
    Nkv = k.shape[2]
    r0 = N - rows
    keep = block_keep_fn(counts, idx, estimators.block_of(spec), Nkv)(r0, N)   # [B, Hs, rows, Nkv]
    tok = estimators.get(spec.policy.name).token_keep
    if tok is not None:
        keep = keep & tok(spec, N, Nkv, q.device)(r0, N)
    keep = keep.repeat_interleave(H // keep.shape[1], dim=1) if keep.shape[1] not in (1, H) else keep
    s = q[:, :, r0:].float() @ k.float().transpose(-1, -2) * spec.scale
    pos = torch.arange(r0, N, device=q.device)[:, None] + (Nkv - N)
    s = s.masked_fill(torch.arange(Nkv, device=q.device)[None, :] > pos, float("-inf"))
    s = s.masked_fill(~keep, float("-inf"))
    ref = torch.softmax(s, -1).nan_to_num(0.0) @ v.float()
    got = out[:, :, r0:].float()
    return float((got - ref).norm() / ref.norm())


def window_density(n_q: int, n_kv: int, sink: int, window: int) -> float:
    """Exact kept/causal pairs of sink + window (causal; global queries see only earlier keys)."""
    p = torch.arange(n_kv - n_q, n_kv, dtype=torch.float64)
    kept = torch.clamp(p + 1, max=window) + torch.clamp(torch.clamp(p - window + 1, min=0), max=sink)
    return float(kept.sum() / (p + 1).sum())


def same_as_reference(name, q, k, spec, counts, idx) -> float:
    """Fraction of (head, query block) lists identical to the PyTorch estimator's and
    selection's (SPARSE_PLANNER_KERNELS=reference) on the same input."""
    est = estimators.get(name)
    old = os.environ.get("SPARSE_PLANNER_KERNELS")
    os.environ["SPARSE_PLANNER_KERNELS"] = "reference"
    try:
        c_ref, i_ref = est.select(est.score(q, k, [], spec), q, k, spec)
    finally:
        if old is None:
            del os.environ["SPARSE_PLANNER_KERNELS"]
        else:
            os.environ["SPARSE_PLANNER_KERNELS"] = old
    if i_ref.shape != idx.shape:
        return 0.0
    rows = (idx == i_ref).all(-1) & (counts == c_ref)
    return float(rows.float().mean())


def torch_selection_ms(q, k) -> float:
    """quest's selection by the PyTorch path (select_topk_blocks) on the same bounds, for the
    side-by-side with the selection program."""
    from codegen.select.reference import select_topk_blocks
    pol = planner.policy("quest")
    sc = sk.quest_page_bounds(q, k, page=pol.page, causal="lower_right")
    topk = -(-pol.budget // pol.page)
    return bench_ms(lambda: select_topk_blocks(sc, q.shape[2], k.shape[2], "lower_right",
                                               pol.page, topk=topk, sink_blocks=pol.sink_pages,
                                               local_blocks=pol.local_pages))


def quest_decode_kept(q, k, v) -> dict:
    """A quest decode step with the page summaries kept with the cache (the cache's keys made
    by ``sparse.append``): the bounds read the summaries instead of K, and the step adds the
    cost of extending them by one token (``runtime.page_summaries.extend``; the append's copy
    itself is the cache's, which every policy and dense attention pay alike)."""
    from runtime import page_summaries as ps
    page = planner.policy("quest").page
    n = k.shape[2]
    past = torch.ops.sparse.append(k[:, :, :0], k[:, :, :n - 1], page)
    kept = ps._find(past, page)
    keys = torch.ops.sparse.append(past, k[:, :, n - 1:], page)     # summaries for all n keys
    assert ps.lookup(keys, page) is not None

    def extend():
        ps._STATE.put(past, kept)
        ps.extend(past, keys, page)
    r = run_case("quest", q, keys, v, "lower_right", rows_check=1)
    r["extend_ms"] = bench_ms(extend)
    r["estimator_ms"] += r["extend_ms"]
    r["total_ms"] += r["extend_ms"]
    return r


def run_case(name, q, k, v, causal, rows_check=256):
    pol = planner.policy(name)
    spec = SiteSpec(site=f"bench.{name}", owner="bench", policy=pol, scale=q.shape[-1] ** -0.5,
                    causal=causal, gqa_group=q.shape[1] // k.shape[1])
    key = register(spec)
    ops = torch.ops.sparse
    sc = ops.score(q, k, [], key)
    counts, idx = ops.select(sc, q, k, key)
    out = ops.attend(q, k, v, [], counts, idx, key)
    torch.cuda.synchronize()
    err = check_rows(q, k, v, out, counts, idx, spec, min(rows_check, q.shape[2]))
    n_q, n_kv = q.shape[2], k.shape[2]
    if name in ("sink_window", "longformer"):
        sink, window = (pol.sink, pol.window) if name == "sink_window" else (pol.global_tokens,
                                                                          pol.window)
        density = window_density(n_q, n_kv, sink, window)
    else:
        kept, allowed = _pairs_kept(counts, idx, estimators.block_of(spec), n_q, n_kv, True)
        density = float(kept.sum() / allowed.sum())
    same = same_as_reference(name, q, k, spec, counts, idx) if name in DYNAMIC else None
    t_score = bench_ms(lambda: ops.score(q, k, [], key)) if estimators.get(name).score else 0.0
    t_sel = bench_ms(lambda: ops.select(sc, q, k, key))
    t_att = bench_ms(lambda: ops.attend(q, k, v, [], counts, idx, key))
    row = dict(policy=name, params=pol.short(), density=density, rel_err=err, same_lists=same,
               estimator_ms=t_score, selection_ms=t_sel, attend_ms=t_att,
               total_ms=t_score + t_sel + t_att)
    if name in DYNAMIC:     # the same calls replayed from a CUDA graph: GPU time, no launches
        try:
            row.update(estimator_graph_ms=common.graph_ms(lambda: ops.score(q, k, [], key)),
                       selection_graph_ms=common.graph_ms(lambda: ops.select(sc, q, k, key)),
                       attend_graph_ms=common.graph_ms(
                           lambda: ops.attend(q, k, v, [], counts, idx, key)))
        except Exception as e:                  # a path that cannot be captured is reported
            row["graph_error"] = f"{type(e).__name__}: {e}"[:200]
    return row


def _graph_cells(r) -> str:
    if "estimator_graph_ms" not in r:
        return r.get("graph_error", "") + " | "
    g = (r["estimator_graph_ms"], r["selection_graph_ms"], r["attend_graph_ms"])
    return f"{g[0]:.3f} / {g[1]:.3f} / {g[2]:.3f} | {(g[0] + g[1]) / sum(g):.1%}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--decode-only", action="store_true",
                    help="only the quest decode rows, written to policies_decode_<card>.*")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)
    import triton
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__,
                command="PYTHONPATH=. python benchmarks/policies.py" + (" --quick" if args.quick else ""),
                date=time.strftime("%Y-%m-%d"), dtype="bfloat16", B=1, H=16, D=128)
    rows = []
    lengths = [] if args.decode_only else [16384] if args.quick else [16384, 65536]
    torch.manual_seed(0)
    for N in lengths:
        q, k, v = (torch.randn(1, 16, N, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        t_dense = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        rows.append(dict(case="prefill", N=N, policy="dense SDPA", total_ms=t_dense, density=1.0))
        print(f"N={N} dense SDPA {t_dense:.3f} ms", flush=True)
        for name in POLICIES:
            try:
                r = run_case(name, q, k, v, "lower_right")
            except Exception as e:      # a policy that fails is reported, the run goes on
                r = dict(policy=name, error=f"{type(e).__name__}: {e}"[:300])
            r.update(case="prefill", N=N, dense_ms=t_dense)
            rows.append(r)
            print(json.dumps(r), flush=True)
            torch.cuda.empty_cache()
        del q, k, v
    # quest at decode time: one query per sequence over an N-token cache
    for N in ([32768] if args.quick else [32768, 131072]):
        B = 8
        q = torch.randn(B, 16, 1, 128, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(B, 16, N, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
        t_dense = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        try:
            r = run_case("quest", q, k, v, "lower_right", rows_check=1)
            r["selection_torch_ms"] = torch_selection_ms(q, k)
        except Exception as e:
            r = dict(policy="quest", error=f"{type(e).__name__}: {e}"[:300])
        r.update(case="decode B=8", N=N, dense_ms=t_dense)
        rows.append(r)
        print(json.dumps(r), flush=True)
        try:
            r = quest_decode_kept(q, k, v)
        except Exception as e:
            r = dict(policy="quest", error=f"{type(e).__name__}: {e}"[:300])
        r.update(case="decode B=8, summaries kept", N=N, dense_ms=t_dense)
        rows.append(r)
        print(json.dumps(r), flush=True)
    tag = "h100" if "H100" in card else ("h200" if "H200" in card else "gpu")
    if args.decode_only:
        tag = "decode_" + tag
        meta["command"] += " --decode-only"
    with open(os.path.join(args.out, f"policies_{tag}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# Policy costs on {card}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}, bf16, B=1, H=16, "
             f"D=128, causal. Command: `{meta['command']}`.", "",
             "`same lists`: fraction of (head, query block) lists identical to those of the "
             "PyTorch estimator and selection on the same input.", "",
             "`graph`: the estimator, selection and attend calls replayed from CUDA graphs (the "
             "GPU's time without the host's launches), the share of estimator + selection in "
             "their sum.", "",
             "| case | N | policy | density | est. ms | select ms | attend ms | total ms | "
             "(est+sel)/total | vs dense SDPA | rel err | same lists | graph est / sel / attend "
             "ms | graph (est+sel)/total |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("policy") == "dense SDPA":
            lines.append(f"| {r['case']} | {r['N']} | dense SDPA | 1 | | | | {r['total_ms']:.3f} | | 1.00x | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {r['case']} | {r['N']} | {r['policy']} | | | | | | | | {r['error']} | | | |")
            continue
        share = (r["estimator_ms"] + r["selection_ms"]) / r["total_ms"]
        lines.append(f"| {r['case']} | {r['N']} | {r['policy']} | {r['density']:.3f} | "
                     f"{r['estimator_ms']:.3f} | {r['selection_ms']:.3f} | {r['attend_ms']:.3f} | "
                     f"{r['total_ms']:.3f} | {share:.1%} | {r['dense_ms'] / r['total_ms']:.2f}x | "
                     f"{r['rel_err']:.1e} | "
                     f"{'' if r.get('same_lists') is None else format(r['same_lists'], '.4f')} | "
                     + _graph_cells(r) + " |")
    torch_sel = [r for r in rows if "selection_torch_ms" in r]
    if torch_sel:
        lines += ["", "Quest decode selection, same bounds, same run: "
                  + "; ".join(f"N={r['N']}: selection program {r['selection_ms']:.3f} ms vs the "
                              f"PyTorch path (select_topk_blocks) {r['selection_torch_ms']:.3f} ms"
                              for r in torch_sel) + "."]
    kept = [r for r in rows if "extend_ms" in r]
    if kept:
        lines += ["", "`summaries kept`: the cache's keys made by `sparse.append`, so quest's page "
                  "summaries are extended by the new token instead of recomputed from all of K; "
                  "est. ms includes that extension (" + "; ".join(
                      f"N={r['N']}: {r['extend_ms']:.3f} ms" for r in kept) + ")."]
    with open(os.path.join(args.out, f"policies_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
