"""The warp-specialized Gluon block-sparse kernel (codegen/block_sparse/wgmma_kernel.py).

Everywhere: it compiles for sm_90 without a GPU (Triton's offline target) into a loader and
consumers with their own register budgets, wgmma products and TMA copies; cases it does not
cover are named and run the Triton kernel instead. On a Hopper GPU: the kernel against the
reference, one program per tile and persistent.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from codegen.block_sparse import wgmma_kernel  # noqa: E402
from codegen.common import BlockSparseSpec, Schedule  # noqa: E402
from runtime.kernels import block_sparse as bsk, launch  # noqa: E402
from test_kernels_block_sparse import TOL, LSE_TOL, make_inputs, run_checked  # noqa: E402

WG = Schedule(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True, wgmma=True)
WG_PERSISTENT = Schedule(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True,
                         persistent=1, wgmma=True)
hopper = pytest.mark.skipif(not (torch.cuda.is_available()
                                 and torch.cuda.get_device_capability()[0] == 9),
                            reason="needs a Hopper GPU")


def _spec(**change):
    base = dict(head_dim=128, v_head_dim=128, gqa_group=1, pack_gqa=False, lists_per_group=True,
                causal=True, dtype="bfloat16", block=128, stride_align=8)
    base.update(change)
    return BlockSparseSpec(**base)


_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from codegen.common import BlockSparseSpec, Schedule
from codegen.emit import emit
from runtime.loader import load
from codegen.block_sparse import wgmma_kernel
spec, sch = eval(sys.argv[1]), Schedule(**eval(sys.argv[2]))
fn = load(emit(spec, sch)).block_sparse_fwd
el = "*bf16" if spec.dtype == "bfloat16" else "*fp16"
types = {"Q": el, "K": el, "V": el, "O": el, "LSE": "*fp32", "KV_NUM": "*i32", "KV_IDX": "*i32",
         "qk_scale": "fp32"}
sig = {n: types.get(n, "i32") for n in fn.arg_names}
k = triton.compile(GluonASTSource(fn, sig), target=GPUTarget("cuda", 90, 128),
                   options=dict(num_warps=wgmma_kernel.LAUNCH_WARPS))
sys.stdout.write(k.asm["ptx"])
"""


def _compile_sm90(spec):
    """PTX of the kernel compiled offline for sm_90 (no GPU needed). In a fresh process: the
    interpreter that the CPU tests switch on would turn Gluon's library functions into
    interpreted ones."""
    pytest.importorskip("triton.experimental.gluon._runtime")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _COMPILE, repr(spec), repr(dict(block_m=WG.block_m, block_n=WG.block_n, num_warps=WG.num_warps, num_stages=WG.num_stages, tma=WG.tma, wgmma=True))], env=env, cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("spec", [
    pytest.param(_spec(), id="bf16-d128-causal"),
    pytest.param(_spec(dtype="float16", head_dim=64, v_head_dim=64, causal=False, windowed=True,
                       gqa_group=4, lists_per_group=False), id="fp16-d64-window-gqa-head-lists"),
])
def test_compiles_for_sm90_warp_specialized(spec):
    ptx = _compile_sm90(spec)
    # two consumer warpgroups and a loader warp with their own register budgets
    assert "setmaxnreg.dec.sync.aligned.u32 \t24" in ptx
    assert "setmaxnreg.inc.sync.aligned.u32" in ptx
    n = 128 if spec.head_dim == 128 else 64
    assert f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32" in ptx
    # Q/K/V tiles in through 4-D descriptors made once per program, the output out through a
    # 3-D one (rows clipped at Nq per head)
    assert "cp.async.bulk.tensor.4d.shared::" in ptx and "mbarrier.try_wait" in ptx
    assert "cp.async.bulk.tensor.3d.global.shared::cta" in ptx
    assert ptx.count("tensormap.replace.tile.global_address") == 5
    assert ".local" not in ptx, "register spills in the PTX"


