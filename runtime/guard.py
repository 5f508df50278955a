"""The whole-call check behind "never slower": where the cost model sends a call's sites down
the sparse path, the compiled model times that call against the same call with every site dense
and keeps the faster, per input shape.

The cost model estimates one site at a time; what a user pays is the whole call, where a small
model's sparse sites can be bound by the host (launches of many small kernels, a selection that
waits for its count) and lose to dense attention that the per-site estimate preferred (measured:
SmolLM2-135M at 16k tokens on an H200, ``block_topk`` 0.81x and ``auto`` 0.63x of the original
with every site planned sparse). So, for inference calls (no autograd) on the devices of
``DEVICES`` under ``cost_model="auto"``, per shape key (the call's tensor shapes, lengths
rounded up to a power of two):

1. the first call runs as planned (its kernels compile); if no site ran sparse, nothing is
   measured for this key;
2. the next call runs as planned, timed;
3. the next runs with every site dense (``runtime.plan.all_dense``), timed;
4. later calls run the faster of the two (dense on a tie within ``TIE``: dense is exact).

The calls are the user's own (nothing runs twice: model code mutates caches in place), so the
two timed calls return what their variant computes: the dense one exact attention. A call
timed on a GPU waits for the device before and after it (in the two timed calls only).
``planner.inspect`` lists the measurements and the choice per key. ``planner.compile`` checks
whole calls; ``torch.compile(backend="sparse_planner")`` and ``planner.backend()`` check each
captured graph (``planner.backend``).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Optional

import torch

from runtime import plan

#: devices whose calls are checked (a CPU call's sites are planned from measured CPU rates and
#: run the same kernels dense or not; the host-bound failure is a GPU one)
DEVICES = ("cuda",)
#: the planned call must be faster than dense by this fraction to be kept
TIE = 0.0


@dataclasses.dataclass
class KeyState:
    """What the check knows of one shape key."""
    calls: int = 0
    plan_ms: Optional[float] = None
    dense_ms: Optional[float] = None
    choice: Optional[str] = None        # "plan" / "dense" once decided
    reason: str = ""


def _bucket(n: int) -> int:
    return n if n <= 64 else 1 << (n - 1).bit_length()


def shape_key(args, kwargs) -> Optional[tuple]:
    """The call's tensor shapes (lengths above 64 rounded up to a power of two) and device;
    None when no tensor argument is on a checked device."""
    tensors = [(name, a) for name, a in list(enumerate(args)) + sorted(kwargs.items())
               if isinstance(a, torch.Tensor)]
    dev = next((str(a.device) for _, a in tensors if a.device.type in DEVICES), None)
    if dev is None:
        return None
    return dev, tuple((name, tuple(_bucket(int(s)) for s in a.shape)) for name, a in tensors)


class CallGuard:
    """The per-key state machine above, for one compiled model."""

    def __init__(self):
        self.keys: dict = {}
        self._lock = threading.Lock()

    def __call__(self, run: Callable, args, kwargs):
        key = shape_key(args, kwargs) if not torch.is_grad_enabled() else None
        if key is None:
            return run()
        if _capturing():            # inside a CUDA graph capture: no timing, no counting
            st = self.keys.get(key)
            return _run_as(st.choice if st is not None else None, run)
        with self._lock:
            st = self.keys.setdefault(key, KeyState())
            st.calls += 1
            first = st.calls == 1
        if st.choice is not None:
            return _run_as(st.choice, run)
        if first:                   # kernels compile; did any site take its sparse path?
            before = plan.sparse_runs()
            out = run()
            if plan.sparse_runs() == before:
                st.choice, st.reason = "plan", "every site ran dense as planned"
            return out
        if st.plan_ms is None:      # (a call that raised leaves its measurement to the next)
            out, st.plan_ms = _timed(run, key[0])
            return out
        with plan.all_dense():
            out, st.dense_ms = _timed(run, key[0])
        st.choice = "plan" if st.plan_ms < st.dense_ms * (1.0 - TIE) else "dense"
        st.reason = (f"measured {st.plan_ms:.2f} ms as planned vs {st.dense_ms:.2f} ms with "
                     f"every site dense")
        return out

    def notes(self) -> list:
        """One line per measured key, for ``planner.inspect``."""
        out = []
        for (dev, shapes), st in self.keys.items():
            if st.choice is None or st.plan_ms is None:
                continue
            dims = ", ".join("x".join(map(str, s)) for _, s in shapes)
            out.append(f"call check ({dev}, inputs {dims}): {st.reason}: runs "
                       + ("as planned" if st.choice == "plan" else "every site dense"))
        return out


def _run_as(choice: Optional[str], run: Callable):
    """One call as ``choice`` says: every site dense for "dense", else as planned."""
    if choice == "dense":
        with plan.all_dense():
            return run()
    return run()


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (where a synchronisation or a
    timed event would fail): the captured call runs the key's decided variant, else the plan."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _timed(run: Callable, device: str) -> tuple:
    """(output, milliseconds) of one call; on a GPU from events, waiting for the device."""
    if device.startswith("cuda"):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        out = run()
        b.record()
        b.synchronize()
        return out, a.elapsed_time(b)
    t0 = time.perf_counter()
    out = run()
    return out, (time.perf_counter() - t0) * 1e3
