"""DeepSeek-V3.2's own sparse attention per layer, three ways, at DeepSeek-V3.2's shapes (hidden
7168, 128 heads, q_lora 1536, kv_lora 512, rope 64, nope 128, v 128, indexer 64 x 128, top-2048;
random bf16 weights of ``DeepseekV32Attention`` layers from transformers):

(a) ``hf``      the Hugging Face layer as it is (SDPA: dense ``[B, S, H_I, T]`` fp32 index scores,
                ``topk``, the indices scattered into a ``[B, 1, S, T]`` mask, masked attention
                over per-head K/V), where it fits;
(b) ``dense``   the same projections, then dense causal SDPA over the decompressed per-head
                K/V (no sparsity: the FlashAttention-class baseline);
(c) ``planner`` the planner's native DSA path on the same weights: the fused indexer + top-k
                (``runtime.kernels.indexer``, no ``[S, T]`` tensor) and token-sparse MLA in the
                absorbed form (``runtime.kernels.sparse_mla``: 128 heads over one 576-wide
                latent row per selected key, W_UV applied after), with the split
                ``proj`` / ``indexer+topk`` / ``attention``;

per N: median time and peak memory of one layer (``--layers`` distinct layers, the mean). A
decode step (one new token over a cached context of 32k / 128k, batch 1 and 8): the planner's
(indexer over the cached indexer keys, top-k, sparse MLA over the latent cache) against dense
MLA decode over the whole latent cache (absorbed, SDPA), with and without CUDA graphs. And the
sparse MLA attention's TFLOP/s: ``2 * H * (576 + 512)`` per selected (query, key) pair, counting
only listed keys (FlashMLA reports 640 TFLOP/s sparse prefill on H800: the public bar).

Before timing, at the smallest N, (c)'s output and selected sets are compared with (a)'s
(relative error; recall of (a)'s sets; ties at equal scores may differ), and the FP8 indexer
option's sets with the bf16 ones (recall).

Usage (about 8 minutes on an H100; cells left when ``--budget-s`` is spent are recorded as
skipped)::

    PYTHONPATH=. python benchmarks/dsa_native.py --out benchmarks/results
    PYTHONPATH=. python benchmarks/dsa_native.py --device cpu --tiny --out /tmp/x    # smoke

writes ``DIR/dsa_native_h100.{json,md}`` (``dsa_native_<card>``; ``--tiny``: ``dsa_native_tiny``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

# the repository root, not this folder, on the path (benchmarks/kernels.py would shadow the
# ``kernels`` package that transformers imports)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path
                                           if os.path.abspath(p or ".") != _HERE]

from benchmarks import common  # noqa: E402

FULL = dict(hidden_size=7168, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
            kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
            index_n_heads=64, index_head_dim=128, index_topk=2048)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
            kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=12, v_head_dim=8,
            index_n_heads=16, index_head_dim=8, index_topk=8)

ROWS: list = []
T0 = time.perf_counter()


def rec(**row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)


class Ctx:
    """Device, dtype, budget and timing of one run."""

    def __init__(self, args):
        self.dev = args.device
        self.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        self.budget = args.budget_s
        self.dry = args.device == "cpu"

    def left(self) -> float:
        return self.budget - (time.perf_counter() - T0)

    def sync(self):
        if self.dev == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn, reps: int = 5) -> float:
        return common.events_ms(fn, reps=reps, dry_run=self.dry)

    def peak_gb(self, fn) -> float | None:
        """Peak memory of ``fn`` above what was allocated before it (GB); None on the CPU."""
        if self.dev != "cuda":
            fn()
            return None
        self.sync()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - base) / 1e9

    def free_gb(self) -> float:
        if self.dev != "cuda":
            return float("inf")
        free, _ = torch.cuda.mem_get_info()
        return free / 1e9


# ----------------------------------------------------------------------------- the layer

def build_layers(cfg_kw: dict, n: int, ctx: Ctx):
    import transformers as T
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import (
        DeepseekV32Attention, DeepseekV32RotaryEmbedding)
    cfg = T.DeepseekV32Config(**cfg_kw, num_hidden_layers=n, vocab_size=128,
                              intermediate_size=256, moe_intermediate_size=64, n_routed_experts=4,
                              num_experts_per_tok=2, n_group=1, topk_group=1,
                              max_position_embeddings=262144, attn_implementation="sdpa")
    torch.manual_seed(0)
    layers = []
    for i in range(n):
        m = DeepseekV32Attention(cfg, i).to(ctx.dev, ctx.dtype).eval()
        for p in m.parameters():                # random weights at a trained model's scale
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
        layers.append(m)
    rope = DeepseekV32RotaryEmbedding(cfg).to(ctx.dev)
    return cfg, layers, rope


def inputs(cfg, rope, B: int, N: int, ctx: Ctx, seed: int = 0):
    g = torch.Generator(device=ctx.dev).manual_seed(seed)
    x = torch.randn(B, N, cfg.hidden_size, device=ctx.dev, dtype=ctx.dtype, generator=g)
    pos = torch.arange(N, device=ctx.dev)[None].expand(B, -1)
    return x, rope(x, pos)


def causal_mask(B: int, N: int, ctx: Ctx):
    """The bool ``[B, 1, N, N]`` mask HF's SDPA path builds (True = visible)."""
    m = torch.ones(N, N, device=ctx.dev, dtype=torch.bool).tril()
    return m[None, None].expand(B, 1, N, N)


