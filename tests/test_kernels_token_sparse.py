"""Token-sparse (gather) attention: Triton prefill and split-K decode kernels vs the PyTorch
reference, and the reference vs a brute-force dense softmax over an explicit keep mask.

On a machine without CUDA the kernels run in Triton's interpreter (set below, before any
kernel module is loaded), in float32 and float16.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from codegen.common import Schedule  # noqa: E402
from codegen.token_sparse import token_sparse_attention_ref  # noqa: E402
from runtime.kernels import launch, token_sparse as tsk  # noqa: E402
from runtime.cache import KERNELS  # noqa: E402
from kernel_checks import compare_with_reference, poisoned_outputs, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 2e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 3e-3,
       torch.bfloat16: 1.2e-2}
LSE_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def poison_workspace(monkeypatch):
    """Split-K partial results start as NaN: a partial no program wrote reaches the output."""
    monkeypatch.setattr(launch, "POISON_WORKSPACE", True)


def random_indices(gen, B, hs, Nq, K, Nkv, *, p_pad=0.2, p_empty_row=0.1):
    """int32 [B, hs, Nq, K]: distinct keys in random order, -1 padding anywhere, some rows all -1."""
    idx = torch.full((B, hs, Nq, K), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(hs):
            for i in range(Nq):
                if torch.rand((), generator=gen).item() < p_empty_row:
                    continue
                row = torch.randperm(Nkv, generator=gen)[:K].to(torch.int32)
                row[torch.rand(row.shape[0], generator=gen) < p_pad] = -1
                idx[b, h, i, :row.shape[0]] = row
                idx[b, h, i] = idx[b, h, i, torch.randperm(K, generator=gen)]
    return idx


def make_inputs(seed, B, Hq, Hkv, lists, Nq, Nkv, K, D, Dv, dtype, **kw):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(DEVICE, dtype)      # [B, Hq, Nq, D]
    k = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE, dtype)    # [B, Hkv, Nkv, D]
    v = torch.randn(B, Hkv, Nkv, Dv, generator=gen).to(DEVICE, dtype)   # [B, Hkv, Nkv, Dv]
    hs = {"shared": 1, "group": Hkv, "head": Hq}[lists]
    idx = random_indices(gen, B, hs, Nq, K, Nkv, **kw).to(DEVICE)       # [B, Hs, Nq, K]
    return q, k, v, idx


def run_checked(q, k, v, idx, schedule=None):
    out, lse = poisoned_outputs(q, v)
    scale = q.shape[-1] ** -0.5
    tsk.token_sparse_attention(q, k, v, idx, scale=scale, schedule=schedule, out=out, lse=lse)
    ref, ref_lse = token_sparse_attention_ref(q, k, v, idx, scale=scale)
    return compare_with_reference(out, lse, ref, ref_lse, "valid index")


#                B, Hq, Hkv, lists, Nq, Nkv, K, D, Dv
SHAPES = [
    pytest.param(1, 2, 2, "group", 63, 100, 24, 64, 64, id="prefill-B1-H2-N63-K24-D64"),
    pytest.param(2, 4, 2, "group", 30, 130, 40, 60, 60, id="prefill-B2-H4-KV2-N30-K40-D60-group"),
    pytest.param(1, 6, 2, "group", 17, 63, 63, 64, 32, id="prefill-B1-H6-KV2-N17-K63-Dv32-group"),
    pytest.param(2, 6, 2, "head", 20, 100, 33, 64, 64, id="prefill-B2-H6-KV2-N20-K33-head"),
    pytest.param(3, 4, 4, "group", 1, 500, 300, 64, 64, id="decode-B3-H4-Nkv500-K300"),
    pytest.param(2, 8, 2, "group", 1, 700, 650, 60, 60, id="decode-B2-H8-KV2-K650-D60-group"),
    pytest.param(2, 4, 1, "group", 1, 300, 200, 64, 64, id="decode-B2-H4-KV1-K200-mqa"),
    pytest.param(2, 6, 2, "head", 1, 400, 250, 64, 64, id="decode-B2-H6-KV2-K250-head"),
    pytest.param(2, 8, 2, "shared", 19, 90, 33, 60, 60, id="prefill-B2-H8-KV2-N19-K33-D60-shared"),
    pytest.param(1, 4, 4, "shared", 13, 70, 24, 64, 48, id="prefill-B1-H4-KV4-N13-K24-Dv48-shared"),
    pytest.param(2, 6, 2, "shared", 1, 500, 300, 64, 64, id="decode-B2-H6-KV2-K300-shared"),
    pytest.param(2, 8, 1, "shared", 1, 300, 200, 64, 64, id="decode-B2-H8-KV1-K200-shared-mqa"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("B, Hq, Hkv, lists, Nq, Nkv, K, D, Dv", SHAPES)
def test_kernel_matches_reference(B, Hq, Hkv, lists, Nq, Nkv, K, D, Dv, dtype):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, idx = make_inputs(seed, B, Hq, Hkv, lists, Nq, Nkv, K, D, Dv, dtype)
    err, lse_err = run_checked(q, k, v, idx)
    assert err <= TOL[dtype], f"seed {seed}: relative error {err:.2e} > {TOL[dtype]:.0e}"
    assert lse_err <= LSE_TOL[dtype], f"seed {seed}: lse error {lse_err:.2e}"


@pytest.mark.parametrize("split", [0, 32, 64, 256], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("lists, Hq, Hkv", [("group", 4, 1), ("group", 2, 2)], ids=["mqa-packed", "mha"])
def test_split_k_agrees(split, lists, Hq, Hkv):
    """Any split of the index list (incl. splits holding only padding) gives the same result."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, idx = make_inputs(seed, 2, Hq, Hkv, lists, 1, 600, 520, 64, 64, torch.float32,
                               p_pad=0.0, p_empty_row=0.0)
    idx[0, :, :, 64:192] = -1                              # whole splits of padding
    err, _ = run_checked(q, k, v, idx, Schedule(block_m=16, block_n=32, num_warps=4,
                                                num_stages=1, split=split))
    assert err <= TOL[torch.float32], f"seed {seed}: relative error {err:.2e}"


