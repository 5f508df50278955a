"""Command line: ``python -m planner demo``, ``eval``, ``assets`` and ``explain`` (also
``sparse-planner``).

``demo`` needs only the base install (torch, triton, networkx, sympy, tabulate): the ``eval``
and ``assets`` parsers are registered from ``planner.quality.cli``, whose heavier dependencies
(numpy, transformers, gguf) are imported inside the command functions, not at parse time.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

PROG_MODULE = "python -m planner"          # prog when run as ``python -m planner``
PROG_SCRIPT = "sparse-planner"             # prog of the console script


def prog_name(argv0: str | None = None) -> str:
    """The name the user typed: ``python -m planner`` (argv[0] is this file) or the console
    script's name."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    base = os.path.basename(argv0 or "")
    if base in ("__main__.py", "-m", "-c", ""):
        return PROG_MODULE
    return PROG_SCRIPT if base.startswith(PROG_SCRIPT) else PROG_MODULE


def _best_ms(fn, reps: int) -> float:
    """Fastest of ``reps`` wall-clock calls of ``fn``, in ms (the call before was the warm-up)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _site_lines(rep, site: str, width: int = 96) -> list:
    """The ``sparse.*`` nodes of one site, one short line each (``name = op(args)``)."""
    out = []
    for line in rep.site_code(site).splitlines():
        if "sparse." not in line:
            continue
        line = re.sub(r", kwargs = \{\}\)$", "", line).replace("%", "").replace(" : = ", " = ")
        line = line.replace(".default((", "(").replace("torch.ops.", "")
        out.append(_short(line, width))
    return out


def demo_policies(args) -> dict:
    """Label -> (policy, cost model) of the demo's rows (every one through
    ``planner.compile``): the policies followed as given (``cost_model="off"``), then the
    default, where the cost model runs a site densely when the sparse path would be slower."""
    import planner
    bt = planner.policy("block_topk", block=64, topk=args.topk)
    return {
        "dense": (planner.policy("dense"), "off"),
        "block_topk": (bt, "off"),
        "sink_window": (planner.policy("sink_window", sink=64, window=args.window), "off"),
        "dsa (untrained)": (planner.policy("dsa", topk=args.dsa_topk, index_heads=4,
                                           index_dim=32), "off"),
        "block_topk (auto)": (bt, "auto"),
    }


def demo(args) -> int:
    import planner
    from tabulate import tabulate

    from planner.models import GPTConfig, TinyGPT

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=args.layers, n_head=4, n_embd=128, block_size=max(2048, args.seq))
    model = TinyGPT(cfg).eval()
    text = ((planner.__doc__ or "") + (planner.compile.__doc__ or "")) * 64
    ids = torch.tensor([list(text.encode()[: args.seq])])                    # [1, N] bytes
    layers = f"{cfg.n_layer} layer{'s' * (cfg.n_layer > 1)}"
    print(f"sparse-planner demo: the built-in TinyGPT ({layers}, {cfg.n_head} heads x "
          f"{cfg.n_embd // cfg.n_head}, random weights)\non {ids.shape[1]} tokens of text; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads.")
    print("Each row compiles the model with planner.compile(model, policy=...): its attention\n"
          "sites are found and rewritten into sparse.score -> sparse.select -> sparse.attend.\n")
    rows, first, kernel_site = [], None, "first site"
    with torch.no_grad():
        ref = model(ids)                                                     # [1, N, 256]
        t_ref = _best_ms(lambda: model(ids), args.reps)
        for label, (pol, cost) in demo_policies(args).items():
            t0 = time.perf_counter()
            cm = planner.compile(model, policy=pol, cost_model=cost)
            out = cm(ids)                                                    # capture + rewrite
            t_first = time.perf_counter() - t0
            t = _best_ms(lambda: cm(ids), args.reps)
            rep = planner.inspect(cm)
            dens = [s.density for s in rep.sites if s.density is not None]
            err = (out - ref).abs().max().item()
            agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
            site = rep.sites[0] if rep.sites else None
            kernel_site = site.name if site else kernel_site
            rows.append([label, f"{sum(dens) / len(dens):.3f}" if dens else "-", f"{err:.1e}",
                         f"{agree:.3f}", f"{t:.0f}", f"{t_first:.1f}",
                         _short(site.kernel or "-", 20) if site else "no site found"])
            if label == "block_topk":
                first = (rep, site)
    rows.append(["original model", "-", "-", "-", f"{t_ref:.0f}", "-", "eager PyTorch"])
    print(tabulate(rows, headers=["policy", "density", "max|dlogit|", "argmax=",
                                  "CPU ms", "1st call s", f"kernel of {kernel_site}"],
                   disable_numparse=True, colalign=("left",) + ("right",) * 5 + ("left",)))
    calls = f"{args.reps} call{'s' if args.reps > 1 else ''}"
    print(f"\ndensity: kept / causal pairs (mean over sites). max|dlogit|: largest logit "
          f"difference to the\noriginal model (dense: the identity check; random weights, so "
          f"sparse rows differ).\nargmax=: positions with the same top token. CPU ms: best of "
          f"{calls} on this CPU through the\nkernel in the last column (cpu_gather: SDPA for "
          f"dense sites, only the kept blocks for\nsparse ones; the GPU speed-ups are in "
          f"README.md \"Measured\"). 1st call s: capture, rewrite\nand first run. The first "
          f"rows follow each policy as given (cost_model=\"off\"); \"(auto)\"\nis "
          f"planner.compile's default, whose cost model runs a site densely where its sparse\n"
          f"path would be slower (on 2 CPU cores: above ~10% density, so at this length).")
    if first is not None:
        rep, site = first
        print(f"\nsite {site.name} ({site.pattern}) under block_topk, as rewritten:")
        for line in _site_lines(rep, site.name):
            print("  " + line)
    nxt = [("rep = planner.inspect(cm); print(rep)",
            "every site: pattern, shapes, density, kernel"),
           ('README.md "Use", "Policies"', "planner.compile, the policies and their parameters"),
           ('README.md "Measured"', "GPU kernel and whole-model speed (H100)"),
           (f"{args.prog} eval --help", 'quality on a real model (README "Quality on a real '
                                          'model")')]
    w = max(len(a) for a, _ in nxt) + 2
    print("\nNext:\n" + "\n".join(f"  {a:<{w}}{b}" for a, b in nxt))
    return 0


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not a positive integer")
    return n


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from planner.quality.cli import add_parsers as add_quality_parsers    # numpy-free at import
    from planner.explain import add_parser as add_explain_parser
    prog = prog or prog_name()
    ap = argparse.ArgumentParser(prog=prog,
                                 description="sparse-planner: makes attention in PyTorch models "
                                             "dynamically sparse")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{demo,eval,assets,explain}")
    d = sub.add_parser("demo", help="compile the built-in GPT with several policies and compare "
                                    "(CPU, no downloads)",
                       description="Compile the built-in TinyGPT with dense, block_topk, "
                                   "sink_window and dsa; print density, logit error and time "
                                   "per policy.")
    d.add_argument("--seq", type=_positive, default=1024,
                   help="input length in tokens (default 1024)")
    d.add_argument("--layers", type=_positive, default=2, help="transformer layers (default 2)")
    d.add_argument("--topk", type=_positive, default=2,
                   help="block_topk: key blocks of 64 per query block, besides the sink and "
                        "local blocks (default 2)")
    d.add_argument("--window", type=_positive, default=192,
                   help="sink_window: keys within this many positions (default 192; sink 64)")
    d.add_argument("--dsa-topk", type=_positive, default=192,
                   help="dsa: keys per query chosen by the untrained indexer (default 192)")
    d.add_argument("--reps", type=_positive, default=2,
                   help="timed calls per row after the first (default 2; the best is shown)")
    d.set_defaults(func=demo, prog=prog)
    add_quality_parsers(sub, prog)                              # eval, assets
    add_explain_parser(sub, prog)                               # explain
    return ap


def main(argv=None, prog: str | None = None) -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main(prog=PROG_MODULE))
