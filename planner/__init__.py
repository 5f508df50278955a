"""sparse-planner: make attention in PyTorch models dynamically sparse.

    >>> import planner
    >>> m = planner.compile(model, policy="block_topk")      # doctest: +SKIP
    >>> y = m(x)                                               # doctest: +SKIP
    >>> print(planner.inspect(m))                              # doctest: +SKIP
"""
from planner.policy import (BlockTopK, Dense, NativeDSA, Policy, PolicyMap, PRESETS,  # noqa: I001
                            SinkWindow, as_policy_map, policy, Eviction, EVICTIONS, StreamingLLM,
                            H2O, SnapKV, PyramidKV, AdaKV, TOVA, ValueSnapKV, eviction)
from planner.report import Report, Site
from planner.backend import Backend, backend, register as _register
from planner.defaults import set_defaults
from planner.api import compile, inspect, recording

_register()     # the one place the process is set up: sparse ops, providers, Dynamo (idempotent)

__all__ = ["compile", "inspect", "recording", "set_defaults", "backend", "policy", "Policy",
           "PolicyMap", "Dense", "SinkWindow", "BlockTopK", "NativeDSA", "PRESETS", "Report", "Site",
           "Backend", "as_policy_map", "Eviction", "EVICTIONS", "eviction", "StreamingLLM", "H2O",
           "SnapKV", "PyramidKV", "AdaKV", "TOVA", "ValueSnapKV"]
__version__ = "0.1.0"
