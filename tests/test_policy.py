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


# (policy, parameter, bad value, text of the valid range): one row per parameter of every
# catalogue policy
BAD_VALUES = [
    ("sink_window", "sink", -1, ">= 0"), ("sink_window", "window", 0, ">= 1"),
    ("block_topk", "block", 0, ">= 1"), ("block_topk", "topk", -1, ">= 0"),
    ("block_topk", "sink_blocks", -2, ">= 0"), ("block_topk", "local_blocks", -1, ">= 0"),
    ("threshold", "gamma", 0.0, "(0.0, 1.0]"), ("threshold", "gamma", 1.5, "(0.0, 1.0]"),
    ("threshold", "block", 0, ">= 1"), ("threshold", "min_budget", -1, ">= 0"),
    ("threshold", "max_budget", -3, ">= 0"), ("threshold", "sink_blocks", -1, ">= 0"),
    ("threshold", "local_blocks", -1, ">= 0"),
    ("vertical_slash", "last_q", 0, ">= 1"), ("vertical_slash", "n_vertical", -1, ">= 0"),
    ("vertical_slash", "n_slash", -1, ">= 0"), ("vertical_slash", "block", 0, ">= 1"),
    ("vertical_slash", "sink_tokens", -4, ">= 0"), ("vertical_slash", "local_tokens", -1, ">= 0"),
    ("quest", "page", 0, ">= 1"), ("quest", "budget", 0, ">= 1"),
    ("quest", "sink_pages", -1, ">= 0"), ("quest", "local_pages", -1, ">= 0"),
    ("longformer", "window", 0, ">= 1"), ("longformer", "global_tokens", -1, ">= 0"),
    ("longformer", "block", 0, ">= 1"),
    ("bigbird", "window", -1, ">= 0"), ("bigbird", "global_tokens", -1, ">= 0"),
    ("bigbird", "random_blocks", -1, ">= 0"), ("bigbird", "seed", -1, ">= 0"),
    ("bigbird", "block", 0, ">= 1"),
    ("auto", "target_density", 0.0, "(0.0, 1.0]"), ("auto", "target_density", 2, "(0.0, 1.0]"),
    ("auto", "block", 0, ">= 1"), ("auto", "tau", -0.1, "[0.0, 0.693"),
    ("auto", "sink_blocks", -1, ">= 0"), ("auto", "local_blocks", -1, ">= 0"),
    ("dsa", "topk", 0, ">= 1"), ("dsa", "index_heads", 0, ">= 1"), ("dsa", "index_dim", 0, ">= 1"),
    ("dsa", "rope", -2, ">= 0"), ("dsa", "rope", 3, "even number <= index_dim (64)"),
]

# every way of building a policy: by name, by its class, and from another policy
BUILDERS = {
    "by-name": lambda name, kw: planner.policy(name, **kw),
    "class": lambda name, kw: planner.PRESETS[name](**kw),
    "override": lambda name, kw: planner.policy(planner.policy(name), **kw),
}


def test_bad_values_cover_every_parameter_of_every_policy():
    import dataclasses
    covered = {(n, p) for n, p, _, _ in BAD_VALUES}
    for name, cls in planner.PRESETS.items():
        for f in dataclasses.fields(cls):
            assert (name, f.name) in covered, f"no bad value tested for {name}.{f.name}"


@pytest.mark.parametrize("how", sorted(BUILDERS))
@pytest.mark.parametrize("name, param, bad, rng", BAD_VALUES,
                         ids=[f"{n}-{p}={v}" for n, p, v, _ in BAD_VALUES])
def test_every_construction_validates_naming_parameter_value_and_range(how, name, param, bad,
                                                                        rng):
    with pytest.raises(ValueError) as e:
        BUILDERS[how](name, {param: bad})
    msg = str(e.value)
    assert repr(param) in msg and str(bad) in msg and rng in msg, msg


@pytest.mark.parametrize("how", sorted(BUILDERS))
@pytest.mark.parametrize("name, param, rng", sorted({(n, p, r) for n, p, _, r in BAD_VALUES
                                                     if "index_dim" not in r}))
def test_wrong_types_are_rejected_naming_parameter_value_and_range(how, name, param, rng):
    for bad in ("8", True, None):
        with pytest.raises(TypeError) as e:
            BUILDERS[how](name, {param: bad})
        msg = str(e.value)
        assert repr(param) in msg and repr(bad) in msg and rng in msg, msg


@pytest.mark.parametrize("name, params, words", [
    ("block_topk", {"topk": 0, "sink_blocks": 0, "local_blocks": 0}, ["topk", "0 + 0 + 0"]),
    ("threshold", {"min_budget": 5, "max_budget": 2}, ["'min_budget' (5)", "'max_budget' (2)"]),
    ("quest", {"page": 16, "budget": 8}, ["'budget' (8", "'page' (16)"]),
])
def test_combinations_are_validated_on_every_path(name, params, words):
    for how in BUILDERS.values():
        with pytest.raises(ValueError) as e:
            how(name, params)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_override_of_a_policy_value_rejects_unknown_parameters():
    with pytest.raises(TypeError, match="valid"):
        planner.policy(planner.policy("block_topk"), top_k=3)
    assert planner.policy(planner.policy("block_topk"), topk=3) == planner.BlockTopK(topk=3)
