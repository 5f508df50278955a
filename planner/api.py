"""``planner.compile`` and ``planner.inspect``."""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect as inspect_mod
from typing import Any, Callable

import torch

from planner.backend import RECOMPILES_PER_COMPILE, Backend, compiles_made, note_compile
from planner.policy import EvictionLike, PolicyLike
from planner.report import Report
from runtime import recall

_ATTR = "_planner_backend"


def compile(model: Any, policy: PolicyLike = None, *, dynamic: bool | None = None,
            verify: bool = True, cost_model: str | None = None, evict: EvictionLike = None,
            remainder: str | None = None, record: str | None = None,
            record_rows: int = 64) -> Any:
    """Capture ``model`` with Dynamo and rewrite every attention site with ``policy``.

    ``policy`` is a preset name (``"dense"``, ``"block_topk"``, ...), a Policy from
    ``planner.policy(...)``, or a per-layer map ``{"model.layers.0.*": "dense", "*": "block_topk"}``
    (first matching glob wins). ``cost_model="auto"`` (the default, see ``set_defaults``) lets the
    planner run a site densely at call shapes where its cost model estimates dense to be faster
    (on a GPU or a CPU: the compiled model is not slower than the original); ``"off"`` always
    follows the policy. ``remainder``: how the captured graph's other ops (projections, norms,
    RoPE, MLPs) run: ``"eager"`` (the default, see ``set_defaults``) one op at a time as the
    original does, or ``"inductor"`` compiled and fused by Inductor around the sparse ops
    (``torch.compile``'s default backend; long compile times; where it fails the graph runs
    eagerly and ``planner.inspect`` says why). Returns an object with the same call signature and outputs;
    for an ``nn.Module`` it is a shallow copy sharing the parameters, whose ``forward`` is
    compiled (so ``generate()`` and other methods that call ``self(...)`` go through it).
    With a ``dsa`` policy the copy also holds the sites' indexers as ``sparse_indexers``
    (created at each site's first call; see ``runtime.dsa``).
    ``record="recall"`` makes every call measure, per site, how much of the dense attention
    mass the kept pairs hold on ``record_rows`` sampled query rows (``runtime.recall``; it
    costs attending those rows densely): ``planner.inspect`` then shows it beside the density,
    and the Report can draw it (``Report.plot``, ``Report.to_html``). ``planner.recording(m)``
    turns it on for a block of calls instead.

    ``evict`` (an eviction policy: ``"snapkv"``, ``planner.SnapKV(budget=0.2)``, ..., or a
    per-layer map of them) compacts each site's K/V cache after a prefill to the policy's budget:
    the model's cache (a Hugging Face ``DynamicCache`` or a returned tuple) then holds only the
    kept keys, and later calls attend over them with ``policy`` (see ``runtime.eviction``).

    >>> import torch, planner
    >>> from planner.models import TinyGPT
    >>> m = TinyGPT().eval()
    >>> x = torch.randint(0, 256, (1, 32))
    >>> cm = planner.compile(m, policy="dense")
    >>> bool((cm(x) - m(x)).abs().max() < 1e-5)
    True
    """
    be = Backend(policy, verify=verify, cost_model=cost_model, evict=evict,
                 n_layers=_n_layers(model), remainder=remainder, record=record,
                 record_rows=record_rows)
    if be.checking:                    # _wrap checks whole calls (runtime.guard)
        be.call_check = be.new_check()
    isolation = _isolation()
    note_compile(isolated=bool(isolation))
    if isinstance(model, torch.nn.Module):
        new = copy.copy(model)
        for name in ("_parameters", "_buffers", "_modules"):
            object.__setattr__(new, name, dict(getattr(model, name)))
        compiled = torch.compile(model.forward, backend=be, dynamic=dynamic, **isolation)
        fwd = _wrap(compiled, model.forward, be)
        object.__setattr__(new, "forward", fwd)
        object.__setattr__(new, _ATTR, be)
        if be.indexers is not None:        # trainable indexers: parameters of the compiled model
            new._modules["sparse_indexers"] = be.indexers
        return new
    if callable(model):
        compiled = torch.compile(model, backend=be, dynamic=dynamic, **isolation)
        fn = _wrap(compiled, model, be)
        setattr(fn, _ATTR, be)
        return fn
    raise TypeError(f"planner.compile expects an nn.Module or a callable, got {type(model).__name__}")


