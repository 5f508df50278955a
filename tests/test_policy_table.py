"""A policy is one value with one table row: a class defined here, with its estimator row
registered here, compiles and runs through the passes, the cost model and the runtime, and
nothing else in the tree names it."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import planner
from conftest import max_err
from codegen.select.reference import window_blocks
from runtime import estimators, plan
from runtime import costmodel as cm
from runtime.policies import Policy


@dataclass(frozen=True)
class NearBlocks(Policy):
    """Each query block keeps the key blocks within ``reach`` blocks of its own rows (a static
    block window), built by the window selection sink_window uses."""

    reach: int = 1
    block: int = 16
    name = "near_blocks"
    attend_kind = "block"

    def validate(self) -> None:
        if self.reach < 0 or self.block < 1:
            raise ValueError(f"policy {self.name!r}: reach >= 0 and block >= 1, got {self}")

    def expected_density(self, n_q: int, n_kv: int) -> float:
        visible = max(1.0, (-(-n_kv // self.block) + 1) / 2)
        return min(1.0, (self.reach + 1) / visible)


def _near_select(sc, q, k, spec):
    p = spec.policy
    return window_blocks(q.shape[0], k.shape[1], q.shape[2], k.shape[2], spec.causal, p.block,
                         sink=0, window=p.reach * p.block, device=q.device)


@pytest.fixture
def near_blocks():
    estimators.register(NearBlocks, estimators.Estimator(select=estimators._static(_near_select)))
    yield NearBlocks
    estimators.ESTIMATORS.pop(NearBlocks)
    plan._choose.cache_clear()


def attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _near_reference(q, k, v, reach: int, block: int):
    """Causal attention over the key blocks ``window_blocks`` keeps, from its rule: key block
    [k_lo, k_hi] is kept for query rows [first, last] when k_hi > first - W and k_lo < last + W."""
    n = q.shape[2]
    w = reach * block
    qb = torch.arange(n) // block
    first, last = qb * block, torch.clamp(qb * block + block, max=n) - 1
    k_lo = (torch.arange(n) // block) * block
    k_hi = torch.clamp(k_lo + block, max=n) - 1
    keep = (k_hi[None, :] > first[:, None] - w) & (k_lo[None, :] < last[:, None] + w)
    keep &= torch.ones(n, n, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def test_a_policy_defined_outside_the_tree_compiles_and_runs(near_blocks):
    pol = near_blocks(reach=1, block=16)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 100, 32) for _ in range(3))
    cm_fn = planner.compile(attention, policy=pol, cost_model="off")
    out = cm_fn(q, k, v)
    assert max_err(out, _near_reference(q, k, v, 1, 16)) <= 1e-5
    assert max_err(out, attention(q, k, v)) > 1e-3          # it is sparse, not dense
    site = planner.inspect(cm_fn).sites[0]
    assert site.status == "rewritten" and "near_blocks" in site.policy, site
    assert site.density is not None and site.density < 1.0, site


def test_the_user_facing_constructors_take_it(near_blocks):
    pol = planner.policy(near_blocks(), reach=2)
    assert pol == near_blocks(reach=2, block=16)
    with pytest.raises(ValueError, match="reach"):
        planner.policy(pol, reach=-1)
    assert planner.as_policy_map({"*": pol}).lookup("any.site") == (pol, "*")


def test_the_cost_model_reads_its_expected_density(near_blocks):
    """The one decision weighs the class's own density: sparse at a long prompt, dense at a
    short one; with the cost model on, the compiled function stays exact where dense runs."""
    pol = near_blocks(reach=1, block=64)
    h100 = cm.PROFILES["h100"]
    shape = dict(B=1, Hq=16, Hkv=16, D=128)
    assert plan.decide(pol, h100, Nq=65536, Nkv=65536, **shape).choice == "policy"
    assert plan.decide(pol, h100, Nq=128, Nkv=128, **shape).choice == "dense"
    q, k, v = (torch.randn(1, 2, 96, 32) for _ in range(3))
    fn = planner.compile(attention, policy=pol, cost_model="auto")
    assert max_err(fn(q, k, v), attention(q, k, v)) <= 1e-5
