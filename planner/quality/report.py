"""Results of a quality run as a table (tabulate), a Markdown file and a plot (matplotlib)."""
from __future__ import annotations

import os
import re
from typing import Optional

from tabulate import tabulate

from planner.quality.policies import CALIBRATION_RTOL, CALIBRATION_STEPS
from planner.quality.tasks import TASKS


def _acc(cell: Optional[dict]) -> str:
    if not cell:
        return "-"
    k = round(cell["acc"] * cell["n"])
    return f"{cell['acc']:.2f} ({k}/{cell['n']})"


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _tasks_in(result: dict) -> list:
    seen = {r["task"] for r in result["trials"]}
    return [t for t in TASKS if t in seen] + sorted(seen - set(TASKS))


def _scoped(result: dict) -> bool:
    """Whether some row's policy covers only part of the sites (sliding-window models)."""
    return any(r.get("policy_sites") is not None and r.get("sites") is not None
               and r["policy_sites"] < r["sites"] for r in result["rows"])


def scopes(result: dict) -> list:
    """The distinct 'which layers the policy covers' texts of the rows."""
    return list(dict.fromkeys(r["scope"] for r in result["rows"] if r.get("scope")))


def main_table(result: dict, fmt: str = "github") -> str:
    """One row per (length, policy): density, perplexity, retrieval accuracy per task. When
    policies cover only some sites, ``density`` is over those and ``density (all sites)``
    counts the others as 1."""
    tasks = _tasks_in(result)
    scoped = _scoped(result)
    head = ["length", "policy", "params", "density",
            *(["density (all sites)"] if scoped else []), "ppl", "Δppl %", *tasks, "all tasks",
            "answer log p"]
    rows = []
    for r in sorted(result["rows"], key=lambda r: (r["length"], -(r["density"] or 0))):
        lp = [t["logprob"] for t in result["trials"]
              if t["policy"] == r["policy"] and t["length"] == r["length"]]
        rows.append([
            f"{r['length']} ({r['tokens']})", r["policy"], r["params"],
            _f(r["density"], ".3f"),
            *([_f(r.get("density_all_sites"), ".3f")] if scoped else []),
            _f(r["ppl"], ".3f"), _f(r.get("ppl_delta_pct"), "+.2f"),
            *[_acc(r["tasks"].get(t)) for t in tasks],
            _acc({"acc": r["retrieval_acc"], "n": r["retrieval_n"]}) if r["retrieval_n"] else "-",
            _f(sum(lp) / len(lp) if lp else None, ".2f")])
    return tabulate(rows, headers=head, tablefmt=fmt, disable_numparse=True)


def depth_table(result: dict, task: str = "passkey", fmt: str = "github") -> str:
    """Accuracy by needle depth for ``task`` (cells named task@depth)."""
    cells = sorted({t["cell"] for t in result["trials"] if t["task"] == task and "@" in t["cell"]},
                   key=lambda c: float(c.split("@")[1].rstrip("%")))
    if not cells:
        return ""
    rows = []
    for r in sorted(result["rows"], key=lambda r: (r["length"], -(r["density"] or 0))):
        rows.append([r["length"], r["policy"], _f(r["density"], ".3f"),
                     *[_acc(r["tasks"].get(c)) for c in cells]])
    return tabulate(rows, headers=["length", "policy", "density",
                                   *[c.split("@")[1] for c in cells]], tablefmt=fmt,
                    disable_numparse=True)


def check_table(result: dict, fmt: str = "github") -> str:
    if not result.get("checks"):
        return ""
    rows = [[c["policy"], c["tokens"], c["params"], f"{c['max_abs_logit_diff']:.2e}",
             f"{c['density_reference']:.4f}", f"{c['density_fast']:.4f}"] for c in result["checks"]]
    return tabulate(rows, headers=["policy", "tokens", "params", "max abs Δ logit",
                                   "density (reference)", "density (fast CPU attend)"],
                    tablefmt=fmt, disable_numparse=True)


