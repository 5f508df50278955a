"""``planner.compile`` and ``planner.inspect``."""
from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import torch

from planner.backend import Backend, default_backend
from planner.policy import PolicyLike
from planner.report import Report

_ATTR = "_planner_backend"


def compile(model: Any, policy: PolicyLike = None, *, dynamic: bool | None = None,
            verify: bool = True, cost_model: str = "auto") -> Any:
    """Capture ``model`` with Dynamo and rewrite every attention site with ``policy``.

    ``policy`` is a preset name (``"dense"``, ``"block_topk"``, ...), a Policy from
    ``planner.policy(...)``, or a per-layer map ``{"model.layers.0.*": "dense", "*": "block_topk"}``
    (first matching glob wins). ``cost_model="auto"`` lets the planner run a site densely at
    call shapes where its cost model estimates dense to be faster (on devices with sparse
    kernels; on the CPU the reference kernels always follow the policy); ``"off"`` always
    follows the policy. Returns an object with the same call signature and outputs;
    for an ``nn.Module`` it is a shallow copy sharing the parameters, whose ``forward`` is
    compiled (so ``generate()`` and other methods that call ``self(...)`` go through it).
    With a ``dsa`` policy the copy also holds the sites' indexers as ``sparse_indexers``
    (created at each site's first call; see ``runtime.dsa``).

    >>> import torch, planner
    >>> from planner.models import TinyGPT
    >>> m = TinyGPT().eval()
    >>> x = torch.randint(0, 256, (1, 32))
    >>> cm = planner.compile(m, policy="dense")
    >>> bool((cm(x) - m(x)).abs().max() < 1e-5)
    True
    """
    be = Backend(policy, verify=verify, cost_model=cost_model)
    _raise_recompile_limit()
    if isinstance(model, torch.nn.Module):
        new = copy.copy(model)
        for name in ("_parameters", "_buffers", "_modules"):
            object.__setattr__(new, name, dict(getattr(model, name)))
        compiled = torch.compile(model.forward, backend=be, dynamic=dynamic)
        fwd = _wrap(compiled, model.forward, be)
        object.__setattr__(new, "forward", fwd)
        object.__setattr__(new, _ATTR, be)
        if be.indexers is not None:        # trainable indexers: parameters of the compiled model
            new._modules["sparse_indexers"] = be.indexers
        return new
    if callable(model):
        compiled = torch.compile(model, backend=be, dynamic=dynamic)
        fn = _wrap(compiled, model, be)
        setattr(fn, _ATTR, be)
        return fn
    raise TypeError(f"planner.compile expects an nn.Module or a callable, got {type(model).__name__}")


def _raise_recompile_limit(minimum: int = 64) -> None:
    """Each compiled instance of a model class takes one Dynamo cache entry of that class's
    ``forward``; the default limit (8) would silently run the 9th instance eagerly."""
    cfg = torch._dynamo.config
    if cfg.recompile_limit < minimum:
        cfg.recompile_limit = minimum
    if cfg.accumulated_recompile_limit < 4 * minimum:
        cfg.accumulated_recompile_limit = 4 * minimum


def _wrap(compiled: Callable, original: Callable, be: Backend) -> Callable:
    checked = []

    @functools.wraps(original)
    def forward(*args, **kwargs):
        _mark_kv_dynamic(list(args) + list(kwargs.values()))
        am = kwargs.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() == 2 and _kv_present(args, kwargs):
            torch._dynamo.maybe_mark_dynamic(am, 1)     # [B, past + new] grows with the cache
        out = compiled(*args, **kwargs)
        if not checked:
            if not be.graphs:
                raise RuntimeError(
                    "planner.compile: Dynamo captured no graph for this call (its recompile "
                    f"limit, torch._dynamo.config.recompile_limit="
                    f"{torch._dynamo.config.recompile_limit}, may be exhausted by other compiled "
                    "instances of the same model class); no attention was rewritten")
            be.check_patterns()
            checked.append(True)
        return out
    return forward


def _kv_tensors(obj, depth: int = 0):
    """Key/value tensors of a KV cache (an object with ``layers[i].keys/values``, as in
    transformers' DynamicCache, or nested tuples of ``[B, H, N, D]`` tensors)."""
    if depth > 3:
        return
    layers = getattr(obj, "layers", None)
    if isinstance(layers, (list, tuple)):
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor) and t.dim() == 4:
                    yield t
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                if item.dim() == 4 and depth > 0:
                    yield item
            else:
                yield from _kv_tensors(item, depth + 1)


def _kv_present(args, kwargs) -> bool:
    return any(True for v in list(args) + list(kwargs.values()) for _ in _kv_tensors(v))


def _mark_kv_dynamic(values) -> None:
    """Cached sequence lengths grow by one per decode step: mark them dynamic up front so
    decoding compiles once instead of once per step (Dynamo's automatic dynamic shapes do not
    see tensors held inside cache objects)."""
    for v in values:
        for t in _kv_tensors(v):
            if t.shape[2] > 1:
                torch._dynamo.maybe_mark_dynamic(t, 2)


def _find_backend(m: Any) -> Backend:
    if isinstance(m, Backend):
        return m
    be = getattr(m, _ATTR, None) if not isinstance(m, torch.nn.Module) else m.__dict__.get(_ATTR)
    if isinstance(be, Backend):
        return be
    # torch.compile(model, backend=...) -> OptimizedModule; look at the backend it was given
    for attr in ("_torchdynamo_orig_backend", "dynamo_ctx"):
        obj = getattr(m, attr, None) if isinstance(m, torch.nn.Module) else None
        if obj is None:
            continue
        for cand in (obj, getattr(obj, "callback", None),
                     getattr(getattr(obj, "callback", None), "_torchdynamo_orig_backend", None),
                     getattr(getattr(obj, "callback", None), "compiler_fn", None)):
            inner = cand
            for _ in range(4):
                if isinstance(inner, Backend):
                    return inner
                if inner is None:
                    break
                inner = getattr(inner, "compiler_fn", None) or getattr(inner, "_torchdynamo_orig_backend", None)
    d = default_backend()
    if d is not None and type(m).__name__ == "OptimizedModule":
        return d
    raise TypeError(f"{type(m).__name__} was not compiled by planner.compile or a planner backend")


def inspect(m: Any) -> Report:
    """Report on a compiled model: sites (pattern, shapes, policy, status, density), graph code,
    unmatched softmax nodes. Shapes and densities are from the last call."""
    return _find_backend(m).report()
