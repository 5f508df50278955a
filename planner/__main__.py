"""Command line: ``python -m planner demo``, ``eval`` and ``assets`` (planner.quality)."""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _time(fn, reps: int = 3) -> float:
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return sorted(t)[len(t) // 2]


def demo(args) -> int:
    import planner
    from planner.models import GPTConfig, TinyGPT

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=args.layers, n_head=4, n_embd=128, block_size=max(2048, args.seq))
    model = TinyGPT(cfg).eval()
    text = (planner.__doc__ or "sparse attention ") * 200
    ids = torch.tensor([list(text.encode()[: args.seq])])                    # [1, N] bytes
    print(f"model: built-in TinyGPT ({cfg.n_layer} layers, {cfg.n_head} heads, "
          f"d={cfg.n_embd // cfg.n_head}), input: {ids.shape[1]} tokens, torch {torch.__version__}")
    with torch.no_grad():
        ref = model(ids)
        t_ref = _time(lambda: model(ids))
        policies = {
            "dense": "dense",
            "block_topk": planner.policy("block_topk", block=64, topk=args.topk),
            "sink_window": planner.policy("sink_window", sink=64, window=256),
            "dsa (untrained)": planner.policy("dsa", topk=256, index_heads=4, index_dim=32),
        }
        rows = []
        first = None
        for name, pol in policies.items():
            cm = planner.compile(model, policy=pol)
            out = cm(ids)
            t = _time(lambda: cm(ids))
            rep = planner.inspect(cm)
            dens = [s.density for s in rep.sites if s.density is not None]
            err = (out - ref).abs().max().item()
            agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
            rows.append([name, f"{err:.2e}", f"{agree:.3f}",
                         f"{sum(dens) / len(dens):.3f}" if dens else "-", f"{t * 1e3:.1f}",
                         f"{t_ref * 1e3:.1f}"])
            if first is None and name == "block_topk":
                first = (cm, rep)
        cm, rep = first
        print("\n== sites (block_topk) ==")
        print(rep)
        site = rep.sites[0].name
        print(f"\n== rewritten graph of {site} ==")
        print(rep.site_code(site))
        from tabulate import tabulate
        print("\n== dense model vs compiled (CPU reference kernels) ==")
        print(tabulate(rows, headers=["policy", "max |err| logits", "argmax agree",
                                      "density", "ms compiled", "ms original"]))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m planner", description="sparse-planner")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compile the built-in GPT with several policies and compare")
    d.add_argument("--seq", type=int, default=1024, help="input length in tokens")
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--topk", type=int, default=4, help="block_topk: key blocks per query block")
    d.set_defaults(func=demo)
    from planner.quality.cli import add_parsers as add_quality_parsers
    add_quality_parsers(sub)                                    # eval, assets
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
