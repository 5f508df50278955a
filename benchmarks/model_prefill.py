"""Where a small real-model prefill spends its time per policy: a Llama of SmolLM2-135M's shape
(30 layers, 9 query / 3 KV heads of 64, random weights, bf16) compiled with each policy (cost
model off, so every site follows it), prefilling N tokens into its cache as a generation does.

Per policy: wall ms per prefill (mean of 5 after 3 warm-ups), GPU busy ms and the number of
kernels of one prefill (torch.profiler). Wall far above GPU busy means the host's launches
and Python set the time. ``SPARSE_PLANNER_DENSITY=0`` rows skip the runtime's density counting.

    PYTHONPATH=. python benchmarks/model_prefill.py --out DIR     # writes model_prefill_<card>.*
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import planner  # noqa: E402

#: SmolLM2-135M-Instruct's architecture (its config.json), weights random
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                     vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, rope_theta=100000.0)
POLICIES = ("dense", "threshold:gamma=0.8281,block=16", "block_topk@0.25:block=16",
            "sink_window@0.25")


def measure(cm, ids, sync):
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        for _ in range(3):
            cm(ids, use_cache=True)
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            cm(ids, use_cache=True)
        sync()
        wall = (time.perf_counter() - t0) / 5 * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            cm(ids, use_cache=True)
            sync()
    ev = prof.key_averages()
    busy = sum(e.self_device_time_total for e in ev) / 1e3
    kernels = sum(e.count for e in ev if e.self_device_time_total > 0)
    return wall, busy, kernels


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--smoke", action="store_true", help="2 layers, 128 tokens, CPU (checks the script)")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    from planner.quality.policies import PolicySpec
    dev = "cpu" if args.smoke else "cuda"
    shape = dict(SMOLLM2_SHAPE, **({"num_hidden_layers": 2} if args.smoke else {}))
    n = 128 if args.smoke else args.tokens
    cfg = LlamaConfig(**shape)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg).to(dev, torch.float32 if args.smoke else torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, n), device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    import transformers
    import triton
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, tokens=n, date=time.strftime("%Y-%m-%d"),
                model="Llama of SmolLM2-135M's shape, random weights, "
                      + ("fp32 (smoke)" if args.smoke else "bf16"),
                command="PYTHONPATH=. python benchmarks/model_prefill.py " + " ".join(sys.argv[1:]))
    rows = []
    for density in ("1", "0"):
        os.environ["SPARSE_PLANNER_DENSITY"] = density
        for spec in POLICIES:
            if density == "0" and spec == "dense":
                continue
            pol = PolicySpec.parse(spec).resolve(n)
            cm = planner.compile(lm, policy=pol, cost_model="off")
            wall, busy, kernels = measure(cm, ids, sync)
            kern = planner.inspect(cm).sites[0].kernel
            rows.append(dict(policy=spec, density_counting=density == "1", wall_ms=wall,
                             gpu_busy_ms=busy, kernels=kernels, site_kernel=kern))
            print(json.dumps(rows[-1]), flush=True)
    name = "model_prefill_" + ("smoke" if args.smoke else "h100" if "H100" in card else "gpu")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# Prefill of a SmolLM2-135M-shaped model on {card}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, transformers "
             f"{meta['transformers']}, {meta['date']}; {meta['model']}; {n} tokens into the "
             f"cache; cost model off. Command: `{meta['command']}`", "",
             "| policy | density counted | wall ms / prefill | GPU busy ms | kernels | site kernel |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['policy']} | {'yes' if r['density_counting'] else 'no'} | {r['wall_ms']:.1f} | "
              f"{r['gpu_busy_ms']:.1f} | {r['kernels']} | {r['site_kernel']} |" for r in rows]
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
