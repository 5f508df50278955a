"""Triton source of token-sparse (gather) attention, rendered per spec and schedule.

Program ``(i, bh, s)`` serves query row ``i`` of one head, or of the ``G`` query heads of a KV
group when the index lists are shared per group or by every head (GQA packing: gathered K/V
rows are loaded once for the group and multiplied on tensor cores with the group's rows padded
to 16). The index tensor is read through runtime strides, so lists shared by every head
(``Hs == 1``) are a head stride of 0, never copies. It walks entries
``[s * chunk, (s + 1) * chunk)`` of the row's index list with an online softmax. With one
split the result is final; otherwise (decode: few rows, long lists) each split writes a
normalized partial output and its lse, and ``token_sparse_combine`` merges them. Soft-capped
scores and a caller's mask tensor (``spec.softcap`` / ``spec.mask``, read at the gathered
positions) are applied to each step's scores before the list's own masks.
Rendered through ``codegen.emit.emit``; the reference is ``reference.py`` beside this file.
"""
from __future__ import annotations

import textwrap

from codegen.common import (DTYPES, Schedule, TokenSparseSpec, dot_code, extra_args_doc,
                            head_mapping_code, indent_code, next_pow2, render_template)


def mask_terms(spec: TokenSparseSpec) -> dict:
    """Head dims padded to powers of two and the mask terms that hide the padding, as template
    values: ``$D_MASK`` / ``$DV_MASK`` on ``offs_d`` / ``offs_dv`` and ``$D_MASK2`` /
    ``$DV_MASK2`` on their ``[None, :]`` broadcasts (empty where nothing is padded); and
    ``$KEY_OK``, which list entries ``ids`` name a key: inside ``[0, Nkv)``, or with
    ``spec.kv_ranges`` inside the batch row's range ``[kv_lo, kv_hi)`` (``RANGE_SETUP``)."""
    bd, bdv = next_pow2(max(spec.head_dim, 16)), next_pow2(max(spec.v_head_dim, 16))
    d_mask = " & (offs_d < %d)" % spec.head_dim if bd != spec.head_dim else ""
    dv_mask = " & (offs_dv < %d)" % spec.v_head_dim if bdv != spec.v_head_dim else ""
    key_ok = "(ids >= kv_lo) & (ids < kv_hi)" if spec.kv_ranges else "(ids >= 0) & (ids < Nkv)"
    return dict(BD=bd, BDV=bdv, D_MASK=d_mask, DV_MASK=dv_mask, KEY_OK=key_ok,
                D_MASK2=d_mask.replace("offs_d <", "offs_d[None, :] <"),
                DV_MASK2=dv_mask.replace("offs_dv <", "offs_dv[None, :] <"))


#: With ``spec.kv_ranges``: the batch row's key range ``[kv_lo, kv_hi)`` clipped to
#: ``[0, Nkv)``, read before the walk (a ``$BASES`` piece of ``GATHER_WALK``).
RANGE_SETUP = '''
kv_lo = tl.maximum(tl.load(KV_START + b), 0)
kv_hi = tl.minimum(tl.load(KV_END + b), Nkv)
'''


#: The mask tensor and its element strides (0 along broadcast dimensions): ``spec.mask``.
MASK_ARGS = ("MASK", "smb", "smh", "smn", "smk")


def extra_args(spec: TokenSparseSpec, sinks: bool = True) -> tuple:
    """Arguments ``spec`` adds after the last one, in order: ``SINKS`` (fp32 ``[Hq]``) with
    ``spec.sinks`` and ``sinks``; ``KV_START``, ``KV_END`` (int32 ``[B]``) with
    ``spec.kv_ranges``; ``cap`` (float, the soft cap ``c`` times log2(e)) with ``spec.softcap``
    and ``sinks``; ``MASK_ARGS`` with ``spec.mask`` and ``sinks``. ``sinks=False``: the
    backward's arguments (it takes no sinks, cap or mask)."""
    return ((("SINKS",) if spec.sinks and sinks else ())
            + (("KV_START", "KV_END") if spec.kv_ranges else ())
            + (("cap",) if spec.softcap and sinks else ())
            + (MASK_ARGS if spec.mask and sinks else ()))


def extra_signature(names: tuple, indent: int) -> str:
    """Signature text of the extra arguments ``names``: a continuation line (empty if none)."""
    return ",\n" + " " * indent + ", ".join(names) if names else ""


