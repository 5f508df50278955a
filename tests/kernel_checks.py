"""Shared checks for the Triton kernel tests: NaN-poisoned outputs, comparison with the
reference (unwritten elements, rows with no key, relative and LSE errors), offline compiles."""
import dataclasses
import os
import subprocess
import sys

import torch


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def poisoned_outputs(q, v):
    """out [B, Hq, Nq, Dv] and lse [B, Hq, Nq] filled with NaN before a kernel writes them."""
    B, Hq, Nq, _ = q.shape
    out = torch.full((B, Hq, Nq, v.shape[-1]), float("nan"), device=q.device, dtype=q.dtype)
    lse = torch.full((B, Hq, Nq), float("nan"), device=q.device)
    return out, lse


def compare_with_reference(out, lse, ref, ref_lse, what: str):
    """Every element written, rows without a ``what`` are exactly 0 with lse -inf; returns
    (relative error of out, max abs error of the finite lse)."""
    assert not out.isnan().any(), "kernel left output elements unwritten (NaN poison)"
    assert not lse.isnan().any(), "kernel left lse elements unwritten (NaN poison)"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), f"rows without a {what} differ"
    assert (out[empty] == 0).all(), f"rows without a {what} must be 0"
    fin = ~empty
    lse_err = (lse[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
    return rel_err(out, ref), lse_err


_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from codegen.common import BlockSparseSpec, Schedule, TokenSparseSpec
from codegen.emit import emit
from runtime.loader import load
spec, sch = eval(sys.argv[1]), Schedule(**eval(sys.argv[2]))
mod = load(emit(spec, sch))
el = "*fp16"
mask = {"add": "*bf16", "keep": "*u8"}.get(getattr(spec, "mask", ""), "*u8")
for name in sys.argv[3].split(","):
    fn = getattr(mod, name)
    types = {"Q": el, "K": el, "V": el, "O": el, "LSE": "*fp32", "KV_NUM": "*i32",
             "KV_IDX": "*i32", "IDX": "*i32", "SINKS": "*fp32", "KV_START": "*i32",
             "KV_END": "*i32", "qk_scale": "fp32", "PO": "*fp32", "PLSE": "*fp32",
             "cap": "fp32", "MASK": mask, "MASK_FLAGS": "*i8", "smb": "i64"}
    sig = {n: types.get(n, "i32") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig), target=GPUTarget("cuda", 90, 128),
                       options=dict(num_warps=sch.num_warps))
    assert ".entry " + name in k.asm["ptx"]
print("ok")
"""


def compile_for_sm90(spec, sch, fns: str) -> None:
    """Render ``spec`` / ``sch`` and compile the kernels named in ``fns`` (comma-separated) for
    an sm_90 target offline (no GPU needed), in a fresh process without the interpreter flag."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    fields = dict(dataclasses.asdict(sch), mask_mode=sch.mask_mode.value)
    r = subprocess.run([sys.executable, "-c", _COMPILE, repr(spec), repr(fields), fns], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
