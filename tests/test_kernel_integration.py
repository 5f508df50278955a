"""sparse.attend through the Triton block-sparse kernel (CPU: Triton interpreter) vs the
reference path, end to end through planner.compile."""
import pytest
import torch
import torch.nn.functional as F

import planner
from runtime.kernels import launch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not launch.runs_triton(DEV),
                                reason="needs CUDA or TRITON_INTERPRET=1")


def _attn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("pol", [
    pytest.param(planner.policy("block_topk", block=16, topk=1), id="block_topk"),
    pytest.param(planner.policy("sink_window", sink=3, window=20), id="sink_window"),
    pytest.param(planner.policy("longformer", window=9, global_tokens=5, block=16),
                 id="longformer"),
    pytest.param(planner.policy("threshold", gamma=0.7, block=16), id="threshold"),
])
def test_compiled_site_runs_triton_kernel_and_matches_reference(pol, monkeypatch):
    q, k, v = (torch.randn(1, h, 70, 16, device=DEV) for h in (4, 2, 2))
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    f_ref = planner.compile(_attn, policy=pol, cost_model="off")
    ref = f_ref(q, k, v)
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    f = planner.compile(_attn, policy=pol, cost_model="off")     # the kernel, not dense
    out = f(q, k, v)
    site = planner.inspect(f).sites[0]
    assert site.kernel == "triton_block_sparse"
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel
    ref_site = planner.inspect(f_ref).sites[0]
    assert ref_site.kernel == "reference"
    # block lists counted per block, token windows by their rule: the reference's pairs
    assert site.density is not None and site.density < 1.0
    assert site.density == pytest.approx(ref_site.density)
    assert site.density_per_head == pytest.approx(ref_site.density_per_head)


def test_a_mask_tensor_runs_in_the_kernel_and_one_it_cannot_apply_falls_back(monkeypatch):
    """A boolean mask tensor is read by the block-sparse kernel (same output as the reference);
    a soft-cap applied after a mask (no kernel composes them that way) runs the reference."""
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")

    def attn(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    q = torch.randn(1, 2, 40, 16, device=DEV)
    m = torch.rand(1, 1, 40, 40, device=DEV) > 0.3
    m[..., 0] = True
    pol = planner.policy("block_topk", block=16, topk=1)
    f = planner.compile(attn, policy=pol, cost_model="off")
    out = f(q, q, q, m)
    assert planner.inspect(f).sites[0].kernel == "triton_block_sparse"
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    g = planner.compile(attn, policy=pol, cost_model="off")
    assert (g(q, q, q, m) - out).abs().max().item() < 1e-5

    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")

    def capped_after_mask(q, k, v, bias):
        s = q @ k.transpose(-2, -1) * 0.25 + bias
        s = torch.tanh(s / 10.0) * 10.0
        return torch.softmax(s, -1) @ v
    h = planner.compile(capped_after_mask, policy=pol, cost_model="off")
    h(q, q, q, torch.randn(1, 1, 40, 40, device=DEV))
    assert planner.inspect(h).sites[0].kernel.startswith("reference")
