"""Environment variables the runtime reads, each read and validated in one place.

``SPARSE_PLANNER_KERNELS`` picks where ``sparse.*`` ops may run Triton kernels:

* ``auto`` (default, also when unset or empty): on CUDA devices; the PyTorch reference elsewhere;
* ``triton``: also on the CPU, through Triton's interpreter (``TRITON_INTERPRET=1``);
* ``reference``: the PyTorch reference everywhere.

    >>> import os
    >>> os.environ["SPARSE_PLANNER_KERNELS"] = "triton"; kernels_mode()
    'triton'
    >>> del os.environ["SPARSE_PLANNER_KERNELS"]; kernels_mode()
    'auto'
"""
from __future__ import annotations

import os

KERNEL_MODES = ("auto", "triton", "reference")


def kernels_mode() -> str:
    """The value of ``SPARSE_PLANNER_KERNELS`` (read at each call, so it may change between
    calls); raises ValueError naming the variable, its value and the accepted values."""
    value = os.environ.get("SPARSE_PLANNER_KERNELS", "")
    mode = value.strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"SPARSE_PLANNER_KERNELS={value!r} is not a kernel mode; accepted values: "
                         f"{'|'.join(KERNEL_MODES)} (unset means auto)")
    return mode


def kernels_unavailable_reason(device) -> str:
    """Why ``SPARSE_PLANNER_KERNELS=triton`` cannot run Triton kernels on ``device`` ("" where
    it can, or where another mode is set): shown with a site's kernel in ``planner.inspect``."""
    if kernels_mode() != "triton":
        return ""
    from runtime import triton_kernels as tk
    if tk.available(device):
        return ""
    return "SPARSE_PLANNER_KERNELS=triton needs a GPU or TRITON_INTERPRET=1"
