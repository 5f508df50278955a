"""Token-sparse (gather) attention backward: the reference is differentiable (gradcheck in
float64) and its explicit backward agrees with autograd; the Triton backward (CPU: Triton's
interpreter) agrees with the reference for every list layout (Hs = 1, Hkv, Hq), GQA group and
split, with keys picked by many rows so the dK/dV atomics collide; the autograd Function runs
either path and serves inputs of which only some require grad.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from codegen.common import Schedule  # noqa: E402
from codegen.token_sparse import (token_sparse_attention_bwd_ref,  # noqa: E402
                                  token_sparse_attention_ref)
from runtime.kernels import launch, token_sparse as tsk  # noqa: E402
from runtime.kernels.token_sparse import token_sparse_attention_fn  # noqa: E402
from kernel_checks import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 2e-3,
       torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def poison_workspace(monkeypatch):
    """dQ and the delta pre-pass start as NaN: an element no program wrote reaches the result."""
    monkeypatch.setattr(launch, "POISON_WORKSPACE", True)


def hot_indices(gen, B, hs, Nq, K, Nkv, *, hot=3, p_pad=0.2):
    """int32 [B, hs, Nq, K]: distinct keys per row in random order, keys 0..hot-1 in every row
    (dK/dV atomics of many programs collide on them), -1 padding, row 1 of each list empty."""
    idx = torch.full((B, hs, Nq, K), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(hs):
            for i in range(Nq):
                if i == 1:
                    continue
                row = torch.cat([torch.arange(hot), hot + torch.randperm(Nkv - hot, generator=gen)])[:K]
                row = row.to(torch.int32)
                row[hot:][torch.rand(K - hot, generator=gen) < p_pad] = -1
                idx[b, h, i] = row[torch.randperm(K, generator=gen)]
    return idx


def make_inputs(seed, B, Hq, Hkv, hs, Nq, Nkv, K, D, Dv, dtype, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(device, dtype)        # [B, Hq, Nq, D]
    k = torch.randn(B, Hkv, Nkv, D, generator=gen).to(device, dtype)      # [B, Hkv, Nkv, D]
    v = torch.randn(B, Hkv, Nkv, Dv, generator=gen).to(device, dtype)     # [B, Hkv, Nkv, Dv]
    idx = hot_indices(gen, B, hs, Nq, K, Nkv).to(device)                  # [B, Hs, Nq, K]
    dout = torch.randn(B, Hq, Nq, Dv, generator=gen).to(device, dtype)    # [B, Hq, Nq, Dv]
    return q, k, v, idx, dout


def exact_grads(q, k, v, idx, dout, scale):
    """float64 reference gradients of the (already rounded) inputs."""
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    out, lse = token_sparse_attention_ref(q64, k64, v64, idx, scale=scale)
    return token_sparse_attention_bwd_ref(q64, k64, v64, idx, out, lse, do64, scale=scale)


# ----------------------------------------------------------------------------- reference

#                 Hkv, Hs
TINY = [pytest.param(2, 1, id="KV2-shared"), pytest.param(2, 2, id="KV2-group"),
        pytest.param(2, 4, id="KV2-head"), pytest.param(1, 1, id="KV1-shared"),
        pytest.param(1, 4, id="KV1-head")]


@pytest.mark.parametrize("path", ["autograd-ref", "function-ref"])
@pytest.mark.parametrize("Hkv, hs", TINY)
def test_gradcheck_reference(Hkv, hs, path, monkeypatch):
    """B=2, Hq=4, Nq=5, Nkv=9, K=4, D=8, float64, padding and an empty row."""
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, idx, _ = make_inputs(seed, 2, 4, Hkv, hs, 5, 9, 4, 8, 8, torch.float64, device="cpu")
    idx[:, :, 0, 0] = -1                                   # padding in every list (row 1 is empty)
    if path == "autograd-ref":
        fn = lambda q, k, v: token_sparse_attention_ref(q, k, v, idx, scale=0.4)[0]  # noqa: E731
    else:
        fn = lambda q, k, v: token_sparse_attention_fn(q, k, v, idx, scale=0.4)  # noqa: E731
    args = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(fn, args), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("Hkv, hs", TINY)
def test_explicit_backward_matches_autograd(Hkv, hs, dtype):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, idx, dout = make_inputs(seed, 2, 4, Hkv, hs, 7, 23, 10, 16, 12, dtype, device="cpu")
    args = [t.requires_grad_() for t in (q, k, v)]
    out, lse = token_sparse_attention_ref(*args, idx, scale=0.3)
    want = torch.autograd.grad(out, args, dout)
    got = token_sparse_attention_bwd_ref(q, k, v, idx, out.detach(), lse, dout, scale=0.3)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert rel_err(g, w) < tol, f"seed {seed}: d{name} {rel_err(g, w):.1e}"
    assert (got[0][:, :, 1] == 0).all(), "an empty row has dq = 0"


# ----------------------------------------------------------------------------- kernels

#                B, Hq, Hkv, Hs, Nq, Nkv, K, D, Dv
SHAPES = [
    pytest.param(2, 2, 2, 2, 13, 37, 8, 16, 16, id="mha-group-K8-D16"),
    pytest.param(1, 3, 3, 1, 13, 37, 16, 32, 24, id="mha-shared-K16-D32-Dv24"),
    pytest.param(2, 4, 2, 1, 13, 37, 16, 32, 32, id="gqa2-shared-K16-D32"),
    pytest.param(2, 4, 2, 2, 13, 37, 8, 16, 16, id="gqa2-group-K8-D16"),
    pytest.param(1, 4, 2, 4, 13, 37, 16, 20, 32, id="gqa2-head-K16-D20"),
    pytest.param(1, 8, 2, 1, 13, 37, 16, 32, 32, id="gqa4-shared-K16-D32"),
    pytest.param(1, 8, 2, 8, 13, 37, 8, 16, 16, id="gqa4-head-K8-D16"),
    pytest.param(2, 4, 1, 1, 13, 37, 16, 24, 16, id="mqa4-shared-K16-D24"),
]


def check_kernel_grads(q, k, v, idx, dout, seed, schedule=None):
    scale = q.shape[-1] ** -0.5
    out, lse = tsk.token_sparse_attention(q, k, v, idx, scale=scale)
    got = tsk.token_sparse_attention_bwd(q, k, v, idx, out, lse, dout, scale=scale,
                                        schedule=schedule)
    want = exact_grads(q, k, v, idx, dout, scale)
    B, Hq, Hkv, Nkv = q.shape[0], q.shape[1], k.shape[1], k.shape[2]
    lists = idx.long().repeat_interleave(Hq // idx.shape[1], 1) + 1        # [B, Hq, Nq, K], 0 = pad
    named = torch.zeros(B, Hkv, Nkv + 1, dtype=torch.bool, device=q.device)
    named.scatter_(2, lists.reshape(B, Hkv, -1), True)                     # a KV head's group
    unused = ~named[..., 1:]                                               # [B, Hkv, Nkv]
    for name, g, w, t in zip("qkv", got, want, (q, k, v)):
        assert g.dtype == t.dtype and g.shape == t.shape, f"d{name}: {g.dtype} {tuple(g.shape)}"
        assert not g.isnan().any(), f"seed {seed}: d{name} holds NaN (unwritten or 0 * inf)"
        err = rel_err(g, w)
        assert err <= TOL[q.dtype], f"seed {seed}: d{name} relative error {err:.2e} > {TOL[q.dtype]:.0e}"
    assert (got[0][:, :, 1] == 0).all(), "empty rows must give dq = 0"
    assert (got[1][unused] == 0).all() and (got[2][unused] == 0).all(), "keys no list names get 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("B, Hq, Hkv, hs, Nq, Nkv, K, D, Dv", SHAPES)
def test_kernel_backward_matches_reference(B, Hq, Hkv, hs, Nq, Nkv, K, D, Dv, dtype):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    check_kernel_grads(*make_inputs(seed, B, Hq, Hkv, hs, Nq, Nkv, K, D, Dv, dtype), seed)


@pytest.mark.parametrize("split", [16, 32], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("Hq, Hkv, hs", [(4, 1, 1), (4, 2, 4)], ids=["mqa-shared", "gqa2-head"])
def test_split_backward_adds_dq_atomically(Hq, Hkv, hs, split):
    """Lists split over programs: dQ adds up in fp32 across splits (incl. splits of padding)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, idx, dout = make_inputs(seed, 2, Hq, Hkv, hs, 3, 90, 60, 32, 32, torch.float32)
    idx[0, :, :, 16:40] = -1
    check_kernel_grads(q, k, v, idx, dout, seed,
                       Schedule(block_m=16, block_n=16, num_warps=4, num_stages=1, split=split))


