"""Triton source of the block-sparse flash-attention forward, rendered per spec and schedule.

One program owns a query tile of ``block_m`` rows (with GQA packing: ``queries x heads`` of one
KV group, so every K/V tile is loaded once for the group) inside one query block of the mask,
walks that block's key-block list with an online softmax (exp2, log2(e) folded into the scale)
and writes ``out`` and ``lse``. Token masks (sequence end, bottom-right causal, sink/window) are
built only on key tiles that can need them (``MaskMode.BRANCH``) or on every tile (``ALWAYS``).
Soft-capped scores and a caller's mask tensor (``spec.softcap`` / ``spec.mask``) are applied
first, in that order, as FlexAttention applies a score modifier: the mask tile is read only
for list entries flagged as needing it (``spec.mask_flags``) or for every listed tile.
K/V tiles come through per-thread async copies or, with ``Schedule.tma``, tensor descriptors.
Rendered through ``codegen.emit.emit``; the reference is ``reference.py`` beside this file.
"""
from __future__ import annotations

import textwrap
from string import Template

from codegen.common import (DTYPES, BlockSparseSpec, MaskMode, Schedule, dot_code,
                            extra_args_doc, head_mapping_code, indent_code, next_pow2,
                            render_template)


# The kernel's decorator and signature ($JIT: triton.jit or gluon.jit; $EXTRA: the tensors of
# ``extra_args``); lengths, strides and the window stay runtime values. wgmma_kernel.py's
# Hopper kernel takes the same arguments (it covers no spec with extra tensors).
KERNEL_DEF = '''\
@$JIT(do_not_specialize=[
    "sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn", "Nq", "Nkv", "Hs", "Hq",
    "n_qblocks", "max_blocks", "sink", "window", "n_mtiles", "n_tiles"])
def block_sparse_fwd(Q, K, V, O, LSE, KV_NUM, KV_IDX,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                     Nq, Nkv, Hs, Hq, n_qblocks, max_blocks, qk_scale, sink, window,
                     n_mtiles, n_tiles$EXTRA):
'''


#: The mask tensor and its element strides (0 along broadcast dimensions): ``spec.mask``.
MASK_ARGS = ("MASK", "smb", "smh", "smn", "smk")
MASK_STRIDES_NOSPEC = ("smb", "smh", "smn")     # ``smk`` (1 or 0) stays specialized


def extra_args(spec: BlockSparseSpec) -> tuple:
    """Arguments after ``n_tiles`` that ``spec`` adds, in order: ``SINKS`` (fp32 ``[Hq]``,
    learned sink logits, natural-log units) with ``spec.sinks``; ``KV_START``, ``KV_END``
    (int32 ``[B]``) with ``spec.kv_ranges``; ``cap`` (float, the soft cap ``c`` times log2(e))
    with ``spec.softcap``; ``MASK_ARGS`` with ``spec.mask``; ``MASK_FLAGS`` (int8 or int32,
    laid out as ``KV_IDX``) with ``spec.mask_flags``."""
    return ((("SINKS",) if spec.sinks else ()) + (("KV_START", "KV_END") if spec.kv_ranges else ())
            + (("cap",) if spec.softcap else ()) + (MASK_ARGS if spec.mask else ())
            + (("MASK_FLAGS",) if spec.mask_flags else ()))


def kernel_def(jit: str, spec: BlockSparseSpec) -> str:
    """``KERNEL_DEF`` with its decorator ``jit`` and the extra arguments of ``spec``."""
    extra = "".join(", " + name for name in extra_args(spec))
    text = KERNEL_DEF.replace("$JIT", jit).replace("$EXTRA", extra)
    if spec.mask:       # the mask's strides change with the lengths: never specialized
        nospec = "".join(f', "{n}"' for n in MASK_STRIDES_NOSPEC)
        text = text.replace('"n_mtiles", "n_tiles"])', f'"n_mtiles", "n_tiles"{nospec}])')
    return text


# Score modifiers of a key tile, in the log2 units of the softmax (qk is scaled first). The soft
# cap: cap * tanh(qk / cap) with cap = c * log2(e) (the same as capping in natural units, then
# converting), tanh(x) = sign(x) * (1 - 2 / (exp(2|x|) + 1)): exp2 overflows to inf for large
# |x|, which gives exactly +-1; cap_k = 2 * log2(e) / cap.
_SOFTCAP = '''\
# soft cap: cap * tanh(qk / cap), tanh(x) = sign(x) * (1 - 2 / (exp(2|x|) + 1))
th = 1.0 - 2.0 / (tl.exp2(tl.abs(qk) * cap_k) + 1.0)
qk = tl.where(qk < 0.0, -th, th) * cap
'''

