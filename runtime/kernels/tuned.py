"""Schedules measured on a card: the fastest checked config of a section of
``benchmarks/dsa_sweep.py``'s ``dsa_sweep_<card>[_round<n>].json`` (committed under
``benchmarks/results``)
becomes the default schedule of that kernel, on that card, at the shape it was measured at.

A row counts when it ran (no error, not skipped) and passed the sweep's checks: outputs within
``MAX_REL_ERR`` of the PyTorch reference and of the section's first config (sparse MLA), or at
least ``MIN_AGREEMENT`` of the first config's selected keys (indexer). No file, no such row, or
another card or shape: ``None``, and the launcher keeps its built-in default.

    >>> best("mla_prefill", "cpu", dk=576, dv=512) is None     # measured on GPUs only
    True
"""
from __future__ import annotations

import functools
import glob
import json
import os
from typing import Optional

from runtime.costmodel import RESULTS_DIR as RESULTS
from runtime.costmodel import card_name as card_of

MAX_REL_ERR = 2e-2           # bf16 outputs against the fp32 reference
MIN_AGREEMENT = 0.99         # share of the first schedule's selected keys


def reload() -> None:
    """Forget what was read (the files under ``RESULTS`` changed)."""
    _rows.cache_clear()
    _best.cache_clear()


@functools.lru_cache(maxsize=None)
def _rows(card: str, results: str) -> tuple:
    """The rows of every sweep file of ``card`` (``dsa_sweep_<card>.json`` and later rounds,
    ``dsa_sweep_<card>_round<n>.json``)."""
    rows = []
    for path in sorted(glob.glob(os.path.join(results, f"dsa_sweep_{card}.json"))
                       + glob.glob(os.path.join(results, f"dsa_sweep_{card}_round*.json"))):
        with open(path) as fh:
            rows += json.load(fh).get("rows", ())
    return tuple(rows)


def _passed(row: dict) -> bool:
    if "ms" not in row or "schedule" not in row or row.get("error") or row.get("skipped"):
        return False
    if "agreement" in row:
        return row["agreement"] >= MIN_AGREEMENT
    return (row.get("rel_err_ref", 1.0) <= MAX_REL_ERR
            and row.get("rel_err_first", 1.0) <= MAX_REL_ERR)


def best(section: str, device, results: Optional[str] = None, **shape) -> Optional[dict]:
    """The schedule fields (a dict) of the fastest row of ``section`` measured on ``device``'s
    card whose recorded shape equals ``shape`` (keys of the row, e.g. ``dk=576, dv=512``),
    or None. Looked up once per (section, card, shape): launchers ask on every call."""
    card = card_of(device)
    if card is None:
        return None
    found = _best(section, card, results or RESULTS, tuple(sorted(shape.items())))
    return dict(found) if found is not None else None


@functools.lru_cache(maxsize=None)
def _best(section: str, card: str, results: str, shape: tuple) -> Optional[tuple]:
    rows = [r for r in _rows(card, results)
            if r.get("section") == section and _passed(r)
            and all(r.get(k) == v for k, v in shape)]
    return tuple(min(rows, key=lambda r: r["ms"])["schedule"].items()) if rows else None
