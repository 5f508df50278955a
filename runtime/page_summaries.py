"""Quest page summaries kept with the KV cache: per page of keys the channel-wise max and min,
extended by the new tokens only instead of recomputed from the whole cache every decode step.

A decoding graph appends the step's keys to the cache (``keys = cat([past, new], dim=-2)``).
For sites running ``quest``, the rewrite turns that ``cat`` into ``sparse.append(past, new,
page)``, which concatenates and, knowing the result is exactly ``past`` followed by ``new``,
extends ``past``'s summaries to the result: only the pages the new tokens touch are computed
(the last page of ``past`` is partial until it fills). The summaries are found again by the
identity of the keys tensor (a weak reference, so they go when the tensor goes) and its length;
a keys tensor without them (the first call, another producer) gets them computed in full, so
the answer never depends on whether they were kept. Extending moves the summaries from
``past`` to the result: ``past`` itself is not expected again (a cache holds the newest keys).

Layout: ``[B * Hkv, capacity, D padded to a power of two]`` in the keys' dtype, the capacity
doubled as the cache grows (``runtime.kernels.select.quest_page_summaries``).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional

import torch

from codegen.common import next_pow2
from runtime.kernels import select as sk
from runtime.kernels.launch import MAX_HEAD_DIM, kernels_enabled
from runtime.tensor_notes import TensorNotes

#: pages computed and extensions that found the past's summaries (for tests and reports)
COUNTERS: collections.Counter = collections.Counter()


@dataclass
class Summary:
    page: int
    tokens: int
    mx: torch.Tensor
    mn: torch.Tensor


_STATE = TensorNotes()


def _find(k: torch.Tensor, page: int, take: bool = False) -> Optional[Summary]:
    s = _STATE.get(k)
    if s is None or s.page != page or s.tokens != k.shape[2] \
            or s.mx.shape[0] != k.shape[0] * k.shape[1]:
        return None
    if take:
        _STATE.pop(k)
    return s


def lookup(k: torch.Tensor, page: int) -> Optional[tuple]:
    """``(max, min)`` summaries kept for exactly this keys tensor, or None."""
    s = _find(k, page)
    return None if s is None else (s.mx, s.mn)


def usable(k: torch.Tensor, page: int) -> bool:
    return (kernels_enabled(k) and k.dim() == 4 and k.shape[-1] <= MAX_HEAD_DIM
            and sk.quest_page_ok(page))


def extend(past: torch.Tensor, out: torch.Tensor, page: int) -> None:
    """``out`` is ``past`` followed by new keys: give it summaries, computing only the pages
    the new keys touch when ``past`` has its own."""
    if not usable(out, page) or out.shape[2] == 0:
        return
    B, H, n, D = out.shape
    n_p = -(-n // page)
    prev = _find(past, page, take=True) if past.shape[:2] == out.shape[:2] else None
    first = 0
    if prev is not None and prev.mx.dtype == out.dtype:
        first = prev.tokens // page              # the partial last page is recomputed
        COUNTERS["extensions"] += 1
        mx, mn = prev.mx, prev.mn
        if mx.shape[1] < n_p:                    # grow: double the capacity
            cap = max(n_p, 2 * mx.shape[1])
            new_mx = mx.new_zeros((B * H, cap, mx.shape[2]))
            new_mn = mn.new_zeros((B * H, cap, mn.shape[2]))
            new_mx[:, :first] = mx[:, :first]
            new_mn[:, :first] = mn[:, :first]
            mx, mn = new_mx, new_mn
    else:
        d_p = next_pow2(max(D, 16))
        mx = out.new_zeros((B * H, n_p, d_p))
        mn = out.new_zeros((B * H, n_p, d_p))
    sk.quest_page_summaries(out, page, mx, mn, first_page=first)
    COUNTERS["pages"] += (n_p - first) * B * H
    _STATE.put(out, Summary(page, n, mx, mn))
