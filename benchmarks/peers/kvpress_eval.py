"""kvpress (NVIDIA, https://pypi.org/project/kvpress/) on the prompts the planner's harness
exports, for ``planner.quality.eviction report``.

kvpress pins transformers < 5.3, so it runs in a virtual environment of its own, created here
from the package registry on first use (``--venv``): the environment sees this machine's torch
(``--system-site-packages``: torch is not downloaded again) and installs ``kvpress==0.5.5``, which
brings its own transformers (5.2.0 at the time of writing) and ``kernels<0.11`` (transformers 5.2
does not import with a newer one); the script then re-runs itself with that environment's python. Each press
compresses the prefill (``with press(model): model(...)``, kvpress's own hook); the scoring is
the harness's (``planner/quality/protocol.py``, loaded by its path because this environment does
not import the planner package): the answer teacher-forced in one call after the prefill,
positions continuing from the full prompt's length.

    python benchmarks/peers/kvpress_eval.py --prompts /tmp/prompts.json --out /tmp/kvpress.json \\
        --presses StreamingLLMPress,SnapKVPress,TOVAPress --budgets 0.5,0.25,0.1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

KVPRESS = "kvpress==0.5.5"
KERNELS = "kernels>=0.10.2,<0.11"      # what transformers 5.2 (kvpress's pin) imports
PRESSES = ("StreamingLLMPress", "SnapKVPress", "TOVAPress", "ObservedAttentionPress",
           "PyramidKVPress", "AdaKVPress(SnapKVPress)")
DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "sparse_planner", "kvpress-0.5.5")


def ensure_venv(venv: str) -> str:
    py = os.path.join(venv, "bin", "python")
    if os.path.exists(os.path.join(venv, ".ready")):
        return py
    print(f"creating {venv} (this python's torch, {KVPRESS}, {KERNELS})", flush=True)
    subprocess.check_call([sys.executable, "-m", "venv", "--system-site-packages", venv])
    subprocess.check_call([py, "-m", "pip", "install", "-q", KVPRESS, KERNELS])
    open(os.path.join(venv, ".ready"), "w").close()
    return py


def make_press(name: str, budget: float):
    import kvpress
    ratio = 1.0 - budget                                  # kvpress: the fraction removed
    if name.startswith("AdaKVPress("):
        inner = getattr(kvpress, name[len("AdaKVPress("):-1])(compression_ratio=ratio)
        return kvpress.AdaKVPress(press=inner)
    return getattr(kvpress, name)(compression_ratio=ratio)


def _protocol():
    """``planner/quality/protocol.py`` loaded by its path (this environment does not import the
    planner package; that file imports only torch and transformers): the harness's scoring."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "planner", "quality", "protocol.py")
    spec = importlib.util.spec_from_file_location("_eviction_protocol", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(args) -> int:
    import kvpress
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    answer_scores = _protocol().answer_scores
    prompts = json.load(open(args.prompts))
    samples = prompts["samples"][: args.limit or None]
    models = {}

    def model(impl):
        if impl not in models:
            models[impl] = AutoModelForCausalLM.from_pretrained(
                prompts["model_dir"], dtype=torch.float32, attn_implementation=impl).eval()
        return models[impl]

    meta = {"kvpress": f"kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5'}",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
            "command": " ".join(["python benchmarks/peers/kvpress_eval.py"]
                                + [x for x in sys.argv[1:] if x != "--inside"]),
            "prompts": {k: prompts[k] for k in ("model", "lengths", "trials", "tasks", "seed")}
            | {"n": len(samples)}}
    cells = []
    runs = ([] if args.no_dense else [("dense", None)]) + [(p, b) for p in args.presses.split(",")
                                for b in (float(x) for x in args.budgets.split(","))]
    for proto in args.protocols.split(","):
        for name, b in runs:
            t0 = time.perf_counter()
            # ObservedAttention reads the attention weights: eager attention
            lm = model("eager" if name == "ObservedAttentionPress" else "sdpa")
            press = None if name == "dense" else make_press(name, b)
            rows = []
            for s in samples:
                ok, nll, lens = answer_scores(lm, s, proto, press)
                rows.append({"cell": s["cell"], "correct": ok, "nll": nll,
                             "cache": sum(lens) / len(lens)})
            n = len(rows)
            acc = sum(r["correct"] for r in rows) / n
            cells.append({"side": "kvpress", "press": name, "budget": b, "protocol": proto,
                          "n": n, "retrieval": acc, "se": math.sqrt(acc * (1 - acc) / n),
                          "nll": sum(r["nll"] for r in rows) / n,
                          "mean_cache_tokens": sum(r["cache"] for r in rows) / n,
                          "seconds": time.perf_counter() - t0, "rows": rows})
            print(f"kvpress {proto:8s} {name:26s} {b}: retrieval {acc:.2f} nll "
                  f"{cells[-1]['nll']:.3f} cache {cells[-1]['mean_cache_tokens']:.0f} "
                  f"({cells[-1]['seconds']:.0f}s)", flush=True)
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump({**meta, "cells": cells}, f, indent=1)
            os.replace(tmp, args.out)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True, help="python -m planner.quality.eviction export")
    ap.add_argument("--out", required=True)
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--budgets", default="0.5,0.25,0.1", help="fractions of the cache kept")
    ap.add_argument("--protocols", default="agnostic,aware")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense cell")
    ap.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    ap.add_argument("--venv", default=DEFAULT_VENV)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.inside:
        py = ensure_venv(args.venv)
        return subprocess.call([py, os.path.abspath(__file__), "--inside"] + sys.argv[1:])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
