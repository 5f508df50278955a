"""Warm up the DSA indexers of a real small model on real text, and measure what it bought.

    python examples/train_dsa_indexer.py                    # SmolLM2-135M, Austen, CPU
    python examples/train_dsa_indexer.py --steps 200 --seq 1024 --topk 64

Stage 1 of DeepSeek Sparse Attention training (``planner.train``): the model is frozen and runs
densely; only the indexers learn, from KL(p_t || softmax(I_t)) with p_t the model's attention
summed over heads. Before and after, on held-out text (a novel the training windows never come
from): the indexers' KL, their top-k recall (the dense attention mass inside each query's
selected set) and the model's perplexity with ``dsa`` at ``--topk`` (sparse attention through
the selected tokens), next to dense perplexity. The trained indexers are saved with
``state_dict`` and reloaded into a freshly compiled model, which must select the same tokens.
Assets come from ``python -m planner assets`` (downloaded once, then offline).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import planner  # noqa: E402
from planner import train  # noqa: E402
from planner.quality.assets import load_corpus, load_model  # noqa: E402


def windows(ids: torch.Tensor, seq: int, count: int, gen: torch.Generator) -> list:
    starts = torch.randint(0, ids.numel() - seq - 1, (count,), generator=gen).tolist()
    return [ids[s:s + seq][None] for s in starts]


@torch.no_grad()
def perplexity(model, batches) -> float:
    nll = [float(model(input_ids=b, labels=b).loss) for b in batches]
    return math.exp(sum(nll) / len(nll))


def indexer_metrics(cm, batches) -> dict:
    res = [train.evaluate_indexers(cm, input_ids=b) for b in batches]
    return {"kl": sum(r["kl"] for r in res) / len(res),
            "recall": sum(r["recall"] for r in res) / len(res)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--index-heads", type=int, default=4)
    ap.add_argument("--index-dim", type=int, default=32)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--out", default="benchmarks/results/quality/dsa_warmup_smollm2",
                    help="writes OUT.json and OUT.md")
    ap.add_argument("--save", default=None, metavar="PATH",
                    help="also save the trained indexers (torch.save of {'policy', 'sites'}); "
                         "`python -m planner eval --indexers PATH` evaluates them")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    lm, tok, desc = load_model(args.model)
    corpus = load_corpus("austen")
    for p in lm.parameters():
        p.requires_grad_(False)                        # stage 1: the model is frozen
    train_ids = tok(corpus.haystack, return_tensors="pt").input_ids[0]
    held_ids = tok(corpus.heldout, return_tensors="pt").input_ids[0]
    held = windows(held_ids, args.seq, args.eval_windows, gen)

    pol = planner.policy("dsa", topk=args.topk, index_heads=args.index_heads,
                         index_dim=args.index_dim)
    cm = planner.compile(lm, policy=pol)
    t0 = time.time()
    ppl_dense = perplexity(lm, held)
    before = indexer_metrics(cm, held)                 # also creates the indexers
    ppl_untrained = perplexity(cm, held)
    print(f"dense ppl {ppl_dense:.3f} | untrained indexers: KL {before['kl']:.4f} recall "
          f"{before['recall']:.4f} ppl(dsa top-{args.topk}) {ppl_untrained:.3f} "
          f"[{time.time() - t0:.0f} s]", flush=True)

    params = train.indexer_parameters(cm)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, args.steps))
    curve = []
    t1 = time.time()
    for step in range(args.steps):
        (batch,) = windows(train_ids, args.seq, 1, gen)
        loss = train.indexer_distillation_loss(cm, input_ids=batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  KL {float(loss):.4f}  [{time.time() - t1:.0f} s]", flush=True)
    train_s = time.time() - t1

    after = indexer_metrics(cm, held)
    ppl_trained = perplexity(cm, held)
    print(f"trained indexers: KL {after['kl']:.4f} recall {after['recall']:.4f} "
          f"ppl(dsa top-{args.topk}) {ppl_trained:.3f}", flush=True)

    # save / reload: a fresh compiled model given the state_dict selects the same tokens
    sd = {k: v.clone() for k, v in cm.state_dict().items() if k.startswith("sparse_indexers.")}
    cm2 = planner.compile(lm, policy=pol)
    missing = cm2.load_state_dict(sd, strict=False)
    with torch.no_grad():
        same = torch.equal(cm(input_ids=held[0]).logits, cm2(input_ids=held[0]).logits)
    print(f"state_dict round trip: {len(sd)} tensors, unexpected {len(missing.unexpected_keys)}, "
          f"identical logits {same}")
    if args.save:
        os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        torch.save({"policy": pol.short(), "sites": train.indexers(cm).export()}, args.save)
        print(f"saved the indexers to {args.save}")

    result = {
        "model": args.model, "model_description": desc, "text": corpus.description,
        "seq": args.seq, "topk": args.topk, "index_heads": args.index_heads,
        "index_dim": args.index_dim, "steps": args.steps, "lr": args.lr,
        "eval_windows": args.eval_windows, "seed": args.seed,
        "indexer_params": sum(p.numel() for p in params), "sites": len(train.indexers(cm).sites),
        "before": {**before, "ppl_dsa": ppl_untrained}, "after": {**after, "ppl_dsa": ppl_trained},
        "ppl_dense": ppl_dense, "train_seconds": train_s, "loss_curve": curve,
        "round_trip_identical": same, "torch": torch.__version__, "triton": _triton_version(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "command": "python examples/train_dsa_indexer.py " + " ".join(argv or sys.argv[1:]),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(report(result))
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not installed"


def report(r: dict) -> str:
    b, a = r["before"], r["after"]
    return f"""# DSA indexer warm-up: {r['model']}

{r['model_description']}. Text: {r['text']}.
Indexers: {r['sites']} sites x ({r['index_heads']} heads x {r['index_dim']} dims),
{r['indexer_params']} parameters in all; model frozen, attention dense during training.
Training: {r['steps']} steps of one {r['seq']}-token window, AdamW lr {r['lr']} (cosine),
{r['train_seconds']:.0f} s on {r['machine']}, torch {r['torch']}, triton {r['triton']}
(the CPU runs the PyTorch references; no Triton kernel is used).
Held-out evaluation: {r['eval_windows']} windows of {r['seq']} tokens from the held-out novel.

| | KL(p ‖ softmax I) | top-{r['topk']} recall of dense attention mass | perplexity, dsa top-{r['topk']} |
|---|---|---|---|
| untrained indexers (initialisation) | {b['kl']:.4f} | {b['recall']:.4f} | {b['ppl_dsa']:.3f} |
| after warm-up | {a['kl']:.4f} | {a['recall']:.4f} | {a['ppl_dsa']:.3f} |
| dense model | – | 1 | {r['ppl_dense']:.3f} |

Top-{r['topk']} of {r['seq']} tokens keeps at most {r['topk'] / r['seq']:.1%} of each query's
keys once past position {r['topk']}. Saved and reloaded indexers (state_dict round trip into a
freshly compiled model) give identical logits: {r['round_trip_identical']}.

Command: `{r['command']}`
"""


if __name__ == "__main__":
    raise SystemExit(main())
