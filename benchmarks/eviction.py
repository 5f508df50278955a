"""KV-cache eviction on a GPU: memory, decode speed and the largest batch that fits.

    PYTHONPATH=. python benchmarks/eviction.py --out $OUT                       # H100, ~8 min
    PYTHONPATH=. python benchmarks/eviction.py --device cpu --tiny --out /tmp/ev  # smoke run

Model: a Llama-3-8B-shaped stack (32 q / 8 kv heads x 128, hidden 4096, MLP 14336, vocab
128256; ``--layers`` of them, 4 by default), random weights, bf16. Per prompt length (32k and
128k) and budget (dense, then 50% / 20% / 10% kept, ``--policy`` snapkv by default):

* the prefill (batch 1) runs through ``planner.compile(model, policy="dense", evict=...)``: the
  rewritten graph scores the keys and hands the compacted K/V to the model's ``DynamicCache``;
* ``--decode-tokens`` (256) greedy tokens are decoded over that cache by the model's own
  attention (after the eviction the cache is an ordinary, smaller ``DynamicCache``; positions
  continue from the prompt's length), each step a forward of one token; ``--timed-tokens``
  of them (all by default) are timed with CUDA events: decode ms per step;
* KV bytes: the cache's K and V tensors after the prefill (all layers); peak memory:
  ``torch.cuda.max_memory_allocated`` over prefill + decode (the prefill's activations set it at
  batch 1) and over the decode alone (weights + cache + one step's activations).

Largest batch at 128k: one prefill per sequence is what a server does (chunked or
disaggregated prefill), so the batch is the compacted cache of one prompt replicated B times
(``--cap-steps`` decode steps must run without running out of memory); B doubles until it
fails, then a bisection; tokens/s = B x steps / time at the largest B. Dense and 10% first,
then 20% and 50% while time is left.

``--budget-s`` (450 by default) bounds the run: a cell that would start after it is skipped
and listed under ``skipped`` in the result. Writes ``eviction_<card>.{json,md}`` into ``--out``
(card: ``h100``, ``h200``, ... from the device name; ``cpu`` for the smoke run).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
# the repository root, not this folder: transformers imports a package named ``kernels``, which
# benchmarks/kernels.py would shadow
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import planner  # noqa: E402
from benchmarks import common  # noqa: E402
from planner.quality.protocol import cache_arg  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=256, rope_theta=10000.0)


def build(tiny: bool, layers: int, max_len: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**(TINY if tiny else LLAMA3_8B), num_hidden_layers=layers,
                      max_position_embeddings=max_len + 1024, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        m = LlamaForCausalLM(cfg)                   # random weights: the model's own init
    return m.to(dtype).eval()


class Clock:
    """Wall-clock time on the CPU, CUDA events on a GPU (milliseconds)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            torch.cuda.synchronize()
            self.ms = self.a.elapsed_time(self.b)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def kv_bytes(cache) -> int:
    return sum(x.keys.numel() * x.keys.element_size() + x.values.numel() * x.values.element_size()
               for x in cache.layers)


def prefill(model, ids, device):
    """(DynamicCache, next token [B, 1], prefill ms)."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config if hasattr(model, "config") else None)
    with torch.no_grad(), Clock(device) as c:
        out = model(input_ids=ids, **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
    return cache, tok, c.ms


def decode(lm, cache, tok, start: int, steps: int, timed: int, device) -> float:
    """Greedy-decode ``steps`` tokens over ``cache`` (positions from ``start``); the mean ms of
    the last ``timed`` steps."""
    b = tok.shape[0]
    ms = 0.0
    with torch.no_grad(), _decode_sdpa():
        for i in range(steps):
            pos = torch.full((b, 1), start + i, device=tok.device, dtype=torch.long)
            with Clock(device) as c:
                out = lm(input_ids=tok, **cache_arg(lm, cache), use_cache=True, position_ids=pos)
                tok = out.logits[:, -1:].argmax(-1)
            if i >= steps - timed:
                ms += c.ms
    return ms / max(1, timed)


def profile_decode(lm, cache, tok, start: int, steps: int, device, top: int = 8) -> dict:
    """``steps`` greedy decode steps under ``torch.profiler``: wall ms per step, the device's
    busy ms per step (the sum of kernel times) and the ops that take the most device time and
    the most host time (ms per step). Where wall >> device busy, a step is host-bound."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof, Clock(device) as c:
        decode(lm, cache, tok, start, steps, steps, device)
    kernels = common.device_kernels(prof, steps)
    by_cpu = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"steps": steps, "wall_ms_per_step": c.ms / steps,
            "device_busy_ms_per_step": sum(ms for _, ms, _ in kernels),
            "top_device": kernels[:top],
            "top_host": [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps)
                         for e in by_cpu]}


