"""What the Triton kernel launchers share: the one rule for whether a call runs them
(``kernels_enabled``), argument checks, launch plans and their cache, the compiled-kernel
lookup.

Every launcher (``block_sparse``, ``token_sparse``, ``select``, ``indexer``) checks its arguments
with the helpers here and raises ValueError naming the function, the argument, what it expected
and what came. A launch plan (``LaunchPlan``) holds what the shapes, strides and dtypes of a call
decide (the kernel's cache key, the grid, the integer arguments); it is built once per call
signature and reused (``cached_plan``).

Two questions, two functions:

* ``kernels_enabled(t)``: should the library route a call on ``t`` to the kernels? The mode
  (``SPARSE_PLANNER_KERNELS``), the device and the dtype decide; every provider, estimator,
  the indexer and the autograd function ask this one function.
* ``runs_triton(device)``: can Triton run on ``device`` at all (CUDA, or the CPU under
  ``TRITON_INTERPRET=1``)? The launchers require it of their arguments, whatever the mode, so
  tests and benchmarks call them directly.

    >>> kernels_enabled(torch.zeros(1, 1, 8, 16))       # CPU, SPARSE_PLANNER_KERNELS unset
    False
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from codegen.block_sparse.mask_blocks import MASK_KINDS, broadcast_mask
from codegen.common import Schedule
from codegen.emit import emit
from runtime import env
from runtime.cache import KERNELS, stable_hash
from runtime.loader import load

LOG2E = 1.4426950408889634
FLOAT_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
MAX_HEAD_DIM = 256

# Tests set this to fill split-K workspaces with NaN, so a partial result that no program
# wrote shows up in the output.
POISON_WORKSPACE = False


def runs_triton(device) -> bool:
    """True where Triton kernels can run: a CUDA device, or the CPU under ``TRITON_INTERPRET=1``
    (whatever ``SPARSE_PLANNER_KERNELS`` says: the launchers' precondition)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return dev.type == "cpu" and env.triton_interpret()


def kernels_enabled(t: torch.Tensor) -> bool:
    """Whether calls on ``t`` run the Triton kernels: ``SPARSE_PLANNER_KERNELS`` is not
    ``reference``; ``t`` is float16, bfloat16 or float32; and ``t`` is on a CUDA device that
    torch can use, or on the CPU with ``SPARSE_PLANNER_KERNELS=triton`` and
    ``TRITON_INTERPRET=1`` and not bfloat16 (the interpreter has none). Shape limits of a family
    (head dims, widths) are the launcher's to check."""
    mode = env.kernels_mode()
    if mode == "reference" or not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
        return False
    if t.device.type == "cpu":
        return mode == "triton" and t.dtype != torch.bfloat16 and runs_triton(t.device)
    return t.device.type == "cuda" and runs_triton(t.device)


def kernels_unavailable_reason(device) -> str:
    """Why ``SPARSE_PLANNER_KERNELS=triton`` cannot run Triton kernels on ``device`` ("" where
    it can, or where another mode is set): shown with a site's kernel in ``planner.inspect``."""
    if env.kernels_mode() != "triton" or runs_triton(device):
        return ""
    return "SPARSE_PLANNER_KERNELS=triton needs a GPU or TRITON_INTERPRET=1"


# ----------------------------------------------------------------------------- validation

def check_qkv(fn: str, q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be a 4-d tensor [B, H, N, D], got {shape}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{fn}: {name}.dtype must be float16, bfloat16 or float32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, q is on {q.device}")
    if not runs_triton(q.device):
        raise ValueError(f"{fn}: Triton kernels cannot run on {q.device} (need CUDA, or the CPU "
                         "with TRITON_INTERPRET=1)")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise ValueError(f"{fn}: bfloat16 is not supported by Triton's CPU interpreter; use "
                         "float16 or float32 on the CPU")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{fn}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{fn}: batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"{fn}: k must be [B, Hkv, Nkv, {D}] (q's head dim), got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{fn}: v must be [{', '.join(map(str, k.shape[:3]))}, Dv], got {tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{fn}: query heads Hq={Hq} must be a multiple of key heads Hkv={Hkv}")
    if max(D, v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head dims up to {MAX_HEAD_DIM} supported, got D={D}, Dv={v.shape[3]}")


def check_scale(fn: str, scale):
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{fn}: scale must be a finite float > 0, got {scale!r}")


def check_index(fn: str, name: str, t, shape: tuple, device):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{fn}: {name} must be an int32 tensor, got {got}")
    if t.dim() != len(shape) or any(e is not None and e != a for e, a in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{fn}: {name} must have shape {want}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, q is on {device}")


def heads_of_lists(fn: str, name: str, hs: int, Hq: int, Hkv: int,
                    shared_ok: bool = False) -> bool:
    """True when the lists are per KV head (shared by a GQA group) or, with ``shared_ok``, one
    list shared by every head (``hs == 1``); False when per query head."""
    if hs == Hkv or (shared_ok and hs == 1):
        return True
    if hs == Hq:
        return False
    one = "1 (shared by every head), " if shared_ok else ""
    raise ValueError(f"{fn}: {name}.shape[1] must be {one}Hkv={Hkv} (per group) or Hq={Hq} "
                     f"(per head), got {hs}")


def check_extras(fn: str, q, k, sinks, kv_start, kv_end) -> tuple:
    """The learned sinks and key ranges as the kernels read them: ``(sinks fp32 [Hq] or None,
    ranges (kv_start, kv_end) int32 [B] or None)``, contiguous on q's device. Sinks of any
    float dtype are converted to fp32; a missing range bound becomes 0 / Nkv."""
    B, Hq, Nkv = q.shape[0], q.shape[1], k.shape[2]
    if sinks is not None:
        if (not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point()
                or tuple(sinks.shape) != (Hq,) or sinks.device != q.device):
            got = (f"{sinks.dtype} {list(sinks.shape)} on {sinks.device}"
                   if isinstance(sinks, torch.Tensor) else type(sinks).__name__)
            raise ValueError(f"{fn}: sinks must be a float tensor [{Hq}] (one logit per query "
                             f"head) on {q.device}, got {got}")
        sinks = sinks.to(torch.float32).contiguous()
    if kv_start is None and kv_end is None:
        return sinks, None
    bounds = []
    for name, t, missing in (("kv_start", kv_start, 0), ("kv_end", kv_end, Nkv)):
        if t is None:
            t = torch.full((B,), missing, dtype=torch.int32, device=q.device)
        check_index(fn, name, t, (B,), q.device)
        bounds.append(t.contiguous())
    return sinks, tuple(bounds)


def check_softcap(fn: str, softcap) -> float:
    """The soft cap as a float (0.0 = none); raises unless a finite number >= 0."""
    if (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
            or not math.isfinite(softcap) or softcap < 0):
        raise ValueError(f"{fn}: softcap must be a finite float >= 0 (0 = no cap), got {softcap!r}")
    return float(softcap)


def mask_field(fn: str, mask, mask_kind) -> str:
    """The kernels' ``mask`` spec field: "" without a mask, else the checked ``mask_kind``."""
    if mask is None:
        return ""
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"{fn}: mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
    return mask_kind


def mask_launch_args(fn: str, q, k, mask, mask_kind: str) -> tuple:
    """Launch arguments of ``mask``: ``(tensor, smb, smh, smn, smk)``, the mask viewed as
    ``[B, Hq, Nq, Nkv]`` (stride 0 where it broadcasts; a bool mask as uint8), element
    strides; ``()`` without a mask."""
    if mask is None:
        return ()
    B, Hq, Nq = q.shape[:3]
    m = broadcast_mask(fn, mask, mask_kind, (B, Hq, Nq, k.shape[2]), q.device)
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    return (m, *m.stride())


def check_mask_flags(fn: str, mask_flags, kv_indices):
    """``mask_flags`` (int8 / int32, shaped like ``kv_indices``) made contiguous, or None."""
    if mask_flags is None:
        return None
    if (not isinstance(mask_flags, torch.Tensor)
            or mask_flags.dtype not in (torch.int8, torch.int32) or mask_flags.shape != kv_indices.shape or mask_flags.device != kv_indices.device):
        got = (f"{mask_flags.dtype} {list(mask_flags.shape)} on {mask_flags.device}"
               if isinstance(mask_flags, torch.Tensor) else type(mask_flags).__name__)
        raise ValueError(f"{fn}: mask_flags must be an int8 or int32 tensor "
                         f"{list(kv_indices.shape)} (kv_indices' shape) on {kv_indices.device}, "
                         f"got {got}")
    return mask_flags.contiguous()


def stride_align(dtype, *tensors) -> int:
    """Largest of (16 bytes / element size, 1) dividing every non-last stride, where every
    tensor also starts on a 16-byte boundary (tensor descriptors need both)."""
    align = 16 // dtype.itemsize
    ok = all(s % align == 0 for t in tensors for s in t.stride()[:3]) and all(
        t.data_ptr() % 16 == 0 for t in tensors)
    return align if ok else 1


def unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def device_key(device) -> tuple:
    if device.type == "cuda":
        return ("cuda",) + tuple(torch.cuda.get_device_capability(device))
    return ("interpreter",)


@functools.lru_cache(maxsize=None)
def sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=None)
def set_descriptor_allocator() -> None:
    """Tensor descriptors built inside a kernel need scratch memory from an allocator."""
    import triton

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, device="cuda", dtype=torch.int8)

    triton.set_allocator(alloc)


def outputs(fn: str, out, lse, shape_out: tuple, shape_lse: tuple, dtype, device):
    """Caller-given (validated) or fresh ``out`` [B, Hq, Nq, Dv] and ``lse`` [B, Hq, Nq]."""
    if out is None:
        out = torch.empty(shape_out, device=device, dtype=dtype)
    elif (tuple(out.shape) != shape_out or out.dtype != dtype or out.device != device
          or not out.is_contiguous()):
        raise ValueError(f"{fn}: out must be a contiguous {dtype} tensor {list(shape_out)} on "
                         f"{device}, got {out.dtype} {list(out.shape)} on {out.device}")
    if lse is None:
        lse = torch.empty(shape_lse, device=device, dtype=torch.float32)
    elif (tuple(lse.shape) != shape_lse or lse.dtype != torch.float32 or lse.device != device
          or not lse.is_contiguous()):
        raise ValueError(f"{fn}: lse must be a contiguous float32 tensor {list(shape_lse)} on "
                         f"{device}, got {lse.dtype} {list(lse.shape)} on {lse.device}")
    return out, lse


def workspace(shape: tuple, device) -> torch.Tensor:
    if POISON_WORKSPACE:
        return torch.full(shape, float("nan"), device=device, dtype=torch.float32)
    return torch.empty(shape, device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------- launch plans

spec_hash = functools.lru_cache(maxsize=None)(stable_hash)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Everything derived from the shapes, strides and dtypes of one call signature: the
    kernel's cache key and how to launch it. Built once per signature (``plan``), reused by
    every later call with the same signature (``run``)."""
    key: tuple
    spec: object
    schedule: Schedule
    grid: tuple
    args: tuple                     # integer launch arguments that follow the tensors
    out_shape: tuple
    lse_shape: tuple
    n_split: int = 1
    contiguous: tuple = ()          # inputs that must be made contiguous before launch
    tail: tuple = ()                # integer launch arguments after the runtime scalars


_PLANS: dict = {}
_MAX_PLANS = 4096


def signature(fn: str, tensors, extra: tuple) -> tuple:
    return (fn, extra) + tuple((t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)
                               for t in tensors)


def cached_plan(sig: tuple, build):
    plan = _PLANS.get(sig)
    if plan is None:
        plan = build()
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[sig] = plan
    return plan


def planned_module(plan: LaunchPlan):
    return KERNELS.get(plan.key, lambda: load(emit(plan.spec, plan.schedule)))


def contiguous_as_planned(plan: LaunchPlan, tensors):
    return [t.contiguous() if c else t for t, c in zip(tensors, plan.contiguous)]