def calibration_table(result: dict, fmt: str = "github") -> str:
    """The calibrated solvers' results: target, solved parameter, its density on the held-out
    calibration windows, and the (value, density) steps of the bisection."""
    recs = [r for r in result.get("calibration", []) if r.get("solved")]
    if not recs:
        return ""
    rows = [[r.get("label", r["name"]), r["tokens"], f"{r['target']:g}", r["params"],
             f"{r['solved']}={r['value']}", f"{r['density']:.4f}",
             f"{len(r['steps'])} x {r['windows']}", f"{r['wall_s']:.0f}",
             ", ".join(f"{v}: {d:.3f}" for v, d in r["steps"])] for r in recs]
    return tabulate(rows, headers=["policy", "tokens", "target", "solved policy", "calibrated",
                                   "density (held-out)", "measurements x windows", "s",
                                   "steps (value: density)"],
                    tablefmt=fmt, disable_numparse=True)


def markdown(result: dict, *, title: str = "Quality: dense vs sparse policies") -> str:
    m = result["meta"]
    cfg = m.get("config", {})
    lines = [f"# {title}", ""]
    facts = [("model", m.get("model")), ("text", m.get("text")),
             ("lengths (prompt tokens)", ", ".join(f"{r['length']} ({r['tokens']})" for r in
                                                  _unique_lengths(result))),
             ("tasks", ", ".join(cfg.get("tasks", []))),
             ("passkey depths", ", ".join(f"{d:.0%}" for d in cfg.get("depths", []))),
             ("trials per cell", cfg.get("trials")), ("perplexity windows", cfg.get("ppl_windows")),
             ("seed", cfg.get("seed")), ("sequence start", m.get("sequence_start")),
             ("policies cover", "; ".join(scopes(result))),
             ("attend" if m.get("device", "CPU") != "CPU" else "attend on CPU", m.get("attend")),
             ("device", m.get("device") if m.get("device", "CPU") != "CPU" else None),
             ("model dtype", m.get("dtype") if m.get("dtype", "float32") != "float32" else None),
             ("machine", m.get("cpu")), ("torch", m.get("torch")),
             ("triton", m.get("triton")), ("transformers", m.get("transformers")),
             ("threads", m.get("threads")), ("planner commit", m.get("commit")),
             ("wall time", f"{m.get('wall_s', 0) / 60:.1f} min")]
    lines += [f"- **{k}**: {v}" for k, v in facts if v not in (None, "")]
    cmds = m.get("commands") or [m.get("command")]
    lines += [f"- **command{'s (run in this order, the later resuming)' if len(cmds) > 1 else ''}"
              f"**: " + "; ".join(f"`{c}`" for c in cmds if c)]
    scope = ("the attention sites the policy covers (see *policies cover*; the column "
             "*density (all sites)* averages over every site, counting the others as 1)"
             if _scoped(result) else "the model's attention sites")
    lines += ["", "## Results", "", main_table(result), "",
              f"Density: mean over {scope} of the fraction of attended pairs "
              "the policy kept, as measured by `planner.inspect` after each prefill (averaged over "
              "all prefills of the row). Accuracy: exact match of the greedy continuation "
              "(every answer token is the argmax, teacher forced through the KV cache), with "
              "(correct/trials). Answer log p: mean over trials of the summed log-probability of "
              "the answer tokens (higher is better).", ""]
    dt = depth_table(result)
    if dt:
        lines += ["## Passkey accuracy by needle depth", "", dt, ""]
    ct = check_table(result)
    if ct:
        lines += ["## Fast CPU attend vs the runtime reference", "", ct, ""]
    cal = calibration_table(result)
    if cal:
        lines += ["## Calibrated densities", "",
                  "`threshold` and `vertical_slash` keep an input-dependent number of pairs: "
                  "their free parameter was bisected until the density `planner.inspect` "
                  "measured on held-out windows of the perplexity text (slots its perplexity "
                  f"windows do not use) was within {CALIBRATION_RTOL:.0%} of the target, or "
                  f"for at most {CALIBRATION_STEPS} measurements; the closest was kept. The "
                  "rows' density is then measured on the evaluation prompts as for every row.",
                  "", cal, ""]
    ft = failure_table(result)
    if ft:
        lines += ["## Retrieval failures: which layer lost the needle", "",
                  "For the failed prompts drawn (`eval --explain-failures N`), the needle map of "
                  "the prompt's prefill: for the last query row, which keys each layer kept "
                  "(share of heads), the needle framed; *dropped by* lists the layers that kept "
                  "less than all of the needle's (head, token) pairs.", "", ft, ""]
    if m.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in m["notes"]] + [""]
    return "\n".join(lines)


