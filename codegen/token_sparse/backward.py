"""Triton source of the token-sparse (gather) attention backward, rendered per spec and schedule.

``token_sparse_bwd_pre`` computes delta = rowsum(dO * O) for every query row.
``token_sparse_bwd``: program ``(i, bh, s)`` serves query row ``i`` of one head, or of the
``G`` query heads of a KV head when the lists are shared by the group or by every head (packed
as in the forward: each gathered K/V row is loaded once for the group, the group's rows padded
to 16 for tensor-core dots). It walks entries ``[s * chunk, (s + 1) * chunk)`` of the row's
list, re-gathers their K/V rows, recomputes P = exp(S * scale - lse) from the forward's lse and

    dS = P * (dO Vᵀ - delta),  dQ = scale * dS K,
    dK[idx] += scale * dSᵀ Q,  dV[idx] += Pᵀ dO      (``tl.atomic_add`` into fp32 buffers)

dQ is stored (``Schedule.split == 0``) or atomically added into an fp32 buffer (split lists).
Padding (negative or ``>= Nkv``, or with ``TokenSparseSpec.kv_ranges`` outside the batch
row's key range) and rows with lse = -inf add nothing. A forward with learned sinks needs no
change here: the sink (a key of value 0) enters only through its lse; ``TokenSparseSpec.sinks``
is ignored. Rendered through ``codegen.emit.emit`` with a ``TokenSparseBackwardSpec``; the
reference is ``token_sparse_attention_bwd_ref`` in ``reference.py`` beside this file.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

from codegen.common import (DTYPES, Schedule, TokenSparseSpec, dot_code, head_mapping_code,
                            indent_code, next_pow2, render_template)
from codegen.token_sparse.kernel import (RANGE_SETUP, extra_args, extra_signature, mask_terms,
                                         render_walk)

PRE_ROWS = 32           # query rows per program of the delta pre-pass


@dataclass(frozen=True)
class TokenSparseBackwardSpec:
    """The backward kernels of the token-sparse forward specialized on ``forward`` (they read
    its dims, GQA layout, dtype, alignment and ``kv_ranges``; neither soft cap nor mask).
    ``codegen.emit.emit(TokenSparseBackwardSpec(spec), schedule)`` renders them."""
    forward: TokenSparseSpec


def render(spec: TokenSparseSpec, sch: Schedule) -> str:
    """Source of ``token_sparse_bwd_pre`` and ``token_sparse_bwd`` for ``spec`` and ``sch``."""
    gp = next_pow2(spec.gqa_group) if spec.pack_gqa else 1
    dt = DTYPES[spec.dtype]
    common = dict(mask_terms(spec), D=spec.head_dim, DV=spec.v_head_dim,
                  BLOCK_N=max(sch.block_n, 16), ALIGN=spec.stride_align, DT=dt,
                  PRE_ROWS=PRE_ROWS, EXTRA=extra_signature(extra_args(spec, sinks=False), 21),
                  EXTRA_DOC=";\n    # KV_START, KV_END [B] int32: the forward's key ranges"
                  if spec.kv_ranges else "")
    pre = '''
    @triton.jit(do_not_specialize=["R"])
    def token_sparse_bwd_pre(O, DO, DELTA, R):
        # O, DO [R, Dv] contiguous -> DELTA [R] fp32 = rowsum(O * DO); R = B * Hq * Nq rows.
        rows = tl.program_id(0).to(tl.int64) * $PRE_ROWS + tl.arange(0, $PRE_ROWS)
        offs_dv = tl.arange(0, $BDV)
        m = (rows < R)[:, None]$DV_MASK2
        o = tl.load(O + rows[:, None] * $DV + offs_dv[None, :], mask=m, other=0.0).to(tl.float32)
        do = tl.load(DO + rows[:, None] * $DV + offs_dv[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < R)

    '''
    signature = '''
    @triton.jit(do_not_specialize=["sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn",
                                   "sib", "sih", "sin", "Nq", "Nkv", "Hs", "Hq", "Hkv", "n_idx",
                                   "chunk"])
    def token_sparse_bwd(Q, K, V, IDX, DO, LSE, DELTA, DQ, DK, DV,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sib, sih, sin,
                         Nq, Nkv, Hs, Hq, Hkv, n_idx, chunk, qk_scale, sm_scale$EXTRA):
        # Q [B, Hq, Nq, D], K [B, Hkv, Nkv, D], V [B, Hkv, Nkv, Dv] (strides / $ALIGN given),
        # IDX [B, Hs, Nq, n_idx] int32 read with strides (sib, sih, sin, 1) as in the forward;
        # DO [B, Hq, Nq, Dv], LSE and DELTA [B, Hq, Nq] fp32 (natural log), DQ [B, Hq, Nq, D],
        # DK [B, Hkv, Nkv, D] and DV [B, Hkv, Nkv, Dv] fp32 zeroed: all contiguous.
        # qk_scale = scale * log2(e); program (i, bh, s) reads entries [s * chunk, (s + 1) * chunk)$EXTRA_DOC.
        qi = tl.program_id(0)
        pid_h = tl.program_id(1)
        pid_s = tl.program_id(2)
    '''
    if gp == 1:
        rows = "0"
        load_rows = '''
        row = (b64 * Hq + head) * Nq + qi
        q = tl.load(Q + b64 * (sqb * $ALIGN) + head.to(tl.int64) * (sqh * $ALIGN) + qi.to(tl.int64) * (sqn * $ALIGN) + offs_d,
                    mask=(offs_d < $BD)$D_MASK, other=0.0).to(tl.float32)
        do = tl.load(DO + row * $DV + offs_dv, mask=(offs_dv < $BDV)$DV_MASK, other=0.0).to(tl.float32)
        lse = tl.load(LSE + row)
        delta = tl.load(DELTA + row)
        lse2 = tl.where(lse > float("-inf"), lse * 1.4426950408889634, float("inf"))  # empty: P = 0
        dq = tl.zeros([$BD], tl.float32)
        '''
        step = '''
            s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale
            p = tl.where(ok, tl.exp2(s - lse2), 0.0)
            v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :], mask=ok[:, None]$DV_MASK2, other=0.0).to(tl.float32)
            ds = p * (tl.sum(v * do[None, :], 1) - delta)
            dq += tl.sum(ds[:, None] * k.to(tl.float32), 0)
            dv_part = p[:, None] * do[None, :]
            dk_part = ds[:, None] * q[None, :]
        '''
        dq_ptr, dq_mask = "DQ + row * $D + offs_d", "(offs_d < $BD)$D_MASK"
    else:
        mr = max(16, gp)
        rows = "tl.arange(0, %d)" % mr
        common.update(MR=mr, G=spec.gqa_group)
        load_rows = '''
        g_ok = tl.arange(0, $MR) < $G
        row = (b64 * Hq + head) * Nq + qi
        q_rows = b64 * (sqb * $ALIGN) + head.to(tl.int64) * (sqh * $ALIGN) + qi.to(tl.int64) * (sqn * $ALIGN)
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=g_ok[:, None]$D_MASK2, other=0.0)
        do = tl.load(DO + row[:, None] * $DV + offs_dv[None, :], mask=g_ok[:, None]$DV_MASK2, other=0.0)
        lse = tl.load(LSE + row, mask=g_ok, other=float("-inf"))
        delta = tl.load(DELTA + row, mask=g_ok, other=0.0)
        lse2 = tl.where(lse > float("-inf"), lse * 1.4426950408889634, float("inf"))  # empty: P = 0
        dq = tl.zeros([$MR, $BD], tl.float32)
        '''
        step = '''
            s = $DOT_QK * qk_scale
            p = tl.where(ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :], mask=ok[:, None]$DV_MASK2, other=0.0)
            ds = p * ($DOT_DOV - delta[:, None])
            dq += $DOT_DSK
            dv_part = $DOT_PDO
            dk_part = $DOT_DSQ
        '''
        common.update(DOT_QK=dot_code(spec, "q", "tl.trans(k)"),
                      DOT_DOV=dot_code(spec, "do", "tl.trans(v)"),
                      DOT_DSK=dot_code(spec, f"ds.to({dt})", "k"),
                      DOT_PDO=dot_code(spec, f"tl.trans(p.to({dt}))", "do"),
                      DOT_DSQ=dot_code(spec, f"tl.trans(ds.to({dt}))", "q"))
        dq_ptr, dq_mask = "DQ + row[:, None] * $D + offs_d[None, :]", "g_ok[:, None]$D_MASK2"
    if sch.split:
        store = "tl.atomic_add(%s, dq * sm_scale, mask=%s, sem=\"relaxed\")" % (dq_ptr, dq_mask)
    else:
        store = "tl.store(%s, (dq * sm_scale).to(DQ.dtype.element_ty), mask=%s)" % (dq_ptr, dq_mask)
    scatter = '''
    tl.atomic_add(dv_base + ids64[:, None] * $DV + offs_dv[None, :], dv_part,
                  mask=ok[:, None]$DV_MASK2, sem="relaxed")
    tl.atomic_add(dk_base + ids64[:, None] * $D + offs_d[None, :], dk_part * sm_scale,
                  mask=ok[:, None]$D_MASK2, sem="relaxed")
    '''
    bases = '''
    dk_base = DK + (b64 * Hkv + kvh) * Nkv * $D
    dv_base = DV + (b64 * Hkv + kvh) * Nkv * $DV
    '''
    if spec.kv_ranges:
        bases = textwrap.dedent(bases) + textwrap.dedent(RANGE_SETUP).lstrip("\n")
    src = render_template(pre, **common) + render_template(signature, **common)
    src += indent_code(head_mapping_code(spec, rows), 4)
    src += render_walk(common, load_rows,
                       textwrap.dedent(step).strip("\n") + "\n" + textwrap.dedent(scatter),
                       store, bases)
    return src