#: SDPA backends the decode steps may use (None: PyTorch's choice). On an H100 with torch 2.11
#: PyTorch picks cuDNN attention for these decode calls, which builds a new plan for every new
#: key length: about 16 ms of host time per call, 64 ms a step for 4 layers whatever the cache
#: size (``--decode-sdpa default`` shows it); the rows exclude cuDNN for dense and evicted alike.
DECODE_BACKENDS = None


def _decode_sdpa():
    import contextlib
    if DECODE_BACKENDS is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel
    return sdpa_kernel(DECODE_BACKENDS)


def replicate(cache, batch: int):
    """A ``DynamicCache`` holding ``batch`` copies of a batch-1 cache (new memory)."""
    from transformers import DynamicCache
    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.expand(batch, -1, -1, -1).contiguous(),
                   layer.values.expand(batch, -1, -1, -1).contiguous(), i)
    return out


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _oom_types():
    types = [torch.OutOfMemoryError] if hasattr(torch, "OutOfMemoryError") else []
    if torch.cuda.is_available():
        types.append(torch.cuda.OutOfMemoryError)
    return tuple(types) or (MemoryError,)


def largest_batch(lm, cache, start: int, steps: int, device, deadline: float,
                  cpu_cap_bytes: int, max_batch: int, log) -> dict:
    """Largest B whose replicated cache decodes ``steps`` tokens, and tokens/s there. On the CPU
    (smoke runs) a batch "fits" while its cache is under ``cpu_cap_bytes``."""
    per_seq = kv_bytes(cache)
    oom = _oom_types()

    def attempt(b: int):
        if device == "cpu" and b * per_seq > cpu_cap_bytes:
            return None
        big = None
        try:
            big = replicate(cache, b)
            tok = torch.zeros(b, 1, dtype=torch.long, device=device)
            decode(lm, big, tok, start, 1, 1, device)                     # warm-up step
            ms = decode(lm, big, tok, start + 1, steps, steps, device)
            return ms
        except oom:
            return None
        finally:
            del big
            _free()

    tries = []
    ok_b, ok_ms, bad = 0, None, None
    b = 1
    while b <= max_batch and time.perf_counter() < deadline:
        ms = attempt(b)
        tries.append((b, ms))
        if ms is None:
            bad = b
            break
        ok_b, ok_ms = b, ms
        b *= 2
    if bad is None and ok_b * 2 > max_batch:
        bad = max_batch + 1
    while bad is not None and bad - ok_b > max(1, ok_b // 32) and time.perf_counter() < deadline:
        mid = (ok_b + bad) // 2
        ms = attempt(mid)
        tries.append((mid, ms))
        if ms is None:
            bad = mid
        else:
            ok_b, ok_ms = mid, ms
    log(f"  largest batch {ok_b} (tries {tries})")
    return {"max_batch": ok_b, "step_ms": ok_ms,
            "tokens_per_s": ok_b * 1e3 / ok_ms if ok_ms else None,
            "kv_bytes_per_seq": per_seq, "tries": tries,
            "exact": bad is not None and bad - ok_b <= max(1, ok_b // 32),
            "capped_at_max_batch": bad == max_batch + 1}


def card_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for c in ("h100", "h200", "a100", "l40s", "b200", "gh200"):
        if c in name:
            return c
    return name.split()[-1]


def run(args, log=print) -> dict:
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    device, tiny = args.device, args.tiny
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lengths = [int(x) for x in args.lengths.split(",")]
    budgets = [float(x) for x in args.budgets.split(",")]
    steps = args.decode_tokens
    timed = min(args.timed_tokens or steps, steps)
    lm = build(tiny, args.layers, max(lengths) + steps, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    compiled = {b: planner.compile(lm, policy="dense", evict=planner.eviction(args.policy, budget=b))
                for b in budgets}
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows, caps, skipped, keep = [], [], [], {}
    cuda = device == "cuda"
    for n in lengths:
        ids = torch.randint(0, lm.config.vocab_size, (1, n), generator=gen).to(device)
        for b in [None] + budgets:
            label = "dense" if b is None else f"{b:.0%}"
            if time.perf_counter() > deadline:
                skipped.append(f"N={n} {label}: out of time (--budget-s {args.budget_s})")
                continue
            _free()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            model = lm if b is None else compiled[b]
            if b is not None and n == lengths[0]:
                # compile outside the timing: two lengths, so the graph is already the dynamic
                # one that every later length reuses
                for w in (min(1024, n // 4), min(2048, n // 2)):
                    prefill(model, ids[:, :w], device)
                _free()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
            cache, tok, pre_ms = prefill(model, ids, device)
            kvb = kv_bytes(cache)
            kept = cache.layers[0].keys.shape[2]
            if cuda:
                torch.cuda.synchronize()
                pre_peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            ms = decode(lm, cache, tok, n, steps, timed, device)
            row = {"length": n, "budget": b, "policy": "dense" if b is None else args.policy,
                   "kept_tokens": kept, "kv_bytes": kvb, "prefill_ms": pre_ms,
                   "decode_ms_per_step": ms, "decode_tokens": steps, "timed_tokens": timed}
            if cuda:
                dec_peak = torch.cuda.max_memory_allocated()
                row |= {"peak_bytes": max(pre_peak, dec_peak), "decode_peak_bytes": dec_peak}
            rows.append(row)
            dense = next(r for r in rows if r["length"] == n and r["budget"] is None)
            row["kv_ratio"] = kvb / dense["kv_bytes"]
            row["decode_speedup"] = dense["decode_ms_per_step"] / ms
            log(f"N={n:>6} {label:>5}: kept {kept}, KV {kvb / 2**20:.1f} MiB "
                f"({row['kv_ratio']:.1%}), prefill {pre_ms:.0f} ms, decode {ms:.2f} ms/step "
                f"({row['decode_speedup']:.2f}x)"
                + (f", peak {row['peak_bytes'] / 2**30:.2f} GiB, decode peak "
                   f"{dec_peak / 2**30:.2f} GiB" if cuda else ""))
            start = n + steps
            if args.profile_steps and n == lengths[-1]:
                row["profile"] = profile_decode(lm, cache, tok, start, args.profile_steps, device)
                start += args.profile_steps
                log(f"  profile: wall {row['profile']['wall_ms_per_step']:.2f} ms/step, device "
                    f"busy {row['profile']['device_busy_ms_per_step']:.2f} ms/step; top device "
                    f"{row['profile']['top_device'][:4]}; top host {row['profile']['top_host'][:4]}")
            if n == lengths[-1]:
                keep[b] = (cache, start)
            else:
                del cache
    n = lengths[-1]
    order = [None, min(budgets)] + [b for b in sorted(budgets) if b != min(budgets)]
    for b in order:
        label = "dense" if b is None else f"{b:.0%}"
        if b not in keep:
            continue
        if time.perf_counter() > deadline:
            skipped.append(f"largest batch at N={n} {label}: out of time")
            continue
        log(f"largest batch at N={n} {label}:")
        cache, start = keep.pop(b)
        res = largest_batch(lm, cache, start, args.cap_steps, device, deadline,
                            args.cpu_cap_mb * 2**20, args.max_batch, log)
        del cache
        _free()
        caps.append({"length": n, "budget": b, "policy": "dense" if b is None else args.policy,
                     **res})
    keep.clear()
    import transformers
    meta = {"card": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "triton": _triton_version(),
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
            "model": ("tiny Llama" if tiny else "Llama-3-8B-shaped") + f", {args.layers} layers, "
                     f"{'x'.join(str(lm.config.__dict__[k]) for k in ('num_attention_heads', 'num_key_value_heads', 'head_dim'))} "
                     f"(q heads x kv heads x dim), random weights, {str(dtype).split('.')[-1]}",
            "weights_bytes": weights, "policy": args.policy, "lengths": lengths,
            "budgets": budgets, "decode_tokens": steps, "timed_tokens": timed,
            "cap_steps": args.cap_steps, "seconds": time.perf_counter() - t_start}
    return {**meta, "rows": rows, "largest_batch": caps, "skipped": skipped}


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "none"


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def markdown(res: dict) -> str:
    gib = 2 ** 30
    lines = [f"# KV-cache eviction: memory and decode speed ({res['card']})", "",
             f"{res['model']}; policy {res['policy']}; torch {res['torch']}, triton "
             f"{res.get('triton', '-')}"
             + (f" ({res['triton_note']})" if res.get("triton_note") else "") + ", transformers "
             f"{res['transformers']}, CUDA {res['cuda']}. Command: `{res['command']}` "
             f"({res['seconds']:.0f} s).", "",
             f"Prefill batch 1 through `planner.compile(evict=...)`; {res['decode_tokens']} tokens "
             f"decoded over the compacted cache, the last {res['timed_tokens']} timed (ms per "
             "step, one token per step). KV bytes: K and V of every layer after the prefill. Peak: "
             "`torch.cuda.max_memory_allocated` over prefill + decode (the prefill's activations "
             "set it) and over the decode alone. Weights: "
             f"{res['weights_bytes'] / gib:.2f} GiB. Decode SDPA backends: "
             + ("flash, memory-efficient, math (cuDNN excluded for dense and evicted alike: it "
                "builds a plan for every new key length, about 16 ms of host time per call on "
                "torch 2.11)" if res.get("decode_sdpa", "default") == "no-cudnn"
                else "PyTorch's choice") + ".", "",
             "| prompt | budget | kept tokens | KV MiB | KV / dense | prefill ms | decode ms/step | "
             "speed-up | peak GiB | decode peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['length']} | {'dense' if r['budget'] is None else format(r['budget'], '.0%')} | "
            f"{r['kept_tokens']} | {r['kv_bytes'] / 2**20:.1f} | {r['kv_ratio']:.1%} | "
            f"{r['prefill_ms']:.0f} | {r['decode_ms_per_step']:.2f} | {r['decode_speedup']:.2f}x | "
            f"{_f(r.get('peak_bytes') and r['peak_bytes'] / gib, '.2f')} | "
            f"{_f(r.get('decode_peak_bytes') and r['decode_peak_bytes'] / gib, '.2f')} |")
    if res["largest_batch"]:
        dense = next((c for c in res["largest_batch"] if c["budget"] is None), None)
        lines += ["", f"Largest batch at {res['lengths'][-1]} tokens (one prompt's compacted cache "
                  f"replicated; {res['cap_steps']} decode steps must run):", "",
                  "| budget | KV MiB / sequence | largest batch | step ms | tokens/s | vs dense |",
                  "|---|---|---|---|---|---|"]
        for c in res["largest_batch"]:
            rel = (c["tokens_per_s"] / dense["tokens_per_s"]
                   if dense and dense["tokens_per_s"] and c["tokens_per_s"] else None)
            lines.append(
                f"| {'dense' if c['budget'] is None else format(c['budget'], '.0%')} | "
                f"{c['kv_bytes_per_seq'] / 2**20:.1f} | {c['max_batch']}"
                f"{'' if c['exact'] else ' (lower bound)'}"
                f"{' (the --max-batch cap)' if c['capped_at_max_batch'] else ''} | "
                f"{_f(c['step_ms'], '.2f')} | {_f(c['tokens_per_s'], '.0f')} | "
                f"{_f(rel, '.2f')}{'x' if rel else ''} |")
    prof = [r for r in res["rows"] if r.get("profile")]
    if prof:
        lines += ["", f"Decode steps under torch.profiler ({prof[0]['profile']['steps']} steps, "
                  "batch 1; ms per step; device busy = the sum of kernel times):", "",
                  "| prompt | budget | wall | device busy | most device time | most host time |",
                  "|---|---|---|---|---|---|"]
        for r in prof:
            p = r["profile"]
            top = lambda xs: ", ".join(f"`{k[:60]}` {ms:.2f}" for k, ms, _ in xs[:3])  # noqa: E731
            lines.append(f"| {r['length']} | {'dense' if r['budget'] is None else format(r['budget'], '.0%')} | "
                         f"{p['wall_ms_per_step']:.2f} | {_f(p['device_busy_ms_per_step'], '.2f')} | "
                         f"{top(p['top_device'])} | {top(p['top_host'])} |")
    if res["skipped"]:
        lines += ["", "Skipped (time budget):", ""] + [f"- {s}" for s in res["skipped"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for eviction_<card>.{json,md}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and prompts (smoke run)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (4; tiny: 2)")
    ap.add_argument("--lengths", default=None, help="prompt lengths (32768,131072; tiny: 256,512)")
    ap.add_argument("--budgets", default="0.5,0.2,0.1", help="fractions of the cache kept")
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--decode-tokens", type=int, default=None, help="256 (tiny: 8)")
    ap.add_argument("--timed-tokens", type=int, default=0, help="last N steps timed (0: all)")
    ap.add_argument("--cap-steps", type=int, default=None, help="decode steps per batch try (8; tiny: 2)")
    ap.add_argument("--max-batch", type=int, default=4096)
    ap.add_argument("--decode-sdpa", default="no-cudnn", choices=("no-cudnn", "default"),
                    help="SDPA backends of the decode steps (see DECODE_BACKENDS)")
    ap.add_argument("--profile-steps", type=int, default=4,
                    help="decode steps profiled per row at the longest prompt (0: none)")
    ap.add_argument("--cpu-cap-mb", type=int, default=16, help="CPU smoke: cache memory 'limit'")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip cells starting later")
    a = ap.parse_args(argv)
    a.layers = a.layers or (2 if a.tiny else 4)
    a.lengths = a.lengths or ("256,512" if a.tiny else "32768,131072")
    a.decode_tokens = a.decode_tokens or (8 if a.tiny else 256)
    a.cap_steps = a.cap_steps or (2 if a.tiny else 8)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu --tiny for a smoke run)")
    global DECODE_BACKENDS
    if a.decode_sdpa == "no-cudnn":            # what the planner's decode-shaped calls use
        from runtime.rules import DECODE_BACKENDS as planner_backends
        DECODE_BACKENDS = list(planner_backends)
    res = run(a)
    res["decode_sdpa"] = a.decode_sdpa
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"eviction_{card_name(a.device)}")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(res))
    print(f"wrote {base}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
