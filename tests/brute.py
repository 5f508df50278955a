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
