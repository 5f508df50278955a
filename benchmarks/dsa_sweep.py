"""Schedule sweep of the native-DSA kernels on one GPU, at DeepSeek-V3.2's sizes (128 heads over
576-wide latent rows, values 512 wide, top-2048; index 64 heads x 128): which tiling is fastest.

    PYTHONPATH=. python benchmarks/dsa_sweep.py --out DIR [--budget-s 240]
    PYTHONPATH=. python benchmarks/dsa_sweep.py --out DIR --smoke     # CPU interpreter, tiny

Sections, each config checked against the first config's output (sparse MLA: also against the
PyTorch reference on a few rows) and timed with CUDA events (median):
1. ``mla_prefill``: ``sparse_mla`` with S query rows over a T-row latent cache, each row listing
   K distinct random keys, under each ``MLASchedule`` of ``MLA_PREFILL``; TFLOP/s over listed
   pairs (``2 (Dk + dv)`` per head and pair).
2. ``mla_decode``: one query row per sequence (B of them) over T rows: list parts (``splits``).
3. ``indexer_prefill``: ``indexer_topk`` causal N x N under each ``IndexerSchedule`` of
   ``INDEXER_PREFILL``; agreement = share of the first schedule's selected keys also selected.
4. ``few_rows``: decode's index keys (B rows over T keys): tensor-core product vs the loop over
   heads (``indexer_rows.FEW_ROWS_MMA_HEADS``), and the whole decode ``indexer_topk``.

Writes ``dsa_sweep_<card>.{json,md}`` (``--round 2``: ``dsa_sweep_<card>_round2``) to ``--out``. A config that fails (out of shared memory,
say) is recorded with its error; configs started past ``--budget-s`` are recorded as skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

ROWS: list = []
T0 = time.perf_counter()

# (block_h, block_n, num_warps, num_stages): the current default first
MLA_PREFILL = [(32, 32, 8, 1), (32, 32, 8, 2), (32, 32, 8, 3), (32, 64, 8, 2), (32, 32, 4, 2),
               (64, 32, 8, 2), (64, 32, 16, 2), (64, 64, 16, 2), (64, 32, 16, 3), (64, 32, 8, 1),
               (64, 64, 8, 2), (128, 32, 16, 2), (128, 32, 16, 1), (16, 64, 4, 3), (32, 64, 8, 3),
               (64, 16, 8, 3), (32, 16, 4, 3)]
MLA_DECODE = [(32, 32, 8, 1, 0), (32, 32, 8, 1, 1), (32, 32, 8, 2, 0), (64, 32, 16, 2, 0),
              (32, 32, 8, 1, 4), (32, 32, 8, 1, 8), (32, 32, 8, 1, 16), (16, 64, 4, 2, 0)]
# (block_m, block_n, num_warps, num_stages, head_group): queries streamed (many wide heads)
INDEXER_PREFILL = [(16, 64, 4, 1, 1), (16, 64, 4, 1, 4), (16, 128, 4, 1, 4), (16, 64, 8, 1, 8),
                   (32, 64, 4, 1, 2), (32, 128, 8, 1, 4), (64, 64, 4, 1, 1), (64, 128, 8, 1, 2),
                   (16, 64, 4, 2, 4), (32, 64, 8, 2, 2), (64, 64, 8, 2, 1), (16, 128, 8, 1, 8),
                   (128, 64, 8, 1, 1)]


# round 2: around round 1's winners on an H200 (h64-n64-w8-s2: 232 TFLOP/s; m64-n64-w4-s1-g1)
MLA_PREFILL_2 = [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 3), (64, 64, 8, 1), (64, 128, 8, 1),
                 (32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 4, 2), (64, 64, 4, 2)]
INDEXER_PREFILL_2 = [(64, 64, 4, 1, 1), (64, 128, 4, 1, 1), (64, 64, 4, 2, 1), (64, 32, 4, 1, 1),
                     (128, 64, 4, 1, 1), (64, 128, 8, 1, 1), (32, 64, 4, 1, 1),
                     (128, 128, 8, 1, 1), (64, 64, 4, 3, 1)]


def rec(**row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)


class Run:
    def __init__(self, args):
        self.smoke = args.smoke
        self.dev = "cpu" if args.smoke else "cuda"
        self.dtype = torch.float32 if args.smoke else torch.bfloat16
        self.budget = args.budget_s
        self.g = torch.Generator(device=self.dev).manual_seed(0)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - T0)

    def ms(self, fn, reps: int = 5) -> float:
        return common.events_ms(fn, reps=reps, warmup=1, dry_run=self.smoke)

    def randn(self, *shape, scale=1.0):
        return torch.randn(*shape, device=self.dev, generator=self.g).mul_(scale).to(self.dtype)

    def distinct(self, rows: int, T: int, K: int) -> torch.Tensor:
        """int32 [rows, K]: K distinct keys of [0, T) per row (random order)."""
        out = torch.empty(rows, K, device=self.dev, dtype=torch.int32)
        for r0 in range(0, rows, 256):
            r1 = min(rows, r0 + 256)
            out[r0:r1] = torch.rand(r1 - r0, T, device=self.dev, generator=self.g).argsort(
                -1)[:, :K].to(torch.int32)
        return out

    def case(self, section: str, tag: str, fn):
        if self.left() <= 0:
            rec(section=section, config=tag, skipped="out of --budget-s")
            return None
        try:
            return fn()
        except Exception as e:                                             # noqa: BLE001
            traceback.print_exc()
            rec(section=section, config=tag, error=f"{type(e).__name__}: {str(e)[:200]}")
            return None
        finally:
            if self.dev == "cuda":
                torch.cuda.empty_cache()


def compiled(jit) -> set:
    """The compiled kernels a Triton ``@jit`` function holds (any device), by identity."""
    out = set()
    for entry in getattr(jit, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) and entry and isinstance(entry[0], dict) \
            else {}
        out.update(id(k) for k in cache.values())
        KEEP.update({id(k): k for k in cache.values()})
    return out


KEEP: dict = {}


def kernel_info(jit, before: set) -> dict:
    """Registers, spills and whether the PTX issues wgmma, of the kernel(s) compiled since
    ``before`` (``compiled(jit)`` taken before the config's first call)."""
    new = [KEEP[i] for i in compiled(jit) - before]
    if not new:
        return {}
    k = new[-1]
    ptx = getattr(k, "asm", {}).get("ptx", "") if hasattr(k, "asm") else ""
    return dict(regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None),
                wgmma="wgmma" in ptx if ptx else None,
                shared_kb=round(getattr(getattr(k, "metadata", None), "shared", 0) / 1024, 1))