# The mask tile at (rows of the program, keys ks + offs_n): "add" adds m * log2(e) and masks
# values <= -1e30 (HF's finfo.min masks: such pairs count as masked, like causality); "keep"
# masks where the tile is False. $OK: the load predicate, $OTHER: the value where it is off.
_MASK_LOAD = '''\
mv = tl.load(m_rows[:, None] + offs_k[None, :].to(tl.int64) * smk, mask=$OK, other=$OTHER)
'''
_MASK_APPLY = {
    "add": '''\
mv = mv.to(tl.float32)
qk = tl.where(mv > -1e30, qk + mv * 1.4426950408889634, float("-inf"))
''',
    "keep": '''\
qk = tl.where(mv != 0, qk, float("-inf"))
''',
}


def modifier_code(spec: BlockSparseSpec, sch: Schedule, entry: str) -> str:
    """Loop code applying ``spec.softcap`` and ``spec.mask`` to the tile's scores ``qk``
    (already in log2 units), or "" without them. ``entry``: the list entry of the tile (index
    into ``MASK_FLAGS``' row). With flags the mask is read under a branch on the entry's flag
    (``MaskMode.BRANCH``) or through a predicated load (``ALWAYS``: no branch)."""
    code = _SOFTCAP if spec.softcap else ""
    if not spec.mask:
        return code
    ok = "row_ok[:, None] & kv_ok[None, :]"
    apply = _MASK_APPLY[spec.mask]
    if not spec.mask_flags:
        return code + _MASK_LOAD.replace("$OK", ok).replace("$OTHER", "0") + apply
    flag = f"tl.load(MASK_FLAGS + list_row.to(tl.int64) * max_blocks + {entry}) != 0"
    if sch.mask_mode is MaskMode.ALWAYS:       # unflagged: neutral values, nothing masked
        other = "0.0" if spec.mask == "add" else "1"
        return (code + f"m_need = {flag}\n"
                + _MASK_LOAD.replace("$OK", f"tl.where(m_need, {ok}, False)").replace(
                    "$OTHER", other) + apply)
    body = _MASK_LOAD.replace("$OK", ok).replace("$OTHER", "0") + apply
    return code + f"if {flag}:\n" + textwrap.indent(body, "    ")


# The learned sink joins each row's softmax at the end: one more key of score sinks[head] (in
# the log2 domain of m_i) and value 0, so a row without keys gets out = 0 and lse = the sink.
_SINK_FOLD = '''\
# the learned sink: one more key of score SINKS[head] and value 0
sk = tl.load(SINKS + head, mask=row_ok, other=0.0) * 1.4426950408889634
m_fin = tl.maximum(m_i, sk)
m_use = tl.where(m_fin == float("-inf"), 0.0, m_fin)
alpha = tl.exp2(m_i - m_use)
l_i = l_i * alpha + tl.exp2(sk - m_use)
acc = acc * alpha[:, None]
m_i = m_use
'''


def mask_terms(spec: BlockSparseSpec, block_n: int):
    """Token-mask code of a key tile starting at ``ks``: the conditions under which the tile
    can need a mask (past Nkv, causal diagonal, window, crossing the batch row's key range
    ``[kv_lo, kv_hi)``), and the terms of the keep mask. With ``spec.kv_ranges``, ``kv_hi``
    (at most Nkv) takes the place of Nkv."""
    hi = "kv_hi" if spec.kv_ranges else "Nkv"
    conds = ["ks + %d > %s" % (block_n, hi)]
    keep = ["offs_k[None, :] < %s" % hi]
    if spec.kv_ranges:
        conds.append("ks < kv_lo")
        keep.append("offs_k[None, :] >= kv_lo")
    if spec.causal:
        conds.append("ks + %d > pos_lo" % (block_n - 1))
        keep.append("offs_k[None, :] <= pos[:, None]")
    if spec.windowed:
        conds.append("ks <= pos_hi - window")
        keep.append("((offs_k[None, :] > pos[:, None] - window) | (offs_k[None, :] < sink))")
    return conds, keep


