"""The lightning indexer: PyTorch reference against a loop-based definition, and the fused
Triton score + top-k kernels (CPU: Triton interpreter) against the reference.

Kernel rows are compared as sets: a key may differ from the reference only where its reference
score lies within a small tolerance of the row's k-th best score (tl.dot and torch sum in a
different order). Integer-valued inputs make every score exact, so there the kernel must match
the reference exactly, equal scores included (ties go to the newer key).
"""
import math

import pytest
import torch

from codegen.indexer import indexer_scores_ref, indexer_topk_ref, visible_counts
from runtime.kernels import indexer as ik, indexer_rows, launch
from runtime.cache import KERNELS

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_DTYPES = [torch.float32, torch.float16]
# few candidate slots (topk + 8) and a dense sample, so tiny rows take every path of the
# kernel: the sampled threshold estimate, exact refinement of missed rows, the two-sided sweep
SMALL = ik.IndexerSchedule(block_m=16, block_n=32, slack=8, sample_stride=2)
SENTINEL = -7

needs_kernels = pytest.mark.skipif(
    not launch.runs_triton(DEV), reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    monkeypatch.setattr(ik, "POISON_WORKSPACE", True)
    ik.COUNTERS.clear()


def make_inputs(B, nq, nkv, H, D, dtype=torch.float32, integer=False):
    """q [B, Nq, H, D], w [B, Nq, H] (some negative), k [B, Nkv, D]; integer-valued (exact
    scores, many ties) or normal."""
    if integer:
        q = torch.randint(-2, 3, (B, nq, H, D)).to(dtype)
        k = torch.randint(-2, 3, (B, nkv, D)).to(dtype)
        w = torch.randint(-1, 3, (B, nq, H)).float() * 0.5
    else:
        q = torch.randn(B, nq, H, D).to(dtype)
        k = torch.randn(B, nkv, D).to(dtype)
        w = torch.rand(B, nq, H) - 0.3
    return q.to(DEV), w.to(DEV), k.to(DEV)


# ----------------------------------------------------------------------------- reference

def brute_topk(q, w, k, topk, causal):
    """Per row: score every visible key with explicit loops, sort by (score, index) descending,
    keep topk, list ascending, pad with -1."""
    B, nq, H, D = q.shape
    nkv = k.shape[1]
    out = torch.full((B, nq, topk), -1, dtype=torch.int32)
    qd, wd, kd = q.double().tolist(), w.double().tolist(), k.double().tolist()
    for b in range(B):
        for t in range(nq):
            last = t + nkv - nq if causal else nkv - 1
            scored = []
            for s in range(min(last, nkv - 1) + 1):
                score = sum(wd[b][t][j] * max(0.0, sum(x * y for x, y in zip(qd[b][t][j], kd[b][s])))
                            for j in range(H))
                scored.append((score, s))
            scored.sort(reverse=True)                      # equal scores: larger index first
            keep = sorted(s for _, s in scored[:topk])
            out[b, t, :len(keep)] = torch.tensor(keep, dtype=torch.int32)
    return out


REF_CASES = [
    pytest.param(1, 6, 6, 2, 4, 3, True, id="B1-N6-H2-D4-k3-causal"),
    pytest.param(2, 5, 9, 3, 4, 4, True, id="B2-Nq5-Nkv9-H3-D4-k4-causal-bottom-right"),
    pytest.param(1, 1, 12, 2, 8, 5, True, id="B1-Nq1-Nkv12-H2-D8-k5-decode"),
    pytest.param(1, 7, 7, 1, 4, 10, False, id="B1-N7-H1-D4-k10-full-padded"),
    pytest.param(2, 8, 5, 2, 4, 2, True, id="B2-Nq8-Nkv5-H2-D4-k2-causal-empty-rows"),
]


@pytest.mark.parametrize("integer", [True, False], ids=["int-ties", "normal"])
@pytest.mark.parametrize("B,nq,nkv,H,D,topk,causal", REF_CASES)
def test_reference_matches_brute_force(B, nq, nkv, H, D, topk, causal, integer):
    q, w, k = (t.cpu() for t in make_inputs(B, nq, nkv, H, D, integer=integer))
    assert torch.equal(indexer_topk_ref(q, w, k, topk, causal=causal),
                       brute_topk(q, w, k, topk, causal))


def test_reference_scores_and_visibility():
    q, w, k = (t.cpu() for t in make_inputs(2, 5, 8, 3, 4))
    s = indexer_scores_ref(q, w, k, causal=True)
    assert s.shape == (2, 5, 8) and s.dtype == torch.float32
    manual = (w[..., None] * torch.relu(torch.einsum("bthd,bsd->bths", q, k))).sum(2)
    vis = torch.arange(8)[None, :] <= torch.arange(5)[:, None] + 3      # bottom-right
    torch.testing.assert_close(s[:, vis], manual[:, vis])
    assert torch.isinf(s[:, ~vis]).all() and (s[:, ~vis] < 0).all()
    assert visible_counts(5, 8, True).tolist() == [4, 5, 6, 7, 8]
    assert visible_counts(8, 5, True).tolist() == [0, 0, 0, 1, 2, 3, 4, 5]


def test_reference_ties_keep_newest_keys():
    q, w, k = (t.cpu() for t in make_inputs(1, 6, 9, 2, 4))
    out = indexer_topk_ref(q, torch.zeros_like(w), k, 3, causal=True)   # every score is 0
    vis = visible_counts(6, 9, True)
    for t in range(6):
        assert out[0, t].tolist() == list(range(int(vis[t]) - 3, int(vis[t])))


# ----------------------------------------------------------------------------- kernel checks

def run_kernel(q, w, k, topk, causal, schedule=SMALL):
    out = torch.full((q.shape[0], q.shape[1], topk), SENTINEL, dtype=torch.int32, device=DEV)
    got = ik.indexer_topk(q, w, k, topk, causal=causal, schedule=schedule, out=out)
    assert got.data_ptr() == out.data_ptr()
    return got


def check_rows(got, q, w, k, topk, causal, rtol=1e-5):
    """Structure (every slot written, distinct visible keys, -1 padding count) and the set
    comparison with the reference under the k-th-score tolerance rule."""
    assert not (got == SENTINEL).any(), "kernel left output slots unwritten"
    B, nq, _ = got.shape
    nkv = k.shape[1]
    scores = indexer_scores_ref(q, w, k, causal=causal)                 # [B, Nq, Nkv]
    want = visible_counts(nq, nkv, causal, q.device).clamp(max=topk)    # [Nq]
    valid = got >= 0
    assert torch.equal(valid.sum(-1), want.expand(B, nq)), "wrong number of keys / -1 padding"
    assert (got[valid] < nkv).all()
    g = torch.where(valid, got, nkv).long()
    srt = g.sort(-1).values
    assert not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] < nkv)).any(), "duplicate keys"
    sel = torch.zeros(B, nq, nkv + 1, dtype=torch.bool, device=q.device).scatter_(-1, g, True)
    sel = sel[..., :nkv]
    finite = torch.isfinite(scores)
    assert not (sel & ~finite).any(), "a hidden key was selected"
    ref = indexer_topk_ref(q, w, k, topk, causal=causal)
    rsel = torch.zeros(B, nq, nkv + 1, dtype=torch.bool, device=q.device).scatter_(
        -1, torch.where(ref >= 0, ref, nkv).long(), True)[..., :nkv]
    diff = sel ^ rsel
    if not diff.any():
        return 0
    top = torch.topk(scores, min(topk, nkv), dim=-1).values
    kth = top.gather(-1, (want - 1).clamp(min=0).expand(B, nq)[..., None])   # [B, Nq, 1]
    scale = scores.masked_fill(~finite, 0).abs().amax(-1, keepdim=True).clamp(min=1e-30)
    far = diff & ((scores - kth).abs() > rtol * scale)
    assert not far.any(), f"{int(far.sum())} keys differ from the reference away from the k-th score"
    return int(diff.sum())


