"""What the planner tells the user instead of staying silent: why every site stayed dense
(budgets covering the length, dropout in training), a bad ``SPARSE_PLANNER_KERNELS``, Triton
kernels asked for where none can run, and a report asked for before the first call."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import planner
from runtime.env import kernels_mode


def causal_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _qkv(n, heads=2, d=16):
    return tuple(torch.randn(1, heads, n, d) for _ in range(3))


# the default parameters of every sparse policy keep everything at N = 128 (auto excepted)
DEFAULT_NOTES = {
    "block_topk": "block_topk keeps topk=32 + sink_blocks=1 + local_blocks=1 = 34 blocks of 64 "
                  "= 2176 keys per query block: at N=128 that is every key; use a smaller topk",
    "sink_window": "sink_window keeps sink=4 + window=1024 = 1028 keys per query: at N=128 that "
                   "is every key; use a smaller window",
    "quest": "quest keeps budget=2048 tokens = 128 pages of 16 (+ sink_pages=0, local_pages=1) = "
             "2064 keys per query: at N=128 that is every key; use a smaller budget",
    "vertical_slash": "n_vertical=1000 columns and n_slash=1000 diagonals",
    "longformer": "window=512 + global_tokens=16 = 528 keys per query: at N=128 that is every key",
    "bigbird": "window=192 + global_tokens=64 + random_blocks=3 blocks of 64 = 448 keys per query",
    "dsa": "dsa keeps topk=2048 keys per query: at N=128 that is every key; use a smaller topk",
    "threshold": "min_budget=1 + sink_blocks=1 + local_blocks=1 = 3 blocks: at N=128 that is "
                 "every key; use a smaller block or gamma",
}


@pytest.mark.parametrize("name", sorted(DEFAULT_NOTES))
def test_report_says_why_default_parameters_keep_every_pair(name):
    f = planner.compile(causal_attention, policy=name)
    f(*_qkv(128))
    rep = planner.inspect(f)
    assert rep.sites[0].density == pytest.approx(1.0)
    text = str(rep)
    assert "density 1.000" in text and DEFAULT_NOTES[name] in text, text


def test_no_note_when_a_site_is_sparse_or_the_policy_dense():
    f = planner.compile(causal_attention, policy=planner.policy("block_topk", block=16, topk=1))
    f(*_qkv(128))
    rep = planner.inspect(f)
    assert rep.sites[0].density < 1 and rep.notes == [] and "note:" not in str(rep)
    d = planner.compile(causal_attention, policy="dense")
    d(*_qkv(128))
    assert planner.inspect(d).notes == []


def test_note_when_the_budget_does_not_cover_the_length_but_the_input_kept_everything():
    # 4 key blocks, 3 forced: threshold's mass criterion took the fourth on this input
    pol = planner.policy("threshold", gamma=1.0, block=32)
    f = planner.compile(causal_attention, policy=pol)
    f(*_qkv(128))
    rep = planner.inspect(f)
    assert rep.sites[0].density == pytest.approx(1.0)
    assert "at N=128 it kept every pair of this input" in str(rep)


def _dropout_llama(impl):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.1,
                      attn_implementation=impl)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_training_with_attention_dropout_warns_once_per_compiled_model(impl):
    m = _dropout_llama(impl).train()
    cm = planner.compile(m, policy="block_topk")
    with pytest.warns(UserWarning) as got:
        cm(torch.randint(0, 128, (1, 20)))
    msgs = [str(w.message) for w in got if "dropout" in str(w.message)]
    assert len(msgs) == 1, msgs
    msg = msgs[0]
    assert "2 attention site(s) run dense" in msg and "p=0.1" in msg and "model.eval()" in msg
    assert "model.layers.0.self_attn" in msg and "model.layers.1.self_attn" in msg
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        cm(torch.randint(0, 128, (1, 20)))
        cm(torch.randint(0, 128, (2, 33)))              # a new shape may recompile
    assert not [w for w in again if "dropout" in str(w.message)]
    # eval mode: no dropout, the sites follow the policy and nothing is said
    ev = planner.compile(_dropout_llama(impl).eval(), policy="block_topk")
    with warnings.catch_warnings(record=True) as quiet, torch.no_grad():
        warnings.simplefilter("always")
        ev(torch.randint(0, 128, (1, 20)))
    assert not [w for w in quiet if "dropout" in str(w.message)]


@pytest.mark.parametrize("value", ["bogus", "Tritonn", "cuda"])
def test_bad_kernel_mode_is_an_error_naming_variable_value_and_choices(value, monkeypatch):
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", value)
    for fn in (kernels_mode, lambda: planner.compile(causal_attention, policy="block_topk")):
        with pytest.raises(ValueError) as e:
            fn()
        msg = str(e.value)
        assert "SPARSE_PLANNER_KERNELS" in msg and repr(value) in msg
        assert "auto|triton|reference" in msg


def test_bad_kernel_mode_set_after_compiling_fails_the_call(monkeypatch):
    f = planner.compile(causal_attention, policy=planner.policy("block_topk", block=16, topk=1))
    f(*_qkv(64))
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "bogus")
    with pytest.raises(Exception, match="SPARSE_PLANNER_KERNELS='bogus'.*auto\\|triton\\|reference"):
        f(*_qkv(64))


@pytest.mark.parametrize("value, mode", [("", "auto"), ("auto", "auto"), ("triton", "triton"),
                                         (" Reference ", "reference")])
def test_kernel_modes_accepted(value, mode, monkeypatch):
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", value)
    assert kernels_mode() == mode


def test_triton_mode_without_interpreter_on_cpu_says_why_the_reference_ran(monkeypatch):
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    f = planner.compile(causal_attention, policy=planner.policy("block_topk", block=16, topk=1))
    f(*_qkv(64))
    kernel = planner.inspect(f).sites[0].kernel
    assert kernel == "reference (SPARSE_PLANNER_KERNELS=triton needs a GPU or TRITON_INTERPRET=1)"
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "reference")        # asked for: no reason
    f(*_qkv(64))
    assert planner.inspect(f).sites[0].kernel == "reference"


def test_triton_mode_with_interpreter_runs_the_kernel(monkeypatch):
    from runtime.kernels import launch
    if not launch.runs_triton("cpu"):
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv("SPARSE_PLANNER_KERNELS", "triton")
    f = planner.compile(causal_attention, policy=planner.policy("block_topk", block=16, topk=1))
    f(*_qkv(64))
    assert planner.inspect(f).sites[0].kernel.startswith("triton_block_sparse")


def test_inspect_before_the_first_call_says_to_call_the_model():
    from planner.models import GPTConfig, TinyGPT
    cm = planner.compile(TinyGPT(GPTConfig(n_layer=1)).eval(), policy="dense")
    assert "call the compiled model first" in str(planner.inspect(cm))
    tm = torch.compile(TinyGPT(GPTConfig(n_layer=1)).eval(), backend="sparse_planner")
    assert "call the compiled model first" in str(planner.inspect(tm))
    with torch.no_grad():
        cm(torch.randint(0, 256, (1, 8)))
    assert "call the compiled model first" not in str(planner.inspect(cm))
