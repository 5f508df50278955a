"""Recall of the attention mass (runtime.recall) against a brute-force computation written
independently here: the kept set rebuilt from the policy's lists (or rule) by loops, every
row's dense softmax in fp64, recall = kept mass / total mass per row."""
from __future__ import annotations

import math

import pytest
import torch

import planner
from planner.models import GPTConfig, TinyGPT
from runtime import estimators, recall
from runtime.policies import PRESETS
from runtime.spec import SiteSpec


def _brute_kept_blocks(counts, indices, block, n_q, n_kv):
    """bool [B, Hs, Nq, Nkv] from block lists, one loop iteration per listed block."""
    B, Hs, nqb = counts.shape
    kept = torch.zeros(B, Hs, n_q, n_kv, dtype=torch.bool)
    for b in range(B):
        for h in range(Hs):
            for qb in range(nqb):
                for t in range(int(counts[b, h, qb])):
                    kb = int(indices[b, h, qb, t])
                    kept[b, h, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block] = True
    return kept


def _brute_recall(q, k, kept, scale, causal_offset, window=0):
    """fp64 [B, Hq, Nq]: share of each row's dense softmax inside ``kept`` [B, Hs, Nq, Nkv]."""
    B, Hq, n_q, _ = q.shape
    n_kv = k.shape[2]
    g = Hq // k.shape[1]
    out = torch.full((B, Hq, n_q), float("nan"), dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = k[b, h // g].double()
            for i in range(n_q):
                pos = i + causal_offset
                vis = [j for j in range(n_kv) if j <= pos and (not window or j > pos - window)]
                if not vis:
                    continue
                s = torch.stack([(q[b, h, i].double() @ kh[j]) * scale for j in vis])
                p = torch.softmax(s, 0)
                ks = kept[b, h * kept.shape[1] // Hq]
                out[b, h, i] = sum(float(p[t]) for t, j in enumerate(vis) if ks[i, j])
    return out


def _spec(policy, *, hq, hkv, block=16, window=0):
    return SiteSpec(site="model.layers.0.attn", owner="recall-test", policy=policy,
                    scale=0.3, causal="lower_right", gqa_group=hq // hkv, block=block,
                    window=window)


def _qk(b, hq, hkv, n_q, n_kv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a few loud keys, so the attention is peaked and selections differ from uniform
    q = torch.randn(b, hq, n_q, d, generator=g)
    k = torch.randn(b, hkv, n_kv, d, generator=g)
    k[:, :, ::11] *= 3.0
    return q, k


CASES = [
    pytest.param(PRESETS["block_topk"](block=16, topk=1, sink_blocks=1, local_blocks=1),
                 2, 4, 2, 75, 75, 12, id="block_topk-B2-H4/2-N75-D12"),
    pytest.param(PRESETS["block_topk"](block=16, topk=2, sink_blocks=0, local_blocks=1),
                 1, 3, 1, 7, 61, 8, id="block_topk-B1-H3/1-Nq7-Nkv61-D8"),
    pytest.param(PRESETS["threshold"](gamma=0.6, block=16), 1, 4, 2, 63, 63, 12,
                 id="threshold-B1-H4/2-N63-D12"),
    pytest.param(PRESETS["sink_window"](sink=3, window=10), 2, 2, 2, 50, 50, 8,
                 id="sink_window-B2-H2-N50-D8"),
    pytest.param(PRESETS["sink_window"](sink=2, window=7), 1, 4, 1, 9, 40, 8,
                 id="sink_window-B1-H4/1-Nq9-Nkv40-D8"),
]


@pytest.mark.parametrize("pol,B,hq,hkv,n_q,n_kv,d", CASES)
def test_recall_equals_brute_force(pol, B, hq, hkv, n_q, n_kv, d):
    spec = _spec(pol, hq=hq, hkv=hkv)
    q, k = _qk(B, hq, hkv, n_q, n_kv, d)
    est = estimators.get(pol)
    sc = est.score(q, k, [], spec) if est.score is not None else q.new_empty(0)
    counts, indices = est.select(sc, q, k, spec)
    kept = _brute_kept_blocks(counts, indices, estimators.block_of(spec), n_q, n_kv)
    off = n_kv - n_q
    if pol.name == "sink_window":          # the token rule inside the blocks, written out
        i = torch.arange(n_q)[:, None] + off
        j = torch.arange(n_kv)[None, :]
        kept &= ((j < pol.sink) | (i - j < pol.window))[None, None]
    want = _brute_recall(q, k, kept, spec.scale, off)
    every = recall.measure(spec, q, k, [], counts, indices, row_index=torch.arange(n_q))
    torch.testing.assert_close(every.row_recall.double(), want, atol=1e-5, rtol=0,
                               equal_nan=True)
    sampled = recall.measure(spec, q, k, [], counts, indices, rows=5)
    assert int(sampled.rows[-1]) == n_q - 1                       # the last row is sampled
    torch.testing.assert_close(sampled.row_recall.double(), want[:, :, sampled.rows],
                               atol=1e-5, rtol=0)
    assert 0.0 < every.worst <= every.recall < 1.0                # the policy dropped mass
    # the last row's map: its kept keys' probability sums to its recall
    last = every.last_prob[:, :].double()
    torch.testing.assert_close((last * every.last_kept).sum(-1), want[0, :, -1], atol=1e-5,
                               rtol=0)


def test_token_lists_and_window_rule():
    """dsa-shaped token lists ([B, 1, Nq, K], -1 padded) on a site with its own sliding window."""
    B, hq, hkv, n, d, topk = 1, 4, 2, 37, 8, 6
    spec = _spec(PRESETS["dsa"](topk=topk), hq=hq, hkv=hkv, window=20)
    q, k = _qk(B, hq, hkv, n, n, d, seed=3)
    g = torch.Generator().manual_seed(1)
    idx = torch.full((B, 1, n, topk), -1, dtype=torch.int32)
    kept = torch.zeros(B, 1, n, n, dtype=torch.bool)
    for i in range(n):
        pick = torch.randperm(i + 1, generator=g)[:topk]
        idx[0, 0, i, :pick.numel()] = pick.to(torch.int32)
        kept[0, 0, i, pick] = True
    want = _brute_recall(q, k, kept, spec.scale, 0, window=20)
    got = recall.measure(spec, q, k, [], q.new_empty(0, dtype=torch.int32), idx,
                         row_index=torch.arange(n))
    torch.testing.assert_close(got.row_recall.double(), want, atol=1e-5, rtol=0)
    assert got.row_recall[0, :, :topk].eq(1).all()       # rows with <= topk visible keys keep all


def test_block_maps_sum_to_row_mass():
    pol = PRESETS["block_topk"](block=16, topk=1)
    spec = _spec(pol, hq=2, hkv=2)
    q, k = _qk(1, 2, 2, 64, 64, 8)
    est = estimators.get(pol)
    counts, indices = est.select(est.score(q, k, [], spec), q, k, spec)
    rec = recall.measure(spec, q, k, [], counts, indices, row_index=torch.arange(64))
    assert rec.block == 16 and rec.block_mass.shape == (2, 4, 4)
    torch.testing.assert_close(rec.block_mass.nansum(-1), torch.ones(2, 4))   # each row sums to 1
    blocks = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    for h in range(2):
        for qb in range(4):
            for t in range(int(counts[0, h, qb])):
                blocks[0, h, qb, int(indices[0, h, qb, t])] = True
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    torch.testing.assert_close(rec.block_kept[:, causal], blocks[0][:, causal].float())
    assert torch.isnan(rec.block_kept[:, ~causal]).all()      # nothing the model attends to


def test_sampled_rows_cover_every_block():
    rows = recall.sample_rows(1000, 64, 64, seed=7)
    assert rows[-1] == 999 and len(set((rows // 64).tolist())) == math.ceil(1000 / 64)
    assert torch.equal(recall.sample_rows(20, 64, 64, seed=7), torch.arange(20))


def _tiny():
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=512)).eval()


def test_compiled_model_reports_recall():
    m = _tiny()
    x = torch.randint(0, 256, (1, 300))
    full = planner.compile(m, policy=planner.policy("block_topk", block=32, topk=16),
                           cost_model="off", record="recall")
    tight = planner.compile(m, policy=planner.policy("sink_window", sink=4, window=32),
                            cost_model="off", record="recall")
    plain = planner.compile(m, policy=planner.policy("sink_window", sink=4, window=32),
                            cost_model="off")
    with torch.no_grad():
        full(x), tight(x), plain(x)
    rf, rt, rp = planner.inspect(full), planner.inspect(tight), planner.inspect(plain)
    assert all(s.recall == 1.0 and s.recall_worst == 1.0 for s in rf.sites)
    for s in rt.sites:
        assert 0 < s.recall_worst <= s.recall < 1 and len(s.recall_per_head) == 4
        assert s.recall > s.density                 # recent keys carry more than their share
    assert "recall" in rt.table() and set(rt.recordings) == {s.name for s in rt.sites}
    assert not rp.recordings and all(s.recall is None for s in rp.sites)
    assert "recall" not in rp.table()               # off: nothing measured, nothing shown


def test_recording_context_manager():
    m = _tiny()
    cm = planner.compile(m, policy=planner.policy("sink_window", sink=4, window=32),
                         cost_model="off")
    x = torch.randint(0, 256, (1, 200))
    with torch.no_grad():
        cm(x)
        assert not planner.inspect(cm).recordings
        with planner.recording(cm, rows=16):
            cm(x)
        rec = planner.inspect(cm).recordings
        assert rec and all(r.rows.numel() <= 16 + 1 for r in rec.values())
        before = {n: r.row_recall.clone() for n, r in rec.items()}
        cm(x[:, :150])                                  # not recorded: the last record stays
    after = planner.inspect(cm).recordings
    assert all(torch.equal(after[n].row_recall, before[n]) for n in before)
