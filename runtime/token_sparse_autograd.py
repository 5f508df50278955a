"""Differentiable token-sparse (gather) attention: ``token_sparse_attention_fn``.

Forward and backward run the Triton kernels where they apply (CUDA; the CPU under
``TRITON_INTERPRET=1`` with ``SPARSE_PLANNER_KERNELS=triton``; fp16/bf16/fp32, head dims up to
``MAX_HEAD_DIM``), else the PyTorch reference (``codegen/token_sparse/reference.py``) and its
explicit backward. The forward saves ``out`` and ``lse``; the backward recomputes the
probabilities from them (no attention matrix is kept). Gradients flow to whichever of q, k, v
require them; the index lists are not differentiable.

Example::

    >>> q = torch.randn(1, 8, 64, 32, requires_grad=True)                  # [B, Hq, Nq, D]
    >>> k = torch.randn(1, 2, 64, 32, requires_grad=True)                  # [B, Hkv, Nkv, D]
    >>> v = torch.randn(1, 2, 64, 32, requires_grad=True)                  # [B, Hkv, Nkv, Dv]
    >>> idx = torch.randint(0, 64, (1, 1, 64, 16), dtype=torch.int32)      # [B, 1, Nq, K]
    >>> out = token_sparse_attention_fn(q, k, v, idx, scale=32 ** -0.5)
    >>> out.sum().backward()
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from codegen.token_sparse import token_sparse_attention_bwd_ref, token_sparse_attention_ref
from runtime import triton_kernels as tk
from runtime.env import kernels_mode
from runtime.triton_kernels import token_sparse_attention_bwd

__all__ = ["token_sparse_attention_fn", "token_sparse_attention_bwd", "kernels_apply"]


def kernels_apply(q, k, v) -> bool:
    """Whether the Triton kernels serve these inputs (``SPARSE_PLANNER_KERNELS`` as for
    ``sparse.attend``: auto = CUDA only, triton = also the CPU interpreter, reference = never)."""
    mode = kernels_mode()
    if mode == "reference" or (q.device.type == "cpu" and mode != "triton"):
        return False
    if not tk.available(q.device) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        return False
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return False                     # the interpreter has no bfloat16
    return max(q.shape[-1], v.shape[-1]) <= tk.MAX_HEAD_DIM


class _TokenSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, scale):
        use_kernels = kernels_apply(q, k, v)
        if use_kernels:
            out, lse = tk.token_sparse_attention(q, k, v, indices, scale=scale)
        else:
            out, lse = token_sparse_attention_ref(q, k, v, indices, scale=scale)
        ctx.save_for_backward(q, k, v, indices, out, lse)
        ctx.scale, ctx.use_kernels = scale, use_kernels
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, indices, out, lse = ctx.saved_tensors
        bwd = token_sparse_attention_bwd if ctx.use_kernels else token_sparse_attention_bwd_ref
        dout = dout.to(out.dtype) if dout.dtype != out.dtype else dout
        dq, dk, dv = bwd(q, k, v, indices, out, lse, dout, scale=ctx.scale)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                None, None)


def token_sparse_attention_fn(q, k, v, indices, *, scale: float):
    """Gather attention differentiable w.r.t. q, k, v: ``out [B, Hq, Nq, Dv]`` in q's dtype.

    q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nkv, D]``, v ``[B, Hkv, Nkv, Dv]``, ``indices`` integer
    ``[B, Hs, Nq, K]`` with ``Hs`` in ``{1, Hkv, Hq}`` (1: one list per query row for every
    head, DeepSeek Sparse Attention style); negative entries are padding; entries of a row must
    be distinct and ``< Nkv``. Rows with no valid entry give 0 and zero gradients. Kernels take
    int32 lists (others are converted once per call).
    """
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point \
            or indices.dtype.is_complex or indices.dtype == torch.bool:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"token_sparse_attention_fn: indices must be an integer tensor, got {got}")
    if indices.dtype != torch.int32 and kernels_apply(q, k, v):
        indices = indices.to(torch.int32)
    out, _ = _TokenSparseAttention.apply(q, k, v, indices, float(scale))
    return out
