"""``python -m planner explain``: what each site of a real model kept on one retrieval prompt,
and what it lost, as a page of tables and pictures (``planner.pictures``).

    python -m planner explain --model smollm2-135m --policy threshold --policy sink_window@0.25 \\
        --length 4096 --out benchmarks/results/explain

For each policy the model (offline assets: ``python -m planner assets``) is compiled with the
policy as given (``cost_model="off"``, as the quality harness does), one retrieval prompt of
``--length`` tokens (``planner.quality.tasks``: a passkey at ``--depth`` by default) is
prefilled with the recall recorded (``runtime.recall``: sampled query rows' exact dense softmax
against the kept pairs, every site), and the answer is scored teacher-forced, as in ``eval``.
The page shows density and recall by layer and head, which layers kept the needle for the
prompt's last query row, and the block maps of the sites that lost the most mass; a JSON beside
it holds the numbers.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time

import torch

from planner import pictures
from planner.quality.cli import CliError, _load, _model_help, expected_errors
from planner.quality.policies import PolicySpec, describe
from planner.quality.tasks import TASKS, make_sample, sample_seed


def add_parser(sub, prog: str = "python -m planner") -> None:
    x = sub.add_parser("explain", help="what each attention site kept and lost on a retrieval "
                                       "prompt: an HTML page of tables and pictures",
                       description="Compile a real model with each policy, prefill one retrieval "
                                   "prompt with the recall of the attention mass recorded, and "
                                   "write an HTML page (density and recall by layer and head, "
                                   "which layers kept the needle, block maps) and a JSON.")
    x.add_argument("--model", default="smollm2-135m", metavar="MODEL", help=_model_help())
    x.add_argument("--policy", action="append", dest="policies", metavar="SPEC",
                   help="repeatable: NAME | NAME:k=v,... | NAME@DENSITY (threshold@D and "
                        "vertical_slash@D are calibrated on held-out text first; default: "
                        "threshold and sink_window@0.25)")
    x.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    x.add_argument("--task", default="passkey", choices=TASKS,
                   help="retrieval task of the prompt (default passkey)")
    x.add_argument("--depth", type=float, default=0.5,
                   help="where the answer's needle sits, in [0, 1] (default 0.5)")
    x.add_argument("--seed", type=int, default=0, help="seed of the prompt (default 0)")
    x.add_argument("--rows", type=int, default=64,
                   help="sampled query rows per site (default 64; one per query block at least)")
    x.add_argument("--text", default="austen", choices=["austen", "pydoc"],
                   help="haystack text (default austen)")
    x.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    x.add_argument("--out", default="benchmarks/results/explain", help="output folder")
    x.add_argument("--name", default=None, help="file stem (default explain_<model>_<length>)")
    x.add_argument("--install", action="store_true", help="fetch missing assets first")
    x.set_defaults(func=run_explain, prog=prog)


def _spans_text(codec, ids, spans) -> str:
    return " | ".join(codec.decode(list(ids[a:b])).strip() for a, b in spans)


@expected_errors
def run_explain(args) -> int:
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)                                 # noqa: E731
    specs = [PolicySpec.parse(p) for p in (args.policies or ["threshold", "sink_window@0.25"])]
    if not 0.0 <= args.depth <= 1.0:
        raise CliError(f"--depth {args.depth} is outside [0, 1]", "e.g. --depth 0.5")
    if not pictures.have_matplotlib():               # before minutes of prefill, not after
        raise CliError("explain draws its pictures with matplotlib, which is not installed",
                       "pip install 'sparse-planner[plot]'")
    t0 = time.perf_counter()
    lm, codec, hay, ppl_ids, desc, text_desc = _load(args, log)
    stem = args.name or f"explain_{os.path.basename(os.path.normpath(args.model))}_{{tokens}}"
    cmd = ("python -m planner explain " + " ".join(shlex.quote(a) for a in sys.argv[2:])
           if sys.argv[1:2] == ["explain"] else "")                   # not when called from Python
    explain(lm, codec, hay, ppl_ids, specs, length=args.length, task=args.task,
            depth=args.depth, seed=args.seed, rows=args.rows, out=args.out, stem=stem,
            desc=desc, text_desc=text_desc, command=cmd, log=log, started=t0)
    return 0


def explain(lm, codec, hay, ppl_ids, specs, *, length: int = 4096, task: str = "passkey",
            depth: float = 0.5, seed: int = 0, rows: int = 64, out: str = ".",
            stem: str = "explain_{tokens}", desc: str = "", text_desc: str = "",
            command: str = "", log=print, started: float | None = None) -> tuple:
    """Prefill one ``task`` prompt of ``length`` tokens through ``lm`` compiled with each of
    ``specs`` (``PolicySpec``), recording the recall (``rows`` sampled query rows per site), and
    write ``out/<stem>.html`` (``{tokens}`` in ``stem``: the prompt's tokens), its PNGs and
    ``<stem>.json``. Returns ``(page path, result dict)``.

    >>> page, res = explain(lm, codec, hay, ppl_ids, [PolicySpec.parse("threshold")],
    ...                     length=1024, out="/tmp/x")                 # doctest: +SKIP
    """
    from planner.quality import harness
    from planner.quality.text import lead_of
    t_all = started if started is not None else time.perf_counter()
    desc = desc or type(lm).__name__
    lm = harness.place(lm).eval()
    max_pos = getattr(lm.config, "max_position_embeddings", None)
    n_tok = harness.EvalConfig().prompt_tokens(length, max_pos)
    sample = make_sample(task, codec, hay, n_tok, seed=sample_seed(seed, n_tok, "explain", task,
                                                                 depth),
                         depth=depth if task == "passkey" else None)
    spans = [sample.needle_span]
    log(f"prompt: {task}, {n_tok} tokens, answer {sample.answer!r}, needle at tokens "
        f"{sample.needle_span[0]}..{sample.needle_span[1]} ({sample.needle_pos:.0%} of the "
        f"prompt): {_spans_text(codec, sample.ids, spans)!r}")
    calibrate = None
    if any(s.needs_calibration for s in specs):
        cfg = harness.EvalConfig(lengths=(n_tok,), policies=tuple(s.label for s in specs))
        calibrate = harness.Calibrator(lm, ppl_ids, cfg, lead=lead_of(codec), records=[], log=log)
    reports, table = [], []
    for spec in specs:
        t0 = time.perf_counter()
        resolved = spec.resolve(n_tok, calibrate)
        t_cal = time.perf_counter() - t0
        runner = harness.Runner(lm, resolved)
        t1 = time.perf_counter()
        lps, hits = runner.answer(sample.ids, sample.answer_ids, record=rows)
        t_run = time.perf_counter() - t1
        rep = runner.recorded
        if rep is None or not rep.recordings:
            raise CliError(f"{spec.label}: no site was recorded (no attention site was rewritten "
                           "for this model?)")
        reports.append((spec.label, rep))
        needle = pictures.needle_rows(rep, spans)
        sites = pictures.recorded_sites(rep)
        row = {"policy": spec.label, "params": describe(resolved),
               "answered": all(hits), "answer_tokens_correct": sum(hits),
               "answer_tokens": len(hits), "answer_logprob": round(sum(lps), 4),
               "density": _mean(s.density for s in sites), "recall": _mean(s.recall for s in sites),
               "recall_worst": min(s.recall_worst for s in sites),
               "needle_kept": _mean(x["kept"] for x in needle),
               "layers_dropping_needle": [x["site"] for x in needle if x["kept"] < 0.999],
               "calibrate_s": round(t_cal, 1), "prefill_and_answer_s": round(t_run, 1),
               "sites": [{"site": s.name, "density": s.density, "recall": s.recall,
                          "recall_worst": s.recall_worst,
                          "density_per_head": s.density_per_head,
                          "recall_per_head": s.recall_per_head,
                          "needle_kept": n["kept"], "needle_dense_mass": n["dense_mass"],
                          "needle_mass_kept": n["kept_mass"]}
                         for s, n in zip(sites, needle)]}
        table.append(row)
        log(f"  {spec.label:<20} {row['params']:<48} density {row['density']:.3f} recall "
            f"{row['recall']:.3f} (worst row {row['recall_worst']:.2f}) needle kept "
            f"{row['needle_kept']:.2f}, answered {'yes' if row['answered'] else 'no'} "
            f"[{t_cal + t_run:.0f}s]")
        del runner
        harness._release()
    stem = stem.replace("{tokens}", str(n_tok)).replace("-", "_")
    page = os.path.join(out, stem + ".html")
    wall = time.perf_counter() - t_all
    intro = (f"{desc}; prompt: {task} at depth {depth:g}, {n_tok} tokens, needle "
             f"{_spans_text(codec, sample.ids, spans)!r} at tokens {sample.needle_span[0]}.."
             f"{sample.needle_span[1]}; answer {sample.answer!r}, scored teacher-forced after "
             f"the recorded prefill." + (f" Text: {text_desc}." if text_desc else ""))
    notes = ([f"command: {command}"] if command else []) + [
        f"{wall:.0f} s on {torch.get_num_threads()} CPU threads "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}; {rows} "
        f"sampled query rows per site (one per query block at least, and the last row)"]
    details = {r["policy"]: f"{r['params']}; {'answered' if r['answered'] else 'missed'} "
                            f"({r['answer_tokens_correct']}/{r['answer_tokens']} answer tokens)"
               for r in table}
    pictures.write_page(page, reports, title=f"What each site kept: {desc}, {n_tok} tokens",
                        spans=spans, intro=intro, notes=notes, details=details)
    result = {"meta": {"command": command, "model": desc, "tokens": n_tok, "task": task,
                       "depth": depth, "seed": seed, "needle_span": list(sample.needle_span),
                       "answer": sample.answer, "rows": rows, "wall_s": round(wall, 1),
                       "threads": torch.get_num_threads(), "torch": torch.__version__},
              "policies": table}
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {page} (and {stem}.json, {stem}_*.png) in {wall:.0f} s")
    return page, result


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None
