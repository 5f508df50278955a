"""KV-cache eviction (runtime.eviction, ``planner.compile(evict=...)``): through Hugging Face
``generate()`` with a ``DynamicCache`` and through a model that returns its cache as tuples.

* a budget covering the prompt changes nothing (greedy tokens equal dense, reported);
* each policy's kept set equals a loop-based definition written from its paper, on small cases;
* the cache really shrinks (the tensors the model holds are checked), and decoding over it
  equals the uncompiled model decoding over a cache compacted by hand;
* both protocols: question-agnostic (compress the context, then question + answer over the
  compacted cache) and question-aware (evict after context + question);
* bad input: budget <= 0 is refused with the value, an unknown cache layout is reported.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import planner
from conftest import tiny_llama
from planner.quality.eviction import greedy
from runtime import eviction as ev

GEN = dict(do_sample=False)


def _gen(m, ids, n):
    with torch.no_grad():
        return m.generate(ids, max_new_tokens=n, min_new_tokens=n, **GEN)


# ------------------------------------------------------------------------------------------
# loop-based definitions (one key at a time, Python floats), written from the papers

def _probs(q, k, scale, hq, i):
    """Causal softmax of query row ``i`` of q head ``hq`` over keys 0..i (q, k: [H, N, D])."""
    g = q.shape[0] // k.shape[0]
    s = [float(q[hq, i] @ k[hq // g, j]) * scale for j in range(i + 1)]
    mx = max(s)
    e = [math.exp(x - mx) for x in s]
    z = sum(e)
    return [x / z for x in e] + [0.0] * (k.shape[1] - i - 1)


def _top(scores: dict, m: int, forced=()) -> list:
    kept = set(forced)
    rest = sorted((j for j in scores if j not in kept), key=lambda j: -scores[j])
    return sorted(kept | set(rest[: m - len(kept)]))


def ref_streaming(n, m, sink):
    return [sorted(set(range(sink)) | set(range(n - (m - sink), n)))]


def ref_h2o(q, k, scale, m, recent):
    hkv, n = k.shape[0], k.shape[1]
    g = q.shape[0] // hkv
    r = int(round(recent * m))
    out = []
    for h in range(hkv):
        acc = [0.0] * n
        for hq in range(h * g, (h + 1) * g):
            for i in range(n):
                for j, p in enumerate(_probs(q, k, scale, hq, i)):
                    acc[j] += p
        out.append(_top(dict(enumerate(acc)), m, forced=range(n - r, n)))
    return out


def _snap_votes(q, k, scale, window, kernel, h):
    n = k.shape[1]
    g = q.shape[0] // k.shape[0]
    w = min(window, n)
    votes = [0.0] * n
    for hq in range(h * g, (h + 1) * g):
        mean = [0.0] * n
        for i in range(n - w, n):
            for j, p in enumerate(_probs(q, k, scale, hq, i)):
                mean[j] += p / w
        for j in range(n):                         # average of the neighbours that exist
            nb = [mean[t] for t in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= t < n]
            votes[j] += sum(nb) / len(nb) / g
    return votes


def ref_snapkv(q, k, scale, m, window, kernel):
    n = k.shape[1]
    w = min(window, n)
    return [_top(dict(enumerate(_snap_votes(q, k, scale, window, kernel, h))), m,
                 forced=range(n - w, n)) for h in range(k.shape[0])]


def ref_tova(q, k, scale, m):
    n = k.shape[1]
    avg = [0.0] * n
    for hq in range(q.shape[0]):
        for j, p in enumerate(_probs(q, k, scale, hq, n - 1)):
            avg[j] += p / q.shape[0]
    kept = _top(dict(enumerate(avg)), m, forced=[n - 1])
    return [kept] * k.shape[0]


def ref_pyramid_budget(avg, layer, n_layers, beta):
    top = avg / beta
    bottom = 2 * avg - top
    return max(1, round(bottom - layer * (bottom - top) / (n_layers - 1)))


def ref_adakv(q, k, v, scale, m, window, kernel, floor, cap, value=False, sink=0):
    """Every head keeps its own top ``floor * m`` (at least 1); then the layer's ``H * m`` slots go to the
    best remaining scores over all heads, a head holding at most ``ceil(cap * m)``."""
    hkv, n = k.shape[0], k.shape[1]
    w_obs = min(window, n)
    width = min(n, math.ceil(cap * m))
    scores = []
    for h in range(hkv):
        s = _snap_votes(q, k, scale, window, kernel, h)
        if value:
            s = [x * float(v[h, j].abs().sum()) for j, x in enumerate(s)]
        s = [math.inf if (j >= n - w_obs or j < sink) else x for j, x in enumerate(s)]
        scores.append(s)
    kept = [set() for _ in range(hkv)]
    rank = [sorted(range(n), key=lambda j, s=s: -s[j]) for s in scores]
    for h in range(hkv):
        kept[h] |= set(rank[h][: min(m, max(1, int(floor * m)))])
    cands = sorted(((scores[h][j], h, j) for h in range(hkv) for j in rank[h][:width]
                    if j not in kept[h]), key=lambda t: -t[0])
    total = sum(len(x) for x in kept)
    for _, h, j in cands:
        if total == hkv * m:
            break
        kept[h].add(j)
        total += 1
    return [sorted(x) for x in kept]


def _kept(idx, counts):
    """Kept positions per head of batch row 0 (``select``'s output)."""
    return [idx[0, h, : (int(counts[0, h]) if counts is not None else idx.shape[2])].tolist()
            for h in range(idx.shape[1])]


CASES = [
    pytest.param(planner.StreamingLLM(budget=7, sink=2), id="streaming_llm-m7-sink2"),
    pytest.param(planner.H2O(budget=7, recent=0.5), id="h2o-m7"),
    pytest.param(planner.SnapKV(budget=7, window=3, kernel=3), id="snapkv-m7-w3-k3"),
    pytest.param(planner.TOVA(budget=6), id="tova-m6"),
    pytest.param(planner.AdaKV(budget=6, window=2, kernel=3, floor=0.34, cap=2.0),
                 id="adakv-m6-w2"),
    pytest.param(planner.ValueSnapKV(budget=6, window=2, kernel=3, floor=0.34, cap=1.5, sink=1),
                 id="snapkv_value-m6-w2"),
]


@pytest.mark.parametrize("pol", CASES)
@pytest.mark.parametrize("n", [13, 17])
def test_kept_set_equals_loop_definition(pol, n):
    hq, hkv, d = 4, 2, 5
    q, k, v = torch.randn(1, hq, n, d), torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d)
    scale = d ** -0.5
    idx, counts = ev.select(pol, q, k, v, scale, hq // hkv)
    got = _kept(idx, counts)
    m = pol.budget
    if isinstance(pol, planner.StreamingLLM):
        want = ref_streaming(n, m, pol.sink) * hkv
    elif isinstance(pol, planner.H2O):
        want = ref_h2o(q[0], k[0], scale, m, pol.recent)
    elif isinstance(pol, planner.ValueSnapKV):
        want = ref_adakv(q[0], k[0], v[0], scale, m, pol.window, pol.kernel, pol.floor,
                         pol.cap, value=True, sink=pol.sink)
    elif isinstance(pol, planner.AdaKV):
        want = ref_adakv(q[0], k[0], v[0], scale, m, pol.window, pol.kernel, pol.floor, pol.cap)
    elif isinstance(pol, planner.SnapKV):
        want = ref_snapkv(q[0], k[0], scale, m, pol.window, pol.kernel)
    else:
        want = ref_tova(q[0], k[0], scale, m)
    assert got == want
    if counts is not None:                      # per-head budgets: the layer's total is kept
        assert int(counts.sum()) == hkv * m and idx.shape[2] == min(n, math.ceil(pol.cap * m))


@pytest.mark.parametrize("n_layers", [2, 5])
def test_pyramid_budgets_and_kept_sets(n_layers):
    pol = planner.PyramidKV(budget=8, window=2, kernel=3, beta=4.0)
    budgets = [pol.budget_for(layer, n_layers, 40) for layer in range(n_layers)]
    assert budgets == [ref_pyramid_budget(8, layer, n_layers, 4.0) for layer in range(n_layers)]
    assert budgets[0] > budgets[-1] and abs(sum(budgets) / n_layers - 8) <= 0.5
    q, k, v = torch.randn(1, 4, 16, 5), torch.randn(1, 2, 16, 5), torch.randn(1, 2, 16, 5)
    idx, counts = ev.select(pol, q, k, v, 0.4, 2, layer=n_layers - 1, n_layers=n_layers)
    assert _kept(idx, counts) == ref_snapkv(q[0], k[0], 0.4, budgets[-1], 2, 3)


# ------------------------------------------------------------------------------------------
# through generate() with a DynamicCache

POLICIES = ["streaming_llm", "h2o", "snapkv", "pyramidkv", "adakv", "tova", "snapkv_value"]


@pytest.mark.parametrize("name", POLICIES)
def test_budget_covering_the_prompt_generates_dense_tokens(name):
    lm = tiny_llama("sdpa")
    ids = torch.randint(0, 128, (1, 29))
    ref = _gen(lm, ids, 6)
    # (PyramidKV's budget is the mean over layers: its top layer keeps budget / beta, so only
    # beta = 1, equal budgets, keeps every key of every layer)
    extra = {"beta": 1.0} if name == "pyramidkv" else {}
    cm = planner.compile(lm, policy="dense", evict=planner.eviction(name, budget=29, **extra))
    assert torch.equal(_gen(cm, ids, 6), ref)
    for s in planner.inspect(cm).sites:
        assert "nothing evicted" in s.evict and s.cache_before == s.cache_after == 29
        assert s.bytes_freed == 0


@pytest.mark.parametrize("name,budget,width", [("snapkv", 0.25, 10), ("streaming_llm", 9, 9),
                                               ("tova", 0.2, 8), ("adakv", 0.25, 20)])
def test_generate_shrinks_the_cache(name, budget, width):
    """The cache the model holds after generate() is the kept width plus the decoded tokens;
    inspect reports lengths and bytes that match the tensors."""
    lm = tiny_llama("sdpa")
    n, n_new = 40, 5
    ids = torch.randint(0, 128, (1, n))
    cm = planner.compile(lm, policy="dense", evict=planner.eviction(name, budget=budget))
    with torch.no_grad():
        out = cm.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new,
                          return_dict_in_generate=True, **GEN)
    assert out.sequences.shape == (1, n + n_new)
    cache = out.past_key_values
    for layer in cache.layers:
        assert layer.keys.shape == (1, 2, width + n_new - 1, 16)
        assert layer.values.shape == (1, 2, width + n_new - 1, 16)
    rep = planner.inspect(cm)
    for s in rep.sites:
        assert (s.cache_before, s.cache_after) == (n, width)
        assert s.bytes_freed == 2 * 2 * 16 * 4 * (n - width)            # K and V, fp32
        assert s.kept.shape == (1, 2, width)
    assert "KV-cache eviction" in str(rep)


