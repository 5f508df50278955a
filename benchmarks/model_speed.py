"""Whole-model prefill speed: the original Hugging Face model against ``planner.compile(model,
policy=...)`` with the cost model on (the default), for the default of each catalogue policy.

    PYTHONPATH=. python benchmarks/model_speed.py --device cpu --out benchmarks/results
    PYTHONPATH=. python benchmarks/model_speed.py --device cuda --out $OUT

Models (random weights, Llama-architecture configs shaped like the named ones): SmolLM2-135M
(30 layers, GQA 9/3 x 64), Llama-3-8B with 4 layers (32/8 x 128), Qwen2.5-7B with 4 layers
(28/4 x 128). A policy ``name@inductor`` compiles the ops outside attention with Inductor
(``remainder="inductor"``); ``torch.compile`` is the original under ``torch.compile``'s
defaults (the peer for the whole model). Per (model, length): the original's time, then per policy the compiled model's
time, speed = original / compiled (>= 0.97 is the promise), the kernel each site ran (which
says whether the cost model ran it densely), the measured density and the relative error of
the last 256 positions' logits (all of them would not fit beside the model at 64k tokens). Times: best of ``--reps``
calls after a warm-up, the original's and the compiled model's calls alternating (CPU: wall
clock; GPU: CUDA events around the call). Rows are appended to
``model_speed_<card>.jsonl`` as they are measured (a run cut short keeps what it measured);
``--report`` turns that file into ``model_speed_<card>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
# the repository root, not this folder: transformers imports a package named ``kernels``, which
# benchmarks/kernels.py would shadow
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import planner  # noqa: E402

MODELS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "llama3-8b-4l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "qwen2.5-7b-4l": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=4,
                          num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
}
# the default of each catalogue policy (planner.policy(name))
PEER = "torch.compile"     # the original model under torch.compile's defaults
POLICIES = ["dense", "block_topk", "threshold", "vertical_slash", "quest", "auto",
            "sink_window", "longformer", "bigbird", "dsa"]


def build(name: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**MODELS[name], max_position_embeddings=1 << 17,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def _once(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def timed_pair(f, g, device, reps: int) -> tuple:
    """Best of ``reps`` calls of ``f`` and of ``g`` in ms, the calls alternating (f, g, f, g,
    ...) after one warm-up call of each, so that drift of the machine affects both alike."""
    f()
    g()
    tf = tg = float("inf")
    for _ in range(reps):
        tf = min(tf, _once(f, device))
        tg = min(tg, _once(g, device))
    return tf, tg


def card_name(device) -> str:
    if device.type == "cuda":
        n = torch.cuda.get_device_name(device)
        return "h200" if "H200" in n else "h100"
    return "cpu"


def _compiled(model, pol: str):
    """``pol``: a policy name, ``name@inductor`` (``planner.compile(..., remainder=
    "inductor")``) or ``torch.compile`` (the original under ``torch.compile``'s defaults)."""
    if pol == PEER:
        return torch.compile(model)
    name, _, remainder = pol.partition("@")
    return planner.compile(model, policy=name, remainder=remainder or None)


def run(args) -> None:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = os.path.join(args.out, f"model_speed_{card_name(device)}.jsonl")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    import triton
    meta = dict(card=(torch.cuda.get_device_name(device) if device.type == "cuda"
                      else f"CPU, {torch.get_num_threads()} threads"),
                torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d"), dtype=str(dtype).replace("torch.", ""),
                command="PYTHONPATH=. python benchmarks/model_speed.py " + " ".join(sys.argv[1:]))
    with open(path, "a") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
    for name in args.models.split(","):
        model = build(name, device, dtype)
        compiled = {}
        for n in [int(x) for x in args.lengths.split(",")]:
            if time.time() - t_start > args.budget_s:
                print(f"time budget of {args.budget_s} s spent: stopping", flush=True)
                return
            ids = torch.randint(0, MODELS[name]["vocab_size"], (1, n), device=device)
            with torch.no_grad():
                ref = model(ids, use_cache=False).logits[:, -256:].float()
                for pol in args.policies.split(","):
                    if time.time() - t_start > args.budget_s:
                        break
                    cm = compiled.get(pol)
                    if cm is None:
                        cm = compiled[pol] = _compiled(model, pol)
                    os.environ["SPARSE_PLANNER_DENSITY"] = "1"
                    out = cm(ids, use_cache=False).logits[:, -256:].float()
                    if pol == PEER:
                        dens, kernels = [], ["Inductor (the original model)"]
                    else:
                        rep = planner.inspect(cm)
                        dens = [s.density for s in rep.sites if s.density is not None]
                        kernels = sorted({(s.kernel or "-") for s in rep.sites})
                    os.environ["SPARSE_PLANNER_DENSITY"] = "0"
                    t_orig, t = timed_pair(lambda: model(ids, use_cache=False),
                                           lambda: cm(ids, use_cache=False), device, args.reps)
                    row = dict(model=name, N=n, policy=pol, original_ms=round(t_orig, 2),
                               compiled_ms=round(t, 2), speed=round(t_orig / t, 3),
                               density=round(sum(dens) / len(dens), 3) if dens else None,
                               kernels=kernels,
                               rel_err=round(((out - ref).norm() / ref.norm()).item(), 5))
                    print(json.dumps(row), flush=True)
                    with open(path, "a") as f:
                        f.write(json.dumps(row) + "\n")
        del model, compiled
        if device.type == "cuda":
            torch.cuda.empty_cache()


def report(path: str) -> None:
    """``model_speed_<card>.jsonl`` -> ``.json`` (meta + rows) and ``.md`` (a table per model)."""
    metas, rows = [], []
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            if "meta" in d:
                metas.append(d["meta"])
            else:
                rows.append(dict(d, run=len(metas) - 1))     # which run measured it
    # a cell measured again (a later run of the same model, length and policy) replaces the
    # earlier one, in the earlier one's place
    key = lambda r: (r["model"], r["N"], r["policy"])  # noqa: E731
    last = {key(r): r for r in rows}
    rows = [last[k] for k in dict.fromkeys(key(r) for r in rows)]
    base = path[:-len(".jsonl")]
    with open(base + ".json", "w") as f:
        json.dump({"meta": metas[-1] if metas else {}, "runs": metas, "rows": rows}, f, indent=1)
    lines = [f"# Whole-model prefill speed ({metas[-1]['card'] if metas else '?'})", ""]
    for i, m in enumerate(metas):                 # each run (a later one re-measures)
        lines += [f"run {i + 1}: torch {m['torch']}, triton {m['triton']}, {m['dtype']}, "
                  f"{m['date']}; `{m['command']}`", ""]
    lines += ["speed = original / compiled (cost model on, the default); >= 0.97 is the "
              "promise. kernels: what the sites ran (`(cost model: dense)` = planned dense).", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == model]
        lines += [f"## {model}", "", "| N | policy | original ms | compiled ms | speed | "
                  "density | kernels | run |", "|---|---|---|---|---|---|---|---|"]
        for r in mr:
            flag = "" if r["speed"] >= 0.97 or r["policy"] == PEER else " **<0.97**"
            lines.append(f"| {r['N']} | {r['policy']} | {r['original_ms']} | "
                         f"{r['compiled_ms']} | {r['speed']}{flag} | {r['density']} | "
                         f"{'; '.join(r['kernels'])} | {r['run'] + 1} |")
        best = {}
        for r in mr:
            if r["policy"] not in ("dense", PEER) and r["speed"] > best.get(r["N"], (0, ""))[0]:
                best[r["N"]] = (r["speed"], r["policy"])
        lines += ["", "best sparse policy per length: " + ", ".join(
            f"{n}: {p} {s}x" for n, (s, p) in best.items()), ""]
        peer = {r["N"]: r for r in mr if r["policy"] == PEER}
        vs = [f"{n}: {r['policy']} {peer[n]['compiled_ms'] / r['compiled_ms']:.2f}x"
              for n in peer for r in mr
              if r["N"] == n and r["policy"] != PEER and r["run"] == peer[n]["run"]]
        if vs:
            lines += [f"against {PEER}(original) at the same length, measured in the same run "
                      f"(its time / the planner's): " + ", ".join(vs), ""]
    ours = [r for r in rows if r["policy"] != PEER]
    bad = [r for r in ours if r["speed"] < 0.97]
    lines.append(f"cells below 0.97x: {len(bad)} of {len(ours)} (the planner's; "
                 f"`{PEER}` rows are the peer, not counted)")
    notes = base + ".notes.md"          # a reading of the table, kept beside the measurements
    if os.path.exists(notes):
        with open(notes) as f:
            lines += ["", f.read().rstrip()]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="smollm2-135m,llama3-8b-4l,qwen2.5-7b-4l")
    ap.add_argument("--lengths", default="1024,4096,16384,65536")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="stop starting new measurements after this many seconds")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--report", metavar="JSONL", help="only turn a .jsonl into .json/.md")
    args = ap.parse_args()
    if args.report:
        report(args.report)
        return 0
    run(args)
    report(os.path.join(args.out, f"model_speed_{card_name(torch.device(args.device))}.jsonl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
