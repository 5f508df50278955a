"""Independent, loop-based definitions used only by the tests (deliberately not sharing code
with codegen/ or runtime/)."""
import math

import torch


def causal_visible(i: int, j: int, n_q: int, n_kv: int, causal) -> bool:
    if causal is None:
        return True
    pos = i if causal == "upper_left" else i + n_kv - n_q
    return j <= pos


def dense_with_keep(q, k, v, keep, scale):
    """softmax over kept pairs; q [B,Hq,Nq,D], k/v [B,Hkv,Nkv,*], keep bool [B,Hq,Nq,Nkv]."""
    B, Hq, Nq, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            s = q[b, h].double() @ k[b, h // G].double().T * scale
            s = s.masked_fill(~keep[b, h], float("-inf"))
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)
            out[b, h] = p @ v[b, h // G].double()
    return out


def block_topk_keep(q, k, *, block, topk, sink_blocks, local_blocks, scale, causal,
                    allowed=None):
    """The block_topk definition, by loops: bool keep [B, Hq, Nq, Nkv] (block granularity),
    intersected with the model's causal rule and ``allowed`` (bool [B, Hq, Nq, Nkv]) if given."""
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nqb, nkb = math.ceil(Nq / block), math.ceil(Nkv / block)
    vis = torch.tensor([[causal_visible(i, j, Nq, Nkv, causal) for j in range(Nkv)]
                        for i in range(Nq)])
    if allowed is None:
        allowed = vis.expand(B, Hq, Nq, Nkv)
    else:
        allowed = allowed & vis
    keep = torch.zeros(B, Hq, Nq, Nkv, dtype=torch.bool)
    off = 0 if causal == "upper_left" else Nkv - Nq
    for b in range(B):
        for hk in range(Hkv):
            for qb in range(nqb):
                rows = range(qb * block, min((qb + 1) * block, Nq))
                heads = range(hk * G, (hk + 1) * G)
                ok = [any(allowed[b, h, i, j] for h in heads for i in rows
                          for j in range(kb * block, min((kb + 1) * block, Nkv)))
                      for kb in range(nkb)]
                pk = [k[b, hk, kb * block:min((kb + 1) * block, Nkv)].double().mean(0)
                      for kb in range(nkb)]
                prob = torch.zeros(nkb, dtype=torch.float64)
                for h in heads:
                    pq = q[b, h, qb * block:min((qb + 1) * block, Nq)].double().mean(0)
                    s = torch.tensor([float(pq @ pk[kb]) * scale if ok[kb] else float("-inf")
                                      for kb in range(nkb)], dtype=torch.float64)
                    if any(ok):
                        prob += torch.softmax(s, 0) / G
                last = (min((qb + 1) * block, Nq) - 1 + off) // block
                last = max(0, min(last, nkb - 1))
                forced = {kb for kb in range(nkb) if ok[kb] and
                          (kb < sink_blocks or last - local_blocks < kb <= last)}
                rest = sorted((kb for kb in range(nkb) if ok[kb] and kb not in forced),
                              key=lambda kb: -float(prob[kb]))
                chosen = forced | set(rest[:topk])
                for kb in chosen:
                    for h in heads:
                        for i in rows:
                            keep[b, h, i, kb * block:min((kb + 1) * block, Nkv)] = True
    return keep & allowed


def sink_window_keep(B, Hq, Nq, Nkv, *, sink, window, causal):
    keep = torch.zeros(B, Hq, Nq, Nkv, dtype=torch.bool)
    off = 0 if causal == "upper_left" else Nkv - Nq
    for i in range(Nq):
        for j in range(Nkv):
            if causal_visible(i, j, Nq, Nkv, causal) and (j < sink or abs(i + off - j) < window):
                keep[:, :, i, j] = True
    return keep


# ---------------------------------------------------------------------------- catalogue

def _blocks_geometry(Nq, Nkv, block, causal):
    off = 0 if causal == "upper_left" else Nkv - Nq
    nqb, nkb = math.ceil(Nq / block), math.ceil(Nkv / block)
    first = [qb * block + off for qb in range(nqb)]
    last = [min((qb + 1) * block, Nq) - 1 + off for qb in range(nqb)]
    return off, nqb, nkb, first, last


def _struct(qb, kb, block, last, causal):
    return causal is None or kb * block <= last[qb]


def _last_rows_probs(q, k, scale, causal, n_rows):
    """[B, Hq, L, Nkv] float64 softmax of the last rows, causal applied, by loops over heads."""
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    L = min(n_rows, Nq)
    out = torch.zeros(B, Hq, L, Nkv, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for r in range(L):
                i = Nq - L + r
                s = torch.tensor([float(q[b, h, i].double() @ k[b, h // G, j].double()) * scale
                                  if causal_visible(i, j, Nq, Nkv, causal) else float("-inf")
                                  for j in range(Nkv)], dtype=torch.float64)
                out[b, h, r] = torch.softmax(s, 0)
    return out


def _expand_blocks(sel, B, Hq, Hkv, Nq, Nkv, block):
    """{(b, hk, qb): set(kb)} -> bool keep [B, Hq, Nq, Nkv]."""
    G = Hq // Hkv
    keep = torch.zeros(B, Hq, Nq, Nkv, dtype=torch.bool)
    for (b, hk, qb), kbs in sel.items():
        for kb in kbs:
            keep[b, hk * G:(hk + 1) * G, qb * block:min((qb + 1) * block, Nq),
                 kb * block:min((kb + 1) * block, Nkv)] = True
    return keep


def _pooled_probs(q, k, b, hk, qb, block, ok, scale):
    Hq, Nq = q.shape[1], q.shape[2]
    G = Hq // k.shape[1]
    nkb = len(ok)
    Nkv = k.shape[2]
    pk = [k[b, hk, kb * block:min((kb + 1) * block, Nkv)].double().mean(0) for kb in range(nkb)]
    prob = torch.zeros(nkb, dtype=torch.float64)
    for h in range(hk * G, (hk + 1) * G):
        pq = q[b, h, qb * block:min((qb + 1) * block, Nq)].double().mean(0)
        s = torch.tensor([float(pq @ pk[kb]) * scale if ok[kb] else float("-inf")
                          for kb in range(nkb)], dtype=torch.float64)
        if any(ok):
            prob += torch.softmax(s, 0) / G
    return prob


def threshold_keep(q, k, *, block, gamma, min_budget, max_budget, sink_blocks, local_blocks,
                   scale, causal):
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    off, nqb, nkb, first, last = _blocks_geometry(Nq, Nkv, block, causal)
    probs = _last_rows_probs(q, k, scale, causal, block)
    sel = {}
    for b in range(B):
        for hk in range(Hkv):
            col = probs[b, hk * G:(hk + 1) * G].mean(dim=(0, 1))             # [Nkv]
            cblk = [float(col[kb * block:min((kb + 1) * block, Nkv)].sum()) for kb in range(nkb)]
            for qb in range(nqb):
                ok = [_struct(qb, kb, block, last, causal) for kb in range(nkb)]
                pool = _pooled_probs(q, k, b, hk, qb, block, ok, scale)
                tot = sum(c for c, o in zip(cblk, ok) if o)
                lastm = [(c / tot if tot > 0 else 1.0 / sum(ok)) if o else 0.0
                         for c, o in zip(cblk, ok)]
                est = [0.5 * float(pool[kb]) + 0.5 * lastm[kb] for kb in range(nkb)]
                lb = max(0, min(last[qb] // block, nkb - 1))
                forced = {kb for kb in range(nkb) if ok[kb] and
                          (kb < sink_blocks or lb - local_blocks < kb <= lb)}
                total = sum(e for e, o in zip(est, ok) if o)
                mass = sum(est[kb] for kb in forced)
                rest = sorted((kb for kb in range(nkb) if ok[kb] and kb not in forced),
                              key=lambda kb: (-est[kb], kb))
                t = 0
                while mass < gamma * total - 1e-9 and t < len(rest):
                    mass += est[rest[t]]
                    t += 1
                t = max(t, min_budget)
                if max_budget:
                    t = min(t, max_budget)
                t = min(t, len(rest))
                sel[(b, hk, qb)] = forced | set(rest[:t])
    return _expand_blocks(sel, B, Hq, Hkv, Nq, Nkv, block)


def _line_masses(p, Nq, Nkv, off):
    """Column masses and diagonal-offset masses of the last rows' probabilities p [G, L, Nkv]."""
    L = p.shape[1]
    vert = [float(p[:, :, j].sum()) for j in range(Nkv)]
    slash = [0.0] * Nkv
    for r in range(L):
        pos = Nq - L + r + off
        for j in range(min(pos + 1, Nkv)):
            slash[pos - j] += float(p[:, r, j].sum())
    return vert, slash


def vertical_slash_keep(q, k, *, last_q, n_vertical, n_slash, block, sink_tokens, local_tokens,
                        scale, causal):
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    off, nqb, nkb, first, last = _blocks_geometry(Nq, Nkv, block, causal)
    probs = _last_rows_probs(q, k, scale, causal, last_q)
    sel = {}
    for b in range(B):
        for hk in range(Hkv):
            p = probs[b, hk * G:(hk + 1) * G]                               # [G, L, Nkv]
            vert, slash = _line_masses(p, Nq, Nkv, off)

            def choose(score, n, n_forced):
                forced = set(range(min(n_forced, Nkv)))
                rest = sorted((x for x in range(Nkv) if x not in forced), key=lambda x: (-score[x], x))
                return forced | {x for x in rest[:n] if score[x] > 0}
            cols, offs = choose(vert, n_vertical, sink_tokens), choose(slash, n_slash, local_tokens)
            for qb in range(nqb):
                kbs = set()
                for c in cols:
                    if causal is None or c <= last[qb]:
                        kbs.add(c // block)
                for o in offs:
                    for pos in range(first[qb], last[qb] + 1):
                        if 0 <= pos - o < Nkv:
                            kbs.add((pos - o) // block)
                sel[(b, hk, qb)] = {kb for kb in kbs if _struct(qb, kb, block, last, causal)}
    return _expand_blocks(sel, B, Hq, Hkv, Nq, Nkv, block)


def quest_keep(q, k, *, page, budget, sink_pages, local_pages, causal):
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    off, nqb, npg, first, last = _blocks_geometry(Nq, Nkv, page, causal)
    topk = math.ceil(budget / page)
    sel = {}
    for b in range(B):
        for hk in range(Hkv):
            kp = [k[b, hk, pg * page:min((pg + 1) * page, Nkv)].double() for pg in range(npg)]
            mx, mn = [x.max(0).values for x in kp], [x.min(0).values for x in kp]
            for qb in range(nqb):
                ok = [_struct(qb, pg, page, last, causal) for pg in range(npg)]
                score = []
                for pg in range(npg):
                    best = float("-inf")
                    for h in range(hk * G, (hk + 1) * G):
                        for i in range(qb * page, min((qb + 1) * page, Nq)):
                            qi = q[b, h, i].double()
                            best = max(best, float(torch.maximum(qi * mx[pg], qi * mn[pg]).sum()))
                    score.append(best)
                lp = max(0, min(last[qb] // page, npg - 1))
                forced = {pg for pg in range(npg) if ok[pg] and
                          (pg < sink_pages or lp - local_pages < pg <= lp)}
                rest = sorted((pg for pg in range(npg) if ok[pg] and pg not in forced),
                              key=lambda pg: -score[pg])
                sel[(b, hk, qb)] = forced | set(rest[:topk])
    return _expand_blocks(sel, B, Hq, Hkv, Nq, Nkv, page)


def longformer_keep(B, Hq, Nq, Nkv, *, window, global_tokens, causal):
    keep = torch.zeros(B, Hq, Nq, Nkv, dtype=torch.bool)
    off = 0 if causal == "upper_left" else Nkv - Nq
    for i in range(Nq):
        p = i + off
        for j in range(Nkv):
            if causal_visible(i, j, Nq, Nkv, causal) and (
                    abs(p - j) < window or j < global_tokens or p < global_tokens):
                keep[:, :, i, j] = True
    return keep


def bigbird_keep(B, Hq, Hkv, Nq, Nkv, *, block, window, global_tokens, random_blocks, seed,
                 causal):
    off, nqb, nkb, first, last = _blocks_geometry(Nq, Nkv, block, causal)
    prio = torch.rand(Hkv, nqb, nkb, generator=torch.Generator().manual_seed(seed))
    w, g = math.ceil(window / block), math.ceil(global_tokens / block)
    sel = {}
    for b in range(B):
        for hk in range(Hkv):
            for qb in range(nqb):
                diag = max(0, min(last[qb] // block, nkb - 1))
                chosen = {kb for kb in range(nkb) if _struct(qb, kb, block, last, causal) and (
                    abs(kb - diag) <= w or kb < g or first[qb] // block < g)}
                rest = sorted((kb for kb in range(nkb) if kb not in chosen
                               and _struct(qb, kb, block, last, causal)),
                              key=lambda kb: -float(prio[hk, qb, kb]))
                sel[(b, hk, qb)] = chosen | set(rest[:random_blocks])
    return _expand_blocks(sel, B, Hq, Hkv, Nq, Nkv, block)


def auto_keep(q, k, *, target_density, block, tau, sink_blocks, local_blocks, scale, causal):
    B, Hq, Nq, D = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    off, nqb, nkb, first, last = _blocks_geometry(Nq, Nkv, block, causal)
    probs = _last_rows_probs(q, k, scale, causal, block)
    L = probs.shape[2]
    sel = {}
    for b in range(B):
        for hk in range(Hkv):
            p = probs[b, hk * G:(hk + 1) * G]
            vert, slash = _line_masses(p, Nq, Nkv, off)
            oks = [[_struct(qb, kb, block, last, causal) for kb in range(nkb)] for qb in range(nqb)]
            # criterion on the last query block
            ok = oks[-1]
            est = _pooled_probs(q, k, b, hk, nqb - 1, block, ok, scale)
            true = [sum(vert[kb * block:min((kb + 1) * block, Nkv)]) / G / L if ok[kb] else 0.0
                    for kb in range(nkb)]
            tot = sum(true)
            true = torch.tensor([t / tot for t in true], dtype=torch.float64)
            m = 0.5 * (est + true)
            kl = lambda a, c: sum(float(x) * math.log(float(x) / float(y))  # noqa: E731
                                  for x, y in zip(a, c) if x > 0)
            query_aware = 0.5 * kl(est, m) + 0.5 * kl(true, m) <= tau
            for qb in range(nqb):
                ok = oks[qb]
                if query_aware:
                    score = [float(x) for x in _pooled_probs(q, k, b, hk, qb, block, ok, scale)]
                else:
                    score = []
                    for kb in range(nkb):
                        lo, hi = kb * block, min((kb + 1) * block, Nkv) - 1
                        s = sum(vert[c] for c in range(lo, hi + 1)
                                if causal is None or c <= last[qb])
                        s += sum(slash[o] for o in range(Nkv)
                                 if any(lo <= pos - o <= hi for pos in range(first[qb], last[qb] + 1)))
                        score.append(s if ok[kb] else 0.0)
                    t = sum(score)
                    score = [x / t for x in score] if t > 0 else [1.0 / sum(ok)] * nkb
                lb = max(0, min(last[qb] // block, nkb - 1))
                forced = {kb for kb in range(nkb) if ok[kb] and
                          (kb < sink_blocks or lb - local_blocks < kb <= lb)}
                budget = math.ceil(target_density * sum(ok))
                rest = sorted((kb for kb in range(nkb) if ok[kb] and kb not in forced),
                              key=lambda kb: (-score[kb], kb))
                sel[(b, hk, qb)] = forced | set(rest[:max(0, budget - len(forced))])
    return _expand_blocks(sel, B, Hq, Hkv, Nq, Nkv, block)