def rel(a, b) -> float:
    return common.rel_err(a.float(), b.float())


def mla(run: Run, section: str, B: int, S: int, T: int, configs):
    from codegen.mla.reference import sparse_mla_reference
    from runtime.kernels.sparse_mla import MLASchedule, flops, sparse_mla
    H, dl, dr, K = (128, 512, 64, 2048) if not run.smoke else (32, 16, 8, 24)
    if run.smoke:
        S, T = min(S, 3), min(T, 64)
    q = run.randn(B, S, H, dl + dr)
    kv = run.randn(B, T, dl + dr)
    idx = run.distinct(B * S, T, K).view(B, S, K)
    scale = (128 + 64) ** -0.5
    fl = flops(B, S, H, K, dl + dr, dl)
    n_ref = min(S, 4)
    ref, _ = sparse_mla_reference(q[:, :n_ref].float(), kv.float(), idx[:, :n_ref].long(),
                                  scale=scale, dv=dl)
    first = None
    for cfg in configs:
        bh, bn, nw, st = cfg[:4]
        splits = cfg[4] if len(cfg) > 4 else 0
        tag = f"h{bh}-n{bn}-w{nw}-s{st}" + (f"-parts{splits}" if len(cfg) > 4 else "")

        def go():
            nonlocal first
            sch = MLASchedule(block_h=min(bh, 32) if run.smoke else bh, block_n=bn, num_warps=nw,
                              num_stages=st, splits=splits)
            fn = lambda: sparse_mla(q, kv, idx, scale=scale, dv=dl, schedule=sch)  # noqa: E731
            jit = _mla_jit(q.device)
            before = compiled(jit) if jit is not None else set()
            out = fn()[0]
            try:
                info = kernel_info(jit, before) if jit is not None else {}
            except Exception as e:                                         # noqa: BLE001
                info = dict(info_error=f"{type(e).__name__}: {e}"[:100])
            err_ref = rel(out[:, :n_ref], ref)
            err_first = 0.0 if first is None else rel(out, first)
            if first is None:
                first = out
            ms = run.ms(fn, reps=3 if section == "mla_prefill" else 20)
            rec(section=section, config=tag, B=B, S=S, T=T, H=H, K=K, dk=dl + dr, dv=dl,
                splits=splits, schedule=dataclasses.asdict(sch), ms=ms,
                tflops=fl / (ms * 1e-3) / 1e12, rel_err_ref=err_ref, rel_err_first=err_first,
                **info)
        run.case(section, tag, go)


