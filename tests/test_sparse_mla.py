"""Token-sparse MLA attention in its absorbed form (``codegen.mla``): the Triton forward against
its PyTorch reference at small odd shapes (through the interpreter on CPU), and the absorbed form
against the model's decompressed per-head attention.

Outputs are poisoned (NaN) before the kernel writes them; every case draws fresh inputs (the
per-test seed); tolerances by dtype.
"""
import os

import pytest
import torch

from codegen.mla.reference import (absorb_query, decompressed_reference, expand_output,
                                   sparse_mla_reference, split_kv_b)
from runtime.kernels import sparse_mla as sm

TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def _lists(B, S, T, K, empty_rows=(), short_rows=()):
    """int32 [B, S, K]: distinct keys per row, -1 padding in ``short_rows``, none in
    ``empty_rows``; entries past T (K > T) are -1."""
    idx = torch.full((B, S, K), -1, dtype=torch.int32)
    for b in range(B):
        for s in range(S):
            n = min(K, T)
            idx[b, s, :n] = torch.randperm(T)[:n].int()
    for b, s in short_rows:
        idx[b, s, 2:] = -1
    for b, s in empty_rows:
        idx[b, s] = -1
    return idx


CASES = [
    pytest.param(1, 3, 5, 40, 7, 40, 12, 40, id="B1-S3-H5-T40-K7-DL40-DR12"),
    pytest.param(2, 5, 20, 37, 19, 24, 8, 24, id="B2-S5-H20-T37-K19-DL24-DR8"),
    pytest.param(1, 1, 33, 63, 80, 48, 16, 48, id="decode-B1-H33-T63-K80"),
    pytest.param(2, 4, 17, 29, 13, 40, 12, 30, id="dv30-of-DL40"),
]


@pytest.fixture
def triton_kernels(monkeypatch):
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    monkeypatch.setattr(sm, "POISON_OUTPUT", True)
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, S, H, T, K, DL, DR, DV", CASES)
def test_kernel_matches_the_reference(triton_kernels, B, S, H, T, K, DL, DR, DV, dtype):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(B, S, H, DL + DR).to(dev, dtype)
    kv = torch.randn(B, T, DL + DR).to(dev, dtype)
    idx = _lists(B, S, T, K, empty_rows=[(B - 1, S - 1)] if S > 1 else [],
                 short_rows=[(0, 0)]).to(dev)
    scale = (DL + DR) ** -0.5
    out, lse = sm.sparse_mla(q, kv, idx, scale=scale, dv=DV, dl=DL,
                             schedule=sm.MLASchedule(block_h=16, block_n=16, num_warps=4))
    ref, ref_lse = sparse_mla_reference(q, kv, idx, scale=scale, dv=DV)
    assert out.dtype == dtype and not out.isnan().any() and not lse.isnan().any()
    err = (out.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)
    assert err <= TOL[dtype], err
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin] - ref_lse[fin]).abs().max() <= 10 * TOL[dtype]
    if S > 1:                                          # a row that names no key: 0 and -inf
        assert (out[B - 1, S - 1] == 0).all() and (lse[B - 1, S - 1] == float("-inf")).all()


@pytest.mark.parametrize("splits", [2, 3, 50], ids=["2-parts", "3-parts", "more-than-blocks"])
@pytest.mark.parametrize("B, S, H, T, K", [(1, 1, 20, 70, 53), (2, 3, 5, 40, 37)],
                         ids=["decode", "rows"])