def test_long_index_list_decode():
    """K = 2048 entries (the decode budget of the benchmarks), split automatically."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, idx = make_inputs(seed, 1, 2, 2, "group", 1, 2500, 2048, 64, 64, torch.float32,
                               p_empty_row=0.0)
    err, _ = run_checked(q, k, v, idx)
    assert err <= TOL[torch.float32], f"seed {seed}: relative error {err:.2e}"


def test_out_of_range_indices_are_ignored():
    q, k, v, idx = make_inputs(5, 1, 2, 2, "group", 3, 50, 10, 64, 64, torch.float32, p_pad=0.0,
                               p_empty_row=0.0)
    out, _ = tsk.token_sparse_attention(q, k, v, idx, scale=0.125)
    bad = idx.clone()
    bad[..., 0] = 50 + torch.arange(bad[..., 0].numel(), dtype=torch.int32).reshape(bad[..., 0].shape)
    clean = idx.clone()
    clean[..., 0] = -1
    out_bad, _ = tsk.token_sparse_attention(q, k, v, bad, scale=0.125)
    out_clean, _ = tsk.token_sparse_attention(q, k, v, clean, scale=0.125)
    assert rel_err(out_bad, out_clean) < 1e-6 and rel_err(out_bad, out) > 1e-3


@pytest.mark.parametrize("Hq, Hkv", [(8, 2), (4, 4)], ids=["gqa4", "mha"])
def test_shared_lists_are_packed_views_not_copies(Hq, Hkv):
    """Hs = 1 runs the per-group programs (GQA packed) over a head stride of 0, and equals the
    same lists expanded per group or per head (a stride-0 view is read as is)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, idx = make_inputs(seed, 2, Hq, Hkv, "shared", 11, 60, 20, 32, 32, torch.float32)
    plan = tsk._plan_token_sparse(q, k, v, idx, None)
    assert plan.spec.pack_gqa == (Hq > Hkv) and plan.grid[1] == 2 * (Hkv if Hq > Hkv else Hq)
    assert not any(plan.contiguous)
    out, lse = tsk.token_sparse_attention(q, k, v, idx, scale=0.2)
    for hs in (Hkv, Hq):
        view = idx.expand(-1, hs, -1, -1)                           # [B, hs, Nq, K], stride 0
        o2, l2 = tsk.token_sparse_attention(q, k, v, view, scale=0.2)
        assert tsk._plan_token_sparse(q, k, v, view, None).contiguous == (False,) * 4
        assert rel_err(o2, out) < 1e-6 and torch.equal(torch.isinf(l2), torch.isinf(lse))