KERNEL_CASES = [
    pytest.param(1, 97, 97, 4, 16, 7, True, id="B1-N97-H4-D16-k7-causal"),
    pytest.param(1, 150, 150, 1, 32, 40, True, id="B1-N150-H1-D32-k40-causal"),
    pytest.param(1, 150, 150, 4, 16, 1, False, id="B1-N150-H4-D16-k1-full"),
    pytest.param(2, 40, 150, 1, 32, 16, True, id="B2-Nq40-Nkv150-H1-D32-k16-bottom-right"),
    pytest.param(1, 1, 300, 4, 16, 7, True, id="B1-Nq1-Nkv300-H4-D16-k7-decode-split"),
    pytest.param(1, 97, 97, 4, 32, 200, True, id="B1-N97-H4-D32-k200-padded"),
    pytest.param(1, 60, 33, 2, 16, 16, True, id="B1-Nq60-Nkv33-H2-D16-k16-empty-rows"),
]


@needs_kernels
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,nq,nkv,H,D,topk,causal", KERNEL_CASES)
def test_kernel_matches_reference(B, nq, nkv, H, D, topk, causal, dtype, kernels):
    q, w, k = make_inputs(B, nq, nkv, H, D, dtype)
    got = run_kernel(q, w, k, topk, causal)
    differing = check_rows(got, q, w, k, topk, causal)
    assert differing <= 2 * B * nq * 0.05 + 2                        # rare rounding-level swaps


