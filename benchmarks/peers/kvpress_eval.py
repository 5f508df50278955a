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
    # this python's torch, pinned: where this python is itself a virtual environment, the new
    # one sees the base interpreter's packages, not its torch, and kvpress's requirement alone
    # would let pip pick the newest (a CUDA build of several GB)
    import torch
    subprocess.check_call([py, "-m", "pip", "install", "-q", KVPRESS, KERNELS,
                           f"torch=={torch.__version__}"])
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
    P = _protocol()
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
    runs = ([] if args.no_dense else [("dense", None)]) + [(p, b) for p in args.presses.split(",")
                                for b in (float(x) for x in args.budgets.split(","))]
    smallest = min((b for _, b in runs if b is not None), default=None)
    cells, t_prefill = P.Cells("kvpress", "press"), 0.0
    for proto in args.protocols.split(","):
        for i, s in enumerate(samples):
            if args.shared:
                t0 = time.perf_counter()
                last, layers, rec = _recorded_prefill(model("sdpa"), P, s, proto)
                t_prefill += time.perf_counter() - t0
            for name, b in runs:
                t0 = time.perf_counter()
                # ObservedAttention reads the attention weights: eager attention, its own prefill
                eager = name == "ObservedAttentionPress"
                lm = model("eager" if eager else "sdpa")
                press = None if name == "dense" else make_press(name, b)
                if not args.shared or eager:
                    res = P.answer_scores(lm, s, proto, press)
                else:
                    res = _replayed(lm, P, s, proto, press, last, layers, rec)
                    if i < args.check and b in (None, smallest):
                        cells.check(proto, name, b, i, res, P.answer_scores(lm, s, proto, press))
                cells.add(proto, name, b, s, res, time.perf_counter() - t0)
            print(f"kvpress {proto:8s} prompt {i + 1}/{len(samples)}: {cells.line(proto)}",
                  flush=True)
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump({**meta, "shared_prefill": args.shared, "prefill_seconds": t_prefill,
                           "cells": cells.cells}, f, indent=1)
            os.replace(tmp, args.out)
    return 0


def _attention_layers(lm):
    inner = lm.model.language_model if hasattr(lm.model, "language_model") else lm.model
    return inner, [layer.self_attn for layer in inner.layers]


def _recorded_prefill(lm, P, sample, protocol):
    """One plain prefill of ``sample``: (last logits, each layer's full (keys, values), each
    layer's ``(kwargs, output)`` as a press's forward hook receives them)."""
    _, attns = _attention_layers(lm)
    rec = {}
    hooks = [a.register_forward_hook(
        lambda mod, args, kwargs, out: rec.__setitem__(mod.layer_idx, (dict(kwargs), out)),
        with_kwargs=True) for a in attns]
    try:
        last, cache = P.prefill(lm, P.parts(sample, protocol)[0])
    finally:
        for h in hooks:
            h.remove()
    return last, [(x.keys, x.values) for x in cache.layers], rec


def _replayed(lm, P, sample, protocol, press, last, layers, rec):
    """``answer_scores`` of ``press`` from a recorded prefill: a cache holding the full K/V,
    the press's own ``forward_hook`` called for every layer with what that layer's hook received
    in the prefill (the prefill attends densely: only the cache depends on the press), then the
    rest of the prompt and the answer over the compressed cache. As ``press(lm)`` does first:
    ``post_init_from_model``, the model's rotary embedding on each attention layer; and each
    layer's head-wise mask (``masked_key_indices``, AdaKV) cleared, as a prefill clears it."""
    import torch
    inner, attns = _attention_layers(lm)
    cache = P.cache_of(lm, layers)
    for a in attns:
        a.masked_key_indices = None
    if press is not None:
        press.post_init_from_model(lm)
        with torch.no_grad():
            for a in attns:
                a.rotary_emb = inner.rotary_emb
                kwargs, out = rec[a.layer_idx]
                press.forward_hook(a, [], dict(kwargs, past_key_values=cache), out)
    return P.finish(lm, cache, last, sample, protocol)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True, help="python -m planner.quality.eviction export")
    ap.add_argument("--out", required=True)
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--budgets", default="0.5,0.25,0.1", help="fractions of the cache kept")
    ap.add_argument("--protocols", default="agnostic,aware")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense cell")
    ap.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    ap.add_argument("--no-shared", dest="shared", action="store_false",
                    help="one prefill per prompt and press (default: one per prompt, the "
                         "presses' hooks replayed on it)")
    ap.add_argument("--check", type=int, default=1,
                    help="prompts per press (smallest budget) also scored with kvpress's own "
                         "prefill; a difference stops the run")
    ap.add_argument("--venv", default=DEFAULT_VENV)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.inside:
        py = ensure_venv(args.venv)
        return subprocess.call([py, os.path.abspath(__file__), "--inside"] + sys.argv[1:])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
