"""Environment variables the library reads: one function per variable, each read at its call
(never cached at import, so a variable may change between calls) and validated here.

=============================  ===========================================================
``SPARSE_PLANNER_KERNELS``     ``kernels_mode``: where ``sparse.*`` ops may run Triton kernels
``TRITON_INTERPRET``           ``triton_interpret``: Triton's CPU interpreter is on
``SPARSE_PLANNER_DENSITY``     ``density_counting``: count kept / allowed pairs per call
``SPARSE_PLANNER_CACHE``       ``cache_root``: folder of rendered kernels and eval assets
``SPARSE_PLANNER_TRACEBACK``   ``cli_traceback``: the CLI re-raises instead of a short message
``PLANNER_DEBUG``              ``planner_debug``: discovery explains its decisions
``PLANNER_STRICT``             ``planner_strict``: a failing pass raises instead of falling back
=============================  ===========================================================

``SPARSE_PLANNER_KERNELS`` takes:

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
CACHE_ENV = "SPARSE_PLANNER_CACHE"


def kernels_mode() -> str:
    """The value of ``SPARSE_PLANNER_KERNELS``; raises ValueError naming the variable, its value
    and the accepted values."""
    value = os.environ.get("SPARSE_PLANNER_KERNELS", "")
    mode = value.strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"SPARSE_PLANNER_KERNELS={value!r} is not a kernel mode; accepted values: "
                         f"{'|'.join(KERNEL_MODES)} (unset means auto)")
    return mode


def triton_interpret() -> bool:
    """``TRITON_INTERPRET=1``: Triton runs kernels on the CPU through its interpreter (Triton
    reads the variable itself when it is first imported; here it says whether the CPU can run
    the kernels)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def density_counting() -> bool:
    """``SPARSE_PLANNER_DENSITY`` (default 1): ``sparse.attend`` counts the pairs it kept and
    allowed for ``planner.inspect``; ``0`` skips the count (no host sync inside timed calls)."""
    return os.environ.get("SPARSE_PLANNER_DENSITY", "1") != "0"


def cache_root() -> str:
    """``SPARSE_PLANNER_CACHE``, else ``~/.cache/sparse_planner``: the folder of rendered kernel
    sources (``runtime.loader.cache_dir`` checks and creates it) and downloaded eval assets."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "sparse_planner")


def cli_traceback() -> bool:
    """``SPARSE_PLANNER_TRACEBACK=1``: ``python -m planner`` re-raises errors it would report
    as one line."""
    return os.environ.get("SPARSE_PLANNER_TRACEBACK") == "1"


def planner_debug() -> str:
    """``PLANNER_DEBUG`` as given ("" when unset): comma-separated ``match`` (explain every
    discovery decision) or ``match:<node or site>`` (only those)."""
    return os.environ.get("PLANNER_DEBUG", "")


def planner_strict() -> bool:
    """``PLANNER_STRICT=1``: a pass that fails raises instead of leaving the graph as captured."""
    return os.environ.get("PLANNER_STRICT", "0") == "1"