@pytest.mark.parametrize("floor", [0.0, 0.2])
def test_adakv_with_every_score_tied_keeps_a_key_per_head(floor):
    """A prompt shorter than SnapKV's observation window: every key is a window key (score
    +inf), so the layer's choice is all ties. Each head still keeps its safeguard (at least one
    key, also with ``floor=0``), the layer keeps H x budget, the indices are keys of the prompt;
    generate() runs over it (a head left with no key made the compaction index past the end)."""
    pol = planner.AdaKV(budget=0.5, floor=floor)
    k = torch.randn(1, 4, 46, 8)
    idx, counts = ev.select(pol, torch.randn(1, 8, 46, 8), k, k, 0.35, 2, 0, 2)
    assert (counts >= max(1, int(floor * 23))).all() and counts.sum() == 4 * 23
    assert 0 <= idx.min() and idx.max() < 46
    lm = tiny_llama("sdpa")
    ids = torch.randint(0, 128, (1, 30))
    cm = planner.compile(lm, policy="dense", evict=pol)
    out = _gen(cm, ids, 3)
    assert out.shape == (1, 33)
    assert all(s.cache_before == 30 for s in planner.inspect(cm).sites)


def test_generate_equals_decoding_over_a_cache_compacted_by_hand():
    """StreamingLLM's kept set needs no scores: the uncompiled model, given a DynamicCache
    compacted to sinks + recent by hand and positions continuing from the prompt's length,
    decodes the same tokens as generate() on the compiled model."""
    from transformers import DynamicCache
    lm = tiny_llama("sdpa")
    n, n_new, m, sink = 37, 6, 12, 3
    ids = torch.randint(0, 128, (1, n))
    cm = planner.compile(lm, policy="dense", evict=planner.StreamingLLM(budget=m, sink=sink))
    got = _gen(cm, ids, n_new)[0, n:]
    keep = torch.tensor(ref_streaming(n, m, sink)[0])
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        out = lm(ids, past_key_values=cache, use_cache=True)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        toks = []
        for i in range(n_new):
            tok = out.logits[0, -1].argmax()
            toks.append(int(tok))
            out = lm(tok.view(1, 1), past_key_values=cache, use_cache=True,
                     position_ids=torch.tensor([[n + i]]))
    assert got.tolist() == toks


