"""Where a compiled model's time goes against the original's: one Hugging Face model, one
length, the top CUDA kernels of one call of each under ``torch.profiler``, and the arguments of
every ``F.scaled_dot_product_attention`` call (mask, is_causal, GQA, strides).

    PYTHONPATH=. python benchmarks/profile_model.py --model smollm2-135m --n 16384
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import planner  # noqa: E402
from model_speed import MODELS, build, timed_pair  # noqa: E402

_SDPA = F.scaled_dot_product_attention
CALLS: list = []


def _logged(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    CALLS.append(dict(q=tuple(q.shape), k=tuple(k.shape), q_stride=q.stride(),
                      k_stride=k.stride(), mask=None if attn_mask is None else
                      (tuple(attn_mask.shape), str(attn_mask.dtype)), is_causal=is_causal,
                      gqa=kw.get("enable_gqa", False), dtype=str(q.dtype)))
    return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                 scale=scale, **kw)


def top_kernels(fn, n: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=70)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--policy", default="dense")
    args = ap.parse_args()
    model = build(args.model, torch.device("cuda"), torch.bfloat16)
    ids = torch.randint(0, MODELS[args.model]["vocab_size"], (1, args.n), device="cuda")
    cm = planner.compile(model, policy=args.policy)
    F.scaled_dot_product_attention = _logged
    with torch.no_grad():
        for label, fn in (("original", lambda: model(ids, use_cache=False)),
                          ("compiled", lambda: cm(ids, use_cache=False))):
            fn()
            fn()
            CALLS.clear()
            fn()
            print(f"== {label}: {len(CALLS)} SDPA calls; first: {CALLS[0] if CALLS else None}")
        rep = planner.inspect(cm)
        print("sites:", sorted({(s.kernel, s.schedule) for s in rep.sites}))
        t0, t1 = timed_pair(lambda: model(ids, use_cache=False), lambda: cm(ids, use_cache=False),
                            torch.device("cuda"), 3)
        print(f"original {t0:.2f} ms, compiled {t1:.2f} ms")
        for label, fn in (("original", lambda: model(ids, use_cache=False)),
                          ("compiled", lambda: cm(ids, use_cache=False))):
            print(f"== {label} kernels")
            print(top_kernels(fn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
