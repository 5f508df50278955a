"""Estimators and selections of the dynamic-sparsity catalogue (PyTorch; the same code runs on
CPU and, as on-device estimators, on CUDA). Every selection is a boolean block map
``[B, Hkv, NQB, NKB]`` turned into block lists by ``blocks_from_mask``; the block map is the
definition each policy is tested against.

Notation: ``block`` = b, query block i holds rows ``i*b .. min((i+1)*b, Nq) - 1`` at positions
``row + off`` (``off = positions_offset(causal, Nq, Nkv)``); key block j holds keys
``j*b .. min((j+1)*b, Nkv) - 1``. GQA: the estimates of the query heads of one group are pooled
so the group shares its selection.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from codegen.attention.reference import MASKED_BELOW, apply_modifiers, positions_offset
from codegen.select.reference import (_cdiv, _forced_blocks, block_bounds, blocks_from_mask,
                                      last_key_blocks, structural_blocks)


def _group_mean(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hkv, ...] (mean over the query heads of each group)."""
    B, Hq = x.shape[:2]
    return x.reshape(B, hkv, Hq // hkv, *x.shape[2:]).mean(dim=2)


# --------------------------------------------------------------------------- last-query attention

def last_rows_attention(q, k, scale: float, mods: Sequence[tuple], mod_tensors, causal,
                        last_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of the last ``last_q`` query rows over all keys (the model's mods and
    causal rule applied): (probs fp32 [B, Hq, L, Nkv], positions [L])."""
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    L = min(last_q, Nq)
    r0 = Nq - L
    G = Hq // Hkv
    # [B, Hkv, G*L, D] @ [B, Hkv, D, Nkv] in the inputs' dtype (fp32 accumulate), no K copy
    ql = q[:, :, r0:].reshape(B, Hkv, G * L, D)
    s = torch.matmul(ql, k.transpose(-1, -2)).to(torch.float32).reshape(B, Hq, L, Nkv) * scale
    s = apply_modifiers(s, mods, mod_tensors, slice(r0, Nq))
    pos = torch.arange(r0, Nq, device=q.device) + positions_offset(causal, Nq, Nkv)
    if causal is not None:
        s = s.masked_fill(torch.arange(Nkv, device=q.device)[None, :] > pos[:, None], float("-inf"))
    s = s.masked_fill(s <= MASKED_BELOW, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0), pos


# --------------------------------------------------------------------------- threshold

def threshold_estimate(q, k, scale, mods, mod_tensors, causal, block: int,
                       allowed: torch.Tensor, col: Optional[torch.Tensor] = None,
                       p_pool: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Estimated attention mass per key block for each query block: the mean of
    (a) the pooled-q x pooled-k block softmax (as block_topk) and
    (b) the last query block's true attention mass per key block, renormalised over the blocks
        query block i may see.
    fp32 [B, Hkv, NQB, NKB], -inf where not allowed; each row sums to 1 over allowed blocks.
    ``col`` [B, Hkv, Nkv]: (b)'s mean attention per key over the last block's rows and the
    group's heads, when computed elsewhere (the Triton line statistics); ``p_pool``: (a), when
    computed elsewhere (the Triton pooled products)."""
    from codegen.select.reference import pooled_block_scores
    B, Hkv, nqb, nkb = allowed.shape
    if p_pool is None:
        p_pool = pooled_block_scores(q, k, scale, block, allowed)
    p_pool = p_pool.clamp_min(0.0)                                              # -inf -> 0
    if col is None:
        probs, _ = last_rows_attention(q, k, scale, mods, mod_tensors, causal, block)
        col = _group_mean(probs.mean(dim=2), Hkv)                              # [B, Hkv, Nkv]
    pad = nkb * block - col.shape[-1]
    col = torch.nn.functional.pad(col, (0, pad)).reshape(B, Hkv, nkb, block).sum(-1)
    last = col[:, :, None, :].expand(B, Hkv, nqb, nkb) * allowed
    tot = last.sum(-1, keepdim=True)
    n_ok = allowed.sum(-1, keepdim=True).clamp_min(1)
    last = torch.where(tot > 0, last / tot.clamp_min(1e-30), allowed / n_ok)
    est = 0.5 * p_pool + 0.5 * last
    return est.masked_fill(~allowed, float("-inf"))


def select_threshold(est: torch.Tensor, n_q: int, n_kv: int, causal, block: int, *, gamma: float,
                     min_budget: int, max_budget: Optional[int], sink_blocks: int,
                     local_blocks: int):
    """Per (group, query block): forced blocks, then the fewest further blocks in descending
    estimate order (ties: lower index first) until the kept mass reaches ``gamma`` of the allowed
    mass; the number of further blocks is clamped to [min_budget, max_budget]."""
    B, H, nqb, nkb = est.shape
    allowed = est > float("-inf")
    forced = _forced_blocks(nqb, nkb, n_q, n_kv, causal, block, sink_blocks, local_blocks,
                            est.device) & allowed
    e = est.clamp_min(0.0).masked_fill(~allowed, 0.0)
    total = e.sum(-1, keepdim=True)
    m_forced = (e * forced).sum(-1, keepdim=True)
    rest = e.masked_fill(forced | ~allowed, -1.0)
    vals, order = torch.sort(rest, dim=-1, descending=True, stable=True)
    csum = vals.clamp_min(0.0).cumsum(-1)
    need = gamma * total - m_forced                                             # [B, H, NQB, 1]
    # smallest t with csum[t-1] >= need (t = 0 if need <= 0)
    t = (csum < need - 1e-7 * total).sum(-1, keepdim=True) + 1
    t = torch.where(need <= 1e-7 * total, torch.zeros_like(t), t)
    n_rest = (rest >= 0).sum(-1, keepdim=True)
    t = t.clamp(min=min_budget)
    if max_budget is not None:
        t = t.clamp(max=max_budget)
    t = torch.minimum(t, n_rest)
    take = torch.arange(nkb, device=est.device) < t
    sel = torch.zeros_like(allowed)
    sel.scatter_(-1, order, take)
    return blocks_from_mask(sel | forced)


# --------------------------------------------------------------------------- vertical-slash

def vslash_estimate(q, k, scale, mods, mod_tensors, causal, last_q: int) -> torch.Tensor:
    """MInference estimator: attention of the last ``last_q`` queries; column sums (vertical)
    and sums along each diagonal offset o = pos_q - key (slash). fp32 [B, Hkv, 2, Nkv]:
    [..., 0, j] = column mass of key j, [..., 1, o] = mass on offset o."""
    probs, pos = last_rows_attention(q, k, scale, mods, mod_tensors, causal, last_q)
    B, Hq, L, Nkv = probs.shape
    Hkv = k.shape[1]
    vert = probs.sum(dim=2)                                                     # [B, Hq, Nkv]
    j = torch.arange(Nkv, device=q.device)
    off = pos[:, None] - j[None, :]                                             # [L, Nkv]
    valid = (off >= 0) & (off < Nkv)
    idx = off.clamp(0, Nkv - 1).expand(B, Hq, L, Nkv)
    slash = torch.zeros(B, Hq, L, Nkv, device=q.device).scatter_add_(
        -1, idx, probs * valid).sum(dim=2)                                      # [B, Hq, Nkv]
    est = torch.stack([vert, slash], dim=2)                                     # [B, Hq, 2, Nkv]
    B_, H_ = est.shape[:2]
    return est.reshape(B_, Hkv, H_ // Hkv, 2, Nkv).sum(dim=2)


def top_lines(est: torch.Tensor, n_vertical: int, n_slash: int, sink_tokens: int,
              local_tokens: int):
    """Chosen columns and offsets: bool [B, H, Nkv] each (forced first columns / offsets, then
    the top by mass, ties to the lower index)."""
    vert, slash = est[:, :, 0], est[:, :, 1]
    Nkv = vert.shape[-1]
    out = []
    for score, n, forced_n in ((vert, n_vertical, sink_tokens), (slash, n_slash, local_tokens)):
        forced = torch.arange(Nkv, device=est.device) < forced_n
        rank = score.masked_fill(forced, float("-inf"))
        sel = forced.expand_as(score).clone()
        n = min(n, Nkv)
        if n > 0:
            _, order = torch.sort(rank, dim=-1, descending=True, stable=True)
            take = torch.zeros_like(sel)
            take.scatter_(-1, order[..., :n], True)
            sel |= take & (rank > 0)      # a line with no mass at all is not worth a block
        out.append(sel)
    return out[0], out[1]


def select_vslash(est: torch.Tensor, n_q: int, n_kv: int, causal, block: int, *, n_vertical: int,
                  n_slash: int, sink_tokens: int, local_tokens: int):
    """Block cover of the chosen lines: key block j is kept for query block i if it holds a chosen
    column visible to the block, or a chosen diagonal crosses block (i, j)."""
    cols, offs = top_lines(est, n_vertical, n_slash, sink_tokens, local_tokens)
    B, H, Nkv = cols.shape
    nqb, nkb = _cdiv(n_q, block), _cdiv(n_kv, block)
    dev = est.device
    first, last = block_bounds(n_q, n_kv, causal, block, dev)
    k_lo = torch.arange(nkb, device=dev) * block
    k_hi = torch.clamp(k_lo + block, max=n_kv) - 1
    # verticals: block j holds a chosen column the query block can see (the first one is enough)
    pad = nkb * block - Nkv
    j = torch.arange(Nkv, device=dev)
    first_col = torch.nn.functional.pad(torch.where(cols, j, Nkv + j), (0, pad),
                                        value=2 * Nkv).reshape(B, H, nkb, block).amin(-1)
    sel = first_col[:, :, None, :] <= k_hi[None, None, None, :]            # [B, H, 1, NKB]
    if causal is not None:
        sel = sel & (first_col[:, :, None, :] <= last[None, None, :, None])
    sel = sel.expand(B, H, nqb, nkb)
    # slashes: a chosen offset o crosses block (i, j) iff o in [first_i - k_hi_j, last_i - k_lo_j]
    cnt = torch.cat([torch.zeros(B, H, 1, device=dev, dtype=torch.int32),
                     offs.to(torch.int32).cumsum(-1, dtype=torch.int32)], -1)   # [B, H, Nkv + 1]
    o_lo = (first[:, None] - k_hi[None, :]).clamp(0, Nkv)                       # [NQB, NKB]
    o_hi = (last[:, None] - k_lo[None, :]).clamp(-1, Nkv - 1)
    hits = cnt[..., (o_hi + 1).clamp(0, Nkv)] - cnt[..., o_lo]
    sel = sel | ((hits > 0) & (o_hi >= o_lo))
    sel &= structural_blocks(n_q, n_kv, causal, block, dev)
    return blocks_from_mask(sel)


# --------------------------------------------------------------------------- quest

def quest_estimate(q, k, page: int, allowed: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Quest (Tang et al., 2024): per page the channel-wise key min/max; a query's bound on its
    largest logit in the page is sum_d max(q_d * max_d, q_d * min_d). Pooled by max over the
    queries of a query block (block = page) and over the heads of a group.
    fp32 [B, Hkv, NQB, NP], -inf where not allowed."""
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    npg = _cdiv(Nkv, page)
    full = Nkv // page
    # min/max over the pages in k's own dtype (one read of k, no fp32 or padded copy)
    mxs, mns = [], []
    if full:
        kp = k[:, :, :full * page].reshape(B, Hkv, full, page, D)
        mxs.append(kp.amax(3))
        mns.append(kp.amin(3))
    if Nkv % page:
        tail = k[:, :, full * page:]
        mxs.append(tail.amax(2, keepdim=True))
        mns.append(tail.amin(2, keepdim=True))
    mx = torch.cat(mxs, 2).to(torch.float32) if len(mxs) > 1 else mxs[0].to(torch.float32)
    mn = torch.cat(mns, 2).to(torch.float32) if len(mns) > 1 else mns[0].to(torch.float32)
    G = Hq // Hkv
    mx = mx.repeat_interleave(G, dim=1)
    mn = mn.repeat_interleave(G, dim=1)
    nqb = _cdiv(Nq, page)
    out = torch.empty(B, Hq, nqb, npg, device=q.device)
    for r0 in range(0, Nq, chunk):
        r1 = min(r0 + chunk, Nq)
        qc = q[:, :, r0:r1].to(torch.float32)
        bound = torch.relu(qc) @ mx.transpose(-1, -2) - torch.relu(-qc) @ mn.transpose(-1, -2)
        rows = r1 - r0
        nb = _cdiv(rows, page)
        bound = torch.nn.functional.pad(bound, (0, 0, 0, nb * page - rows), value=float("-inf"))
        out[:, :, r0 // page: r0 // page + nb] = bound.reshape(B, Hq, nb, page, npg).amax(3)
    est = out.reshape(B, Hkv, G, nqb, npg).amax(2)
    return est.masked_fill(~allowed, float("-inf"))


# --------------------------------------------------------------------------- static patterns

def bigbird_blocks(B: int, H: int, n_q: int, n_kv: int, causal, block: int, *, window: int,
                   global_tokens: int, random_blocks: int, seed: int, device=None):
    """BigBird (Zaheer et al., 2020), block form: key blocks within ``ceil(window / block)``
    blocks of the query block's diagonal block, the first ``ceil(global_tokens / block)`` key
    blocks, all blocks for the global query blocks, and ``random_blocks`` further blocks per
    (head, query block) drawn with priorities ``torch.rand(H, NQB, NKB)`` from a CPU generator
    seeded with ``seed`` (the top priorities among the allowed, not yet chosen blocks)."""
    nqb, nkb = _cdiv(n_q, block), _cdiv(n_kv, block)
    first, _ = block_bounds(n_q, n_kv, causal, block, device)
    diag = last_key_blocks(n_q, n_kv, causal, block, device)
    w = _cdiv(window, block)
    g = _cdiv(global_tokens, block)
    j = torch.arange(nkb, device=device)
    sel = ((j[None, :] - diag[:, None]).abs() <= w) | (j[None, :] < g)
    sel |= (first // block < g)[:, None]
    struct = structural_blocks(n_q, n_kv, causal, block, device)
    sel = (sel & struct).expand(B, H, nqb, nkb).clone()
    if random_blocks > 0:
        gen = torch.Generator().manual_seed(seed)
        prio = torch.rand(H, nqb, nkb, generator=gen).to(device)
        prio = prio.expand(B, H, nqb, nkb).masked_fill(sel | ~struct, -1.0)
        r = min(random_blocks, nkb)
        vals, idx = prio.topk(r, dim=-1)
        sel |= torch.zeros_like(sel).scatter_(-1, idx, vals >= 0)
    return blocks_from_mask(sel)


def longformer_blocks(B: int, H: int, n_q: int, n_kv: int, causal, block: int, *, window: int,
                      global_tokens: int, device=None):
    """Blocks holding a pair of the Longformer pattern (see ``longformer_keep_fn``)."""
    nqb, nkb = _cdiv(n_q, block), _cdiv(n_kv, block)
    first, last = block_bounds(n_q, n_kv, causal, block, device)
    k_lo = torch.arange(nkb, device=device) * block
    k_hi = torch.clamp(k_lo + block, max=n_kv) - 1
    sel = (k_lo[None, :] < global_tokens).expand(nqb, nkb).clone()
    sel |= (k_hi[None, :] > first[:, None] - window) & (k_lo[None, :] < last[:, None] + window)
    sel |= (first < global_tokens)[:, None]
    sel &= structural_blocks(n_q, n_kv, causal, block, device)
    return blocks_from_mask(sel.expand(B, H, nqb, nkb))


def longformer_keep_fn(n_q: int, n_kv: int, causal, *, window: int, global_tokens: int,
                       device=None):
    """Longformer (Beltagy et al., 2020): key j is kept for the query at position p iff
    |p - j| < window, or j < global_tokens (global keys), or p < global_tokens (global queries)."""
    off = positions_offset(causal, n_q, n_kv)
    j = torch.arange(n_kv, device=device)

    def keep(r0: int, r1: int) -> torch.Tensor:
        pos = torch.arange(r0, r1, device=device)[:, None] + off
        return (((pos - j[None, :]).abs() < window) | (j[None, :] < global_tokens)
                | (pos < global_tokens))[None, None]
    return keep


# --------------------------------------------------------------------------- auto

def _js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) along the last axis of two distributions."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log(a.clamp_min(1e-30)) - torch.log(b.clamp_min(1e-30))),
                           torch.zeros_like(a)).sum(-1)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def vslash_block_scores(est: torch.Tensor, n_q: int, n_kv: int, causal, block: int,
                        allowed: torch.Tensor) -> torch.Tensor:
    """Line mass through each block: sum of the column mass of the block's keys (visible ones)
    plus the mass of every diagonal offset crossing block (i, j). [B, H, NQB, NKB], -inf where
    not allowed; rows normalised to sum 1."""
    vert, slash = est[:, :, 0], est[:, :, 1]                                   # [B, H, Nkv]
    B, H, Nkv = vert.shape
    nqb, nkb = allowed.shape[2], allowed.shape[3]
    dev = est.device
    first, last = block_bounds(n_q, n_kv, causal, block, dev)
    zero = torch.zeros(B, H, 1, device=dev)
    cv = torch.cat([zero, vert.cumsum(-1)], -1)                                # prefix sums
    cs = torch.cat([zero, slash.cumsum(-1)], -1)
    k_lo = torch.arange(nkb, device=dev) * block
    k_hi = torch.clamp(k_lo + block, max=n_kv) - 1
    # columns of block j that query block i can see: [k_lo, min(k_hi, last_i)]
    c_hi = torch.minimum(k_hi[None, :], last[:, None]) if causal is not None else k_hi[None, :].expand(nqb, nkb)
    c_ok = c_hi >= k_lo[None, :]
    v_sum = (cv[..., (c_hi.clamp(min=-1) + 1).clamp(max=Nkv)] - cv[..., k_lo[None, :].expand(nqb, nkb)])
    v_sum = v_sum * c_ok
    # offsets crossing block (i, j): o in [first_i - k_hi_j, last_i - k_lo_j], clipped to [0, Nkv-1]
    o_lo = (first[:, None] - k_hi[None, :]).clamp(0, Nkv)
    o_hi = (last[:, None] - k_lo[None, :]).clamp(-1, Nkv - 1)
    s_ok = o_hi >= o_lo
    s_sum = (cs[..., (o_hi + 1).clamp(0, Nkv)] - cs[..., o_lo]) * s_ok
    score = (v_sum + s_sum).clamp_min(0.0).masked_fill(~allowed, 0.0)
    tot = score.sum(-1, keepdim=True)
    score = torch.where(tot > 0, score / tot.clamp_min(1e-30), allowed / allowed.sum(-1, keepdim=True).clamp_min(1))
    return score.masked_fill(~allowed, float("-inf"))


def auto_criterion(est_last: torch.Tensor, lines: torch.Tensor, allowed_last: torch.Tensor,
                   n_q: int, block: int, tau: float, group: int) -> torch.Tensor:
    """``auto``'s per-group choice: bool [B, Hkv], True where the Jensen-Shannon divergence
    between ``est_last`` (the pooled estimate's distribution over the key blocks for the last
    query block, [B, Hkv, NKB]) and that block's true attention mass per key block (from the
    vertical statistics of ``lines`` [B, Hkv, 2, Nkv], ``group`` query heads per KV head) is at
    most ``tau``."""
    B, Hkv, nkb = est_last.shape
    n_kv = lines.shape[-1]
    col = lines[:, :, 0] / group / min(block, n_q)                               # mean per query row
    pad = nkb * block - n_kv
    true_last = torch.nn.functional.pad(col, (0, pad)).reshape(B, Hkv, nkb, block).sum(-1)
    true_last = true_last * allowed_last
    true_last = true_last / true_last.sum(-1, keepdim=True).clamp_min(1e-30)
    return _js(est_last.clamp_min(0.0), true_last) <= tau


def auto_estimate(q, k, scale, mods, mod_tensors, causal, block: int, allowed: torch.Tensor,
                  tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per GQA group, pick the estimator its last query block vouches for (FlexPrefill-style).

    Criterion (``auto_criterion``): the Jensen-Shannon divergence between (a) the pooled-q x
    pooled-k block distribution of the last query block and (b) that block's true attention
    mass per key block. JS <= ``tau``: the pooled estimate is trusted (query-aware, block_topk
    scores: the pooled logits when a group has one head, which rank like the probabilities);
    otherwise the head follows vertical/slash lines (MInference scores). Returns (scores [B,
    Hkv, NQB, NKB] with -inf where not allowed, query_aware bool [B, Hkv])."""
    from codegen.select.reference import pooled_block_logits, pooled_block_scores
    B, Hkv, nqb, nkb = allowed.shape
    n_q, n_kv = q.shape[2], k.shape[2]
    if q.shape[1] == Hkv:
        pool = pooled_block_logits(q, k, scale, block, allowed)
        est_last = torch.softmax(pool[:, :, -1], dim=-1).nan_to_num(0.0)
    else:
        pool = pooled_block_scores(q, k, scale, block, allowed)
        est_last = pool[:, :, -1]
    vs = vslash_estimate(q, k, scale, mods, mod_tensors, causal, block)          # [B, Hkv, 2, Nkv]
    query_aware = auto_criterion(est_last, vs, allowed[:, :, -1], n_q, block, tau,
                                 q.shape[1] // Hkv)
    lines = vslash_block_scores(vs, n_q, n_kv, causal, block, allowed)
    scores = torch.where(query_aware[:, :, None, None], pool, lines)
    return scores, query_aware


def select_budget_fraction(scores: torch.Tensor, n_q: int, n_kv: int, causal, block: int, *,
                           density: float, sink_blocks: int, local_blocks: int):
    """Per row, the forced blocks plus the top blocks until ``ceil(density * allowed blocks)``
    blocks are kept (ties to the lower index)."""
    B, H, nqb, nkb = scores.shape
    allowed = scores > float("-inf")
    forced = _forced_blocks(nqb, nkb, n_q, n_kv, causal, block, sink_blocks, local_blocks,
                            scores.device) & allowed
    budget = torch.ceil(density * allowed.sum(-1, keepdim=True).to(torch.float64)).to(torch.long)
    t = (budget - forced.sum(-1, keepdim=True)).clamp_min(0)
    rank = scores.masked_fill(forced | ~allowed, float("-inf"))
    _, order = torch.sort(rank, dim=-1, descending=True, stable=True)
    n_rest = (rank > float("-inf")).sum(-1, keepdim=True)
    take = torch.arange(nkb, device=scores.device) < torch.minimum(t, n_rest)
    sel = torch.zeros_like(allowed).scatter_(-1, order, take)
    return blocks_from_mask(sel | forced)