def render(spec: BlockSparseSpec, sch: Schedule) -> str:
    """Source of ``block_sparse_fwd`` specialized on ``spec`` and ``sch``."""
    gp = next_pow2(spec.gqa_group) if spec.pack_gqa else 1
    block_m = max(sch.block_m, gp)
    qm = block_m // gp                      # query rows of one head in a tile
    if qm > spec.block:
        raise ValueError(f"schedule block_m={sch.block_m} covers {qm} queries per head, more "
                         f"than the mask block {spec.block}")
    block_n = min(sch.block_n, spec.block)
    sub = spec.block // block_n             # key tiles per listed key block
    bd, bdv = next_pow2(max(spec.head_dim, 16)), next_pow2(max(spec.v_head_dim, 16))
    d_mask = " & (offs_d[None, :] < %d)" % spec.head_dim if bd != spec.head_dim else ""
    dv_mask = " & (offs_dv[None, :] < %d)" % spec.v_head_dim if bdv != spec.v_head_dim else ""
    dt = DTYPES[spec.dtype]
    row_ok = "(rows_q < Nq)" + (f" & (g < {spec.gqa_group})" if gp != spec.gqa_group else "")

    conds, keep = mask_terms(spec, block_n)
    keep_code = "keep = " + " & ".join(f"({c})" for c in keep) + "\n"
    keep_code += 'qk = tl.where(keep, qk, float("-inf"))\n'
    if sch.mask_mode is MaskMode.ALWAYS:
        mask_code = indent_code(keep_code, 8)
    else:
        mask_code = indent_code("need = " + " | ".join(f"({c})" for c in conds), 8)
        mask_code += indent_code("if need:\n" + textwrap.indent(keep_code, "    "), 8)
    a = spec.stride_align
    mods = modifier_code(spec, sch, "t" if sub == 1 else f"t // {sub}")
    loop = _key_loop(sch, sub, block_n, textwrap.dedent(mask_code), mods, BLOCK=spec.block,
                     ALIGN=a, D_MASK=d_mask, DV_MASK=dv_mask,
                     DOT_QK=dot_code(spec, "q", "tl.trans(k)"),
                     DOT_PV=dot_code(spec, f"p.to({dt})", "v"))
    setup = ""
    if sch.tma:
        setup = indent_code(f'''
            k_desc = tl.make_tensor_descriptor(k_base, shape=[Nkv, {spec.head_dim}], strides=[skn * {a}, 1],
                                               block_shape=[{block_n}, {bd}])
            v_desc = tl.make_tensor_descriptor(v_base, shape=[Nkv, {spec.v_head_dim}], strides=[svn * {a}, 1],
                                               block_shape=[{block_n}, {bdv}])
            ''', 4)
    if spec.kv_ranges:          # the batch row's key range, clipped to the sequence
        setup += indent_code('''
            kv_lo = tl.load(KV_START + b)
            kv_hi = tl.minimum(tl.load(KV_END + b), Nkv)
            ''', 4)
    if spec.softcap:
        setup += indent_code("cap_k = 2.8853900817779268 / cap\n", 4)
    if spec.mask:               # the mask's row pointers of the tile (head per row: GQA packing)
        setup += indent_code('''
            m_rows = MASK + b64 * smb + head.to(tl.int64) * smh + rows_q.to(tl.int64) * smn
            ''', 4)
    if spec.sinks:
        loop += indent_code(_SINK_FOLD, 4)
    head = render_template("\n" + textwrap.indent(kernel_def("triton.jit", spec).rstrip("\n"), "    ") + '''
        # Q [B, Hq, Nq, D], K [B, Hkv, Nkv, D], V [B, Hkv, Nkv, Dv] (strides / $ALIGN given),
        # O [B, Hq, Nq, Dv] and LSE [B, Hq, Nq] contiguous, KV_NUM [B, Hs, NQB],
        # KV_IDX [B, Hs, NQB, max_blocks]; qk_scale = softmax scale * log2(e)$EXTRA_DOC.
        # Tile (pid_m, pid_h): query tile pid_m of head program pid_h; the last (longest causal)
        # query tiles of a head go first.
    ''', ALIGN=a, EXTRA_DOC=extra_args_doc(spec))
    if sch.persistent:
        head += indent_code('''
            for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), flatten=True):
                pid_h = tile // n_mtiles
                pid_m = n_mtiles - 1 - tile % n_mtiles
            ''', 4)
    else:
        head += indent_code('''
            pid_m = n_mtiles - 1 - tl.program_id(0)
            pid_h = tl.program_id(1)
            ''', 4)
    body = render_template('''
        offs_r = tl.arange(0, $BLOCK_M)
        g = offs_r // $QM
        rows_q = pid_m * $QM + offs_r % $QM
    $HEADS
        b64 = b.to(tl.int64)
        offs_d = tl.arange(0, $BD)
        offs_dv = tl.arange(0, $BDV)
        offs_n = tl.arange(0, $BLOCK_N)
        row_ok = $ROW_OK
        q_rows = b64 * (sqb * $ALIGN) + head.to(tl.int64) * (sqh * $ALIGN) + rows_q.to(tl.int64) * (sqn * $ALIGN)
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None]$D_MASK, other=0.0)
        k_base = K + b64 * (skb * $ALIGN) + kvh.to(tl.int64) * (skh * $ALIGN)
        v_base = V + b64 * (svb * $ALIGN) + kvh.to(tl.int64) * (svh * $ALIGN)
    $SETUP
        q0 = pid_m * $QM
        list_row = (b * Hs + hs) * n_qblocks + q0 // $BLOCK
        n_blk = tl.minimum(tl.load(KV_NUM + list_row), max_blocks)
        idx_ptr = KV_IDX + list_row.to(tl.int64) * max_blocks
        pos = rows_q + (Nkv - Nq)                     # bottom-right aligned key position
        pos_lo = q0 + (Nkv - Nq)
        pos_hi = tl.minimum(q0 + $QM, Nq) - 1 + (Nkv - Nq)
        m_i = tl.full([$BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([$BLOCK_M], tl.float32)
        acc = tl.zeros([$BLOCK_M, $BDV], tl.float32)
    $LOOP
        l_ok = l_i > 0.0
        l_safe = tl.where(l_ok, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(l_ok, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        o_rows = ((b64 * Hq + head) * Nq + rows_q) * $DV
        tl.store(O + o_rows[:, None] + offs_dv[None, :], out.to($DT), mask=row_ok[:, None]$DV_MASK)
        tl.store(LSE + (b64 * Hq + head) * Nq + rows_q, lse, mask=row_ok)
    ''', BLOCK_M=block_m, QM=qm, BLOCK_N=block_n, BD=bd, BDV=bdv, DV=spec.v_head_dim,
        BLOCK=spec.block, SUB=sub, ALIGN=a, ROW_OK=row_ok,
        D_MASK=d_mask, DV_MASK=dv_mask, DT=dt, LOOP=loop.rstrip("\n"), SETUP=setup.rstrip("\n"),
        HEADS=indent_code(head_mapping_code(spec, "g"), 4).rstrip("\n"),
        DOT_QK=dot_code(spec, "q", "tl.trans(k)"), DOT_PV=dot_code(spec, f"p.to({dt})", "v"))
    return head + (textwrap.indent(body, "    ") if sch.persistent else body)


