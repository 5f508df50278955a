"""How one eviction-quality sample is scored, shared by the planner's harness
(``planner.quality.eviction``) and the kvpress peer (``benchmarks/peers/kvpress_eval.py``, which
runs in an environment that does not import the planner and loads this file by its path): it
imports nothing but torch and transformers.

Protocols: ``agnostic`` compresses the context alone, then the question and the answer are read
over the compressed cache; ``aware`` compresses context + question. The answer is teacher-forced
after the prefill, positions continuing from the full prompt's length.
"""
from __future__ import annotations

import contextlib

import torch


def answer_scores(lm, sample: dict, protocol: str, press=None) -> tuple:
    """(correct, answer nll, cache length per layer after the prefill) of one sample, with
    ``lm`` evicting (or not) in its prefill, or under ``press(lm)`` (a kvpress press: its hook
    compresses the prefill); the cache is a ``DynamicCache``."""
    from transformers import DynamicCache
    ctx, q, ans = sample["context"], sample["question"], sample["answer"]
    first, rest = (ctx, q + ans[:-1]) if protocol == "agnostic" else (ctx + q, ans[:-1])
    try:
        cache = DynamicCache(config=lm.config)
    except TypeError:                              # a transformers whose cache takes no config
        cache = DynamicCache()
    with torch.no_grad():
        with press(lm) if press is not None else contextlib.nullcontext():
            out = lm(input_ids=torch.tensor([first]), past_key_values=cache, use_cache=True,
                     logits_to_keep=1)
        lengths = [layer.keys.shape[2] for layer in cache.layers]
        logits = [out.logits[0, -1:].float()]
        logits += [o.logits[0].float() for o in feed(lm, cache, rest, len(first))]
    lg = torch.cat(logits)[-len(ans):]                                  # rows predicting ans
    target = torch.tensor(ans)
    nll = float(torch.nn.functional.cross_entropy(lg, target))
    return bool((lg.argmax(-1) == target).all()), nll, lengths


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
        yield lm(input_ids=torch.tensor([part]), past_key_values=cache, use_cache=True,
                 position_ids=torch.arange(start + i, start + i + len(part))[None], **kw)
