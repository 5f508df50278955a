"""Sparsity policies: frozen dataclasses, presets by name, per-layer maps.

A policy says *what* a site keeps; the passes and the runtime decide *how*. The values (the
catalogue classes, their validation, ``PRESETS``, ``PolicyMap``) live in ``runtime.policies``,
below the passes and the runtime that read them; this module is their user-facing face.

Example::

    >>> import planner
    >>> planner.policy("block_topk", block=64, topk=8)
    BlockTopK(block=64, topk=8, sink_blocks=1, local_blocks=1)
    >>> planner.policy("sink_window", window=128)
    SinkWindow(sink=4, window=128)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Union

from runtime.eviction import (EVICTIONS, H2O, TOVA, AdaKV, Eviction, PyramidKV,  # noqa: F401
                              SnapKV, StreamingLLM, ValueSnapKV, eviction)
from runtime.policies import (DSA, PRESETS, Auto, BigBird, BlockTopK, Dense, Longformer,  # noqa: F401
                              NativeDSA, Policy, PolicyMap, Quest, SinkWindow, Threshold,
                              VerticalSlash)


DEFAULT_POLICY = "block_topk"


def policy(name: str, **params: Any) -> Policy:
    """Build a policy by preset name, overriding its defaults with ``params``.

    >>> policy("dense")
    Dense()
    """
    if isinstance(name, Policy):
        _check_known(name.name, type(name), params)
        # replace() builds a new instance through __init__, so __post_init__ validates it
        return dataclasses.replace(name, **params) if params else name
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown policy {name!r}; valid names: {', '.join(sorted(PRESETS))}")
    cls = PRESETS[name]
    _check_known(name, cls, params)
    return cls(**params)                   # validated in __post_init__


def _check_known(name: str, cls: type, params: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - known
    if unknown:
        raise TypeError(f"policy {name!r} has no parameter(s) {sorted(unknown)}; "
                        f"valid: {sorted(known) or 'none'}")


PolicyLike = Union[str, Policy, Mapping[str, Union[str, Policy]], None]


def as_policy_map(spec: PolicyLike) -> PolicyMap:
    """Normalise what users pass as ``policy=`` into a PolicyMap."""
    if spec is None:
        spec = DEFAULT_POLICY
    if isinstance(spec, PolicyMap):
        return spec
    if isinstance(spec, (str, Policy)):
        return PolicyMap((("*", policy(spec)),))
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError("policy map is empty; give at least one {'pattern': policy} entry")
        rules = []
        for pattern, pol in spec.items():
            if not isinstance(pattern, str):
                raise TypeError(f"policy map keys must be glob strings, got {pattern!r}")
            rules.append((pattern, policy(pol)))
        return PolicyMap(tuple(rules))
    raise TypeError(f"policy must be a name, a Policy or a {{pattern: policy}} map, got {spec!r}")


EvictionLike = Union[str, Eviction, Mapping[str, Union[str, Eviction, None]], None]


def as_eviction_map(spec: EvictionLike):
    """Normalise ``evict=`` (a name, an Eviction, or ``{pattern: eviction or None}``) into a
    PolicyMap of eviction policies, or None for no eviction.

    >>> as_eviction_map("snapkv").lookup("model.layers.0.self_attn")[0].name
    'snapkv'
    """
    if spec is None:
        return None
    if isinstance(spec, PolicyMap):
        return spec
    if isinstance(spec, (str, Eviction)):
        return PolicyMap((("*", eviction(spec)),))
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError("eviction map is empty; give at least one {'pattern': eviction} entry")
        rules = []
        for pattern, ev in spec.items():
            if not isinstance(pattern, str):
                raise TypeError(f"eviction map keys must be glob strings, got {pattern!r}")
            rules.append((pattern, None if ev is None else eviction(ev)))
        return PolicyMap(tuple(rules))
    raise TypeError(f"evict must be a name, an Eviction or a {{pattern: eviction}} map, got {spec!r}")