@pytest.mark.parametrize("change, why", [
    (dict(dtype="float32"), "dtype float32"),
    (dict(head_dim=96, v_head_dim=96), "head dims 96/96"),
    (dict(v_head_dim=64), "head dims 128/64"),
    (dict(block=64), "mask block 64"),
    (dict(pack_gqa=True, gqa_group=4), "GQA packing"),
    (dict(stride_align=4), "strides aligned to 4"),
])
def test_unsupported_cases_are_named(change, why):
    assert not wgmma_kernel.supported(_spec(**change), WG)
    assert why in wgmma_kernel.unsupported_reason(_spec(**change), WG)
    with pytest.raises(ValueError, match="does not cover"):
        wgmma_kernel.render(_spec(**change), WG)


def test_other_devices_run_the_triton_kernel():
    """Off Hopper (here: the CPU interpreter, or another GPU) the schedule runs kernel.py."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        pytest.skip("this device runs the warpgroup-MMA kernel")
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    dtype = torch.float16
    q, k, v, num, idx = make_inputs(seed, 1, 2, 2, "group", 130, 130, 64, 64, 128, dtype)
    err, lse_err = run_checked(q, k, v, num, idx, block=128, causal=True, schedule=WG)
    assert err <= TOL[dtype] and lse_err <= LSE_TOL[dtype], f"seed {seed}: {err:.2e}"


def test_hopper_first_keeps_the_given_schedule_elsewhere():
    """``hopper_first`` swaps a given schedule for the Hopper kernel only where that covers the
    call; off Hopper the given schedule runs, and ``return_schedule`` says which ran."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        pytest.skip("this device runs the warpgroup-MMA kernel")
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    dtype = torch.float16
    q, k, v, num, idx = make_inputs(seed, 1, 2, 2, "group", 130, 130, 64, 64, 128, dtype)
    given = Schedule(block_m=64, block_n=32, num_warps=4, num_stages=2)
    out, lse, ran = bsk.block_sparse_attention(q, k, v, num, idx, block=128, scale=0.125,
                                              causal=True, schedule=given, hopper_first=True,
                                              return_schedule=True)
    assert ran == given
    ref, _ = bsk.block_sparse_attention(q, k, v, num, idx, block=128, scale=0.125, causal=True,
                                       schedule=given)
    assert torch.equal(out, ref), f"seed {seed}"


