"""The PyTorch references of codegen/ against loop-based definitions (tests/brute.py)."""
import pytest
import torch

from brute import block_topk_keep, causal_visible, dense_with_keep, sink_window_keep
from codegen.attention import attention_reference
from codegen.select import (allowed_blocks, block_keep_fn, blocks_from_mask, mask_from_blocks,
                            pooled_block_scores, select_topk_blocks, window_blocks, window_keep_fn)

CASES = [
    pytest.param(2, 4, 4, 37, 37, 20, None, id="B2-H4-N37-D20-full"),
    pytest.param(1, 6, 2, 33, 53, 16, "lower_right", id="B1-H6kv2-Nq33-Nkv53-D16-lower_right"),
    pytest.param(2, 3, 1, 29, 29, 8, "upper_left", id="B2-H3kv1-N29-D8-upper_left"),
    pytest.param(1, 2, 2, 1, 40, 16, "lower_right", id="B1-H2-decode-Nkv40"),
]


def _qkv(B, Hq, Hkv, Nq, Nkv, D):
    return (torch.randn(B, Hq, Nq, D), torch.randn(B, Hkv, Nkv, D), torch.randn(B, Hkv, Nkv, D))


@pytest.mark.parametrize("B, Hq, Hkv, Nq, Nkv, D, causal", CASES)
def test_attention_reference_matches_definition_with_modifiers(B, Hq, Hkv, Nq, Nkv, D, causal):
    q, k, v = _qkv(B, Hq, Hkv, Nq, Nkv, D)
    add = torch.randn(B, 1, Nq, Nkv)
    add[..., : Nkv // 5] = torch.finfo(torch.float32).min           # padded keys
    fill = torch.rand(1, Hq, Nq, Nkv) < 0.2
    keep_t = torch.rand(B, Hq, Nq, Nkv) > 0.1
    mods = (("add",), ("fill", float("-inf")), ("keep",))
    out, lse = attention_reference(q, k, v, scale=0.3, mods=mods, mod_tensors=[add, fill, keep_t],
                                   causal=causal, chunk=7)
    # definition
    s_keep = torch.zeros(B, Hq, Nq, Nkv, dtype=torch.bool)
    G = Hq // Hkv
    exp = torch.zeros(B, Hq, Nq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            s = q[b, h].double() @ k[b, h // G].double().T * 0.3 + add[b, 0].double()
            s = s.masked_fill(fill[0, h], float("-inf")).masked_fill(~keep_t[b, h], float("-inf"))
            for i in range(Nq):
                for j in range(Nkv):
                    if not causal_visible(i, j, Nq, Nkv, causal):
                        s[i, j] = float("-inf")
            p = torch.softmax(s, -1).nan_to_num(0.0)
            exp[b, h] = p @ v[b, h // G].double()
            s_keep[b, h] = torch.isfinite(s)
    assert torch.allclose(out.double(), exp, atol=1e-5)
    rows_empty = ~s_keep.any(-1)
    assert torch.all(torch.isneginf(lse[rows_empty]))


@pytest.mark.parametrize("B, Hq, Hkv, Nq, Nkv, D, causal", CASES)
@pytest.mark.parametrize("block, topk, sink_blocks, local_blocks", [
    pytest.param(8, 1, 1, 1, id="blk8-top1"), pytest.param(16, 2, 0, 2, id="blk16-top2-nosink"),
    pytest.param(5, 0, 1, 1, id="blk5-top0")])
def test_block_topk_selection_matches_definition(B, Hq, Hkv, Nq, Nkv, D, causal, block, topk,
                                                 sink_blocks, local_blocks):
    q, k, v = _qkv(B, Hq, Hkv, Nq, Nkv, D)
    ok = allowed_blocks(q.shape, k.shape, (), (), causal, block)
    sc = pooled_block_scores(q, k, 0.25, block, ok)
    counts, idx = select_topk_blocks(sc, Nq, Nkv, causal, block, topk=topk,
                                     sink_blocks=sink_blocks, local_blocks=local_blocks)
    keep = block_keep_fn(counts, idx, block, Nkv)(0, Nq)
    keep = keep.repeat_interleave(Hq // Hkv, dim=1)
    exp = block_topk_keep(q, k, block=block, topk=topk, sink_blocks=sink_blocks,
                          local_blocks=local_blocks, scale=0.25, causal=causal)
    vis = sink_window_keep(B, Hq, Nq, Nkv, sink=10 ** 9, window=10 ** 9, causal=causal)
    assert torch.equal(keep & vis, exp)


@pytest.mark.parametrize("B, Hq, Hkv, Nq, Nkv, D, causal", CASES)
@pytest.mark.parametrize("sink, window, block", [(2, 5, 8), (0, 1, 4), (4, 100, 16)])
def test_sink_window_keep_matches_definition(B, Hq, Hkv, Nq, Nkv, D, causal, sink, window, block):
    counts, idx = window_blocks(B, Hkv, Nq, Nkv, causal, block, sink=sink, window=window)
    keep = block_keep_fn(counts, idx, block, Nkv)(0, Nq) & window_keep_fn(
        Nq, Nkv, causal, sink=sink, window=window)(0, Nq)
    keep = keep.repeat_interleave(Hq // Hkv, dim=1)
    vis = sink_window_keep(B, Hq, Nq, Nkv, sink=10 ** 9, window=10 ** 9, causal=causal)
    assert torch.equal(keep.expand(B, Hq, Nq, Nkv) & vis,
                       sink_window_keep(B, Hq, Nq, Nkv, sink=sink, window=window, causal=causal))


def test_block_list_round_trip_and_layout():
    sel = torch.rand(2, 3, 5, 7) > 0.5
    counts, idx = blocks_from_mask(sel)
    assert counts.dtype == torch.int32 and idx.dtype == torch.int32
    assert torch.equal(mask_from_blocks(counts, idx, 7), sel)
    for b, h, r in [(0, 0, 0), (1, 2, 4)]:
        n = int(counts[b, h, r])
        listed = idx[b, h, r, :n].tolist()
        assert listed == sorted(listed) and all(i == -1 for i in idx[b, h, r, n:].tolist())


def test_reference_sparse_attention_equals_dense_on_kept_pairs():
    q, k, v = _qkv(1, 4, 2, 45, 45, 16)
    ok = allowed_blocks(q.shape, k.shape, (), (), "lower_right", 8)
    counts, idx = select_topk_blocks(pooled_block_scores(q, k, 0.25, 8, ok), 45, 45,
                                     "lower_right", 8, topk=1, sink_blocks=1, local_blocks=1)
    out, _ = attention_reference(q, k, v, scale=0.25, causal="lower_right",
                                 keep=block_keep_fn(counts, idx, 8, 45), chunk=16)
    keep = block_topk_keep(q, k, block=8, topk=1, sink_blocks=1, local_blocks=1, scale=0.25,
                           causal="lower_right")
    assert torch.allclose(out.double(), dense_with_keep(q, k, v, keep, 0.25), atol=1e-5)