@needs_kernels
def test_stacked_heads_match_reference(kernels):
    """One tensor-core product for all heads (stack_heads): same rows."""
    sch = ik.IndexerSchedule(block_m=16, block_n=32, slack=8, sample_stride=2, stack_heads=True)
    q, w, k = make_inputs(1, 70, 90, 3, 16)                 # 3 heads pad to 4 stacked blocks
    check_rows(run_kernel(q, w, k, 9, True, schedule=sch), q, w, k, 9, True)


@needs_kernels
def test_streamed_queries_match_reference(kernels):
    """Each head's query tile reloaded per key tile (stream_queries: many wide heads): same
    rows; the default schedule streams them where the tiles would not fit on chip together."""
    sch = ik.IndexerSchedule(block_m=16, block_n=32, slack=8, sample_stride=2,
                             stream_queries=True)
    q, w, k = make_inputs(1, 70, 90, 3, 16)
    check_rows(run_kernel(q, w, k, 9, True, schedule=sch), q, w, k, 9, True)
    for heads, group in ((6, 4), (8, 2)):         # a last group half masked; groups exact
        sch = ik.IndexerSchedule(block_m=16, block_n=32, slack=8, sample_stride=2,
                                 stream_queries=True, head_group=group)
        q, w, k = make_inputs(1, 70, 90, heads, 16)
        check_rows(run_kernel(q, w, k, 9, True, schedule=sch), q, w, k, 9, True)
    big = ik.default_schedule(64, 128, "cuda")                      # DeepSeek-V3.2's indexer
    assert big.stream_queries and big.num_stages == 1
    assert big.block_m * 64 * 128 * 2 > ik.RESIDENT_Q_BYTES
    small = ik.default_schedule(4, 64, "cuda")                      # a trained DSA indexer
    assert not small.stream_queries


@needs_kernels
def test_zero_ties_at_the_target_are_split_by_recency(kernels):
    """Rows whose weights are all negative score <= 0, most keys exactly 0: the k-th best is a
    tie at zero; the estimate splits the zeros by index and the result keeps the newest."""
    sch = ik.IndexerSchedule(block_m=16, block_n=32, slack=40, sample_stride=2)
    q, w, k = make_inputs(1, 64, 300, 1, 16)
    w[:, ::2] = -w[:, ::2].abs() - 0.1
    got = run_kernel(q, w, k, 16, True, schedule=sch)
    check_rows(got, q, w, k, 16, True)
    assert ik.COUNTERS["estimates"] == 1