def projections(m, x, pe):
    """The layer's queries, latent and indexer inputs, as its forward computes them:
    (q_nope [B,S,H,nope], q_rope [B,S,H,dr], c [B,T,r], k_rope [B,T,dr], q_I [B,S,H_I,d_I],
    k_I [B,T,d_I], w [B,S,H_I] fp32)."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import (
        apply_rotary_pos_emb, apply_rotary_pos_emb_interleave)
    B, S, _ = x.shape
    cos, sin = pe
    q_resid = m.q_a_layernorm(m.q_a_proj(x))
    q = m.q_b_proj(q_resid).view(B, S, -1, m.qk_head_dim).transpose(1, 2)
    q_nope, q_rope = torch.split(q, [m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
    ckv = m.kv_a_proj_with_mqa(x)
    c, k_rope = torch.split(ckv, [m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
    c = m.kv_a_layernorm(c)
    k_rope = k_rope.view(B, 1, S, m.qk_rope_head_dim)
    q_rope, k_rope = apply_rotary_pos_emb_interleave(q_rope, k_rope, cos, sin)
    ix = m.indexer
    qi = ix.wq_b(q_resid).view(B, S, ix.n_heads, ix.head_dim)
    q_rot, q_pass = torch.split(qi, [ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], -1)
    ki = ix.k_norm(ix.wk(x)).unsqueeze(2)
    k_rot, k_pass = torch.split(ki, [ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], -1)
    q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    qi = torch.cat([q_rot, q_pass], -1)
    ki = torch.cat([k_rot, k_pass], -1).squeeze(2)
    w = ix.weights_proj(x).float() * ix.n_heads ** -0.5
    return (q_nope.transpose(1, 2), q_rope.transpose(1, 2), c, k_rope[:, 0], qi, ki, w)


def weights_uk_uv(m):
    from codegen.mla.reference import split_kv_b
    return split_kv_b(m.kv_b_proj.weight, m.num_heads, m.qk_nope_head_dim, m.v_head_dim)


def planner_select(m, qi, ki, w, topk: int):
    from runtime.kernels.indexer import indexer_topk
    return indexer_topk(qi, w * m.indexer.softmax_scale, ki, topk, causal=True)


def planner_attend(m, q_nope, q_rope, c, k_rope, idx, w_uk, w_uv):
    """Absorbed MLA over the selected latent rows, then W_UV and o_proj: [B, S, hidden]."""
    from runtime.kernels.sparse_mla import sparse_mla
    q_abs = torch.cat([torch.einsum("bshn,hnr->bshr", q_nope, w_uk), q_rope], -1)
    kv = torch.cat([c, k_rope], -1)                                        # [B, T, 576]
    o_lat, _ = sparse_mla(q_abs, kv, idx, scale=m.scaling, dv=c.shape[-1])
    o = torch.einsum("bshr,hvr->bshv", o_lat, w_uv)
    return m.o_proj(o.reshape(*o.shape[:2], -1))


def planner_layer(m, x, pe, topk, w_uk, w_uv):
    q_nope, q_rope, c, k_rope, qi, ki, w = projections(m, x, pe)
    idx = planner_select(m, qi, ki, w, topk)
    return planner_attend(m, q_nope, q_rope, c, k_rope, idx, w_uk, w_uv), idx


def dense_layer(m, x, pe):
    """(b): the layer's projections, per-head K/V decompressed, dense causal SDPA, o_proj."""
    q_nope, q_rope, c, k_rope, *_ = projections(m, x, pe)
    B, S = x.shape[:2]
    kv = m.kv_b_proj(c).view(B, S, m.num_heads, -1)
    k_nope, v = torch.split(kv, [m.qk_nope_head_dim, m.v_head_dim], -1)
    k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, m.num_heads, -1)], -1)
    q = torch.cat([q_nope, q_rope], -1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, scale=m.scaling)
    return m.o_proj(o.transpose(1, 2).reshape(B, S, -1))