def failure_table(result: dict, fmt: str = "github") -> str:
    """Failed trials with a needle map: policy, length, cell, trial, needle kept, the layers
    that dropped part of it, and a link to the picture. "" when none was drawn."""
    rows = []
    for t in result.get("trials", []):
        if not t.get("explain_png"):
            continue
        layers = [re.search(r"(\d+)", x).group(1) if re.search(r"(\d+)", x) else x
                  for x in t.get("needle_dropped_by", [])]
        rows.append([t["policy"], t["length"], t["cell"], t["trial"],
                     f"{t.get('needle_kept', 0):.2f}",
                     ", ".join(layers) if layers else "none (lost downstream)",
                     f"[needle map]({t['explain_png']})"])
    if not rows:
        return ""
    return tabulate(rows, headers=["policy", "length", "cell", "trial", "needle kept",
                                   "dropped by layers", "picture"], tablefmt=fmt,
                    disable_numparse=True)


def _unique_lengths(result: dict) -> list:
    seen, out = set(), []
    for r in result["rows"]:
        if r["length"] not in seen:
            seen.add(r["length"])
            out.append(r)
    return out


def plot(result: dict, path: str, log=print) -> Optional[str]:
    """Accuracy / answer log p / perplexity delta vs measured density, one colour per policy
    family, one marker per length. Returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install 'sparse-planner[plot]'): no plot written")
        return None
    rows = [r for r in result["rows"] if r.get("density") is not None]
    lengths = sorted({r["length"] for r in rows})
    series = lambda r: r.get("series", r["family"])                      # noqa: E731
    fams = sorted({series(r) for r in rows if r["family"] != "dense"})
    fixed = {"block_topk": "tab:blue", "sink_window": "tab:red"}
    palette = ["tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive",
               "tab:cyan", "tab:gray"]
    spare = iter([(c, ls) for ls in ("-", "--", ":", "-.") for c in palette] * 4)
    styles = {f: (fixed[f], "-") if f in fixed else next(spare) for f in fams}
    colors = {f: c for f, (c, _) in styles.items()}
    markers = {n: m for n, m in zip(lengths, ["o", "s", "^", "D", "v"])}
    lp = {}
    for t in result["trials"]:
        lp.setdefault((t["policy"], t["length"]), []).append(t["logprob"])
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    axes = axes.ravel()
    panels = [("passkey accuracy (all depths)", lambda r: r["tasks"].get("passkey", {}).get("acc")),
              ("retrieval accuracy (all tasks)", lambda r: r.get("retrieval_acc")),
              ("mean answer log p", lambda r: (sum(lp[(r["policy"], r["length"])]) /
                                               len(lp[(r["policy"], r["length"])]))
               if lp.get((r["policy"], r["length"])) else None),
              ("perplexity delta to dense (%)", lambda r: r.get("ppl_delta_pct"))]
    for ax, (ylabel, get) in zip(axes, panels):
        for n in lengths:
            dense = next((r for r in rows if r["length"] == n and r["family"] == "dense"), None)
            for fam in fams:
                pts = sorted((r["density"], get(r)) for r in rows
                             if r["length"] == n and series(r) == fam and get(r) is not None)
                if pts and dense is not None and get(dense) is not None:
                    pts.append((dense["density"], get(dense)))
                if pts:
                    ax.plot(*zip(*pts), marker=markers[n], color=colors[fam], alpha=0.85,
                            linestyle=styles[fam][1], label=f"{fam}, {n} tokens")
            if dense is not None and get(dense) is not None:
                ax.plot([dense["density"]], [get(dense)], marker=markers[n], color="black",
                        linestyle="", label=f"dense, {n} tokens")
        ax.set_xscale("log")
        ax.set_xlabel("measured density (fraction of causal pairs kept"
                      + (", layers the policy covers)" if _scoped(result) else ")"))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    for ax in axes[:2]:
        ax.set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=8, handlelength=3.5)
    m = result["meta"]
    fig.suptitle(f"{str(m.get('model', 'model')).split(' (')[0]}: quality vs density "
                 f"(seed {m.get('config', {}).get('seed')}, trials/cell "
                 f"{m.get('config', {}).get('trials')})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
