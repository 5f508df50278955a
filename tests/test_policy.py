import pytest
import torch

import planner
from planner.models import GPTConfig, TinyGPT


def test_presets_build_frozen_hashable_policies():
    p = planner.policy("block_topk", block=32, topk=4)
    assert p == planner.BlockTopK(block=32, topk=4)
    assert hash(p) == hash(planner.policy("block_topk", block=32, topk=4))
    with pytest.raises(Exception):
        p.topk = 3
    assert planner.policy("dense") == planner.Dense()
    assert planner.policy("sink_window", sink=2, window=8).window == 8


def test_unknown_policy_lists_valid_names():
    with pytest.raises(ValueError) as e:
        planner.policy("nope")
    msg = str(e.value)
    assert "nope" in msg and "block_topk" in msg and "dense" in msg and "sink_window" in msg


@pytest.mark.parametrize("name, params, bad", [
    pytest.param("block_topk", {"topk": -1}, "topk", id="block_topk-negative-topk"),
    pytest.param("block_topk", {"block": 0}, "block", id="block_topk-zero-block"),
    pytest.param("sink_window", {"window": -5}, "window", id="sink_window-negative-window"),
    pytest.param("sink_window", {"sink": -1}, "sink", id="sink_window-negative-sink"),
])
def test_negative_budgets_are_rejected_naming_the_parameter(name, params, bad):
    with pytest.raises(ValueError) as e:
        planner.policy(name, **params)
    assert repr(bad) in str(e.value) and str(list(params.values())[0]) in str(e.value)


def test_unknown_parameter_is_rejected():
    with pytest.raises(TypeError, match="valid"):
        planner.policy("block_topk", top_k=3)


def test_compile_rejects_unknown_policy_before_running():
    with pytest.raises(ValueError, match="valid names"):
        planner.compile(TinyGPT(GPTConfig(n_layer=1)), policy="blocky")


def test_per_layer_map_pattern_matching_nothing_is_an_error():
    m = TinyGPT(GPTConfig(n_layer=2)).eval()
    cm = planner.compile(m, policy={"model.layers.*": "dense", "*": "block_topk"})
    with pytest.raises(ValueError) as e, torch.no_grad():
        cm(torch.randint(0, 256, (1, 16)))
    assert "model.layers.*" in str(e.value) and "h.0.attn" in str(e.value)


def test_per_layer_map_applies_first_matching_pattern():
    m = TinyGPT(GPTConfig(n_layer=3)).eval()
    pol = {"h.0.*": "dense", "*": planner.policy("sink_window", sink=1, window=4)}
    cm = planner.compile(m, policy=pol)
    with torch.no_grad():
        cm(torch.randint(0, 256, (1, 40)))
    rep = planner.inspect(cm)
    by = {s.name: s for s in rep.sites}
    assert by["h.0.attn"].policy == "dense" and by["h.0.attn"].density == pytest.approx(1.0)
    assert by["h.1.attn"].policy.startswith("sink_window") and by["h.1.attn"].density < 0.5