def hf_layer(m, x, pe, mask):
    out, _ = m(x, pe, mask)
    return out


def hf_fits(cfg, B, N, ctx) -> tuple[bool, float]:
    """Whether (a) should fit: its index scores (fp32, twice: scores and ReLU) and the [B,1,N,N]
    masks (GB)."""
    need = (2 * 4 * B * N * cfg.index_n_heads * N + 3 * B * N * N) / 1e9
    return need < 0.85 * ctx.free_gb(), need


# ----------------------------------------------------------------------------- runs

def check(cfg, layers, rope, ctx, N, topk):
    """(c) against (a) at one N: output relative error and recall of (a)'s selected sets."""
    m = layers[0]
    x, pe = inputs(cfg, rope, 1, N, ctx, seed=1)
    got = {}
    h = m.indexer.register_forward_hook(lambda mod, a, out: got.setdefault("idx", out))
    with torch.no_grad():
        ref = hf_layer(m, x, pe, causal_mask(1, N, ctx))
        h.remove()
        out, idx = planner_layer(m, x, pe, topk, *weights_uk_uv(m))
        # the FP8 option (NativeDSA.fp8): q_I, k_I rounded to e4m3 with one scale per row
        from runtime.native_dsa import fp8_rows
        _, _, _, _, qi, ki, w = projections(m, x, pe)
        idx8 = planner_select(m, fp8_rows(qi), fp8_rows(ki), w, topk)
    rec(case="check", N=N, rel_err=common.rel_err(out, ref),
        recall=recall(got["idx"][0], idx[0], N), fp8_recall=recall(idx[0], idx8[0], N))


def recall(ref, got, N: int) -> float:
    """Share of ``ref``'s visible selected keys ([N, K] lists, causal) that ``got`` keeps."""
    vis = torch.ones(N, N, device=ref.device, dtype=torch.bool).tril()
    ref = ref.long()
    r_ok = vis.gather(1, ref.clamp(min=0)) & (ref >= 0)
    mine = torch.zeros(N, N + 1, device=ref.device, dtype=torch.bool)   # column N: no key
    mine.scatter_(1, torch.where(got >= 0, got.long(), N), True)
    return (mine.gather(1, ref.clamp(min=0)) & r_ok).sum().item() / max(r_ok.sum().item(), 1)


def prefill(cfg, layers, rope, ctx, N, topk, impl):
    B = 1
    x, pe = inputs(cfg, rope, B, N, ctx)
    row = dict(case="prefill", impl=impl, N=N, B=B, layers=len(layers))
    if impl == "hf":
        fits, need = hf_fits(cfg, B, N, ctx)
        if not fits:
            rec(**row, skipped=f"does not fit: index scores and masks need ~{need:.0f} GB")
            return
        mask = causal_mask(B, N, ctx)
        fns = [lambda m=m: hf_layer(m, x, pe, mask) for m in layers]
    elif impl == "dense":
        fns = [lambda m=m: dense_layer(m, x, pe) for m in layers]
    else:
        uv = [weights_uk_uv(m) for m in layers]
        fns = [lambda m=m, u=u: planner_layer(m, x, pe, topk, *u) for m, u in zip(layers, uv)]
    reps = 1 if N >= 65536 else 3
    with torch.no_grad():
        try:
            peak = ctx.peak_gb(fns[0])
            ms = sum(ctx.time_ms(f, reps) for f in fns) / len(fns)
        except torch.OutOfMemoryError as e:
            rec(**row, error=f"OOM: {str(e)[:120]}")
            return
        row.update(ms=ms, peak_gb=peak)
        if impl == "planner":
            row.update(split(cfg, layers[0], x, pe, topk, ctx, reps))
    rec(**row)


