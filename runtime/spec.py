"""The frozen spec each sparse IR node carries, and the registry that names it in the graph.

Custom ops take plain strings, so a rewritten node holds a *key* such as
``"model.layers.0.self_attn#3f2a9c..."``; ``lookup(key)`` gives the ``SiteSpec`` back.
Sequence lengths are not part of a spec: they come from the tensors at run time.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Optional

from runtime.cache import stable_hash


@dataclass(frozen=True)
class SiteSpec:
    """Everything a site's score/select/attend need besides its tensors.

    site:      module path of the attention (``model.layers.3.self_attn``)
    owner:     id of the compiled model that holds the site (stats are kept per owner)
    policy:    the frozen Policy chosen for the site
    scale:     softmax scale applied to q @ k^T
    causal:    None | "upper_left" | "lower_right" (see codegen.attention.reference)
    gqa_group: query heads per key head (1 when keys are already repeated)
    mods:      score modifiers in application order: ("add",) ("keep",) ("fill", v) ("softcap", c)
    block:     block size of the block lists (block policies)
    """

    site: str
    owner: str
    policy: object
    scale: float
    causal: Optional[str] = None
    gqa_group: int = 1
    mods: tuple = ()
    block: int = 64
    schedule: Optional[object] = field(default=None, compare=True)

    @functools.cached_property
    def key(self) -> str:                   # computed once per spec (hashing repr is not free)
        return f"{self.site}#{stable_hash(self, 12)}"

    @property
    def stats_key(self) -> str:
        return f"{self.owner}/{self.site}"

    def n_mod_tensors(self) -> int:
        return sum(1 for m in self.mods if m[0] != "softcap")


_REGISTRY: dict[str, SiteSpec] = {}
_LOCK = threading.Lock()


def register(spec: SiteSpec) -> str:
    key = spec.key
    with _LOCK:
        _REGISTRY[key] = spec
    return key


def lookup(key: str) -> SiteSpec:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise KeyError(f"no site spec registered under {key!r}: the graph was rewritten in another "
                       f"process; compile the model again in this one") from None
