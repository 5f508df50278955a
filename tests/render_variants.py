"""A fixed list of kernel renders (spec x schedule) and the hashes of their source text.

``variants()`` enumerates the renders of every kernel family in a fixed order: block-sparse
(Triton and Hopper Gluon), token-sparse forward and backward, then the same families with
learned sinks, key ranges, soft-capped scores and mask tensors, the selection kernels
(block top-k, lines, Quest) and the lightning indexer kernels. ``tests/data/render_hashes.json``
holds the sha256 of each render's text; ``test_render_hashes.py`` checks that the same specs
still render the same bytes. The first 824 entries are the renders of the specs every kernel
has had from the start, as the kernels produced them before sinks and key ranges existed (the
file held their first 20 hex digits then, and a stored digest matches as a prefix).

Regenerate the file only when a change is meant to alter the kernels' text::

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
KINDS = ("block_sparse", "wgmma", "token_sparse", "token_sparse_bwd", "block_topk", "lines",
         "quest", "indexer", "indexer_few_rows")


def _specs():
    from codegen import common
    return common


def _bs_schedules(MaskMode, Schedule):
    return [
        Schedule(block_m=64, block_n=64, num_warps=4, num_stages=1),
        Schedule(block_m=32, block_n=16, num_warps=4, num_stages=1, mask_mode=MaskMode.ALWAYS),
        Schedule(block_m=128, block_n=64, num_warps=8, num_stages=3),
        Schedule(block_m=64, block_n=32, num_warps=4, num_stages=2, tma=True),
        Schedule(block_m=32, block_n=32, num_warps=4, num_stages=2, persistent=2),
        Schedule(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True,
                 mask_mode=MaskMode.ALWAYS),
    ]


def _block_sparse(m):
    schedules = _bs_schedules(m.MaskMode, m.Schedule)
    dims = [(64, 64), (60, 60), (128, 128), (64, 32)]
    heads = [(1, False, True), (4, True, True), (3, True, True), (4, False, False)]
    i = 0
    for (d, dv), (g, pack, per_group), causal, dtype, block, windowed, align in itertools.product(
            dims, heads, (True, False), ("float16", "float32", "bfloat16"), (64, 128),
            (False, True), (1, 8)):
        spec = m.BlockSparseSpec(head_dim=d, v_head_dim=dv, gqa_group=g, pack_gqa=pack,
                                 lists_per_group=per_group, causal=causal, dtype=dtype,
                                 block=block, windowed=windowed, stride_align=align)
        i += 1
        if i % 3:                       # every third spec, each with two schedules in turn
            continue
        for sch in (schedules[(i // 3) % len(schedules)], schedules[(i // 3 + 2) % len(schedules)]):
            if sch.block_m <= block and sch.block_n <= block:
                yield "block_sparse", spec, sch


def _wgmma(m):
    for d, dtype, causal, windowed, g, per_group, persistent in itertools.product(
            (64, 128), ("float16", "bfloat16"), (True, False), (False, True),
            (1, 4), (True, False), (0, 1)):
        spec = m.BlockSparseSpec(head_dim=d, v_head_dim=d, gqa_group=g, pack_gqa=False,
                                 lists_per_group=per_group, causal=causal, dtype=dtype,
                                 block=128, windowed=windowed, stride_align=8)
        yield "wgmma", spec, m.Schedule(block_m=128, block_n=128, num_warps=8, num_stages=3,
                                        tma=True, wgmma=True, persistent=persistent)


def _ts_schedules(Schedule):
    return [Schedule(block_m=16, block_n=32, num_warps=4, num_stages=1),
            Schedule(block_m=16, block_n=64, num_warps=2, num_stages=3, split=128),
            Schedule(block_m=16, block_n=16, num_warps=4, num_stages=2, split=32)]


def _token_sparse(m, kind):
    schedules = _ts_schedules(m.Schedule)
    i = 0
    for (d, dv), (g, pack, per_group), dtype, align in itertools.product(
            [(64, 64), (60, 60), (128, 128), (64, 48), (256, 256)],
            [(1, False, True), (2, True, True), (4, True, True), (6, True, True),
             (4, False, False), (32, True, True)],
            ("float16", "float32", "bfloat16"), (1, 4, 8)):
        spec = m.TokenSparseSpec(head_dim=d, v_head_dim=dv, gqa_group=g, pack_gqa=pack,
                                 lists_per_group=per_group, dtype=dtype, stride_align=align)
        i += 1
        if i % 2:
            continue
        yield kind, spec, schedules[(i // 2) % len(schedules)]


# ----------------------------------------------------------------------------- later features

_MASKS = (("", False), ("add", False), ("add", True), ("keep", False), ("keep", True))


def _block_sparse_features(m):
    """Learned sinks, key ranges, soft cap and mask tensors (with and without mask flags), every
    combination on four base specs, the schedules (mask modes, TMA, persistent) in turn."""
    schedules = _bs_schedules(m.MaskMode, m.Schedule)
    bases = [dict(head_dim=64, v_head_dim=64, gqa_group=1, pack_gqa=False, lists_per_group=True,
                  causal=True, dtype="float16", block=64, stride_align=8),
             dict(head_dim=128, v_head_dim=128, gqa_group=4, pack_gqa=True, lists_per_group=True,
                  causal=True, dtype="bfloat16", block=128, windowed=True, stride_align=8),
             dict(head_dim=60, v_head_dim=60, gqa_group=3, pack_gqa=True, lists_per_group=True,
                  causal=False, dtype="float32", block=64),
             dict(head_dim=64, v_head_dim=32, gqa_group=4, pack_gqa=False, lists_per_group=False,
                  causal=False, dtype="float16", block=128, windowed=True)]
    i = 0
    for base in bases:
        fitting = [s for s in schedules if s.block_m <= base["block"] and s.block_n <= base["block"]]
        for sinks, ranges, cap, (mask, flags) in itertools.product(
                (False, True), (False, True), (False, True), _MASKS):
            if not (sinks or ranges or cap or mask):
                continue
            spec = m.BlockSparseSpec(**base, sinks=sinks, kv_ranges=ranges, softcap=cap,
                                     mask=mask, mask_flags=flags)
            i += 1
            yield "block_sparse", spec, fitting[i % len(fitting)]


def _wgmma_schedules(m):
    """The Gluon kernel under the other schedule fields it reads (mask mode, stages, grid)."""
    for d, dtype, (mode, stages, persistent) in itertools.product(
            (64, 128), ("float16", "bfloat16"),
            ((m.MaskMode.ALWAYS, 3, 0), (m.MaskMode.BRANCH, 2, 2), (m.MaskMode.ALWAYS, 4, 1))):
        spec = m.BlockSparseSpec(head_dim=d, v_head_dim=d, gqa_group=2, pack_gqa=False,
                                 lists_per_group=True, causal=True, dtype=dtype, block=128,
                                 windowed=d == 64, stride_align=8)
        yield "wgmma", spec, m.Schedule(block_m=128, block_n=128, num_warps=8, num_stages=stages,
                                        tma=True, wgmma=True, persistent=persistent,
                                        mask_mode=mode)


_TS_BASES = [dict(head_dim=64, v_head_dim=64, gqa_group=1, pack_gqa=False, lists_per_group=True,
                  dtype="float16", stride_align=8),
             dict(head_dim=128, v_head_dim=128, gqa_group=4, pack_gqa=True, lists_per_group=True,
                  dtype="bfloat16", stride_align=8),
             dict(head_dim=60, v_head_dim=48, gqa_group=6, pack_gqa=True, lists_per_group=True,
                  dtype="float32"),
             dict(head_dim=64, v_head_dim=64, gqa_group=4, pack_gqa=False, lists_per_group=False,
                  dtype="float16", stride_align=4)]


def _token_sparse_features(m):
    schedules = _ts_schedules(m.Schedule)
    i = 0
    for base in _TS_BASES:
        for sinks, ranges, cap, mask in itertools.product(
                (False, True), (False, True), (False, True), ("", "add", "keep")):
            if not (sinks or ranges or cap or mask):
                continue
            i += 1
            yield ("token_sparse", m.TokenSparseSpec(**base, sinks=sinks, kv_ranges=ranges,
                                                     softcap=cap, mask=mask),
                   schedules[i % len(schedules)])


def _token_sparse_bwd_features(m):
    """The backward reads learned sinks and key ranges (neither soft cap nor mask)."""
    schedules = _ts_schedules(m.Schedule)
    for base, (sinks, ranges), sch in itertools.product(
            _TS_BASES, ((True, False), (False, True), (True, True)), schedules[:2]):
        yield "token_sparse_bwd", m.TokenSparseSpec(**base, sinks=sinks, kv_ranges=ranges), sch


def _backward(rows):
    """The token-sparse rows of ``rows`` as renders of their backward."""
    from codegen.token_sparse.backward import TokenSparseBackwardSpec
    for kind, spec, sch in rows:
        yield kind, TokenSparseBackwardSpec(spec), sch


def _selection(m):
    from codegen.select.block_topk_kernel import BlockTopkSpec
    from codegen.select.lines_kernel import LinesSpec
    from codegen.select.quest_kernel import QuestSpec
    yield "block_topk", BlockTopkSpec(), None
    yield "lines", LinesSpec(), None
    yield "quest", QuestSpec(), None


def _indexer(m):
    from codegen.indexer.kernel import IndexerSpec
    i = 0
    for heads, d, dtype, bm, bn, t, align, stack in itertools.product(
            (1, 4, 8), (64, 128, 40), ("float16", "bfloat16", "float32"), (16, 64), (32, 64),
            (1, 16), (1, 8), (False, True)):
        i += 1
        if i % 11:
            continue
        yield "indexer", IndexerSpec(heads=heads, head_dim=d, dtype=dtype, block_m=bm, block_n=bn,
                                     thresholds=t, stride_align=align, stack_heads=stack), None
    for stack in (False, True):     # DeepSeek-V3.2's shape
        yield "indexer", IndexerSpec(heads=64, head_dim=128, dtype="bfloat16", block_m=64,
                                     block_n=32, thresholds=16, stride_align=8,
                                     stack_heads=stack), None
    for group in (1, 4):            # its queries streamed, one head or four per product
        yield "indexer", IndexerSpec(heads=64, head_dim=128, dtype="bfloat16", block_m=16,
                                     block_n=64, thresholds=16, stride_align=8,
                                     stream_queries=True, head_group=group), None
    from codegen.indexer.few_rows_kernel import FewRowsSpec
    yield "indexer_few_rows", FewRowsSpec(), None


def variants():
    """``(kind, spec, schedule)`` for every render of the list, in a fixed order."""
    m = _specs()
    yield from _block_sparse(m)
    yield from _wgmma(m)
    yield from _token_sparse(m, "token_sparse")
    yield from _backward(_token_sparse(m, "token_sparse_bwd"))
    yield from _block_sparse_features(m)
    yield from _wgmma_schedules(m)
    yield from _token_sparse_features(m)
    yield from _backward(_token_sparse_bwd_features(m))
    yield from _selection(m)
    yield from _indexer(m)


def render(kind, spec, sch) -> str:
    """The full module text of one variant, as ``codegen.emit.emit`` writes it."""
    from codegen.emit import emit
    return emit(spec, sch, gluon_names=GLUON_NAMES if kind == "wgmma" else None)


def render_hashes() -> list:
    """``[(kind, repr(spec), repr(schedule), sha256 of the text)]`` over ``variants()``."""
    return [(kind, repr(spec), repr(sch),
             hashlib.sha256(render(kind, spec, sch).encode()).hexdigest())
            for kind, spec, sch in variants()]


def kind_counts(rows) -> dict:
    return {k: n for k in KINDS if (n := sum(r[0] == k for r in rows))}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    rows = render_hashes()
    if "--write" in sys.argv:
        os.makedirs(os.path.dirname(HASH_FILE), exist_ok=True)
        with open(HASH_FILE, "w") as f:
            json.dump({"variants": len(rows), "kinds": kind_counts(rows),
                       "hashes": [h for *_, h in rows]}, f, indent=0)
            f.write("\n")
    print(f"{len(rows)} renders", kind_counts(rows))