def split(cfg, m, x, pe, topk, ctx, reps) -> dict:
    """(c)'s parts: projections, indexer + top-k (fused), attention (absorbed sparse MLA with
    W_UK / W_UV and o_proj), and the sparse MLA kernel alone with its TFLOP/s."""
    from runtime.kernels.sparse_mla import flops, sparse_mla
    w_uk, w_uv = weights_uk_uv(m)
    proj = projections(m, x, pe)
    q_nope, q_rope, c, k_rope, qi, ki, w = proj
    idx = planner_select(m, qi, ki, w, topk)
    q_abs = torch.cat([torch.einsum("bshn,hnr->bshr", q_nope, w_uk), q_rope], -1)
    kv = torch.cat([c, k_rope], -1)
    t_proj = ctx.time_ms(lambda: projections(m, x, pe), reps)
    t_sel = ctx.time_ms(lambda: planner_select(m, qi, ki, w, topk), reps)
    t_att = ctx.time_ms(lambda: planner_attend(m, q_nope, q_rope, c, k_rope, idx, w_uk, w_uv),
                        reps)
    t_mla = ctx.time_ms(lambda: sparse_mla(q_abs, kv, idx, scale=m.scaling, dv=c.shape[-1]),
                        reps)
    pairs = (idx >= 0).sum().item()
    fl = flops(1, 1, m.num_heads, 1, kv.shape[-1], c.shape[-1]) * pairs
    return dict(proj_ms=t_proj, indexer_topk_ms=t_sel, attention_ms=t_att, sparse_mla_ms=t_mla,
                sparse_mla_tflops=fl / (t_mla * 1e-3) / 1e12,
                sparse_mla_tflops_all_k=flops(*idx.shape[:2], m.num_heads, idx.shape[2],
                                              kv.shape[-1], c.shape[-1]) / (t_mla * 1e-3) / 1e12)


def decode(cfg, layers, rope, ctx, T, B, topk):
    """One new token over a cached context of T: planner vs dense absorbed MLA decode."""
    from runtime.kernels.indexer import indexer_topk
    from runtime.kernels.sparse_mla import sparse_mla
    m = layers[0]
    g = torch.Generator(device=ctx.dev).manual_seed(2)
    H, r, dr = m.num_heads, m.kv_lora_rank, m.qk_rope_head_dim
    ix = m.indexer

    def rnd(*shape):
        return torch.randn(*shape, device=ctx.dev, dtype=ctx.dtype, generator=g)
    need = B * T * (r + dr + ix.head_dim) * 2 / 1e9
    if need > 0.7 * ctx.free_gb():
        rec(case="decode", T=T, B=B, skipped=f"cache needs ~{need:.0f} GB")
        return
    kv = rnd(B, T, r + dr)                                 # latent cache [c, k_rope]
    ki = rnd(B, T, ix.head_dim)                            # indexer key cache
    q_abs = rnd(B, 1, H, r + dr)
    qi = rnd(B, 1, ix.n_heads, ix.head_dim)
    w = torch.rand(B, 1, ix.n_heads, device=ctx.dev, generator=g) * ix.softmax_scale

    def planner_step():
        idx = indexer_topk(qi, w, ki, topk, causal=True)
        return sparse_mla(q_abs, kv, idx, scale=m.scaling, dv=r)[0]

    def dense_step():
        # dense MLA decode over the whole latent cache, absorbed: every head reads every row
        # (two matrix products; SDPA's fused kernels take no 576-wide heads)
        s = torch.matmul(q_abs[:, 0], kv.transpose(1, 2)).float() * m.scaling   # [B, H, T]
        p = torch.softmax(s, dim=-1).to(kv.dtype)
        return torch.matmul(p, kv[..., :r])                                     # [B, H, r]
    with torch.no_grad():
        for impl, fn in (("planner", planner_step), ("dense", dense_step)):
            row = dict(case="decode", impl=impl, T=T, B=B)
            try:
                row["ms"] = ctx.time_ms(fn, 20)
            except Exception as e:                                         # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:150]}"
            if ctx.dev == "cuda" and "ms" in row:
                try:
                    row["graph_ms"] = common.graph_ms(fn)
                except Exception as e:                                     # noqa: BLE001
                    row["graph_error"] = f"{type(e).__name__}: {str(e)[:150]}"
                row["kernels"] = _top_kernels(fn)
            rec(**row)