def _n_layers(model: Any):
    """The model's layer count where its config says it (per-layer eviction budgets)."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if n is None and cfg is not None and hasattr(cfg, "get_text_config"):
        n = getattr(cfg.get_text_config(), "num_hidden_layers", None)
    return n if isinstance(n, int) else None


@functools.lru_cache(maxsize=1)
def _isolation() -> dict:
    """``torch.compile`` arguments giving each compile its own Dynamo cache entries and
    recompile limit (``isolate_recompiles``, torch >= 2.12): every compile of one model class
    adds entries to that class's ``forward``, and shared entries would count against one
    limit (the 65th compile of a class would run eagerly). Empty where not supported: the
    shared limit is then raised per compile (``note_compile``)."""
    params = inspect_mod.signature(torch.compile).parameters
    if "isolate_recompiles" in params and "recompile_limit" in params:
        return {"isolate_recompiles": True, "recompile_limit": RECOMPILES_PER_COMPILE}
    return {}


def _no_graph_error() -> RuntimeError:
    cfg = torch._dynamo.config
    n = compiles_made()
    return RuntimeError(
        "planner.compile: Dynamo captured no graph for this call, so no attention was "
        "rewritten (the model ran as written). The likely cause is Dynamo's recompile limit for "
        f"this model class ({n} compiles in this process; torch._dynamo.config.recompile_limit="
        f"{cfg.recompile_limit}, accumulated_recompile_limit={cfg.accumulated_recompile_limit}). "
        "To proceed: raise those two limits before compiling, or call torch._dynamo.reset() "
        "between compiles once the earlier compiled models are no longer used (it drops every "
        "compiled graph); TORCH_LOGS=recompiles shows Dynamo's reason")


def _wrap(compiled: Callable, original: Callable, be: Backend) -> Callable:
    checked = []

    @functools.wraps(original)
    def forward(*args, **kwargs):
        _mark_kv_dynamic(list(args) + list(kwargs.values()))
        am = kwargs.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() == 2 and _kv_present(args, kwargs):
            torch._dynamo.maybe_mark_dynamic(am, 1)     # [B, past + new] grows with the cache
        if be.call_check is not None:
            out = be.call_check(lambda: compiled(*args, **kwargs), args, kwargs)
        else:
            out = compiled(*args, **kwargs)
        if not checked:
            if not be.graphs:
                raise _no_graph_error()
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
    # torch.compile(model, backend=...) -> OptimizedModule: the backend object of that compile
    ctx = m.__dict__.get("dynamo_ctx") if isinstance(m, torch.nn.Module) else None
    callback = getattr(ctx, "callback", None)
    if callable(callback):
        from planner.backend import _innermost, backend_for_compile, sparse_planner_backend
        inner = _innermost(callback)
        for _ in range(4):
            if isinstance(inner, Backend):
                return inner
            if inner is sparse_planner_backend:
                return backend_for_compile(_innermost(callback))
            inner = getattr(inner, "compiler_fn", None)
            if inner is None:
                break
    raise TypeError(f"{type(m).__name__} was not compiled by planner.compile or a planner backend")


def inspect(m: Any) -> Report:
    """Report on a compiled model: sites (pattern, shapes, policy, status, density), graph code,
    unmatched softmax nodes. Shapes and densities are from the last call."""
    return _find_backend(m).report()


@contextlib.contextmanager
def recording(m: Any, rows: int = 64):
    """Within the block, every call of compiled model ``m`` measures each site's recall of the
    attention mass on ``rows`` sampled query rows (as ``planner.compile(..., record="recall")``
    does for every call); ``planner.inspect(m)`` reports the last recorded call.

    >>> with planner.recording(cm):          # doctest: +SKIP
    ...     cm(x)
    >>> planner.inspect(cm).sites[0].recall  # doctest: +SKIP
    """
    owner = _find_backend(m).owner
    before = recall.rows_of(owner)
    recall.enable(owner, rows)
    try:
        yield m
    finally:
        if before is None:
            recall.disable(owner)
        else:
            recall.enable(owner, before)