def _mla_jit(device):
    from codegen.emit import emit
    from codegen.mla.sparse_kernel import SparseMLASpec
    from runtime.cache import KERNELS
    from runtime.kernels.launch import device_key
    from runtime.loader import load
    try:
        return KERNELS.get(("sparse_mla", device_key(device)),
                           lambda: load(emit(SparseMLASpec()))).sparse_mla_fwd
    except Exception:                                                      # noqa: BLE001
        return None


def indexer_prefill(run: Run, N: int, configs):
    from runtime.kernels import indexer as ik
    Hi, d, K = (64, 128, 2048) if not run.smoke else (20, 16, 8)
    N = N if not run.smoke else 48
    qi = run.randn(1, N, Hi, d)
    ki = run.randn(1, N, d)
    w = torch.rand(1, N, Hi, device=run.dev, generator=run.g) * Hi ** -0.5 * d ** -0.5
    pairs = N * (N + 1) / 2
    first = None
    for bm, bn, nw, st, hg in configs:
        tag = f"m{bm}-n{bn}-w{nw}-s{st}-g{hg}"

        def go():
            nonlocal first
            sch = ik.IndexerSchedule(block_m=bm if not run.smoke else 16, block_n=bn,
                                     num_warps=nw, num_stages=st, stream_queries=True,
                                     head_group=hg)
            fn = lambda: ik.indexer_topk(qi, w, ki, K, causal=True, schedule=sch)  # noqa: E731
            sel = fn().long().sort(-1).values
            if first is None:
                first, agree = sel, 1.0
            else:
                agree = _agreement(first, sel, N)
            ms = run.ms(fn, reps=3)
            rec(section="indexer_prefill", config=tag, N=N, H_I=Hi, d_I=d, K=K,
                schedule=dataclasses.asdict(sch), ms=ms,
                score_tflops=2 * Hi * d * pairs / (ms * 1e-3) / 1e12, agreement=agree)
        run.case("indexer_prefill", tag, go)


def _agreement(a: torch.Tensor, b: torch.Tensor, n: int) -> float:
    """Share of ``a``'s selected keys (>= 0) that ``b`` selects too (rows as sets)."""
    ka = torch.zeros(a.shape[0], a.shape[1], n + 1, dtype=torch.bool, device=a.device)
    kb = torch.zeros_like(ka)
    ka.scatter_(-1, a.clamp(min=-1) % (n + 1), True)
    kb.scatter_(-1, b.clamp(min=-1) % (n + 1), True)
    ka[..., n] = False
    kb[..., n] = False
    return float((ka & kb).sum() / ka.sum().clamp(min=1))