@needs_kernels
@pytest.mark.parametrize("B,nq,nkv,H,D,topk,causal", [
    pytest.param(1, 97, 97, 1, 16, 7, True, id="B1-N97-H1-D16-k7-causal"),
    pytest.param(2, 50, 120, 3, 16, 20, True, id="B2-Nq50-Nkv120-H3-D16-k20-bottom-right"),
    pytest.param(1, 64, 64, 2, 32, 5, False, id="B1-N64-H2-D32-k5-full"),
])
def test_kernel_exact_with_tied_scores(B, nq, nkv, H, D, topk, causal, kernels):
    """Integer-valued inputs: scores are exact and tie often; the recency rule decides."""
    q, w, k = make_inputs(B, nq, nkv, H, D, integer=True)
    got = run_kernel(q, w, k, topk, causal)
    assert not (got == SENTINEL).any()
    g = torch.where(got < 0, nkv, got).sort(-1).values
    assert torch.equal(torch.where(g == nkv, -1, g), indexer_topk_ref(q, w, k, topk, causal=causal))


@needs_kernels
@pytest.mark.parametrize("zero", ["w", "k"])
@pytest.mark.parametrize("how", ["refine", "direct"])
def test_kernel_all_scores_tied_keeps_newest(zero, how, kernels, monkeypatch):
    """Every score 0 (w = 0 or k_idx = 0): exactly the newest visible keys, through the
    single-score bracket of the exact refinement, or the full score rows of missed rows."""
    monkeypatch.setattr(ik, "DIRECT_ELEMS", 0 if how == "refine" else 2 ** 26)
    q, w, k = make_inputs(1, 70, 90, 2, 16)
    if zero == "w":
        w = torch.zeros_like(w)
    else:
        k = torch.zeros_like(k)
    got = run_kernel(q, w, k, 9, True)
    vis = visible_counts(70, 90, True)
    want = torch.stack([torch.arange(int(v) - 9, int(v)) for v in vis]).int()
    assert torch.equal(got[0].sort(-1).values.cpu(), want)
    assert ik.COUNTERS["two_sided_sweeps" if how == "refine" else "direct_rows"] >= 1


@needs_kernels
@pytest.mark.parametrize("miss", ["too_low", "too_high"])
@pytest.mark.parametrize("how", ["refine", "direct"])
def test_missed_estimate_is_resolved_exactly(miss, how, kernels, monkeypatch):
    """A threshold estimate that leaves too many (or too few) candidates is corrected exactly,
    by the threshold refinement or (few missed rows) from the rows' full scores: the result
    does not depend on the estimate."""
    q, w, k = make_inputs(2, 80, 80, 2, 16)
    fill = float("-inf") if miss == "too_low" else 1e30           # every key / none admitted
    monkeypatch.setattr(ik._IndexerRun, "estimate", lambda self: torch.where(
        self.vis > self.C, ik._pack(torch.full_like(self.vis, fill, dtype=torch.float32),
                                    ik.IDX_ABOVE), self.lo_all))
    monkeypatch.setattr(ik, "DIRECT_ELEMS", 0 if how == "refine" else 2 ** 26)
    got = run_kernel(q, w, k, 6, True)
    check_rows(got, q, w, k, 6, True)
    assert ik.COUNTERS["refined_rows"] > 0
    if how == "refine":
        assert ik.COUNTERS["refine_sweeps"] >= 1 and not ik.COUNTERS["direct_rows"]
    else:
        assert ik.COUNTERS["direct_rows"] == ik.COUNTERS["refined_rows"]
        assert not ik.COUNTERS["refine_sweeps"]


@needs_kernels
def test_default_schedule_and_strided_inputs(kernels):
    """Non-contiguous q_idx / w / k_idx (read through strides), default schedule."""
    base_q = torch.randn(1, 4, 90, 24, device=DEV)                    # [B, H, N, D] storage
    q = base_q.permute(0, 2, 1, 3)                                    # [B, N, H, D] view
    k = torch.randn(1, 90, 48, device=DEV)[:, :, ::2]                 # every other column
    w = (torch.rand(1, 90, 8, device=DEV) - 0.3)[:, :, 1::2]
    assert not (q.is_contiguous() or k.is_contiguous() or w.is_contiguous())
    got = run_kernel(q, w, k, 12, True, schedule=None)
    check_rows(got, q, w, k, 12, True)


