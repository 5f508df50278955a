"""How one eviction-quality sample is scored, shared by the planner's harness
(``planner.quality.eviction``) and the kvpress peer (``benchmarks/peers/kvpress_eval.py``, which
runs in an environment that does not import the planner and loads this file by its path): it
imports nothing but torch and transformers.

Protocols: ``agnostic`` compresses the context alone, then the question and the answer are read
over the compressed cache; ``aware`` compresses context + question. The answer is teacher-forced
after the prefill, positions continuing from the full prompt's length.

One prefill can serve every eviction of a sample: the prefill itself attends densely (a cache is
evicted after it), so its logits and the full K/V it caches do not depend on the policy; only
the kept keys do. ``prefill`` runs it once (its caller records what each layer's eviction reads),
``cache_of`` builds a cache holding one eviction's kept K/V, and ``finish`` scores the sample over
it, as ``answer_scores`` does after evicting inside the prefill.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch


def parts(sample: dict, protocol: str) -> tuple:
    """(prefill ids, ids read over the evicted cache, answer ids) of ``sample``."""
    ctx, q, ans = sample["context"], sample["question"], sample["answer"]
    if protocol == "agnostic":
        return ctx, q + ans[:-1], ans
    if protocol == "aware":
        return ctx + q, ans[:-1], ans
    raise ValueError(f"protocol must be 'agnostic' or 'aware', got {protocol!r}")


def cache_arg(model, cache) -> dict:
    """``{name: cache}``: the keyword under which ``model``'s forward takes its cache. transformers
    5.25 renamed ``past_key_values`` to ``cache`` (the old name warns, and is removed in 5.40);
    older releases (kvpress's environment pins < 5.3) know only ``past_key_values``."""
    return {_cache_name(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_name(cls) -> str:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def new_cache(lm):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=lm.config)
    except TypeError:                              # a transformers whose cache takes no config
        return DynamicCache()


def prefill(lm, ids, press=None, cache=None):
    """(logits of the last prefill position [1, V] fp32, the ``DynamicCache``): ``lm`` on ``ids``
    (an eviction compiled into ``lm`` compacts the cache here), or under ``press(lm)`` (a kvpress
    press: its hook compresses the cache); into ``cache`` if given, else a new one."""
    cache = new_cache(lm) if cache is None else cache
    with torch.no_grad():
        with press(lm) if press is not None else contextlib.nullcontext():
            out = lm(input_ids=torch.tensor([list(ids)]), **cache_arg(lm, cache), use_cache=True,
                     logits_to_keep=1)
    return out.logits[0, -1:].float(), cache


def cache_of(lm, layers):
    """A ``DynamicCache`` whose layer i holds exactly ``layers[i] = (keys, values)`` (the very
    tensors: notes kept with a tensor, such as per-head valid counts, stay attached)."""
    cache = new_cache(lm)
    for i, (k, v) in enumerate(layers):
        cache.update(k[:, :, :0], v[:, :, :0], i)          # initialises the layer
        cache.layers[i].keys, cache.layers[i].values = k, v
    return cache


def finish(lm, cache, last_logits, sample: dict, protocol: str) -> tuple:
    """(correct, answer nll, cache length per layer) of ``sample`` whose prefill ended with
    ``last_logits`` and left ``cache``: the rest of the prompt and the answer are read over it."""
    first, rest, ans = parts(sample, protocol)
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    logits = [last_logits]
    with torch.no_grad():
        logits += [o.logits[0].float() for o in feed(lm, cache, rest, len(first))]
    lg = torch.cat(logits)[-len(ans):]                                  # rows predicting ans
    target = torch.tensor(ans)
    nll = float(torch.nn.functional.cross_entropy(lg, target))
    return bool((lg.argmax(-1) == target).all()), nll, lengths


def answer_scores(lm, sample: dict, protocol: str, press=None) -> tuple:
    """(correct, answer nll, cache length per layer after the prefill) of one sample, with
    ``lm`` evicting (or not) in its prefill, or under ``press(lm)`` (a kvpress press: its hook
    compresses the prefill); the cache is a ``DynamicCache``."""
    first, _, _ = parts(sample, protocol)
    last, cache = prefill(lm, first, press)
    return finish(lm, cache, last, sample, protocol)


def same_scores(a: tuple, b: tuple, tol: float = 1e-4) -> bool:
    """Two ``answer_scores`` results agree: the same verdict and cache lengths, nll within
    ``tol`` (the shared prefill against a prefill that evicts itself)."""
    return a[0] == b[0] and list(a[2]) == list(b[2]) and abs(a[1] - b[1]) <= tol


def summarize(rows: list) -> dict:
    """n, retrieval (share answered right), its binomial standard error, mean answer nll and
    (where rows carry it) the mean cache length."""
    n = len(rows)
    acc = sum(r["correct"] for r in rows) / n if n else float("nan")
    se = math.sqrt(acc * (1 - acc) / n) if n else float("nan")
    out = {"n": n, "retrieval": acc, "se": se,
           "nll": sum(r["nll"] for r in rows) / n if n else float("nan")}
    if n and all("cache" in r for r in rows):
        out["mean_cache_tokens"] = sum(r["cache"] for r in rows) / n
    return out


class Cells:
    """One side's scores per (protocol, policy or press, budget) cell, in the order met: a
    row per prompt (``add``), the cell's summary kept current, the check of a shared prefill
    against a direct one counted (``check``)."""

    def __init__(self, side: str, key: str):
        self.side, self.key, self.cells = side, key, []

    def cell(self, proto: str, name: str, budget) -> dict:
        for c in self.cells:
            if (c["protocol"], c[self.key], c["budget"]) == (proto, name, budget):
                return c
        c = {"side": self.side, self.key: name, "budget": budget, "protocol": proto,
             "rows": [], "seconds": 0.0, "checked": 0}
        self.cells.append(c)
        return c

    def add(self, proto: str, name: str, budget, sample: dict, res: tuple, seconds: float):
        c = self.cell(proto, name, budget)
        ok, nll, lens = res
        c["rows"].append({"cell": sample["cell"], "length": sample.get("length"),
                          "correct": ok, "nll": nll, "cache": sum(lens) / len(lens)})
        c["seconds"] += seconds
        c.update(summarize(c["rows"]))

    def check(self, proto: str, name: str, budget, i: int, shared: tuple, direct: tuple):
        """Count a prompt scored both ways; a difference stops the run."""
        if not same_scores(shared, direct):
            raise RuntimeError(
                f"{name}@{budget} {proto} prompt {i}: the shared prefill gives {shared[:2]} "
                f"(cache {shared[2][:3]}...), its own prefill {direct[:2]} "
                f"(cache {direct[2][:3]}...)")
        self.cell(proto, name, budget)["checked"] += 1

    def line(self, proto: str) -> str:
        return ", ".join(f"{c[self.key]}@{c['budget']} {c['retrieval']:.2f}"
                         for c in self.cells if c["protocol"] == proto and c["rows"])


def feed(lm, cache, tokens, start: int, **kw):
    """Calls of ``lm`` reading ``tokens`` over ``cache`` at positions from ``start`` (the full
    prompt's length, whatever the cache kept), each call's output yielded: all of them in one
    call, or one token per call where the layers kept different lengths (per-layer budgets: the
    model builds one mask for every layer, sized by the first layer's cache, and a one-token
    call needs none); the logits are the same either way (causal). ``kw``: more arguments of
    each call (``logits_to_keep``)."""
    tokens = list(tokens)
    step = max(1, len(tokens)) if len({x.keys.shape[2] for x in cache.layers}) == 1 else 1
    for i in range(0, len(tokens), step):
        part = tokens[i:i + step]
        yield lm(input_ids=torch.tensor([part]), **cache_arg(lm, cache), use_cache=True,
                 position_ids=torch.arange(start + i, start + i + len(part))[None], **kw)
