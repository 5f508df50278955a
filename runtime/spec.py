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
    window:    the model's own sliding window: query at position p sees keys j with
               p - window < j (and the causal rule), 0 = none (Mistral, Gemma 2/3, GPT-OSS)
    sinks:     a learned sink logit per query head (GPT-OSS): float [Hq] tensor after the
               modifier tensors; the softmax denominator gains exp(sink_h)
    kv_valid:  a key-validity tensor [B, >= Nkv] (nonzero = a real token: padding) after those;
               keys it marks invalid are masked like the causal rule masks later keys
    empty_rows: what a query row with no visible key gives, as the model computed it: "zero"
               (boolean masks, sinks) or "mean" of v over every key (an additive finite mask:
               every score of the row is the same huge negative value)
    evict:     the site's KV-cache eviction policy (``runtime.eviction``), None = keep every key
    layer:     the site's layer index (from its name) and ``n_layers`` the model's count, for
               per-layer eviction budgets (PyramidKV); None where unknown
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
    window: int = 0
    sinks: bool = False
    kv_valid: bool = False
    empty_rows: str = "zero"
    evict: Optional[object] = None
    layer: Optional[int] = None
    n_layers: Optional[int] = None

    @functools.cached_property
    def key(self) -> str:                   # computed once per spec (hashing repr is not free)
        return f"{self.site}#{stable_hash(self, 12)}"

    @property
    def stats_key(self) -> str:
        return f"{self.owner}/{self.site}"

    def n_score_tensors(self) -> int:
        """Tensors of the score modifiers (a soft-cap has none)."""
        return sum(1 for m in self.mods if m[0] != "softcap")

    def n_mod_tensors(self) -> int:
        """Every tensor the site's ops take in their ``mods`` list: the score modifiers', then
        the sink logits and the key-validity tensor where the site has them."""
        return self.n_score_tensors() + int(self.sinks) + int(self.kv_valid)

    def split(self, tensors) -> tuple:
        """``mods`` list -> (score-modifier tensors, sinks [Hq] or None, key validity or None)."""
        n = self.n_score_tensors()
        if len(tensors) != self.n_mod_tensors():
            raise ValueError(f"site {self.site}: {len(tensors)} modifier tensors given, the spec "
                             f"needs {self.n_mod_tensors()} ({n} for {self.mods}"
                             f"{', sinks' if self.sinks else ''}"
                             f"{', key validity' if self.kv_valid else ''})")
        rest = list(tensors[n:])
        sinks = rest.pop(0) if self.sinks else None
        valid = rest.pop(0) if self.kv_valid else None
        return list(tensors[:n]), sinks, valid

    @property
    def rules(self) -> bool:
        """Has a token rule beyond causality (window, sinks, key validity)."""
        return bool(self.window or self.sinks or self.kv_valid)


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
