"""KV-cache eviction quality: the planner's eviction policies on RULER-style prompts, beside
NVIDIA kvpress's presses of the same names (``benchmarks/peers/kvpress_eval.py``).

Both sides score a prompt the same way, in two protocols:

* ``agnostic`` (question-agnostic, kvpress's pipeline): prefill the context (the cache is
  evicted there), then the question and the answer run over the compacted cache;
* ``aware`` (question-aware, the papers' setting): prefill context + question (evicted there),
  then the answer.

The answer is teacher-forced after the prefill in one call (positions continue from the full
prompt's length; the cache holds the kept keys only): ``correct`` = every answer token is the
greedy choice (what greedy decoding would produce), ``nll`` = the answer's mean negative
log-likelihood (its change from dense is the reported delta-nll, a per-token perplexity ratio
exp(delta)). The prompts are exported once (``export``) so both sides read identical ids.

    python -m planner.quality.eviction export --lengths 4096 --trials 4 --out /tmp/prompts.json
    python -m planner.quality.eviction run --prompts /tmp/prompts.json --budgets 0.5,0.25,0.1 \\
        --out /tmp/planner_evict.json
    python benchmarks/peers/kvpress_eval.py --prompts /tmp/prompts.json --out /tmp/kvpress.json
    python -m planner.quality.eviction report --planner /tmp/planner_evict.json \\
        --kvpress /tmp/kvpress.json --out benchmarks/results/quality/eviction_vs_kvpress
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Optional

import torch

from planner.quality.protocol import (Cells, answer_scores, cache_arg, cache_of, feed, finish,
                                      parts, prefill, summarize)

#: planner eviction policy -> the kvpress press of the same method (ObservedAttention is
#: kvpress's H2O-like press: mean observed attention, no recent window)
KVPRESS_NAMES = {"streaming_llm": "StreamingLLMPress", "snapkv": "SnapKVPress",
                 "tova": "TOVAPress", "h2o": "ObservedAttentionPress",
                 "pyramidkv": "PyramidKVPress", "adakv": "AdaKVPress(SnapKVPress)"}
POLICIES = ("streaming_llm", "h2o", "snapkv", "pyramidkv", "adakv", "tova", "snapkv_value")


def export(model: str, lengths, trials: int, tasks, seed: int, path: str, log=print) -> dict:
    """Write the prompts (context / question / answer ids per sample) as JSON."""
    from planner.quality import assets
    from planner.quality.harness import EvalConfig, build_samples
    from planner.quality.text import HFCodec, Haystack
    lm, tok, _ = assets.load_model(model, log=log)
    corpus = assets.load_corpus("austen", log=log)
    codec = HFCodec(tok, lead=assets.leading_tokens(model, tok))
    hay = Haystack.from_text(codec, corpus.haystack, corpus.name)
    cfg = EvalConfig(lengths=tuple(lengths), tasks=tuple(tasks), seed=seed)
    rows = []
    for n in lengths:
        for cell, t, s in build_samples(cfg, codec, hay, n, trials):
            nq = s.meta["question_tokens"]
            rows.append({"length": n, "cell": cell.name, "task": s.task, "trial": t,
                         "context": list(s.ids[:-nq]), "question": list(s.ids[-nq:]),
                         "answer": list(s.answer_ids), "answer_text": s.answer})
    out = {"model": model, "model_dir": assets.model_dir(model), "text": corpus.description,
           "seed": seed, "lengths": list(lengths), "trials": trials, "tasks": list(tasks),
           "samples": rows}
    with open(path, "w") as f:
        json.dump(out, f)
    log(f"{len(rows)} prompts -> {path}")
    return out


def greedy(lm, first, rest=(), n_new: int = 1, cache=None):
    """Greedy decoding in the two protocols: prefill ``first`` (an eviction compiled into
    ``lm`` compacts the cache there), feed ``rest`` over the compacted cache in one call, then
    decode ``n_new`` tokens one at a time. Positions continue from the full length
    (``len(first) + len(rest)``), whatever the cache kept.

    * question-agnostic: ``greedy(lm, context, question, n)``;
    * question-aware: ``greedy(lm, context + question, (), n)`` (what ``lm.generate`` does).

    Returns (tokens [n_new] int64, the ``DynamicCache``).

    >>> import torch, planner                                             # doctest: +SKIP
    >>> cm = planner.compile(lm, evict=planner.SnapKV(budget=0.2))       # doctest: +SKIP
    >>> toks, cache = greedy(cm, ctx_ids, question_ids, 8)               # doctest: +SKIP
    """
    first, rest = list(first), list(rest)
    last, cache = prefill(lm, first, cache=cache)
    toks = []
    with torch.no_grad():
        for out in feed(lm, cache, rest, len(first), logits_to_keep=1):
            last = out.logits[0, -1:].float()
        pos = len(first) + len(rest)
        for i in range(n_new):
            tok = last[-1].argmax()
            toks.append(int(tok))
            if i == n_new - 1:
                break
            last = lm(input_ids=tok.view(1, 1), **cache_arg(lm, cache), use_cache=True,
                      position_ids=torch.tensor([[pos]])).logits[0, -1:].float()
            pos += 1
    return torch.tensor(toks, dtype=torch.long), cache


def run_planner(prompts: dict, policies, budgets, protocols, path: str, log=print, cells=(),
                dense: bool = True, shared: bool = True, check: int = 1) -> dict:
    """Score every (policy, budget) cell on every prompt, per protocol; write ``path``.

    ``shared`` (the default): one prefill per prompt serves every cell (``protocol``'s module
    docstring): the prefill runs once through the planner with nothing evicted while
    ``runtime.eviction.capturing`` keeps what each site's eviction reads; each cell then keeps
    its policy's keys of those values (``runtime.eviction.select``, what the site runs) and reads
    the rest of the prompt and the answer through the model compiled with that policy. The
    first ``check`` prompts of each cell at the smallest budget are also scored the direct way
    (the compiled model evicting inside its own prefill) and must agree (``same_scores``), or
    the run stops. ``shared=False``: one prefill per prompt and cell."""
    import planner
    from runtime import eviction as ev
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(prompts["model_dir"], dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    samples = prompts["samples"]
    runs = ([("dense", None)] if dense else []) + (
        list(cells) if cells else [(p, b) for b in budgets for p in policies])   # budget-major

    def compiled(name, b):
        return planner.compile(lm, policy="dense", cost_model="off",
                               evict=planner.eviction(name, budget=b))

    models = {(name, b): (lm if name == "dense" else compiled(name, b)) for name, b in runs}
    smallest = min((b for _, b in runs if b is not None), default=None)
    out, t_prefill = Cells("planner", "policy"), 0.0
    capture = compiled("streaming_llm", 1.0) if shared else None       # keeps every key
    for proto in protocols:
        for i, s in enumerate(samples):
            if shared:
                t0 = time.perf_counter()
                with ev.capturing() as got:
                    last, _ = prefill(capture, parts(s, proto)[0])
                t_prefill += time.perf_counter() - t0
                sites = sorted(got.values(), key=lambda x: x[5])         # by layer
            for name, b in runs:
                t0 = time.perf_counter()
                m = models[(name, b)]
                if not shared:
                    res = answer_scores(m, s, proto)
                else:
                    pol = None if name == "dense" else planner.eviction(name, budget=b)
                    layers = [(x[1], x[2]) if pol is None else ev.keep(pol, *x)[:2]
                              for x in sites]
                    res = finish(m, cache_of(lm, layers), last, s, proto)
                    if i < check and b in (None, smallest):
                        out.check(proto, name, b, i, res, answer_scores(m, s, proto))
                out.add(proto, name, b, s, res, time.perf_counter() - t0)
            log(f"planner {proto:8s} prompt {i + 1}/{len(samples)}: {out.line(proto)}")
            _write({"prompts": _prompt_meta(prompts), "cells": out.cells,
                    "shared_prefill": shared, "prefill_seconds": t_prefill, **env_meta()}, path)
    return {"cells": out.cells}


def _prompt_meta(prompts: dict) -> dict:
    return {k: prompts[k] for k in ("model", "text", "seed", "lengths", "trials", "tasks")} | {
        "n": len(prompts["samples"])}


def env_meta() -> dict:
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "command": "python -m planner.quality.eviction " + " ".join(sys.argv[1:])}


def _write(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- report
def _merged(paths: str) -> Optional[dict]:
    """Runs written to several files (comma-separated): the first one's metadata, every cell
    (a later file's cell replaces an earlier one of the same policy, budget and protocol)."""
    files = [json.load(open(p)) for p in paths.split(",") if os.path.exists(p)]
    if not files:
        return None
    cells = {}
    for f in files:
        for c in f["cells"]:
            cells[(c.get("policy", c.get("press")), c["budget"], c["protocol"])] = c
    out = dict(files[0])
    out["cells"] = list(cells.values())
    if len(files) > 1:
        out["command"] = " ; ".join(f.get("command", "") for f in files)
    return out


def report(planner_path: str, kvpress_path: Optional[str], out_base: str, log=print,
           notes=()) -> dict:
    pl = _merged(planner_path)
    kv = _merged(kvpress_path) if kvpress_path else None
    # the same prompts on both sides: a protocol's cells cut to the fewest any of them scored
    every = pl["cells"] + (kv or {}).get("cells", [])
    per_row = {p: min(len(c["rows"]) for c in every if c["protocol"] == p)
               for p in sorted({c["protocol"] for c in every})}
    for c in every:
        n = per_row[c["protocol"]]
        if len(c["rows"]) > n:
            c["rows"] = c["rows"][:n]
            c.update(summarize(c["rows"]))
    dense = {c["protocol"]: c for c in pl["cells"] if c["policy"] == "dense"}
    kv_dense = {c["protocol"]: c for c in (kv or {}).get("cells", []) if c["press"] == "dense"}
    table = []
    for c in pl["cells"]:
        if c["policy"] == "dense":
            continue
        row = {"protocol": c["protocol"], "budget": c["budget"], "policy": c["policy"],
               "planner_retrieval": c["retrieval"], "planner_se": c["se"],
               "planner_dnll": c["nll"] - dense[c["protocol"]]["nll"] if c["protocol"] in dense else None,
               "planner_cache": c["mean_cache_tokens"], "n": c["n"],
               "planner_rows": [(r["cell"], r["correct"], round(r["nll"], 4)) for r in c["rows"]]}
        press = KVPRESS_NAMES.get(c["policy"])
        k = next((x for x in (kv or {}).get("cells", []) if x["press"] == press
                  and x["protocol"] == c["protocol"] and abs(x["budget"] - c["budget"]) < 1e-9), None)
        if k is not None:
            row.update({"press": press, "kvpress_retrieval": k["retrieval"], "kvpress_se": k["se"],
                        "kvpress_dnll": k["nll"] - kv_dense[c["protocol"]]["nll"]
                        if c["protocol"] in kv_dense else None, "kvpress_n": k["n"],
                        "kvpress_cache": k["mean_cache_tokens"],
                        "kvpress_rows": [(r["cell"], r["correct"], round(r["nll"], 4))
                                         for r in k["rows"]]})
            pairs = list(zip(c["rows"], k["rows"]))
            if all(a["cell"] == b["cell"] for a, b in pairs):       # the same prompts, in order
                row["agree"] = sum(a["correct"] == b["correct"] for a, b in pairs)
                row["max_nll_gap"] = max(abs(a["nll"] - b["nll"]) for a, b in pairs)
        table.append(row)
    best = []
    for proto in sorted({r["protocol"] for r in table}):
        for b in sorted({r["budget"] for r in table if r["protocol"] == proto}, reverse=True):
            rs = [r for r in table if r["protocol"] == proto and r["budget"] == b]
            pb = max(rs, key=lambda r: r["planner_retrieval"])
            ks = [r for r in rs if r.get("kvpress_retrieval") is not None]
            kb = max(ks, key=lambda r: r["kvpress_retrieval"]) if ks else None
            best.append({"protocol": proto, "budget": b, "planner_best": pb["policy"],
                         "planner_best_retrieval": pb["planner_retrieval"],
                         "kvpress_best": kb["press"] if kb else None,
                         "kvpress_best_retrieval": kb["kvpress_retrieval"] if kb else None})
    res = {"planner": {k: v for k, v in pl.items() if k != "cells"},
           "kvpress": {k: v for k, v in (kv or {}).items() if k != "cells"},
           "dense": {p: {"planner": dense[p]["retrieval"],
                         "kvpress": kv_dense[p]["retrieval"] if p in kv_dense else None,
                         "planner_nll": dense[p]["nll"],
                         "kvpress_nll": kv_dense[p]["nll"] if p in kv_dense else None}
                     for p in dense},
           "rows": table, "best": best, "per_row": per_row, "notes": list(notes)}
    _write(res, out_base + ".json")
    with open(out_base + ".md", "w") as f:
        f.write(markdown(res))
    _plot(res, out_base + ".png", log)
    log(f"wrote {out_base}.json/.md/.png")
    return res


def _per_row(res: dict) -> int:
    """Prompts per row: the fewest of any protocol (each protocol's rows share one count)."""
    return min(res.get("per_row", {}).values(), default=0)


def _f(x, fmt=".2f"):
    return "-" if x is None else format(x, fmt)


def markdown(res: dict) -> str:
    p, k = res["planner"], dict(res["kvpress"])
    if "--inside" in k.get("command", ""):          # the re-run inside its environment
        k["command"] = "python benchmarks/peers/" + k["command"].replace(" --inside", "")
    pm = p.get("prompts", {})
    lines = ["# KV-cache eviction: the planner's policies beside kvpress's presses", "",
             f"Model {pm.get('model')}, prompts {pm.get('lengths')} tokens, tasks "
             f"{pm.get('tasks')}, prompts per row: "
             f"{', '.join(f'{p} {n}' for p, n in res.get('per_row', {}).items())} (the first "
             f"of the {pm.get('n')} exported; seed {pm.get('seed')}); "
             f"text: {pm.get('text')}.",
             f"Planner: torch {p.get('torch')}, transformers {p.get('transformers')}, CPU "
             f"({p.get('cpu_threads')} threads); command: `{p.get('command')}`.",
             f"kvpress: {k.get('kvpress', '-')}, torch {k.get('torch', '-')}, transformers "
             f"{k.get('transformers', '-')}; command: `{k.get('command', '-')}`.", "",
             "Retrieval = share of prompts whose answer is the greedy continuation (exact "
             "match, teacher-forced); ± one standard error (binomial). Δnll = change of the "
             "answer's mean negative log-likelihood from dense (same side). Cache = mean "
             "tokens per layer the cache holds after the prefill (kvpress's AdaKV masks evicted "
             "keys in a full-size cache).", ""]
    n = _per_row(res)
    if n < 50:
        lines += [f"**Only {n} prompts in some rows** (the target is >= 50): a retrieval difference "
                  "below about 1/n is noise; the per-prompt Δnll is the finer comparison.", ""]
    lines += [f"- {x}" for x in res.get("notes", [])] + ([""] if res.get("notes") else [])
    for proto, d in res["dense"].items():
        lines.append(f"Dense ({proto}): planner {_f(d['planner'])} (nll {_f(d['planner_nll'], '.3f')}), "
                     f"kvpress {_f(d['kvpress'])} (nll {_f(d['kvpress_nll'], '.3f')}).")
    lines += ["", "Per prompt: *same verdict* = prompts where both sides' answers are right or both "
              "wrong; *nll gap* = the largest difference of one prompt's answer nll between "
              "the two sides.", "",
              "| protocol | budget | planner policy | retrieval | Δnll | cache | kvpress press | "
              "retrieval | Δnll | cache | same verdict | nll gap |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['protocol']} | {r['budget']:.0%} | {r['policy']} | "
                     f"{_f(r['planner_retrieval'])} ± {_f(r['planner_se'])} | "
                     f"{_f(r['planner_dnll'], '+.3f')} | {_f(r['planner_cache'], '.0f')} | "
                     f"{r.get('press', '-')} | "
                     f"{_f(r.get('kvpress_retrieval'))}"
                     f"{' ± ' + _f(r.get('kvpress_se')) if r.get('kvpress_se') is not None else ''} | "
                     f"{_f(r.get('kvpress_dnll'), '+.3f')} | {_f(r.get('kvpress_cache'), '.0f')} | "
                     f"{str(r['agree']) + '/' + str(r['n']) if 'agree' in r else '-'} | "
                     f"{_f(r.get('max_nll_gap'), '.3f')} |")
    lines += ["", "Best per budget:", "", "| protocol | budget | planner best | retrieval | "
              "kvpress best | retrieval |", "|---|---|---|---|---|---|"]
    for b in res["best"]:
        lines.append(f"| {b['protocol']} | {b['budget']:.0%} | {b['planner_best']} | "
                     f"{_f(b['planner_best_retrieval'])} | {b['kvpress_best'] or '-'} | "
                     f"{_f(b['kvpress_best_retrieval'])} |")
    return "\n".join(lines) + "\n"


def _plot(res: dict, path: str, log) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    protos = sorted({r["protocol"] for r in res["rows"]})
    if not protos:
        return
    fig, axes = plt.subplots(1, len(protos), figsize=(6 * len(protos), 4), squeeze=False)
    for ax, proto in zip(axes[0], protos):
        rs = [r for r in res["rows"] if r["protocol"] == proto]
        for pol in sorted({r["policy"] for r in rs}):
            pts = sorted((r["budget"], r["planner_retrieval"], r.get("kvpress_retrieval"))
                         for r in rs if r["policy"] == pol)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{pol}")
            kv = [(p[0], p[2]) for p in pts if p[2] is not None]
            if kv:
                ax.plot([p[0] for p in kv], [p[1] for p in kv], "x--", color=line.get_color(),
                        label=f"kvpress {KVPRESS_NAMES.get(pol, '')}")
        ax.set_xscale("log")
        ax.set_xlabel("KV budget (fraction kept)")
        ax.set_ylabel("retrieval")
        ax.set_title(f"{proto}: planner (o-) vs kvpress (x--)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m planner.quality.eviction")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--lengths", default="4096")
    e.add_argument("--trials", type=int, default=4)
    e.add_argument("--tasks", default="passkey,niah_single,niah_multikey,vt")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--prompts", required=True)
    r.add_argument("--policies", default=",".join(POLICIES))
    r.add_argument("--budgets", default="0.5,0.25,0.1")
    r.add_argument("--protocols", default="agnostic,aware")
    r.add_argument("--cells", default="", help="policy@budget,... (instead of the product)")
    r.add_argument("--no-dense", action="store_true", help="skip the dense cell")
    r.add_argument("--no-shared", action="store_true",
                   help="one prefill per prompt and cell (default: one per prompt)")
    r.add_argument("--check", type=int, default=1,
                   help="prompts per cell (smallest budget) also scored with their own prefill")
    r.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    r.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("--planner", required=True)
    p.add_argument("--kvpress")
    p.add_argument("--out", required=True)
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    a = ap.parse_args(argv)
    if a.cmd == "export":
        export(a.model, [int(x) for x in a.lengths.split(",")], a.trials, a.tasks.split(","),
               a.seed, a.out)
    elif a.cmd == "run":
        prompts = json.load(open(a.prompts))
        if a.limit:
            prompts["samples"] = prompts["samples"][:a.limit]
        cells = [(c.split("@")[0], float(c.split("@")[1])) for c in a.cells.split(",") if c]
        run_planner(prompts, a.policies.split(","), [float(x) for x in a.budgets.split(",")],
                    a.protocols.split(","), a.out, cells=cells, dense=not a.no_dense,
                    shared=not a.no_shared, check=a.check)
    else:
        report(a.planner, a.kvpress, a.out, notes=a.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
