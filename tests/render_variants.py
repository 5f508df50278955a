"""A fixed list of kernel renders (spec x schedule) and the hashes of their source text.

``variants()`` enumerates a few hundred block-sparse (Triton and Hopper Gluon), token-sparse
forward and token-sparse backward renders using only the spec fields every kernel has had from
the start (no learned sinks, no key ranges). ``tests/data/render_hashes.json`` holds the sha256
of each render's text as the kernels produced it before those features were added; the test in
``test_kernels_sinks_ranges.py`` checks that the same specs still render the same bytes.

Regenerate the file only when a change is meant to alter the existing kernels' text::

    python tests/render_variants.py --write
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
HASH_FILE = os.path.join(HERE, "data", "render_hashes.json")
# Gluon call names fixed here, so the Hopper renders do not depend on the installed Triton
GLUON_NAMES = {"TMA_LOAD": "async_load", "TMA_STORE": "async_store", "BARRIER": "barrier"}


def _block_sparse(emit_mod):
    BlockSparseSpec, Schedule, MaskMode = (emit_mod.BlockSparseSpec, emit_mod.Schedule,
                                           emit_mod.MaskMode)
    dims = [(64, 64), (60, 60), (128, 128), (64, 32)]
    heads = [(1, False, True), (4, True, True), (3, True, True), (4, False, False)]
    schedules = [
        Schedule(block_m=64, block_n=64, num_warps=4, num_stages=1),
        Schedule(block_m=32, block_n=16, num_warps=4, num_stages=1, mask_mode=MaskMode.ALWAYS),
        Schedule(block_m=128, block_n=64, num_warps=8, num_stages=3),
        Schedule(block_m=64, block_n=32, num_warps=4, num_stages=2, tma=True),
        Schedule(block_m=32, block_n=32, num_warps=4, num_stages=2, persistent=2),
        Schedule(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True,
                 mask_mode=MaskMode.ALWAYS),
    ]
    i = 0
    for (d, dv), (g, pack, per_group), causal, dtype, block, windowed, align in itertools.product(
            dims, heads, (True, False), ("float16", "float32", "bfloat16"), (64, 128),
            (False, True), (1, 8)):
        spec = BlockSparseSpec(head_dim=d, v_head_dim=dv, gqa_group=g, pack_gqa=pack,
                               lists_per_group=per_group, causal=causal, dtype=dtype, block=block,
                               windowed=windowed, stride_align=align)
        i += 1
        if i % 3:                       # every third spec, each with two schedules in turn
            continue
        for sch in (schedules[(i // 3) % len(schedules)], schedules[(i // 3 + 2) % len(schedules)]):
            if sch.block_m <= block and sch.block_n <= block:
                yield "block_sparse", spec, sch


def _wgmma(emit_mod):
    BlockSparseSpec, Schedule = emit_mod.BlockSparseSpec, emit_mod.Schedule
    for d, dtype, causal, windowed, g, per_group, persistent in itertools.product(
            (64, 128), ("float16", "bfloat16"), (True, False), (False, True),
            (1, 4), (True, False), (0, 1)):
        spec = BlockSparseSpec(head_dim=d, v_head_dim=d, gqa_group=g, pack_gqa=False,
                               lists_per_group=per_group, causal=causal, dtype=dtype, block=128,
                               windowed=windowed, stride_align=8)
        yield "wgmma", spec, Schedule(block_m=128, block_n=128, num_warps=8, num_stages=3,
                                      tma=True, wgmma=True, persistent=persistent)


def _token_sparse(emit_mod, kind):
    TokenSparseSpec, Schedule = emit_mod.TokenSparseSpec, emit_mod.Schedule
    schedules = [Schedule(block_m=16, block_n=32, num_warps=4, num_stages=1),
                 Schedule(block_m=16, block_n=64, num_warps=2, num_stages=3, split=128),
                 Schedule(block_m=16, block_n=16, num_warps=4, num_stages=2, split=32)]
    i = 0
    for (d, dv), (g, pack, per_group), dtype, align in itertools.product(
            [(64, 64), (60, 60), (128, 128), (64, 48), (256, 256)],
            [(1, False, True), (2, True, True), (4, True, True), (6, True, True),
             (4, False, False), (32, True, True)],
            ("float16", "float32", "bfloat16"), (1, 4, 8)):
        spec = TokenSparseSpec(head_dim=d, v_head_dim=dv, gqa_group=g, pack_gqa=pack,
                               lists_per_group=per_group, dtype=dtype, stride_align=align)
        i += 1
        if i % 2:
            continue
        yield kind, spec, schedules[(i // 2) % len(schedules)]


def variants():
    """``(kind, spec, schedule)`` for every render of the list, in a fixed order."""
    from codegen import emit as emit_mod
    yield from _block_sparse(emit_mod)
    yield from _wgmma(emit_mod)
    yield from _token_sparse(emit_mod, "token_sparse")
    yield from _token_sparse(emit_mod, "token_sparse_bwd")


def render(kind, spec, sch) -> str:
    """The full module text of one variant (header included), as ``codegen.emit`` writes it."""
    from codegen.emit import _HEADER, emit, render_template
    if kind == "wgmma":
        from codegen.block_sparse import wgmma_kernel
        return (render_template(_HEADER, SPEC=repr(spec), SCHEDULE=repr(sch))
                + wgmma_kernel.render(spec, sch, GLUON_NAMES))
    if kind == "token_sparse_bwd":
        from codegen.token_sparse.backward import emit_backward
        return emit_backward(spec, sch)
    return emit(spec, sch)


def render_hashes() -> list:
    """``[(kind, repr(spec), repr(schedule), sha256 of the text)]`` over ``variants()``."""
    return [(kind, repr(spec), repr(sch),
             hashlib.sha256(render(kind, spec, sch).encode()).hexdigest())
            for kind, spec, sch in variants()]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    rows = render_hashes()
    if "--write" in sys.argv:
        os.makedirs(os.path.dirname(HASH_FILE), exist_ok=True)
        with open(HASH_FILE, "w") as f:
            json.dump({"variants": len(rows), "hashes": [h[:20] for *_, h in rows]}, f, indent=0)
            f.write("\n")
    print(f"{len(rows)} renders", {k: sum(r[0] == k for r in rows) for k in
                                   ("block_sparse", "wgmma", "token_sparse", "token_sparse_bwd")})