@pytest.mark.parametrize("change, match", [
    pytest.param(dict(lse=lambda a: a["lse"].half()), "lse must be a torch.float32", id="lse-fp16"),
    pytest.param(dict(dout=lambda a: a["dout"][:, :, :2]), r"dout must be .* \[2, 4, 3, 32\]", id="dout-rows"),
    pytest.param(dict(out=lambda a: a["out"].double()), "out must be a torch.float32", id="out-fp64"),
    pytest.param(dict(indices=lambda a: a["indices"].repeat(1, 3, 1, 1)), "1 .*, Hkv=2 .* or Hq=4", id="idx-6-heads"),
    pytest.param(dict(scale=lambda a: -1.0), "scale must be", id="scale-negative"),
])
def test_backward_invalid_arguments(change, match):
    q, k, v, idx, dout = make_inputs(0, 2, 4, 2, 1, 3, 40, 8, 32, 32, torch.float32)
    out, lse = tsk.token_sparse_attention(q, k, v, idx, scale=0.2)
    args = dict(q=q, k=k, v=v, indices=idx, out=out, lse=lse, dout=dout, scale=0.2)
    args.update({name: fn(args) for name, fn in change.items()})
    tensors = [args.pop(n) for n in ("q", "k", "v", "indices", "out", "lse", "dout")]
    with pytest.raises(ValueError, match=match):
        tsk.token_sparse_attention_bwd(*tensors, **args)


# ----------------------------------------------------------------------------- autograd

@pytest.mark.parametrize("needs", ["qkv", "q", "kv", "v"])
@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_function_matches_reference_autograd(mode, needs, monkeypatch):
    """Either path, any subset of q, k, v requiring grad, int64 lists (topk's dtype)."""
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", mode)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, idx, dout = make_inputs(seed, 2, 4, 2, 1, 9, 30, 8, 16, 16, torch.float32)
    assert launch.kernels_enabled(q) == (mode == "triton")
    leaves = dict(zip("qkv", (q, k, v)))
    for name in needs:
        leaves[name].requires_grad_()
    out = token_sparse_attention_fn(q, k, v, idx.long(), scale=0.25)
    ref, _ = token_sparse_attention_ref(q, k, v, idx, scale=0.25)
    assert rel_err(out, ref) < 1e-5
    out.backward(dout)
    want = exact_grads(q.detach(), k.detach(), v.detach(), idx, dout, 0.25)
    for name, w in zip("qkv", want):
        g = leaves[name].grad
        if name not in needs:
            assert g is None
        else:
            assert rel_err(g, w) < 1e-5, f"seed {seed}: d{name} {rel_err(g, w):.1e}"