@needs_kernels
def test_new_length_reuses_the_compiled_kernels(kernels):
    sch = ik.IndexerSchedule(block_m=16, block_n=16, slack=4, sample_stride=2)
    q, w, k = make_inputs(1, 20, 20, 2, 16)
    ik.indexer_topk(q, w, k, 3, causal=True, schedule=sch)
    compiles = KERNELS.stats()["compiles"]
    q, w, k = make_inputs(1, 37, 45, 2, 16)
    check_rows(run_kernel(q, w, k, 3, True, schedule=sch), q, w, k, 3, True)
    assert KERNELS.stats()["compiles"] == compiles


def test_reference_mode_and_cpu_bfloat16_use_the_reference(monkeypatch):
    q, w, k = (t.cpu() for t in make_inputs(1, 30, 30, 2, 16))
    ref = indexer_topk_ref(q, w, k, 5, causal=True)
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    assert not launch.kernels_enabled(q)
    assert torch.equal(ik.indexer_topk(q, w, k, 5, causal=True), ref)
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    qb, kb = q.bfloat16(), k.bfloat16()
    assert not launch.kernels_enabled(qb)
    assert torch.equal(ik.indexer_topk(qb, w, kb, 5, causal=True),
                       indexer_topk_ref(qb, w, kb, 5, causal=True))


# ----------------------------------------------------------------------------- errors

def _bad(case):
    q = torch.randn(2, 5, 3, 16)
    w = torch.rand(2, 5, 3)
    k = torch.randn(2, 7, 16)
    args = dict(q_idx=q, w=w, k_idx=k, topk=4)
    args.update(case)
    return args


@pytest.mark.parametrize("case,match", [
    pytest.param(dict(q_idx=torch.randn(2, 5, 16)),
                 r"q_idx must be a 4-d tensor \[B, Nq, H_I, d_I\], got \[2, 5, 16\]", id="q-rank"),
    pytest.param(dict(k_idx=torch.randn(2, 7, 1, 16)), r"k_idx must be a 3-d tensor", id="k-rank"),
    pytest.param(dict(w=torch.rand(2, 5)), r"w must be a 3-d tensor", id="w-rank"),
    pytest.param(dict(k_idx=torch.randn(3, 7, 16)),
                 r"k_idx must be \[B, Nkv, d_I\] with B=2, d_I=16 .* got \[3, 7, 16\]", id="batch"),
    pytest.param(dict(k_idx=torch.randn(2, 7, 32)), r"with B=2, d_I=16 .* got \[2, 7, 32\]",
                 id="head-dim"),
    pytest.param(dict(w=torch.rand(2, 5, 4)), r"w must be \[B, Nq, H_I\] = \[2, 5, 3\]", id="w-heads"),
    pytest.param(dict(topk=0), r"topk must be an int >= 1, got 0", id="topk-0"),
    pytest.param(dict(topk=-3), r"topk must be an int >= 1, got -3", id="topk-negative"),
    pytest.param(dict(topk=2.0), r"topk must be an int >= 1, got 2.0", id="topk-float"),
    pytest.param(dict(k_idx=torch.randn(2, 7, 16, dtype=torch.float64)),
                 r"k_idx.dtype must equal q_idx.dtype \(torch.float32\), got torch.float64",
                 id="k-dtype"),
    pytest.param(dict(q_idx=torch.randn(2, 5, 3, 16).double(), k_idx=torch.randn(2, 7, 16).double()),
                 r"q_idx.dtype must be float16, bfloat16 or float32, got torch.float64", id="q-dtype"),
    pytest.param(dict(w=torch.ones(2, 5, 3, dtype=torch.int32)),
                 r"w must be a floating-point tensor, got torch.int32", id="w-dtype"),
])
def test_bad_inputs_raise_clear_errors(case, match):
    args = _bad(case)
    with pytest.raises(ValueError, match=match):
        ik.indexer_topk(args["q_idx"], args["w"], args["k_idx"], args["topk"], causal=True)


