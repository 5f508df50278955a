"""Block-sparse flash-attention forward: Triton kernel vs the PyTorch reference, and the
reference vs a brute-force dense softmax over an independently built keep mask.

On a machine without CUDA the kernels run in Triton's interpreter (set below, before any
kernel module is loaded), in float32 and float16.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from codegen.block_sparse import (block_lists_to_dense, block_sparse_attention_ref,  # noqa: E402
                                  from_flex_block_mask, to_flex_block_mask)
from codegen.common import BlockSparseSpec, MaskMode, Schedule  # noqa: E402
from codegen.emit import emit  # noqa: E402
from runtime.kernels import block_sparse as bsk  # noqa: E402
from runtime.cache import KERNELS  # noqa: E402
from kernel_checks import compare_with_reference, poisoned_outputs, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# relative error ||out - ref|| / ||ref|| allowed per dtype, and absolute error on lse
TOL = {torch.float32: 2e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 3e-3,
       torch.bfloat16: 1.2e-2}
LSE_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_block_lists(gen, B, hs, nqb, nkb, *, p_empty=0.2, device="cpu"):
    """num [B, hs, nqb] and idx [B, hs, nqb, nkb + 2]: distinct blocks in random order, some
    rows empty; entries after num are junk (-1 or valid-looking numbers) that must be ignored."""
    num = torch.zeros(B, hs, nqb, dtype=torch.int32)
    idx = torch.randint(-1, nkb, (B, hs, nqb, nkb + 2), generator=gen, dtype=torch.int32)
    for b in range(B):
        for h in range(hs):
            for i in range(nqb):
                if torch.rand((), generator=gen).item() < p_empty:
                    continue
                n = int(torch.randint(1, nkb + 1, (), generator=gen))
                num[b, h, i] = n
                idx[b, h, i, :n] = torch.randperm(nkb, generator=gen)[:n].to(torch.int32)
    return num.to(device), idx.to(device)


def make_inputs(seed, B, Hq, Hkv, lists, Nq, Nkv, D, Dv, block, dtype):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(DEVICE, dtype)      # [B, Hq, Nq, D]
    k = torch.randn(B, Hkv, Nkv, D, generator=gen).to(DEVICE, dtype)    # [B, Hkv, Nkv, D]
    v = torch.randn(B, Hkv, Nkv, Dv, generator=gen).to(DEVICE, dtype)   # [B, Hkv, Nkv, Dv]
    hs = Hkv if lists == "group" else Hq
    num, idx = random_block_lists(gen, B, hs, -(-Nq // block), -(-Nkv // block), device=DEVICE)
    return q, k, v, num, idx


def run_checked(q, k, v, num, idx, *, block, causal, sink=0, window=0, schedule=None,
                pack_gqa=None):
    """Kernel into NaN-poisoned outputs, compared with the reference; returns the errors."""
    out, lse = poisoned_outputs(q, v)
    scale = q.shape[-1] ** -0.5
    bsk.block_sparse_attention(q, k, v, num, idx, block=block, scale=scale, causal=causal,
                              sink=sink, window=window, schedule=schedule, pack_gqa=pack_gqa,
                              out=out, lse=lse)
    ref, ref_lse = block_sparse_attention_ref(q, k, v, num, idx, block=block, scale=scale,
                                              causal=causal, sink=sink, window=window)
    return compare_with_reference(out, lse, ref, ref_lse, "visible key")


#                B, Hq, Hkv, lists, Nq, Nkv, D, Dv, block, causal
SHAPES = [
    pytest.param(1, 2, 2, "group", 63, 63, 64, 64, 64, True, id="B1-H2-N63-D64-causal"),
    pytest.param(2, 4, 2, "group", 100, 100, 60, 60, 64, True, id="B2-H4-KV2-N100-D60-causal-group"),
    pytest.param(1, 6, 2, "group", 63, 130, 64, 64, 64, True, id="B1-H6-KV2-Nq63-Nkv130-D64-causal-group"),
    pytest.param(1, 6, 2, "head", 130, 130, 64, 64, 64, False, id="B1-H6-KV2-N130-D64-head"),
    pytest.param(2, 4, 4, "group", 130, 100, 60, 60, 64, False, id="B2-H4-Nq130-Nkv100-D60"),
    pytest.param(1, 2, 2, "group", 70, 63, 64, 64, 64, False, id="B1-H2-Nq70-Nkv63-noncausal"),
    pytest.param(1, 4, 1, "group", 100, 100, 64, 32, 64, True, id="B1-H4-KV1-N100-D64-Dv32-causal-mqa"),
    pytest.param(2, 4, 2, "head", 1, 130, 64, 64, 64, True, id="B2-H4-KV2-Nq1-Nkv130-causal-head"),
    pytest.param(1, 2, 2, "group", 130, 63, 64, 64, 64, True, id="B1-H2-Nq130-Nkv63-causal-empty-rows"),
    pytest.param(1, 6, 2, "group", 200, 260, 64, 64, 128, True, id="B1-H6-KV2-Nq200-Nkv260-block128-causal"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("B, Hq, Hkv, lists, Nq, Nkv, D, Dv, block, causal", SHAPES)
def test_kernel_matches_reference(B, Hq, Hkv, lists, Nq, Nkv, D, Dv, block, causal, dtype):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, num, idx = make_inputs(seed, B, Hq, Hkv, lists, Nq, Nkv, D, Dv, block, dtype)
    packings = [False, True] if lists == "group" and Hq > Hkv else [None]   # per-head / GQA-packed
    for pack in packings:
        err, lse_err = run_checked(q, k, v, num, idx, block=block, causal=causal, pack_gqa=pack)
        assert err <= TOL[dtype], f"seed {seed} pack {pack}: relative error {err:.2e} > {TOL[dtype]:.0e}"
        assert lse_err <= LSE_TOL[dtype], f"seed {seed} pack {pack}: lse error {lse_err:.2e}"


SCHEDULES = [
    pytest.param(Schedule(block_m=32, block_n=16, num_warps=4, num_stages=1,
                          mask_mode=MaskMode.ALWAYS), id="m32-n16-always"),
    pytest.param(Schedule(block_m=64, block_n=32, num_warps=4, num_stages=2), id="m64-n32-branch"),
    pytest.param(Schedule(block_m=16, block_n=64, num_warps=4, num_stages=2), id="m16-n64-branch"),
    pytest.param(Schedule(block_m=64, block_n=32, num_warps=4, num_stages=2, tma=True), id="m64-n32-tma"),
    pytest.param(Schedule(block_m=32, block_n=32, num_warps=4, num_stages=2, persistent=2),
                 id="m32-n32-persistent"),
]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("lists", ["group", "head"])
def test_schedules_agree(schedule, lists):
    """Tiles smaller than the mask block (sub-tiles, several programs per query block)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, num, idx = make_inputs(seed, 1, 6, 2, lists, 100, 130, 60, 60, 64, torch.float32)
    err, _ = run_checked(q, k, v, num, idx, block=64, causal=True, schedule=schedule,
                         pack_gqa=lists == "group")
    assert err <= TOL[torch.float32], f"seed {seed}: relative error {err:.2e}"