#            B, Hq, Hkv, lists, Nq, Nkv, D, causal, sink, window
GPU_SHAPES = [
    pytest.param(2, 8, 2, "group", 1000, 1000, 128, True, 0, 0, id="gqa-N1000-causal"),
    pytest.param(1, 4, 4, "head", 1013, 999, 128, True, 0, 0, id="Nq1013-Nkv999-causal"),
    pytest.param(1, 4, 2, "head", 700, 1300, 128, False, 0, 0, id="Nq700-Nkv1300-noncausal"),
    pytest.param(2, 4, 1, "group", 384, 384, 64, True, 0, 0, id="mqa-D64-N384"),
    pytest.param(1, 4, 2, "group", 900, 900, 128, True, 4, 200, id="window200-sink4"),
    pytest.param(1, 2, 2, "group", 60, 300, 128, True, 0, 0, id="Nq60-decode-like"),
]


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("sch", [WG, WG_PERSISTENT], ids=["per-tile", "persistent"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B, Hq, Hkv, lists, Nq, Nkv, D, causal, sink, window", GPU_SHAPES)
def test_gpu_matches_reference(B, Hq, Hkv, lists, Nq, Nkv, D, causal, sink, window, dtype, sch):
    """Random block lists in random order, empty rows, junk past each row's count, blocks in
    the future of every query (rows masked out for a whole tile), lengths off the block."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q, k, v, num, idx = make_inputs(seed, B, Hq, Hkv, lists, Nq, Nkv, D, D, 128, dtype)
    plan_sch = bsk._plan_block_sparse(q, k, v, num, idx, 128, causal, window > 0, sch, False).schedule
    assert plan_sch.wgmma, "the warpgroup-MMA kernel was not chosen"
    err, lse_err = run_checked(q, k, v, num, idx, block=128, causal=causal, sink=sink,
                               window=window, schedule=sch, pack_gqa=False)
    assert err <= TOL[dtype], f"seed {seed}: relative error {err:.2e} > {TOL[dtype]:.0e}"
    assert lse_err <= LSE_TOL[dtype], f"seed {seed}: lse error {lse_err:.2e}"


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("sch", [WG, WG_PERSISTENT], ids=["per-tile", "persistent"])
def test_gpu_long_lists_and_all_blocks(sch):
    """Full causal lists (every stage and barrier phase used many times) at 4096 tokens."""
    gen = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    B, H, N, D = 1, 2, 4096, 128
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    nb = N // 128
    num = torch.arange(1, nb + 1, device="cuda", dtype=torch.int32).expand(B, H, nb).contiguous()
    idx = torch.arange(nb, device="cuda", dtype=torch.int32).expand(B, H, nb, nb).contiguous()
    err, lse_err = run_checked(q, k, v, num, idx, block=128, causal=True, schedule=sch)
    assert err <= TOL[torch.bfloat16] and lse_err <= LSE_TOL[torch.bfloat16], f"{err:.2e}"


@pytest.mark.gpu
@hopper
def test_gpu_persistent_programs_walk_several_tiles():
    """More tiles (8 heads x 64) than programs (one per SM): every program runs several tiles
    of different list lengths, so the buffers' phases carry over from tile to tile."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    dtype = torch.bfloat16
    q, k, v, num, idx = make_inputs(seed, 1, 8, 8, "head", 8192, 8192, 128, 128, 128, dtype)
    assert launch.sm_count(q.device) < 8 * 64
    err, lse_err = run_checked(q, k, v, num, idx, block=128, causal=True, schedule=WG_PERSISTENT)
    assert err <= TOL[dtype] and lse_err <= LSE_TOL[dtype], f"seed {seed}: {err:.2e}"


def _misaligned_copy(t):
    """``t`` copied into a contiguous tensor whose start is 2 bytes off a 16-byte boundary."""
    flat = torch.empty(t.numel() + 8, device=t.device, dtype=t.dtype)
    return flat[1:1 + t.numel()].view(t.shape).copy_(t)


@pytest.mark.parametrize("what", ["q", "out"])
def test_misaligned_start_is_handled(what):
    """Tensor descriptors need 16-byte aligned starts: a misaligned q runs the Triton kernel, a
    misaligned out is written through an aligned temporary. Either way the result is right."""
    from codegen.block_sparse import block_sparse_attention_ref
    from kernel_checks import compare_with_reference
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float16   # interpreter: fp16
    q, k, v, num, idx = make_inputs(seed, 1, 2, 2, "group", 300, 300, 64, 64, 128, dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    if what == "q":
        q = _misaligned_copy(q)
    else:
        out = _misaligned_copy(out)
    assert (q if what == "q" else out).data_ptr() % 16 != 0
    bsk.block_sparse_attention(q, k, v, num, idx, block=128, scale=0.125, causal=True,
                              schedule=WG, out=out, lse=lse)
    ref, ref_lse = block_sparse_attention_ref(q, k, v, num, idx, block=128, scale=0.125,
                                              causal=True)
    err, lse_err = compare_with_reference(out, lse, ref, ref_lse, "visible key")
    assert err <= TOL[dtype] and lse_err <= LSE_TOL[dtype], f"seed {seed}: {err:.2e}"


@pytest.mark.gpu
@hopper
def test_compiled_model_runs_the_hopper_kernel():
    """planner.compile with 128-token blocks at head dim 128: the site runs the warp-specialized
    kernel, also where the cost model picked a Triton tile schedule. With every causal block
    kept the output is causal attention; with 4 of 128 kept, the cost model's run matches the
    default schedule's."""
    import torch.nn.functional as F
    import planner

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 4, 2048, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    every = planner.compile(attn, policy=planner.policy("block_topk", block=128, topk=16),
                            cost_model="off")
    out = every(q, k, v)
    assert planner.inspect(every).sites[0].kernel == "triton_block_sparse[wgmma]"
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err <= TOL[torch.bfloat16], err
    pol = planner.policy("block_topk", block=128, topk=4)
    q, k, v = (torch.randn(1, 4, 16384, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))                     # long enough for the sparse path
    auto = planner.compile(attn, policy=pol, cost_model="auto")
    out_auto = auto(q, k, v)
    kernel = planner.inspect(auto).sites[0].kernel
    if kernel.startswith("sdpa"):
        pytest.skip(f"the cost model ran this size densely ({kernel})")
    assert kernel == "triton_block_sparse[wgmma]", kernel
    out_off = planner.compile(attn, policy=pol, cost_model="off")(q, k, v)
    torch.testing.assert_close(out_auto, out_off, rtol=0, atol=0)