_SOFTMAX_STEP = '''\
m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
p = tl.exp2(qk * qk_scale - m_use[:, None])
alpha = tl.exp2(m_i - m_use)
l_i = l_i * alpha + tl.sum(p, 1)
$LOAD_V
acc = acc * alpha[:, None] + $DOT_PV
m_i = m_new
'''


def _key_loop(sch: Schedule, sub: int, block_n: int, mask_code: str, mods: str = "",
              **values) -> str:
    """The loop over key tiles ``t`` (listed block ``t // sub``, sub-tile ``t % sub``).

    ``sch.tma``: K/V tiles come through tensor descriptors (rows past Nkv read as zero).
    ``mods``: score-modifier code (``modifier_code``); with it the scores are scaled into
    log2 units before the modifiers and the rule masks, not in the softmax step."""
    if sub == 1:
        ks = "tl.load(idx_ptr + t) * $BLOCK"
    else:
        ks = f"tl.load(idx_ptr + t // {sub}) * $BLOCK + (t % {sub}) * {block_n}"
    if sch.tma:
        load_k = "k = k_desc.load([ks, 0])\n"
        load_v = "v = v_desc.load([ks, 0])"
    else:
        load_k = ("k_rows = offs_k.to(tl.int64) * (skn * $ALIGN)\n"
                  "k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kv_ok[:, None]$D_MASK, "
                  "other=0.0)\n")
        load_v = ("v_rows = offs_k.to(tl.int64) * (svn * $ALIGN)\n"
                  "v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :], "
                  "mask=kv_ok[:, None]$DV_MASK, other=0.0)")
    step = _SOFTMAX_STEP.replace("$LOAD_V", load_v)
    if mods:
        mods = "qk = qk * qk_scale\n" + mods
        step = step.replace("tl.max(qk, 1) * qk_scale", "tl.max(qk, 1)").replace(
            "qk * qk_scale - m_use", "qk - m_use")
    loop = (f"for t in range(0, n_blk * {sub}):\n"
            + indent_code(f"ks = {ks}\noffs_k = ks + offs_n\nkv_ok = offs_k < Nkv\n"
                          + load_k + "qk = $DOT_QK\n" + mods, 4)
            + indent_code(mask_code, 4)
            + indent_code(step, 4))
    return indent_code(Template(loop).substitute({k: str(v) for k, v in values.items()}), 4)