# Score modifiers of a step's scores s (log2 units), before the list's own masks: the soft cap
# cap * tanh(s / cap) with cap = c * log2(e), tanh(x) = sign(x) * (1 - 2 / (exp(2|x|) + 1))
# (exp2 overflows to inf for large |x|: exactly +-1), then the mask read at the gathered keys
# ("add": + m * log2(e), values <= -1e30 masked; "keep": 0 masked).
_SOFTCAP = '''
th = 1.0 - 2.0 / (tl.exp2(tl.abs(s) * cap_k) + 1.0)
s = tl.where(s < 0.0, -th, th) * cap
'''
_MASK_APPLY = {
    "add": '''
mv = mv.to(tl.float32)
s = tl.where(mv > -1e30, s + mv * 1.4426950408889634, float("-inf"))
''',
    "keep": '''
s = tl.where(mv != 0, s, float("-inf"))
''',
}


def _modifier_code(spec: TokenSparseSpec, packed: bool) -> str:
    """Step code applying ``spec.softcap`` and ``spec.mask`` to ``s`` ("" without them); the
    mask pointers ``m_base`` (one per packed row) come from ``_modifier_setup``."""
    code = textwrap.dedent(_SOFTCAP).lstrip("\n") if spec.softcap else ""
    if spec.mask:
        if packed:
            code += ("mv = tl.load(m_base[:, None] + (ids64 * smk)[None, :], "
                     "mask=g_ok[:, None] & ok[None, :], other=0)\n")
        else:
            code += "mv = tl.load(m_base + ids64 * smk, mask=ok, other=0)\n"
        code += textwrap.dedent(_MASK_APPLY[spec.mask]).lstrip("\n")
    return code


def _modifier_setup(spec: TokenSparseSpec) -> str:
    """Code before the walk for ``_modifier_code`` (a ``$BASES`` piece; "" without modifiers)."""
    code = "cap_k = 2.8853900817779268 / cap\n" if spec.softcap else ""
    if spec.mask:
        code += "m_base = MASK + b64 * smb + head.to(tl.int64) * smh + qi.to(tl.int64) * smn\n"
    return code


# The learned sink joins the softmax of a row's whole list: one more key of score
# SINKS[head] (log2 domain of m_i) and value 0. With split lists the combine adds it once,
# so the partials leave it out (sk = -inf leaves m_i, l_i and acc as they are).
_SINK_FOLD = '''
# the learned sink (whole lists only; the combine adds it to split ones)
sk = tl.where(n_split == 1, tl.load(SINKS + head$SINK_MASK) * 1.4426950408889634, float("-inf"))
m_fin = tl.maximum(m_i, sk)
m_use = tl.where(m_fin == float("-inf"), 0.0, m_fin)
alpha = tl.exp2(m_i - m_use)
l_i = l_i * alpha + tl.exp2(sk - m_use)
acc = acc * $ALPHA
m_i = m_use
'''


#: The walk over one chunk of a row's list, shared by the forward and the backward: offsets,
#: K/V bases, the list entries of each step and the gathered K tile. ``$ROWS`` loads the
#: program's query rows (indented 4), ``$BASES`` adds pointers (indented 4, may be empty),
#: ``$STEP`` consumes the tile (indented 8), ``$STORE`` writes the results (indented 4).
GATHER_WALK = '''
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, $BD)
    offs_dv = tl.arange(0, $BDV)
    offs_n = tl.arange(0, $BLOCK_N)
$ROWS
    k_base = K + b64 * (skb * $ALIGN) + kvh.to(tl.int64) * (skh * $ALIGN)
    v_base = V + b64 * (svb * $ALIGN) + kvh.to(tl.int64) * (svh * $ALIGN)
$BASES
    idx_ptr = IDX + b64 * sib + hs.to(tl.int64) * sih + qi.to(tl.int64) * sin
    start = pid_s * chunk
    end = tl.minimum(start + chunk, n_idx)
    for j in range(start, end, $BLOCK_N):
        offs = j + offs_n
        ids = tl.load(idx_ptr + offs, mask=offs < end, other=-1)
        ok = $KEY_OK
        ids64 = ids.to(tl.int64)
        k_rows = ids64 * (skn * $ALIGN)
        v_rows = ids64 * (svn * $ALIGN)
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=ok[:, None]$D_MASK2, other=0.0)
$STEP
$STORE
'''