def test_split_lists_merge_to_the_reference(triton_kernels, B, S, H, T, K, splits):
    """Each row's list split into parts (decode rows fill the device this way), merged by their
    log-sum-exp: the reference's output, a part of only -1 entries included (short rows), and
    a row naming no key stays 0 / -inf."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    DL, DR = 24, 8
    q = torch.randn(B, S, H, DL + DR).to(dev)
    kv = torch.randn(B, T, DL + DR).to(dev)
    idx = _lists(B, S, T, K, empty_rows=[(B - 1, S - 1)] if S > 1 else [],
                 short_rows=[(0, 0)]).to(dev)
    sch = sm.MLASchedule(block_h=16, block_n=16, num_warps=4, splits=splits)
    n, ks = sm.parts(1, K, sch, dev)
    assert n > 1 and n * ks >= K and ks % 16 == 0
    out, lse = sm.sparse_mla(q, kv, idx, scale=0.2, dv=DL, schedule=sch)
    ref, ref_lse = sparse_mla_reference(q, kv, idx, scale=0.2, dv=DL)
    assert out.shape == ref.shape and not out.isnan().any()
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin] - ref_lse[fin]).abs().max() <= 1e-4
    if S > 1:
        assert (out[B - 1, S - 1] == 0).all()


def test_parts_split_only_grids_smaller_than_the_device():
    sch = sm.MLASchedule()
    assert sm.parts(4, 2048, sch, "cpu") == (1, 2048)               # no split off CUDA
    assert sm.parts(4, 2048, sm.MLASchedule(splits=8), "cpu") == (8, 256)
    assert sm.parts(4, 40, sm.MLASchedule(block_n=32, splits=8), "cpu") == (2, 32)
    with pytest.raises(ValueError, match="splits must be >= 0"):
        sm.MLASchedule(splits=-1)


def test_kernel_with_values_of_their_own(triton_kernels):
    B, S, H, T, K, D, DV = 1, 3, 18, 21, 9, 36, 20
    q, kv, v = torch.randn(B, S, H, D), torch.randn(B, T, D), torch.randn(B, T, DV)
    idx = _lists(B, S, T, K)
    out, lse = sm.sparse_mla(q, kv, idx, scale=0.2, dv=DV, dl=24, v=v,
                             schedule=sm.MLASchedule(block_h=16, block_n=16, num_warps=4))
    ref, _ = sm._reference_separate_v(q, kv, v, idx, 0.2)
    assert (out - ref).abs().max() <= 1e-5


def test_absorbed_form_equals_the_decompressed_attention():
    """q_nope W_UK attends to the latent, the output times W_UV: the model's per-head K/V."""
    B, S, T, H, r, dr, nope, dv, K = 2, 6, 23, 5, 24, 8, 12, 10, 9
    c, k_rope = torch.randn(B, T, r), torch.randn(B, T, dr)
    q_nope, q_rope = torch.randn(B, S, H, nope), torch.randn(B, S, H, dr)
    w_kvb = torch.randn(H * (nope + dv), r) / r ** 0.5
    idx = _lists(B, S, T, K, short_rows=[(1, 2)])
    scale = (nope + dr) ** -0.5
    ref = decompressed_reference(q_nope, q_rope, c, k_rope, w_kvb, idx, scale=scale,
                                 nope=nope, dv=dv)
    w_uk, w_uv = split_kv_b(w_kvb, H, nope, dv)
    o_lat, _ = sparse_mla_reference(absorb_query(q_nope, q_rope, w_uk),
                                    torch.cat([c, k_rope], -1), idx, scale=scale, dv=r)
    torch.testing.assert_close(expand_output(o_lat, w_uv), ref, atol=1e-5, rtol=1e-5)


def test_bad_arguments_say_what_was_expected():
    q, kv = torch.randn(1, 2, 3, 24), torch.randn(1, 5, 20)
    with pytest.raises(ValueError, match=r"kv must be \[B=1, T, Dk=24\]"):
        sm.sparse_mla(q, kv, torch.zeros(1, 2, 3, dtype=torch.int32), scale=1.0, dv=16)
    with pytest.raises(ValueError, match="power of two"):
        sm.MLASchedule(block_h=24)


def test_flops_count():
    assert sm.flops(1, 4096, 128, 2048, 576, 512) == 2.0 * 4096 * 128 * 2048 * 1088