def test_bad_out_and_schedule_raise():
    q, w, k = torch.randn(1, 5, 2, 16), torch.rand(1, 5, 2), torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match=r"out must be a contiguous int32 tensor \[1, 5, 3\]"):
        ik.indexer_topk(q, w, k, 3, causal=True, out=torch.empty(1, 5, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"IndexerSchedule.block_n must be a power of two >= 16, got 24"):
        ik.IndexerSchedule(block_n=24)
    with pytest.raises(ValueError, match=r"IndexerSchedule.thresholds must be >= 16, got 8"):
        ik.IndexerSchedule(thresholds=8)
    with pytest.raises(ValueError, match=r"stack_heads and stream_queries exclude each other"):
        ik.IndexerSchedule(stack_heads=True, stream_queries=True)
    for bad in (dict(head_group=2), dict(head_group=3, stream_queries=True)):
        with pytest.raises(ValueError, match=r"head_group must be a power of two"):
            ik.IndexerSchedule(**bad)
    assert math.isclose(ik.IndexerSchedule(slack=8).capacity(3), 11)


@pytest.mark.parametrize("B,n_q,n_kv,topk,causal,tied", [
    (2, 1, 300, 32, True, False), (3, 4, 97, 200, True, False), (1, 16, 500, 7, False, False),
    (2, 3, 50, 20, True, True)])
@pytest.mark.parametrize("path", ["scores", "kernel"])
@pytest.mark.parametrize("heads", [4, 20], ids=["4-heads", "20-heads-mma"])
def test_few_rows_path_matches_reference(B, n_q, n_kv, topk, causal, tied, path, heads,
                                         monkeypatch):
    """Decode-sized calls (int64 selection keys from the score rows, or from the few-row key
    kernel, then one topk) equal the reference; 20 heads take the tensor-core kernel
    (``few_row_keys_mma``, heads padded to 32)."""
    if path == "kernel":
        if not launch.runs_triton(DEV):
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    else:
        monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    q = torch.randn(B, n_q, heads, 16)
    w = torch.zeros(B, n_q, heads) if tied else torch.randn(B, n_q, heads)
    k = torch.randn(B, n_kv, 16)
    if path == "kernel":                       # strided inputs on the kernels' device
        q = torch.randn(B, n_q, heads, 32, device=DEV)[..., ::2]
        k = torch.randn(B, n_kv, 24, device=DEV)[..., 4:20]
        w = w.to(DEV)
        keys = indexer_rows.few_row_keys(q, w, k, causal=causal)
        vis = visible_counts(n_q, n_kv, causal, q.device)
        want = indexer_rows.keys_of_scores(indexer_scores_ref(q, w, k, causal=causal), vis)
        hidden = want == torch.iinfo(torch.int64).min
        assert torch.equal(keys == torch.iinfo(torch.int64).min, hidden)
        assert torch.equal(keys[~hidden] & 0xFFFFFFFF, want[~hidden] & 0xFFFFFFFF)
        torch.testing.assert_close(indexer_rows.from_key(keys[~hidden] >> 32),
                                   indexer_rows.from_key(want[~hidden] >> 32), rtol=1e-5, atol=1e-5)
    got = indexer_rows.topk_few_rows(q, w, k, topk, causal=causal)
    ref = indexer_topk_ref(q, w, k, topk, causal=causal)
    assert got.dtype == torch.int32 and got.shape == ref.shape
    assert torch.equal(got.sort(-1).values.cpu(), ref.sort(-1).values.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32-output product is CUDA-only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_few_row_scores_on_cuda_match_reference(dtype):
    """bf16/fp16 score rows from one fp32-output product equal the reference's fp32 rows up to
    summation order, and the selection equals the reference's."""
    from runtime.kernels.indexer_rows import few_row_scores, topk_few_rows
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(4, 2, 4, 64, device="cuda", generator=g).to(dtype)
    w = torch.randn(4, 2, 4, device="cuda", generator=g).to(dtype)
    k = torch.randn(4, 5000, 64, device="cuda", generator=g).to(dtype)
    got = few_row_scores(q, w, k, causal=True)
    ref = indexer_scores_ref(q, w, k, causal=True)
    fin = ref > float("-inf")
    assert torch.equal(got > float("-inf"), fin)
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-5, atol=1e-5)
    sel = topk_few_rows(q, w, k, 256, causal=True)
    want = indexer_topk_ref(q, w, k, 256, causal=True)
    assert torch.equal(sel.sort(-1).values, want.sort(-1).values)
