"""Gluon source of the block-sparse forward for Hopper: warp-specialized, two consumer
warpgroups taking turns on the tensor cores.

The Triton kernel (``kernel.py``) runs one tile's QK^T, softmax and P·V in lockstep across its
8 warps, so the tensor cores idle during every softmax (Triton 3.6 generates no warp
specialization for that loop on sm_90). This kernel is written in Gluon
(``triton.experimental.gluon``) with explicit warpgroup MMAs, tensor-memory copies and
mbarriers, and splits each 128-query tile over three partitions:

- a loader warp: Q's two 64-row halves (double-buffered across tiles), then K_j and V_j of
  every listed block into one of two stages, each stage reused once both consumers release it;
  all through tensor descriptors made once per program (4-D: batch, head, row, dim);
- two consumer warpgroups, rows 0-63 and 64-127. They alternate on the tensor cores through
  two "turn" barriers: a turn issues QK^T of block j and P·V of block j-1 back to back and
  passes right after the issue, then the consumer waits for both, masks (only on tiles that
  can need it) and runs the online softmax of block j while the other consumer's products run.
  The first block's QK^T and the last block's P·V take a turn alone. The normalized output
  goes to the consumer's own shared-memory buffer and leaves through the copy engine (a 3-D
  descriptor that clips rows past the sequence end), overlapping the next tile.

An intra-warpgroup variant (QK^T of tile j and P·V of tile j-1 in flight together, softmax in
between, without the second consumer) compiled as written, but ptxas moved the wait for P·V
above the softmax, and it measured no faster than the Triton kernel
(benchmarks/NOTES_kernels.md).

Programs walk tiles head by head, each head's longest causal tiles first; with
``Schedule.persistent`` the grid holds that many programs per SM, each walking several tiles
(loads of the next tile overlap the current one's work), else one program per tile. Same
arguments, outputs and masking rules as ``kernel.py``'s ``block_sparse_fwd`` (bottom-right
causal, sequence end, sink/window), so the launch code is shared (launched with
``LAUNCH_WARPS`` warps). Supported: CUDA capability 9.x, fp16/bf16, equal head dims of 64 or
128, 128x128 tiles equal to the mask block, no GQA packing, no learned sinks, per-batch key
ranges, soft cap or mask tensor (``BlockSparseSpec.sinks`` / ``kv_ranges`` / ``softcap`` /
``mask``: the launcher runs ``kernel.py`` for those), 16-byte strides and start
addresses (tensor descriptors; the runtime writes a misaligned ``out`` through an aligned
temporary); ``supported`` says whether a case is covered and ``unsupported_reason`` names
what misses (the runtime then runs ``kernel.py``).
K/V are double-buffered whatever ``num_stages`` says.
"""
from __future__ import annotations

from codegen.block_sparse.kernel import kernel_def, mask_terms
from codegen.common import (DTYPES, BlockSparseSpec, Schedule, head_mapping_code, indent_code,
                            render_template)

_GL_DTYPES = {k: v.replace("tl.", "gl.") for k, v in DTYPES.items() if k != "float32"}
LAUNCH_WARPS = 4        # the launch's warps run consumer 0; consumer 1 and the loader are workers


def unsupported_reason(spec: BlockSparseSpec, sch: Schedule) -> str:
    """Why this kernel does not cover ``(spec, sch)``, e.g. ``"GQA packing"``; ``""`` when it
    does (see ``supported``)."""
    if spec.dtype not in _GL_DTYPES:
        return f"dtype {spec.dtype} (needs float16 or bfloat16)"
    if spec.head_dim != spec.v_head_dim or spec.head_dim not in (64, 128):
        return f"head dims {spec.head_dim}/{spec.v_head_dim} (needs equal dims of 64 or 128)"
    if spec.pack_gqa:
        return "GQA packing"
    if spec.sinks or spec.kv_ranges:
        return "learned sinks or per-batch key ranges (the Triton kernel applies them)"
    if spec.softcap or spec.mask:
        return "soft-capped scores or a mask tensor (the Triton kernel applies them)"
    if not (sch.block_m == sch.block_n == spec.block == 128):
        return (f"tiles {sch.block_m}x{sch.block_n} with mask block {spec.block} "
                f"(needs 128x128 tiles and block 128)")
    if sch.num_warps != 8:          # the two consumer warpgroups (launched as LAUNCH_WARPS + workers)
        return f"num_warps={sch.num_warps} (needs 8)"
    if spec.stride_align * 2 != 16:
        return f"strides aligned to {spec.stride_align} elements (needs 8: 16-byte TMA strides)"
    return ""