def test_batched_generate_keeps_per_row_sets():
    lm = tiny_llama("sdpa")
    ids = torch.randint(0, 128, (2, 30))
    cm = planner.compile(lm, policy="dense", evict=planner.SnapKV(budget=8, window=4))
    with torch.no_grad():
        out = cm.generate(ids, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True,
                          **GEN)
    assert all(layer.keys.shape == (2, 2, 8 + 2, 16) for layer in out.past_key_values.layers)
    kept = planner.inspect(cm).sites[0].kept
    assert kept.shape == (2, 2, 8) and not torch.equal(kept[0], kept[1])


@pytest.mark.parametrize("name", ["snapkv", "streaming_llm"])
def test_both_protocols(name):
    """Question-aware: evict after context + question; generate() does exactly that.
    Question-agnostic: evict the context alone, then the question runs over the compacted
    cache (not evicted again) and the answer is decoded; a budget covering the context gives
    the dense tokens in both."""
    lm = tiny_llama("sdpa")
    ctx, question = torch.randint(0, 128, (40,)).tolist(), torch.randint(0, 128, (6,)).tolist()
    dense, _ = greedy(lm, ctx + question, (), 5)
    assert torch.equal(dense, _gen(lm, torch.tensor([ctx + question]), 5)[0, 46:])
    full = planner.compile(lm, policy="dense", evict=planner.eviction(name, budget=len(ctx) + 6))
    assert torch.equal(greedy(full, ctx, question, 5)[0], dense)
    assert torch.equal(greedy(full, ctx + question, (), 5)[0], dense)

    pol = planner.eviction(name, budget=10)
    aware = planner.compile(lm, policy="dense", evict=pol)
    toks, cache = greedy(aware, ctx + question, (), 5)
    assert all(layer.keys.shape[2] == 10 + 4 for layer in cache.layers)
    via_generate = _gen(planner.compile(lm, policy="dense", evict=pol),
                        torch.tensor([ctx + question]), 5)[0, 46:]
    assert torch.equal(toks, via_generate)

    agnostic = planner.compile(lm, policy="dense", evict=pol)
    toks, cache = greedy(agnostic, ctx, question, 5)
    assert all(layer.keys.shape[2] == 10 + 6 + 4 for layer in cache.layers)
    s = planner.inspect(agnostic).sites[0]
    assert (s.cache_before, s.cache_after) == (40, 10)