def render_walk(common: dict, rows: str, step: str, store: str, bases: str = "") -> str:
    """``GATHER_WALK`` with the kernel's pieces (each a template over ``common``)."""
    def piece(template: str, indent: int) -> str:
        if not template.strip():
            return ""
        return indent_code(render_template(template, **common), indent).rstrip("\n")
    return render_template(GATHER_WALK, ROWS=piece(rows, 4), BASES=piece(bases, 4),
                           STEP=piece(step, 8), STORE=piece(store, 4), **common)


def render(spec: TokenSparseSpec, sch: Schedule) -> str:
    """Source of ``token_sparse_fwd`` and ``token_sparse_combine`` for ``spec`` and ``sch``."""
    gp = next_pow2(spec.gqa_group) if spec.pack_gqa else 1
    dt = DTYPES[spec.dtype]
    common = dict(mask_terms(spec), DV=spec.v_head_dim, BLOCK_N=max(sch.block_n, 16),
                  ALIGN=spec.stride_align, DT=dt,
                  EXTRA=extra_signature(extra_args(spec), 21),
                  EXTRA_DOC=extra_args_doc(spec, mask_at='read at the gathered keys: '))
    signature = '''
    @triton.jit(do_not_specialize=["sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn",
                                   "sib", "sih", "sin", "Nq", "Nkv", "Hs", "Hq", "n_idx", "chunk",
                                   "n_split"])
    def token_sparse_fwd(Q, K, V, IDX, O, LSE, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                         sib, sih, sin, Nq, Nkv, Hs, Hq, n_idx, chunk, n_split, qk_scale$EXTRA):
        # Q [B, Hq, Nq, D], K [B, Hkv, Nkv, D], V [B, Hkv, Nkv, Dv] (strides / $ALIGN given),
        # IDX [B, Hs, Nq, n_idx] int32 read with strides (sib, sih, sin, 1), negative = padding
        # (lists shared by every head come as Hs = Hkv or Hq with sih = 0); program (i, bh, s)
        # reads entries [s * chunk, (s + 1) * chunk) and writes O [B, Hq, Nq, n_split, Dv] and
        # LSE [B, Hq, Nq, n_split] (contiguous; n_split == 1 is the final output)$EXTRA_DOC.
        qi = tl.program_id(0)
        pid_h = tl.program_id(1)
        pid_s = tl.program_id(2)
    '''
    if gp == 1:
        rows = "0"
        load_q = '''
        q = tl.load(Q + b64 * (sqb * $ALIGN) + head.to(tl.int64) * (sqh * $ALIGN) + qi.to(tl.int64) * (sqn * $ALIGN) + offs_d,
                    mask=(offs_d < $BD)$D_MASK, other=0.0).to(tl.float32)
        m_i = float("-inf")
        l_i = 0.0
        acc = tl.zeros([$BDV], tl.float32)
        '''
        step = '''
            s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use)
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 0)
            v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :], mask=ok[:, None]$DV_MASK2, other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
            m_i = m_new
        '''
        store = '''
        l_ok = l_i > 0.0
        l_safe = tl.where(l_ok, l_i, 1.0)
        lse = tl.where(l_ok, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        out_row = ((b64 * Hq + head) * Nq + qi) * n_split + pid_s
        tl.store(O + out_row * $DV + offs_dv, (acc / l_safe).to(O.dtype.element_ty), mask=(offs_dv < $BDV)$DV_MASK)
        tl.store(LSE + out_row, lse)
        '''
    else:
        mr = max(16, gp)
        rows = "tl.arange(0, %d)" % mr
        common["MR"] = mr
        common["G"] = spec.gqa_group
        load_q = '''
        g_ok = tl.arange(0, $MR) < $G
        q_rows = b64 * (sqb * $ALIGN) + head.to(tl.int64) * (sqh * $ALIGN) + qi.to(tl.int64) * (sqn * $ALIGN)
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=g_ok[:, None]$D_MASK2, other=0.0)
        m_i = tl.full([$MR], float("-inf"), tl.float32)
        l_i = tl.zeros([$MR], tl.float32)
        acc = tl.zeros([$MR, $BDV], tl.float32)
        '''
        step = '''
            s = $DOT_QK * qk_scale
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :], mask=ok[:, None]$DV_MASK2, other=0.0)
            acc = acc * alpha[:, None] + $DOT_PV
            m_i = m_new
        '''
        store = '''
        l_ok = l_i > 0.0
        l_safe = tl.where(l_ok, l_i, 1.0)
        lse = tl.where(l_ok, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        out_row = ((b64 * Hq + head) * Nq + qi) * n_split + pid_s
        out = (acc / l_safe[:, None]).to(O.dtype.element_ty)
        tl.store(O + out_row[:, None] * $DV + offs_dv[None, :], out, mask=g_ok[:, None]$DV_MASK2)
        tl.store(LSE + out_row, lse, mask=g_ok)
        '''
        common["DOT_QK"] = dot_code(spec, "q", "tl.trans(k)")
        common["DOT_PV"] = dot_code(spec, f"p.to({dt})", "v")
    mods = _modifier_code(spec, gp > 1)
    if mods:                    # inserted right after the step's scores are computed
        first = "s = $DOT_QK * qk_scale\n" if gp > 1 else \
            "s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale\n"
        step = textwrap.dedent(step).replace(first, first + mods)
        signature = signature.replace('"n_split"])', '"n_split", "smb", "smh", "smn"])', 1) \
            if spec.mask else signature
    if spec.sinks:
        fold = render_template(_SINK_FOLD, SINK_MASK="" if gp == 1 else ", mask=g_ok, other=0.0",
                               ALPHA="alpha" if gp == 1 else "alpha[:, None]")
        store = textwrap.dedent(fold).strip("\n") + "\n" + textwrap.dedent(store).lstrip("\n")
    src = render_template(signature, **common)
    src += indent_code(head_mapping_code(spec, rows), 4)
    bases = textwrap.dedent(RANGE_SETUP) if spec.kv_ranges else ""
    src += render_walk(common, load_q, step, store, bases + _modifier_setup(spec))
    # combine: with sinks, the sink is one more partial of lse SINKS[head] and output 0
    sink = "tl.load(SINKS + (row // Nq) % Hq)"
    common.update(CNOSPEC=', "Nq", "Hq"' if spec.sinks else "",
                  CEXTRA=", Nq, Hq, SINKS" if spec.sinks else "",
                  CDOC="; SINKS [Hq] fp32 sink logits" if spec.sinks else "",
                  M0=sink if spec.sinks else 'float("-inf")',
                  DEN0=f"tl.exp({sink} - m_use)" if spec.sinks else "0.0")
    src += render_template('''

    @triton.jit(do_not_specialize=["n_split"$CNOSPEC])
    def token_sparse_combine(PO, PLSE, O, LSE, n_split$CEXTRA):
        # PO [R, n_split, Dv] fp32 and PLSE [R, n_split] (per-split normalized outputs and lse)
        # -> O [R, Dv], LSE [R]; R = B * Hq * Nq rows$CDOC.
        row = tl.program_id(0).to(tl.int64)
        offs_s = tl.arange(0, 16)
        offs_dv = tl.arange(0, $BDV)
        m = $M0
        for s0 in range(0, n_split, 16):
            ls = tl.load(PLSE + row * n_split + s0 + offs_s, mask=s0 + offs_s < n_split, other=float("-inf"))
            m = tl.maximum(m, tl.max(ls, 0))
        m_use = tl.where(m == float("-inf"), 0.0, m)
        den = $DEN0
        acc = tl.zeros([$BDV], tl.float32)
        for s0 in range(0, n_split, 16):
            s_ok = s0 + offs_s < n_split
            ls = tl.load(PLSE + row * n_split + s0 + offs_s, mask=s_ok, other=float("-inf"))
            w = tl.exp(ls - m_use)
            po = tl.load(PO + (row * n_split + s0 + offs_s)[:, None] * $DV + offs_dv[None, :],
                         mask=s_ok[:, None]$DV_MASK2, other=0.0)
            acc += tl.sum(w[:, None] * po, 0)
            den += tl.sum(w, 0)
        ok = den > 0.0
        d_safe = tl.where(ok, den, 1.0)
        tl.store(O + row * $DV + offs_dv, (acc / d_safe).to(O.dtype.element_ty), mask=(offs_dv < $BDV)$DV_MASK)
        tl.store(LSE + row, tl.where(ok, m_use + tl.log(d_safe), float("-inf")))
    ''', **common)
    return src