def brute_force(q, k, v, idx, *, scale):
    """float64 dense softmax over a keep mask set entry by entry from the index lists."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    keep = torch.zeros(B, Hq, Nq, Nkv, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            row = {1: 0, Hkv: h // (Hq // Hkv)}.get(idx.shape[1], h)
            for i in range(Nq):
                for j in idx[b, row, i].tolist():
                    if j >= 0:
                        keep[b, h, i, j] = True
    kk = k.double().repeat_interleave(Hq // Hkv, 1)
    vv = v.double().repeat_interleave(Hq // Hkv, 1)
    s = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    has = keep.any(-1)
    p = torch.softmax(torch.where(has[..., None], s, 0.0), -1) * keep
    lse = torch.where(has, torch.logsumexp(torch.where(has[..., None], s, 0.0), -1), float("-inf"))
    return p @ vv, lse


@pytest.mark.parametrize("lists", ["shared", "group", "head"])
def test_reference_matches_brute_force(lists):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    B, Hq, Hkv, Nq, Nkv, K = 2, 4, 2, 9, 40, 12
    q, k, v = (torch.randn(B, h, n, 8, generator=gen) for h, n in ((Hq, Nq), (Hkv, Nkv), (Hkv, Nkv)))
    idx = random_indices(gen, B, {"shared": 1, "group": Hkv, "head": Hq}[lists], Nq, K, Nkv)
    out, lse = token_sparse_attention_ref(q, k, v, idx, scale=0.3)
    bo, bl = brute_force(q, k, v, idx, scale=0.3)
    assert rel_err(out, bo) < 1e-6
    assert torch.equal(torch.isinf(lse), torch.isinf(bl))
    assert torch.allclose(lse[~torch.isinf(bl)].double(), bl[~torch.isinf(bl)], atol=1e-5)


@pytest.mark.parametrize("Nq", [1, 8], ids=["decode", "prefill"])
def test_new_length_in_bucket_compiles_nothing(Nq):
    args = dict(B=2, Hq=4, Hkv=2, lists="group", Nq=Nq, K=150, D=64, Dv=64, dtype=torch.float32)
    q, k, v, idx = make_inputs(1, Nkv=300, **args)
    tsk.token_sparse_attention(q, k, v, idx, scale=0.125)
    before = KERNELS.stats()
    q, k, v, idx = make_inputs(2, Nkv=500, **args)                      # same bucket (512)
    err, _ = run_checked(q, k, v, idx)
    after = KERNELS.stats()
    assert err <= TOL[torch.float32]
    assert after["compiles"] == before["compiles"] and after["hits"] >= before["hits"] + 1


@pytest.mark.parametrize("change, match", [
    pytest.param(dict(indices=lambda a: a["indices"].long()), "indices must be an int32", id="idx-int64"),
    pytest.param(dict(indices=lambda a: a["indices"][:, :, :2]), r"indices must have shape \[2, \*, 3, \*\]", id="idx-rows"),
    pytest.param(dict(indices=lambda a: a["indices"].repeat(1, 3, 1, 1)), "1 .*, Hkv=2 .* or Hq=4", id="idx-6-heads"),
    pytest.param(dict(v=lambda a: a["v"].half()), "share a dtype", id="v-fp16"),
    pytest.param(dict(k=lambda a: a["k"][..., :32]), r"k must be \[B, Hkv, Nkv, 64\]", id="k-D32"),
    pytest.param(dict(scale=lambda a: float("nan")), "scale must be", id="scale-nan"),
])
def test_invalid_arguments(change, match):
    q, k, v, idx = make_inputs(0, 2, 4, 2, "group", 3, 50, 10, 64, 64, torch.float32)
    args = dict(q=q, k=k, v=v, indices=idx, scale=0.125)
    args.update({name: fn(args) for name, fn in change.items()})
    with pytest.raises(ValueError, match=match):
        tsk.token_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("indices"),
                                  **args)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("G", [1, 4], ids=["mha", "gqa4"])
def test_gpu_decode_bf16_long_list(G):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, idx = make_inputs(seed, 4, 4 * G, 4, "group", 1, 9000, 2048, 128, 128,
                               torch.bfloat16, p_empty_row=0.0)
    err, _ = run_checked(q, k, v, idx)
    assert err <= TOL[torch.bfloat16], f"seed {seed}: {err:.2e}"