# ------------------------------------------------------------------------------------------
# a model whose cache is a tuple it returns

class TupleCacheLM(nn.Module):
    """Two causal attention layers (GQA 4 q / 2 kv heads, no rotary) returning their cache as
    ``((k, v), ...)``; a call with ``past`` appends to it."""

    def __init__(self, d=32, hq=4, hkv=2, vocab=64, layers=2):
        super().__init__()
        self.hq, self.hkv, self.hd = hq, hkv, d // hq
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(256, d)
        self.qkv = nn.ModuleList(nn.Linear(d, (hq + 2 * hkv) * self.hd) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(hq * self.hd, d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, past=None, start=0):
        b, t = ids.shape
        x = self.emb(ids) + self.pos(torch.arange(start, start + t))
        cache = []
        for i, (qkv, o) in enumerate(zip(self.qkv, self.out)):
            y = qkv(x).view(b, t, self.hq + 2 * self.hkv, self.hd).transpose(1, 2)
            q, k, v = y.split([self.hq, self.hkv, self.hkv], dim=1)
            if past is not None:
                k = torch.cat([past[i][0], k], dim=2)
                v = torch.cat([past[i][1], v], dim=2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=past is None, enable_gqa=True)
            x = x + o(a.transpose(1, 2).reshape(b, t, -1))
            cache.append((k, v))
        return self.head(x), tuple(cache)


def test_tuple_cache_is_compacted_and_decoding_uses_it():
    m = TupleCacheLM().eval()
    ids = torch.randint(0, 64, (1, 21))
    pol = planner.StreamingLLM(budget=8, sink=2)
    cm = planner.compile(m, policy="dense", evict=pol)
    with torch.no_grad():
        _, cache = cm(ids)
        _, full = m(ids)
    keep = torch.tensor(ref_streaming(21, 8, 2)[0])
    for (k, v), (kf, vf) in zip(cache, full):
        assert k.shape == v.shape == (1, 2, 8, 8)
        assert torch.equal(k, kf[:, :, keep]) and torch.equal(v, vf[:, :, keep])
    tok = torch.tensor([[5]])
    with torch.no_grad():
        got, c2 = cm(tok, past=cache, start=21)
        want, _ = m(tok, past=tuple((k[:, :, keep], v[:, :, keep]) for k, v in full), start=21)
    assert (got - want).abs().max() < 1e-5 and c2[0][0].shape[2] == 9
    rep = planner.inspect(cm)
    assert all(s.cache_before == 21 and s.cache_after == 8 for s in rep.sites)


# ------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("budget", [0, -3, 0.0, -0.5, 1.5])
def test_non_positive_budget_is_refused_with_its_value(budget):
    for name in ("snapkv", "streaming_llm", "adakv"):
        with pytest.raises(ValueError, match=f"got {budget}"):
            planner.eviction(name, budget=budget)
    with pytest.raises(ValueError, match="budget"):
        planner.compile(tiny_llama("sdpa"), evict={"*": planner.eviction("snapkv").__class__(
            budget=budget)})


def test_budget_type_and_unknown_name():
    with pytest.raises(TypeError, match="'budget' must be"):
        planner.SnapKV(budget="10%")
    with pytest.raises(ValueError, match="unknown eviction policy 'snap'"):
        planner.compile(tiny_llama("sdpa"), evict="snap")


def test_unknown_cache_layout_stays_unevicted_with_a_reason():
    """TinyGPT keeps no cache: its sites are rewritten, not evicted, and inspect says why."""
    from planner.models import TinyGPT
    m = TinyGPT().eval()
    x = torch.randint(0, 256, (1, 40))
    cm = planner.compile(m, policy="dense", evict=planner.SnapKV(budget=0.25))
    with torch.no_grad():
        assert (cm(x) - m(x)).abs().max() < 1e-5
    rep = planner.inspect(cm)
    assert rep.sites and all(s.status == "rewritten" for s in rep.sites)
    for s in rep.sites:
        assert "cache layout unknown" in s.evict and s.cache_after is None
    assert "cache layout unknown" in str(rep)


def test_per_layer_map_leaves_unlisted_layers_alone():
    lm = tiny_llama("sdpa")
    ids = torch.randint(0, 128, (1, 30))
    cm = planner.compile(lm, policy="dense", evict={"*layers.0.*": planner.SnapKV(budget=6),
                                                   "*": None})
    with torch.no_grad():
        out = cm.generate(ids, max_new_tokens=2, min_new_tokens=2, return_dict_in_generate=True,
                          **GEN)
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [6 + 1, 30 + 1]


def test_per_layer_budgets_through_both_protocols():
    """PyramidKV leaves layers with different cache lengths; the question (agnostic protocol)
    then runs one token per call, since the model builds one mask for every layer."""
    lm = tiny_llama("sdpa")
    ctx, question = torch.randint(0, 128, (40,)).tolist(), torch.randint(0, 128, (5,)).tolist()
    pol = planner.PyramidKV(budget=10, window=4, beta=4.0)
    want = [pol.budget_for(layer, 2, 40) for layer in range(2)]
    assert want[0] > want[1]
    toks, cache = greedy(planner.compile(lm, policy="dense", evict=pol), ctx, question, 3)
    assert [x.keys.shape[2] for x in cache.layers] == [w + 5 + 2 for w in want]
    aware = planner.compile(lm, policy="dense", evict=pol)
    toks, cache = greedy(aware, ctx + question, (), 3)
    assert [x.keys.shape[2] for x in cache.layers] == [
        pol.budget_for(layer, 2, 45) + 2 for layer in range(2)]
    assert toks.shape == (3,)
