"""What every kernel family of ``codegen`` shares: the specs and schedule of the attention
kernels and the helpers that write kernel code.

``BlockSparseSpec`` / ``TokenSparseSpec``: what a block-sparse / token-sparse (gather) kernel is
specialized on (every shape-independent choice, baked into the source as a literal);
``Schedule``: tiling and launch choices, with ``MaskMode`` the block-sparse masking strategy.
``DTYPES`` maps the spec dtypes to Triton's, ``MASK_KINDS`` names the mask tensors a spec can
read. The code helpers (``render_template``, ``indent_code``, ``dot_code``,
``head_mapping_code``, ``extra_args_doc``, ``next_pow2``) are what the family renderers build
their source with. Nothing here imports a family: ``codegen.emit`` sits above the families and
hands a spec to its renderer.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, fields
from enum import Enum
from string import Template

DTYPES = {"float16": "tl.float16", "bfloat16": "tl.bfloat16", "float32": "tl.float32"}


class MaskMode(str, Enum):
    """How the block-sparse kernel applies token masks (causal, sequence end, sink/window)."""
    BRANCH = "branch"   # test per key tile, build and apply the mask only where it can bite
    ALWAYS = "always"   # build and apply the mask on every key tile (no branch in the loop)


@dataclass(frozen=True)
class BlockSparseSpec:
    """What a block-sparse forward kernel is specialized on (all but lengths and strides).

    ``lists_per_group``: the block lists have one row per KV head (``Hs == Hkv``), else one per
    query head. ``pack_gqa``: one program serves the ``gqa_group`` query heads of a KV head (only
    with ``lists_per_group``). ``stride_align``: every q/k/v stride except the last is a
    multiple of this many elements, and every start address too (lets loads vectorize with
    runtime strides, and tensor descriptors address the tensors). ``sinks``: a learned logit
    per query head joins each row's softmax as one more key of value 0 (GPT-OSS; the logits
    are a runtime fp32 ``[Hq]`` tensor). ``kv_ranges``: batch row ``b`` keeps only keys
    ``kv_start[b] <= j < kv_end[b]`` (runtime int32 ``[B]`` tensors; padded batches).
    ``softcap``: scores ``s = scale * q . k`` become ``c * tanh(s / c)`` before any mask (Gemma 2,
    Grok; ``c`` a runtime float). ``mask``: ``""`` (none), ``"add"`` (a float tensor added to the
    capped scores, natural-log units; values <= -1e30 mask the pair) or ``"keep"`` (a bool
    tensor, False masks the pair), broadcastable to ``[B, Hq, Nq, Nkv]`` and read through
    runtime strides, applied after the cap and before the rule masks. ``mask_flags``: an int
    flag per block-list entry says whether the entry's key block needs the mask at all (blocks
    the mask leaves whole skip reading it); without it every listed tile reads the mask. The
    printed form names ``sinks`` and the later fields only when set, so existing specs print
    (and render) as before.
    """
    head_dim: int
    v_head_dim: int
    gqa_group: int
    pack_gqa: bool
    lists_per_group: bool
    causal: bool
    dtype: str
    block: int
    windowed: bool = False
    stride_align: int = 1
    sinks: bool = False
    kv_ranges: bool = False
    softcap: bool = False
    mask: str = ""
    mask_flags: bool = False

    def __repr__(self) -> str:
        return _spec_repr(self)

    def __post_init__(self):
        _check_common(self)
        if self.mask_flags and not self.mask:
            raise ValueError("BlockSparseSpec.mask_flags needs a mask (mask='add' or 'keep')")
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"BlockSparseSpec.block must be a power of two >= 16, got {self.block}")


@dataclass(frozen=True)
class TokenSparseSpec:
    """What a token-sparse (gather) kernel is specialized on; fields as in BlockSparseSpec
    (``kv_ranges``: list entries outside the batch row's key range are skipped as padding;
    ``mask`` is read at the gathered positions; the backward has neither ``softcap`` nor
    ``mask``)."""
    head_dim: int
    v_head_dim: int
    gqa_group: int
    pack_gqa: bool
    lists_per_group: bool
    dtype: str
    stride_align: int = 1
    sinks: bool = False
    kv_ranges: bool = False
    softcap: bool = False
    mask: str = ""

    def __repr__(self) -> str:
        return _spec_repr(self)

    def __post_init__(self):
        _check_common(self)


@dataclass(frozen=True)
class Schedule:
    """Tiling and launch choices. ``block_m``: rows of a program's query tile (GQA-packed rows
    count: ``block_m = heads_per_program_pow2 * queries``); ``block_n``: keys per inner step;
    ``mask_mode``: block-sparse masking strategy; ``split``: token-sparse only, index entries
    per program (0 = one program walks the whole list; else split-K plus a combine step);
    ``persistent``: block-sparse only, 0 = one program per tile, k > 0 = k programs per SM
    looping over tiles (the Triton kernel marks the loop for flattening, which Triton 3.6 does
    not do for this data-dependent nest, and measured slower on H100; the ``wgmma`` kernel
    prefetches the next tile's loads, faster on short lists); ``tma``: block-sparse only, load
    K/V tiles through tensor descriptors (the copy engine) instead of per-thread async copies;
    ``wgmma``: block-sparse only, the warp-specialized Gluon kernel for Hopper (a loader warp
    and two consumer warpgroups, ``num_warps=8``; ``codegen/block_sparse/wgmma_kernel.py``,
    whose ``supported`` / ``unsupported_reason`` name the cases it covers)."""
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    mask_mode: MaskMode = MaskMode.BRANCH
    split: int = 0
    persistent: int = 0
    tma: bool = False
    wgmma: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if val < 1 or val & (val - 1):
                raise ValueError(f"Schedule.{name} must be a power of two, got {val}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"Schedule.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.split < 0 or (self.split and self.split % self.block_n):
            raise ValueError(f"Schedule.split must be 0 or a multiple of block_n={self.block_n}, "
                             f"got {self.split}")
        if self.persistent < 0:
            raise ValueError(f"Schedule.persistent must be >= 0, got {self.persistent}")
        object.__setattr__(self, "mask_mode", MaskMode(self.mask_mode))

    def tag(self) -> str:
        """Short printable name, e.g. ``m128-n64-w8-s3-branch``."""
        t = f"m{self.block_m}-n{self.block_n}-w{self.num_warps}-s{self.num_stages}-{self.mask_mode.value}"
        return t + (f"-split{self.split}" if self.split else "") + (
            f"-persist{self.persistent}" if self.persistent else "") + ("-tma" if self.tma else "") + (
            "-wgmma" if self.wgmma else "")


# spec fields printed only when not at their default
_SHOWN_WHEN_SET = ("sinks", "kv_ranges", "softcap", "mask", "mask_flags")
MASK_KINDS = ("", "add", "keep")        # BlockSparseSpec.mask / TokenSparseSpec.mask


def _spec_repr(spec) -> str:
    """The dataclass ``repr``, less the ``_SHOWN_WHEN_SET`` fields left at their default (the
    printed spec heads every emitted module and keys the kernel caches)."""
    parts = [f"{f.name}={getattr(spec, f.name)!r}" for f in fields(spec)
             if f.name not in _SHOWN_WHEN_SET or getattr(spec, f.name) != f.default]
    return f"{type(spec).__qualname__}({', '.join(parts)})"


def _check_common(spec) -> None:
    if spec.dtype not in DTYPES:
        raise ValueError(f"{type(spec).__name__}.dtype must be one of {sorted(DTYPES)}, "
                         f"got {spec.dtype!r}")
    for name in ("head_dim", "v_head_dim", "gqa_group", "stride_align"):
        if getattr(spec, name) < 1:
            raise ValueError(f"{type(spec).__name__}.{name} must be >= 1, got {getattr(spec, name)}")
    if spec.pack_gqa and not spec.lists_per_group:
        raise ValueError(f"{type(spec).__name__}: pack_gqa needs lists_per_group (one index list "
                         "shared by the query heads of a group)")
    if spec.mask not in MASK_KINDS:
        raise ValueError(f"{type(spec).__name__}.mask must be one of {MASK_KINDS}, "
                         f"got {spec.mask!r}")


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def render_template(template: str, **values) -> str:
    return Template(textwrap.dedent(template)).substitute(
        {k: str(v) for k, v in values.items()})


def indent_code(code: str, n: int) -> str:
    return textwrap.indent(textwrap.dedent(code).strip("\n"), " " * n) + "\n"


def extra_args_doc(spec, *, mask_at: str = "") -> str:
    """Comment text on a kernel's extra arguments (learned sinks, key ranges, soft-cap, mask,
    mask flags), one ``;``-led line each at a 4-space indent (empty without them); ``mask_at``
    says where the mask is read."""
    lines = []
    if spec.sinks:
        lines.append("SINKS [Hq] fp32 learned sink logits")
    if spec.kv_ranges:
        lines.append("KV_START, KV_END [B] int32: batch row b keeps keys KV_START[b] <= j < "
                     "KV_END[b]")
    if spec.softcap:
        lines.append("cap: soft cap c * log2(e), scores s -> c * tanh(s / c) before any mask")
    if spec.mask:
        lines.append("MASK broadcast to [B, Hq, Nq, Nkv] by strides (smb, smh, smn, smk), "
                     + mask_at + ("added (natural units, <= -1e30 masked)" if spec.mask == "add"
                                  else "bool as uint8, 0 = masked"))
    if getattr(spec, "mask_flags", False):
        lines.append("MASK_FLAGS like KV_IDX: nonzero where the entry's key block reads MASK")
    return "".join(";\n    # " + line for line in lines)


def dot_code(spec, a: str, b: str) -> str:
    prec = ', input_precision="ieee"' if spec.dtype == "float32" else ""
    return f"tl.dot({a}, {b}{prec})"


def head_mapping_code(spec, packed_rows: str) -> str:
    """Code setting b, hs (list row), kvh (KV head), head (query head per row) from pid_h."""
    g = spec.gqa_group
    if spec.pack_gqa:
        return f"""
        b = pid_h // Hs
        hs = pid_h % Hs
        kvh = hs
        head = hs * {g} + {packed_rows}
        """
    hs = f"hq // {g}" if spec.lists_per_group else "hq"
    return f"""
        b = pid_h // Hq
        hq = pid_h % Hq
        hs = {hs}
        kvh = hq // {g}
        head = hq + {packed_rows} * 0
        """
