"""``planner.compile(..., remainder="inductor")``: the ops outside attention compiled by
Inductor around the sparse ops, the same outputs as the original (dense) and as the eager
remainder (sparse); a bad value is a clear error."""
import pytest
import torch

import planner

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.slow
def test_inductor_remainder_matches(llama):
    pol = planner.policy("block_topk", block=16, topk=2)
    ind = planner.compile(llama, policy={"model.layers.0.*": "dense", "*": pol},
                          cost_model="off", remainder="inductor")
    eager = planner.compile(llama, policy={"model.layers.0.*": "dense", "*": pol},
                            cost_model="off")
    ids = torch.randint(0, 128, (1, 150))
    with torch.no_grad():
        want = llama(ids, use_cache=False).logits
        got = ind(ids, use_cache=False).logits
        same_plan = eager(ids, use_cache=False).logits
    rep = planner.inspect(ind)
    assert any("compiled by Inductor (1 of 1" in n for n in rep.notes), rep.notes
    sites = {s.name: s for s in rep.sites}
    assert len(sites) == 2 and min(s.density for s in sites.values()) < 1.0
    torch.testing.assert_close(got, same_plan, rtol=1e-4, atol=1e-4)
    # the dense layer alone: equal to the original's first layer is covered by the policy
    # sweep; here the whole model differs from the original only by layer 1's sparsity
    assert (got - want).abs().max() > 0


def test_bad_remainder_is_a_clear_error(llama):
    with pytest.raises(ValueError, match="remainder must be one of"):
        planner.compile(llama, policy="dense", remainder="tvm")
    with pytest.raises(ValueError, match="remainder must be one of"):
        planner.set_defaults(remainder="jit")