def supported(spec: BlockSparseSpec, sch: Schedule) -> bool:
    """Whether this kernel covers ``(spec, sch)`` (``unsupported_reason`` says why not)."""
    return not unsupported_reason(spec, sch)


def gluon_names() -> dict:
    """Gluon calls whose names differ between Triton releases, as the installed Triton spells
    them: the TMA tile load and store (``async_copy_global_to_shared`` /
    ``async_copy_shared_to_global`` in 3.6, ``async_load`` / ``async_store`` later) and the
    CTA barrier (``thread_barrier`` in 3.6, ``barrier`` later)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import tma
    load = "async_load" if hasattr(tma, "async_load") else "async_copy_global_to_shared"
    store = "async_store" if hasattr(tma, "async_store") else "async_copy_shared_to_global"
    barrier = "thread_barrier" if hasattr(gl, "thread_barrier") else "barrier"
    return {"TMA_LOAD": load, "TMA_STORE": store, "BARRIER": barrier}


def render(spec: BlockSparseSpec, sch: Schedule, names: dict | None = None) -> str:
    """Source of ``block_sparse_fwd`` (Gluon) for ``spec`` / ``sch``; ``names``: ``gluon_names()``
    of the Triton that will compile it (default: the installed one)."""
    why = unsupported_reason(spec, sch)
    if why:
        raise ValueError(f"the warpgroup-MMA block-sparse kernel does not cover {why}")
    d, bn, a = spec.head_dim, sch.block_n, spec.stride_align
    conds, keep = mask_terms(spec, bn)
    return render_template('''
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)


    @gluon.jit
    def _masked(s, ks, pos, pos_lo, pos_hi, Nkv, sink, window):
        # -inf where a key of the tile starting at ks is past Nkv, in the future or outside the
        # window; the mask is built only on tiles that can need it.
        need = $NEED
        if need:
            offs_k = ks + gl.arange(0, $BN, layout=gl.SliceLayout(0, s.type.layout))
            keep = $KEEP
            s = gl.where(keep, s, float("-inf"))
        return s


    @gluon.jit
    def _softmax_step(s, m_i, l_i, qk_scale):
        # Online softmax in base 2: new row max, probabilities, rescale factor, new row sums.
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * qk_scale - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i


    @gluon.jit
    def _tile(tile, n_mtiles, Hq, Hs, n_qblocks, max_blocks, KV_NUM, KV_IDX):
        # Tile -> (batch, query head, KV head, first query row, list length, list pointer).
        # Head by head, the longest causal tiles of a head first: programs that run at the
        # same time share a head's K/V in L2.
        pid_h = tile // n_mtiles
        pid_m = n_mtiles - 1 - tile % n_mtiles
    $HEADS
        q0 = pid_m * $BM
        list_row = (b * Hs + hs) * n_qblocks + q0 // $BLOCK
        n_blk = gl.minimum(gl.load(KV_NUM + list_row), max_blocks)
        idx_ptr = KV_IDX + list_row.to(gl.int64) * max_blocks
        return b, hq, kvh, q0, n_blk, idx_ptr


    @gluon.jit
    def _producer(Q, K, V, KV_NUM, KV_IDX, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, Nq, Nkv,
                  Hs, Hq, n_qblocks, max_blocks, n_mtiles, n_tiles, q_s, k_s, v_s, bars):
        # One warp: per tile, Q's two halves into Q buffer t % 2, then K_j and V_j of every
        # listed block through the copy engine into stage (running block count) % 2, each once
        # both consumers have released that buffer.
        tile_l: gl.constexpr = q_s.layout            # the kernel's tile layout
        n_b = n_tiles // (n_mtiles * Hq)
        q_desc = tma.make_tensor_descriptor(Q, shape=[n_b, Hq, Nq, $D],
                                            strides=[sqb * $ALIGN, sqh * $ALIGN, sqn * $ALIGN, 1],
                                            block_shape=[1, 1, $HM, $D], layout=tile_l)
        k_desc = tma.make_tensor_descriptor(K, shape=[n_b, Hq // $G, Nkv, $D],
                                            strides=[skb * $ALIGN, skh * $ALIGN, skn * $ALIGN, 1],
                                            block_shape=[1, 1, $BN, $D], layout=tile_l)
        v_desc = tma.make_tensor_descriptor(V, shape=[n_b, Hq // $G, Nkv, $D],
                                            strides=[svb * $ALIGN, svh * $ALIGN, svn * $ALIGN, 1],
                                            block_shape=[1, 1, $BN, $D], layout=tile_l)
        it = 0
        t_local = 0
        for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            b, hq, kvh, q0, n_blk, idx_ptr = _tile(tile, n_mtiles, Hq, Hs, n_qblocks, max_blocks,
                                                   KV_NUM, KV_IDX)
            qb = t_local % 2
            mbarrier.wait(bars.index(10 + qb), ((t_local // 2) & 1) ^ 1)     # Q buffer free
            mbarrier.expect(bars.index(8 + qb), $Q_BYTES)
            for h in gl.static_range(2):
                tma.$TMA_LOAD(q_desc, [b, hq, q0 + h * $HM, 0], bars.index(8 + qb),
                              q_s.index(2 * qb + h).reshape([1, 1, $HM, $D]))
            for j in range(n_blk):
                st = it % 2
                ph = (it // 2) & 1
                ks = gl.load(idx_ptr + j) * $BLOCK
                mbarrier.wait(bars.index(2 + st), ph ^ 1)            # K stage free
                mbarrier.expect(bars.index(st), $TILE_BYTES)
                tma.$TMA_LOAD(k_desc, [b, kvh, ks, 0], bars.index(st),
                              k_s.index(st).reshape([1, 1, $BN, $D]))
                mbarrier.wait(bars.index(6 + st), ph ^ 1)            # V stage free
                mbarrier.expect(bars.index(4 + st), $TILE_BYTES)
                tma.$TMA_LOAD(v_desc, [b, kvh, ks, 0], bars.index(4 + st),
                              v_s.index(st).reshape([1, 1, $BN, $D]))
                it += 1
            t_local += 1


    @gluon.jit
    def _consumer(c: gl.constexpr, O, LSE, KV_NUM, KV_IDX, Nq, Nkv, Hs, Hq, n_qblocks,
                  max_blocks, n_mtiles, n_tiles, qk_scale, sink, window, q_s, k_s, v_s, o_s, bars):
        # Rows q0 + 64c .. q0 + 64c + 63 of each tile (one warpgroup). The two consumers take
        # turns on the tensor cores (bars 12 + c: "my turn"), so one's softmax runs while the
        # other's products do.
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, $BN, 16])     # S = Q K^T
        mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, $D, 16])    # O += P V
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        rows_o: gl.constexpr = gl.SliceLayout(1, mma_o)
        s_zero = gl.zeros([$HM, $BN], gl.float32, mma)
        o_desc = tma.make_tensor_descriptor(O, shape=[n_tiles // n_mtiles, Nq, $D],
                                            strides=[Nq * $D, $D, 1], block_shape=[1, $HM, $D],
                                            layout=o_s.layout)
        it = 0          # blocks consumed (K/V stage and phase)
        tn = 0          # turns taken on the tensor cores
        t_local = 0
        for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            b, hq, kvh, q0, n_blk, idx_ptr = _tile(tile, n_mtiles, Hq, Hs, n_qblocks, max_blocks,
                                                   KV_NUM, KV_IDX)
            rows = q0 + c * $HM + gl.arange(0, $HM, layout=rows_l)
            pos = rows + (Nkv - Nq)                   # bottom-right aligned key position
            pos_lo = q0 + (Nkv - Nq)
            pos_hi = gl.minimum(q0 + $BM, Nq) - 1 + (Nkv - Nq)
            m_i = gl.full([$HM], float("-inf"), gl.float32, rows_l)
            l_i = gl.zeros([$HM], gl.float32, rows_l)
            acc = gl.zeros([$HM, $D], gl.float32, mma_o)
            qb = t_local % 2
            q_c = q_s.index(2 * qb + c)
            ks = gl.load(idx_ptr, mask=max_blocks > 0, other=0) * $BLOCK     # block 0's keys
            mbarrier.wait(bars.index(8 + qb), (t_local // 2) & 1)   # Q landed
            if n_blk > 0:
                # block 0: QK^T alone on this turn
                st = it % 2
                ph = (it // 2) & 1
                mbarrier.wait(bars.index(st), ph)                    # K_0 landed
                mbarrier.wait(bars.index(12 + c), (tn & 1) ^ (1 - c))   # my turn
                s = warpgroup_mma(q_c, k_s.index(st).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
                mbarrier.arrive(bars.index(13 - c), count=1)         # the other's turn
                tn += 1
                s = warpgroup_mma_wait(0, deps=(s,))
                mbarrier.arrive(bars.index(2 + st), count=1)         # K stage released
                s = _masked(s, ks, pos, pos_lo, pos_hi, Nkv, sink, window)
                p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale)
                p = gl.convert_layout(p.to($DT), p_layout)
                for j in range(1, n_blk):
                    # one turn issues QK^T of block j and P V of block j - 1 back to back,
                    # then this consumer's softmax runs while the other's products do
                    pst = st
                    pph = ph
                    it += 1
                    st = it % 2
                    ph = (it // 2) & 1
                    ks = gl.load(idx_ptr + j) * $BLOCK
                    mbarrier.wait(bars.index(st), ph)                # K_j landed
                    mbarrier.wait(bars.index(4 + pst), pph)          # V_{j-1} landed
                    mbarrier.wait(bars.index(12 + c), (tn & 1) ^ (1 - c))
                    s = warpgroup_mma(q_c, k_s.index(st).permute((1, 0)), s_zero, use_acc=False,
                                      is_async=True)
                    acc = warpgroup_mma(p, v_s.index(pst), acc, is_async=True)
                    mbarrier.arrive(bars.index(13 - c), count=1)
                    tn += 1
                    s, acc = warpgroup_mma_wait(0, deps=(s, acc))
                    mbarrier.arrive(bars.index(2 + st), count=1)     # K_j released
                    mbarrier.arrive(bars.index(6 + pst), count=1)    # V_{j-1} released
                    s = _masked(s, ks, pos, pos_lo, pos_hi, Nkv, sink, window)
                    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale)
                    acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
                    p = gl.convert_layout(p.to($DT), p_layout)
                # the last block's P V
                mbarrier.wait(bars.index(4 + st), ph)                # V landed
                mbarrier.wait(bars.index(12 + c), (tn & 1) ^ (1 - c))
                acc = warpgroup_mma(p, v_s.index(st), acc, is_async=True)
                mbarrier.arrive(bars.index(13 - c), count=1)
                tn += 1
                acc = warpgroup_mma_wait(0, deps=(acc,))
                mbarrier.arrive(bars.index(6 + st), count=1)         # V stage released
                it += 1
            mbarrier.arrive(bars.index(10 + qb), count=1)            # Q buffer released
            l_ok = l_i > 0.0
            l_safe = gl.where(l_ok, l_i, 1.0)
            out = acc * gl.convert_layout(1.0 / l_safe, rows_o)[:, None]
            lse = gl.where(l_ok, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
            o_base = (b.to(gl.int64) * Hq + hq) * Nq
            gl.store(LSE + o_base + rows, lse, mask=rows < Nq)
            # the output through this consumer's buffer and the copy engine (rows past Nq
            # clipped); the store overlaps the next tile
            o_c = o_s.index(c)
            tma.store_wait(0)                       # the previous tile's output has left o_c
            o_c.store(out.to($DT))
            fence_async_shared()
            gl.$BARRIER()
            tma.$TMA_STORE(o_desc, [b * Hq + hq, q0 + c * $HM, 0], o_c.reshape([1, $HM, $D]))
            t_local += 1
        tma.store_wait(0)


    $KERNEL_DEF
        # Arguments as kernel.py's block_sparse_fwd. A 1-D grid of programs walks the tiles
        # (one each, or several when the grid is persistent). Launched with 4 warps (consumer
        # 0); consumer 1 (4 warps) and the loader (1 warp) are worker partitions.
        tile_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=$SWIZZLE, element_bitwidth=16,
                                                    rank=2)
        q_s = gl.allocate_shared_memory($DT, [4, $HM, $D], tile_l)      # 2 buffers x 2 halves
        k_s = gl.allocate_shared_memory($DT, [2, $BN, $D], tile_l)
        v_s = gl.allocate_shared_memory($DT, [2, $BN, $D], tile_l)
        o_s = gl.allocate_shared_memory($DT, [2, $HM, $D], tile_l)      # each consumer's output
        # 0-1 K landed, 2-3 K free (both consumers), 4-5 V landed, 6-7 V free, 8-9 Q landed,
        # 10-11 Q free, 12-13 consumer 0 / 1 may issue its next product
        bars = gl.allocate_shared_memory(gl.int64, [14, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(bars.index(i), count=1)
            mbarrier.init(bars.index(2 + i), count=2)
            mbarrier.init(bars.index(4 + i), count=1)
            mbarrier.init(bars.index(6 + i), count=2)
            mbarrier.init(bars.index(8 + i), count=1)
            mbarrier.init(bars.index(10 + i), count=2)
            mbarrier.init(bars.index(12 + i), count=1)
        gl.warp_specialize([
            (_consumer, (0, O, LSE, KV_NUM, KV_IDX, Nq, Nkv, Hs, Hq, n_qblocks, max_blocks,
                         n_mtiles, n_tiles, qk_scale, sink, window, q_s, k_s, v_s, o_s, bars)),
            (_consumer, (1, O, LSE, KV_NUM, KV_IDX, Nq, Nkv, Hs, Hq, n_qblocks, max_blocks,
                         n_mtiles, n_tiles, qk_scale, sink, window, q_s, k_s, v_s, o_s, bars)),
            (_producer, (Q, K, V, KV_NUM, KV_IDX, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                         Nq, Nkv, Hs, Hq, n_qblocks, max_blocks, n_mtiles, n_tiles, q_s, k_s, v_s,
                         bars)),
        ], [4, 1], [$CONSUMER_REGS, 24])
    ''', BM=sch.block_m, BN=bn, D=d, BLOCK=spec.block, ALIGN=a, DT=_GL_DTYPES[spec.dtype],
        SWIZZLE=min(128, d * 2), TILE_BYTES=bn * d * 2, Q_BYTES=sch.block_m * d * 2,
        HM=sch.block_m // 2, G=spec.gqa_group, CONSUMER_REGS=240,
        KERNEL_DEF=kernel_def("gluon.jit", spec).rstrip("\n"),
        NEED=" | ".join(f"({c})" for c in conds), KEEP=" & ".join(f"({c})" for c in keep),
        **(names or gluon_names()),
        HEADS=indent_code(head_mapping_code(spec, "0"), 4).rstrip("\n"))