def _top_kernels(fn, steps: int = 10, top: int = 5) -> list:
    """The device kernels of ``steps`` calls under ``torch.profiler``: (name, us per call)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return [(k[:60], round(ms * 1e3, 1)) for k, ms, _ in common.device_kernels(prof, steps)[:top]]


# ----------------------------------------------------------------------------- report

def markdown(meta) -> str:
    out = [f"# DeepSeek-V3.2 native DSA per layer ({meta['device']})", "",
           f"torch {meta['torch']}, triton {meta['triton']}, transformers "
           f"{meta['transformers']}; `{meta['command']}`", "",
           "## Prefill, one layer (B=1, bf16; ms, peak GB above the inputs)", "",
           "| N | impl | ms | peak GB | proj | indexer+top-k | attention | sparse MLA ms | "
           "TFLOP/s (listed keys) | note |", "|" + "---|" * 10]
    for r in ROWS:
        if r.get("case") != "prefill":
            continue
        f = (lambda k: f"{r[k]:.2f}" if isinstance(r.get(k), float) else "")
        out.append(f"| {r['N']} | {r['impl']} | {f('ms')} | {f('peak_gb')} | {f('proj_ms')} | "
                   f"{f('indexer_topk_ms')} | {f('attention_ms')} | {f('sparse_mla_ms')} | "
                   f"{f('sparse_mla_tflops')} | {r.get('skipped', r.get('error', ''))} |")
    out += ["", "## Decode step (one token, ms; CUDA graph replay ms)", "",
            "| context | B | impl | ms | graph ms | kernels (us per step, most first) | note |",
            "|---|---|---|---|---|---|---|"]
    for r in ROWS:
        if r.get("case") == "decode":
            f = (lambda k: f"{r[k]:.3f}" if isinstance(r.get(k), float) else "")
            out.append(f"| {r['T']} | {r['B']} | {r.get('impl', '')} | {f('ms')} | "
                       f"{f('graph_ms')} | "
                       f"{', '.join(f'`{k}` {us}' for k, us in r.get('kernels', [])[:4])} | "
                       f"{r.get('skipped', r.get('error', r.get('graph_error', '')))} |")
    checks = [r for r in ROWS if r.get("case") == "check"]
    if checks:
        out += ["", "## (c) against (a)", ""]
        out += [f"- N={r['N']}: output relative error {r['rel_err']:.2e}, recall of the model's "
                f"selected sets {r['recall']:.4f}; FP8 indexer (e4m3, per-row scales): recall "
                f"of the bf16 sets {r['fp8_recall']:.4f}" if "rel_err" in r else
                f"- N={r['N']}: {r.get('error', '')}" for r in checks]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for dsa_native_<card>.{json,md}")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny config (the smoke path)")
    ap.add_argument("--lengths", default="8192,32768,65536,131072")
    ap.add_argument("--decode", default="32768,131072", help="decode context lengths")
    ap.add_argument("--batches", default="1,8", help="decode batch sizes")
    ap.add_argument("--layers", type=int, default=2, help="distinct random layers timed")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="cells started after this many seconds are recorded as skipped")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/dsa_native.py: no CUDA device (use --device cpu --tiny)")
    if args.device == "cpu":           # the kernels through Triton's interpreter (fp32)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("SPARSE_PLANNER_KERNELS", "triton")
    cfg_kw = TINY if args.tiny else FULL
    if args.tiny:
        args.lengths, args.decode = "40,96", "64"
    ctx = Ctx(args)
    import transformers
    import triton
    card = torch.cuda.get_device_name() if ctx.dev == "cuda" else "cpu"
    name = ("dsa_native_tiny" if args.tiny else
            "dsa_native_" + ("h200" if "H200" in card else "h100" if "H100" in card else "gpu"))
    meta = dict(device=card, torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, host=platform.node(), config=cfg_kw,
                command="PYTHONPATH=. python benchmarks/dsa_native.py " + " ".join(sys.argv[1:]))
    print(json.dumps(meta), flush=True)
    cfg, layers, rope = build_layers(cfg_kw, args.layers, ctx)
    topk = cfg.index_topk
    lengths = [int(n) for n in args.lengths.split(",") if n]
    try:
        check(cfg, layers, rope, ctx, lengths[0], topk)
    except Exception as e:                                                 # noqa: BLE001
        traceback.print_exc()
        rec(case="check", N=lengths[0], error=f"{type(e).__name__}: {str(e)[:200]}")
    def cell(run, **key):
        """One cell: skipped past the time budget, its error recorded if it fails."""
        if ctx.left() <= 0:
            rec(**key, skipped="out of --budget-s")
            return
        try:
            run()
        except Exception as e:                                             # noqa: BLE001
            traceback.print_exc()
            rec(**key, error=f"{type(e).__name__}: {str(e)[:200]}")
        if ctx.dev == "cuda":
            torch.cuda.empty_cache()
    for n in lengths:
        for impl in ("planner", "dense", "hf"):
            cell(lambda: prefill(cfg, layers, rope, ctx, n, topk, impl),
                 case="prefill", impl=impl, N=n)
    for t in [int(x) for x in args.decode.split(",") if x]:
        for b in [int(x) for x in args.batches.split(",") if x]:
            cell(lambda: decode(cfg, layers, rope, ctx, t, b, topk), case="decode", T=t, B=b)
    meta["seconds"] = time.perf_counter() - T0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.json"), "w") as fh:
        json.dump({"meta": meta, "rows": ROWS}, fh, indent=1, default=str)
    with open(os.path.join(args.out, f"{name}.md"), "w") as fh:
        fh.write(markdown(meta))
    print(markdown(meta))


if __name__ == "__main__":
    main()
