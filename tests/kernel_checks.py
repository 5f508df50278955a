"""Shared checks for the Triton kernel tests: NaN-poisoned outputs, comparison with the
reference (unwritten elements, rows with no key, relative and LSE errors)."""
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