def few_rows(run: Run, B: int, T: int):
    from runtime.kernels import indexer as ik
    from runtime.kernels import indexer_rows as ir
    Hi, d, K = (64, 128, 2048) if not run.smoke else (20, 16, 8)
    T = T if not run.smoke else 80
    qi = run.randn(B, 1, Hi, d)
    ki = run.randn(B, T, d)
    w = torch.rand(B, 1, Hi, device=run.dev, generator=run.g) * Hi ** -0.5
    saved = ir.FEW_ROWS_MMA_HEADS
    keys = {}
    try:
        for tag, th in (("mma", 16), ("loop", 10 ** 9)):
            def go():
                ir.FEW_ROWS_MMA_HEADS = th
                fn = lambda: ir.few_row_keys(qi, w, ki, causal=True)  # noqa: E731
                keys[tag] = fn() >> 32
                ms_keys = run.ms(fn, reps=20)
                ms_all = run.ms(lambda: ik.indexer_topk(qi, w, ki, K, causal=True), reps=20)
                rec(section="few_rows", config=tag, B=B, T=T, H_I=Hi, d_I=d, keys_ms=ms_keys,
                    indexer_topk_ms=ms_all, GB_per_s=ki.numel() * ki.element_size()
                    / (ms_keys * 1e-3) / 1e9)
            run.case("few_rows", tag, go)
    finally:
        ir.FEW_ROWS_MMA_HEADS = saved
    if len(keys) == 2:
        rec(section="few_rows", config="mma vs loop (fp32 score images, ulps)",
            score_key_max_abs_diff=int((keys["mma"] - keys["loop"]).abs().max()))


def markdown(meta) -> str:
    out = [f"# Native-DSA kernel schedules ({meta['device']})", "",
           f"torch {meta['torch']}, triton {meta['triton']}; `{meta['command']}`", ""]
    for section, cols in (("mla_prefill", ("B", "S", "T", "ms", "tflops", "rel_err_ref",
                                           "rel_err_first", "regs", "spills", "wgmma",
                                           "shared_kb")),
                          ("mla_decode", ("B", "T", "ms", "tflops", "rel_err_ref",
                                          "rel_err_first", "regs", "spills", "wgmma")),
                          ("indexer_prefill", ("N", "ms", "score_tflops", "agreement")),
                          ("few_rows", ("B", "T", "keys_ms", "GB_per_s", "indexer_topk_ms",
                                        "score_key_max_abs_diff"))):
        rows = [r for r in ROWS if r.get("section") == section]
        if not rows:
            continue
        out += [f"## {section}", "", "| config | " + " | ".join(cols) + " | note |",
                "|---" * (len(cols) + 2) + "|"]
        for r in rows:
            cells = [_fmt(r.get(c)) for c in cols]
            out.append(f"| {r['config']} | " + " | ".join(cells) + " | "
                       + (r.get("error") or r.get("skipped") or "") + " |")
        out.append("")
    return "\n".join(out) + "\n"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 else f"{v:.2f}"
    return str(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU interpreter")
    ap.add_argument("--sections", default="mla_prefill,mla_decode,few_rows,indexer_prefill")
    ap.add_argument("--round", type=int, default=1, choices=(1, 2),
                    help="config lists: 1 (broad) or 2 (around round 1's winners)")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("SPARSE_PLANNER_KERNELS", "triton")
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/dsa_sweep.py: no CUDA device (--smoke runs on the CPU)")
    import triton
    run = Run(args)
    card = torch.cuda.get_device_name() if not args.smoke else "cpu"
    name = "dsa_sweep_" + ("cpu" if args.smoke else "h200" if "H200" in card else
                           "h100" if "H100" in card else "gpu") + (
        "" if args.round == 1 else f"_round{args.round}")
    meta = dict(device=card, torch=torch.__version__, triton=triton.__version__,
                host=platform.node(),
                command="PYTHONPATH=. python benchmarks/dsa_sweep.py " + " ".join(sys.argv[1:]))
    print(json.dumps(meta), flush=True)
    sections = args.sections.split(",")
    with torch.no_grad():
        if "mla_prefill" in sections:
            mla(run, "mla_prefill", 1, 4096, 65536,
                MLA_PREFILL if args.round == 1 else MLA_PREFILL_2)
        if "mla_decode" in sections:
            mla(run, "mla_decode", 8, 1, 131072, MLA_DECODE)
        if "few_rows" in sections:
            few_rows(run, 8, 131072)
        if "indexer_prefill" in sections:
            indexer_prefill(run, 16384,
                            INDEXER_PREFILL if args.round == 1 else INDEXER_PREFILL_2)
    meta["seconds"] = time.perf_counter() - T0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.json"), "w") as fh:
        json.dump({"meta": meta, "rows": ROWS}, fh, indent=1, default=str)
    md = markdown(meta)
    with open(os.path.join(args.out, f"{name}.md"), "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    main()