@pytest.mark.parametrize("window, sink, Nq", [
    pytest.param(16, 0, 130, id="N130-window16"),
    pytest.param(16, 4, 130, id="N130-window16-sink4"),
    pytest.param(40, 70, 63, id="Nq63-Nkv130-window40-sink70"),
])
def test_sink_window(window, sink, Nq):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, num, idx = make_inputs(seed, 2, 4, 2, "group", Nq, 130, 64, 64, 64, torch.float32)
    err, lse_err = run_checked(q, k, v, num, idx, block=64, causal=True, sink=sink, window=window,
                               pack_gqa=True)
    assert err <= TOL[torch.float32] and lse_err <= LSE_TOL[torch.float32], f"seed {seed}: {err:.2e}"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
def test_default_schedules_fit_every_block(block, dtype, device):
    """The default schedule of any (block, dtype, device) renders (tiles within the mask block)."""
    for d, g, pack, maxb in ((16, 1, False, 1), (64, 4, True, 3), (128, 2, False, 64), (256, 1, False, 9)):
        spec = BlockSparseSpec(head_dim=d, v_head_dim=d, gqa_group=g, pack_gqa=pack,
                               lists_per_group=True, causal=True, dtype=dtype, block=block,
                               stride_align=16 // (4 if dtype == "float32" else 2))
        sch = bsk.default_block_sparse_schedule(spec, torch.device(device), maxb)
        assert sch.block_m <= block and sch.block_n <= block, sch
        assert "def block_sparse_fwd" in emit(spec, sch)


def brute_force(q, k, v, num, idx, *, block, scale, causal, sink=0, window=0):
    """float64 dense softmax over a keep mask built pair by pair from the rules."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nkv = k.shape[1], k.shape[2]
    hs = num.shape[1]
    keep = torch.zeros(B, Hq, Nq, Nkv, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            row = h // (Hq // Hkv) if hs == Hkv else h
            for qb in range(num.shape[2]):
                for t in range(int(num[b, row, qb])):
                    kb = int(idx[b, row, qb, t])
                    for i in range(qb * block, min(qb * block + block, Nq)):
                        pos = i + Nkv - Nq
                        for j in range(kb * block, min(kb * block + block, Nkv)):
                            ok = (not causal or j <= pos) and (window == 0 or j > pos - window or j < sink)
                            keep[b, h, i, j] = ok
    kk = k.double().repeat_interleave(Hq // Hkv, 1)
    vv = v.double().repeat_interleave(Hq // Hkv, 1)
    s = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    has = keep.any(-1)
    p = torch.softmax(torch.where(has[..., None], s, 0.0), -1) * keep
    lse = torch.where(has, torch.logsumexp(torch.where(has[..., None], s, 0.0), -1), float("-inf"))
    return p @ vv, lse


@pytest.mark.parametrize("lists, causal, sink, window", [
    pytest.param("group", True, 0, 0, id="group-causal"),
    pytest.param("head", False, 0, 0, id="head-noncausal"),
    pytest.param("group", True, 3, 20, id="group-causal-sink3-window20"),
])
def test_reference_matches_brute_force(lists, causal, sink, window):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    B, Hq, Hkv, Nq, Nkv, block = 2, 4, 2, 37, 50, 16
    q, k, v = (torch.randn(B, h, n, 8, generator=gen) for h, n in ((Hq, Nq), (Hkv, Nkv), (Hkv, Nkv)))
    hs = Hkv if lists == "group" else Hq
    num, idx = random_block_lists(gen, B, hs, -(-Nq // block), -(-Nkv // block))
    out, lse = block_sparse_attention_ref(q, k, v, num, idx, block=block, scale=0.3, causal=causal,
                                          sink=sink, window=window)
    bo, bl = brute_force(q, k, v, num, idx, block=block, scale=0.3, causal=causal, sink=sink,
                         window=window)
    assert rel_err(out, bo) < 1e-6
    assert torch.equal(torch.isinf(lse), torch.isinf(bl))
    assert torch.allclose(lse[~torch.isinf(bl)].double(), bl[~torch.isinf(bl)], atol=1e-5)


def test_new_length_in_bucket_compiles_nothing():
    args = dict(B=1, Hq=4, Hkv=2, lists="group", D=64, Dv=64, block=64, dtype=torch.float32)
    q, k, v, num, idx = make_inputs(1, Nq=100, Nkv=100, **args)
    bsk.block_sparse_attention(q, k, v, num, idx, block=64, scale=0.125, causal=True)
    before = KERNELS.stats()
    q, k, v, num, idx = make_inputs(2, Nq=120, Nkv=113, **args)        # same buckets (128)
    err, _ = run_checked(q, k, v, num, idx, block=64, causal=True)
    after = KERNELS.stats()
    assert err <= TOL[torch.float32]
    assert after["compiles"] == before["compiles"] and after["hits"] >= before["hits"] + 1
    q, k, v, num, idx = make_inputs(3, Nq=300, Nkv=300, **args)        # next bucket: one build
    bsk.block_sparse_attention(q, k, v, num, idx, block=64, scale=0.125, causal=True)
    assert KERNELS.stats()["compiles"] == after["compiles"] + 1


def _bad(**change):
    q, k, v, num, idx = make_inputs(0, 1, 4, 2, "group", 100, 100, 64, 64, 64, torch.float32)
    args = dict(q=q, k=k, v=v, kv_num_blocks=num, kv_indices=idx, block=64, scale=0.125,
                causal=True)
    args.update({name: fn(args) for name, fn in change.items()})
    return args


@pytest.mark.parametrize("change, match", [
    pytest.param(dict(kv_indices=lambda a: a["kv_indices"].long()), "kv_indices must be an int32", id="idx-int64"),
    pytest.param(dict(kv_num_blocks=lambda a: a["kv_num_blocks"][:, :, :1]), r"kv_num_blocks must have shape \[1, \*, 2\]", id="num-short"),
    pytest.param(dict(kv_indices=lambda a: a["kv_indices"][:1, :1]), r"kv_indices must have shape \[1, 2, 2, \*\]", id="idx-heads"),
    pytest.param(dict(kv_num_blocks=lambda a: a["kv_num_blocks"].repeat(1, 3, 1)[:, :3].contiguous(),
                      kv_indices=lambda a: a["kv_indices"].repeat(1, 3, 1, 1)[:, :3].contiguous()),
                 "Hkv=2 .* or Hq=4", id="lists-3-heads"),
    pytest.param(dict(k=lambda a: a["k"].half()), "share a dtype", id="k-fp16"),
    pytest.param(dict(v=lambda a: a["v"][:, :, :50]), r"v must be \[1, 2, 100, Dv\]", id="v-short"),
    pytest.param(dict(q=lambda a: a["q"][:, :3]), "multiple of key heads", id="heads-3-2"),
    pytest.param(dict(block=lambda a: 48), "power of two", id="block-48"),
    pytest.param(dict(scale=lambda a: 0.0), "scale must be", id="scale-0"),
    pytest.param(dict(q=lambda a: a["q"][0]), "4-d tensor", id="q-3d"),
    pytest.param(dict(pack_gqa=lambda a: True, kv_num_blocks=lambda a: a["kv_num_blocks"].repeat(1, 2, 1),
                      kv_indices=lambda a: a["kv_indices"].repeat(1, 2, 1, 1)), "pack_gqa=True needs", id="pack-per-head"),
])
def test_invalid_arguments(change, match):
    args = _bad(**change)
    with pytest.raises(ValueError, match=match):
        bsk.block_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"),
                                  args.pop("kv_num_blocks"), args.pop("kv_indices"), **args)


@pytest.mark.parametrize("split_full", [True, False], ids=["split-full", "all-partial"])
def test_flex_block_mask_round_trip_and_semantics(split_full):
    """Same block set after a round trip; FlexAttention (eager) computes what the reference does."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    B, Hq, Hkv, Nq, Nkv, block, D = 1, 4, 2, 256, 384, 128, 16
    num, idx = random_block_lists(gen, B, Hkv, Nq // block, Nkv // block, p_empty=0.0)
    bm = to_flex_block_mask(num, idx, block=block, n_q=Nq, n_kv=Nkv, causal=True,
                            num_q_heads=Hq, split_full=split_full, exact_mask_mod=False)
    num2, idx2 = from_flex_block_mask(bm)
    want = block_lists_to_dense(num, idx, Nkv // block).repeat_interleave(Hq // Hkv, 1)
    assert torch.equal(block_lists_to_dense(num2, idx2, Nkv // block), want)
    q = torch.randn(B, Hq, Nq, D, generator=gen)
    k, v = torch.randn(B, Hkv, Nkv, D, generator=gen), torch.randn(B, Hkv, Nkv, D, generator=gen)
    bm = to_flex_block_mask(num, idx, block=block, n_q=Nq, n_kv=Nkv, causal=True,
                            num_q_heads=Hq, split_full=split_full, exact_mask_mod=True)
    out = flex.flex_attention(q, k, v, block_mask=bm, scale=0.25, enable_gqa=True)
    ref, ref_lse = block_sparse_attention_ref(q, k, v, num, idx, block=block, scale=0.25, causal=True)
    fin = ~torch.isinf(ref_lse)
    assert rel_err(out[fin], ref[fin]) < 1e-4


def _triton_variants(fn) -> int:
    caches = getattr(fn, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps no device_caches to count compiled variants")
    return sum(len(c[0]) for c in caches.values())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_gqa_d128_and_no_triton_recompile(dtype):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, num, idx = make_inputs(seed, 2, 8, 2, "group", 1000, 1000, 128, 128, 128, dtype)
    err, _ = run_checked(q, k, v, num, idx, block=128, causal=True)
    assert err <= TOL[dtype], f"seed {seed}: {err:.2e}"
    mod = [m for key, m in KERNELS._entries.items()
           if key[0] == "block_sparse" and key[2][0] == str(dtype) and key[-1] == (1024, 1024)][0]
    n0 = _triton_variants(mod.block_sparse_fwd)
    q, k, v, num, idx = make_inputs(seed + 1, 2, 8, 2, "group", 1013, 999, 128, 128, 128, dtype)
    err, _ = run_checked(q, k, v, num, idx, block=128, causal=True)
    assert err <= TOL[dtype]
    assert _triton_variants(mod.block_sparse_fwd) == n0, "a new length recompiled the kernel"
