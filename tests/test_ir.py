"""The sparse custom ops: fake impls, verifier, cache counters."""
import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

import planner
import runtime.ops  # noqa: F401
from passes.verify import IRVerificationError, verify_ir
from runtime.cache import KernelCache, seq_bucket
from runtime.spec import SiteSpec, register


@pytest.mark.parametrize("pol", [planner.policy("dense"), planner.policy("block_topk", block=16),
                                 planner.policy("sink_window", window=8)])
def test_fake_impls_match_real_shapes(pol):
    key = register(SiteSpec(site="t", owner="test", policy=pol, scale=0.25, gqa_group=3,
                            causal="lower_right"))
    q, k, v = torch.randn(2, 6, 37, 16), torch.randn(2, 2, 45, 16), torch.randn(2, 2, 45, 8)
    ops = torch.ops.sparse
    real = [ops.score(q, k, [], key)]
    real += list(ops.select(real[0], q, k, key))
    real.append(ops.attend(q, k, v, [], real[1], real[2], key))
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = [ops.score(fq, fk, [], key)]
        fake += list(ops.select(fake[0], fq, fk, key))
        fake.append(ops.attend(fq, fk, fv, [], fake[1], fake[2], key))
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype
    assert real[-1].shape == (2, 6, 37, 8)


def test_opcheck_attend():
    key = register(SiteSpec(site="t2", owner="test", policy=planner.policy("block_topk", block=8),
                            scale=0.5, causal="lower_right"))
    q, k, v = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    sc = torch.ops.sparse.score(q, k, [], key)
    c, i = torch.ops.sparse.select(sc, q, k, key)
    torch.library.opcheck(torch.ops.sparse.attend.default, (q, k, v, [], c, i, key),
                          test_utils=("test_schema", "test_faketensor"))


def test_verifier_rejects_attend_without_select():
    key = register(SiteSpec(site="t3", owner="test", policy=planner.policy("dense"), scale=1.0))
    g = fx.Graph()
    q, k, v = g.placeholder("q"), g.placeholder("k"), g.placeholder("v")
    e = g.call_function(torch.empty, (0,))
    out = g.call_function(torch.ops.sparse.attend.default, (q, k, v, [], e, e, key))
    g.output(out)
    with pytest.raises(IRVerificationError, match="select"):
        verify_ir(fx.GraphModule(torch.nn.Module(), g))


def test_kernel_cache_counts_and_buckets():
    c = KernelCache()
    assert c.get(("a", seq_bucket(300)), lambda: 1) == 1
    assert c.get(("a", seq_bucket(500)), lambda: 2) == 1       # same bucket (512)
    assert c.get(("a", seq_bucket(513)), lambda: 3) == 3
    assert c.stats() == {"hits": 1, "misses": 2, "compiles": 2, "entries": 2}
    with pytest.raises(ValueError):
        seq_bucket(-1)
