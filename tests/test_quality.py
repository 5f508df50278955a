"""Quality harness (planner.quality): synthetic prompts, matched densities, the fast CPU attend,
and the harness end to end on a tiny random-weight Llama with a byte tokenizer (no downloads)."""
import json
import os

import pytest
import torch

import planner
from planner.quality import cpu_attend, harness, report
from planner.quality.policies import PolicySpec, causal_density
from planner.quality.tasks import TASKS, make_sample
from planner.quality.text import ByteCodec
from planner.quality.toy import tiny_llama_lm, toy_corpus


@pytest.fixture(scope="module")
def corpus():
    codec = ByteCodec()
    hay, heldout = toy_corpus(codec)
    return codec, hay, heldout


def _contains(seq, sub) -> bool:
    return any(tuple(seq[i:i + len(sub)]) == tuple(sub) for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("n", [700, 1537], ids=["N700", "N1537"])
@pytest.mark.parametrize("task", TASKS)
def test_sample_has_requested_length_and_answer_in_its_needle(corpus, task, n):
    codec, hay, _ = corpus
    s = make_sample(task, codec, hay, n, seed=7, depth=0.5 if task == "passkey" else None)
    assert len(s.ids) == n
    a, b = s.needle_span
    assert _contains(s.ids[a:b], s.answer_ids), (codec.decode(s.ids[a:b]), s.answer)
    assert s.answer.strip().isdigit()
    assert not _contains(s.ids[:a] + s.ids[b:], s.answer_ids), "the answer must appear once"
    assert codec.decode(s.ids[a:b]).startswith(" ") and codec.decode(s.ids[a - 1:a]) in ".!?\n "
    assert make_sample(task, codec, hay, n, seed=7, depth=s.depth if task == "passkey" else None) == s


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_needle_sits_at_its_depth(corpus, depth):
    codec, hay, _ = corpus
    n = 1200
    s = make_sample("passkey", codec, hay, n, seed=3, depth=depth)
    prefix = s.meta["hay_tokens"]
    a, b = s.needle_span
    frame = n - s.meta["hay_tokens"] - (b - a)                   # prefix + question tokens
    q_len = len(codec.encode("\n\nWhat is the pass key? The pass key is")) + 1   # + the space
    pre_len = frame - q_len
    if depth == 0.0:
        assert a == pre_len                                       # right after the instruction
    elif depth == 1.0:
        assert b == n - q_len                                     # right before the question
    else:
        assert abs((a - pre_len) - depth * prefix) <= 48          # snapped to a sentence start


def test_sample_rejects_a_length_too_short_for_its_frame(corpus):
    codec, hay, _ = corpus
    with pytest.raises(ValueError, match="haystack"):
        make_sample("niah_multikey", codec, hay, 200, seed=0)


@pytest.mark.parametrize("text, label, name, density, params", [
    ("dense", "dense", "dense", None, ()),
    ("sink_window@0.1", "sink_window@10%", "sink_window", 0.1, ()),
    ("block_topk@25%:block=32", "block_topk@25%:block=32", "block_topk", 0.25, (("block", 32),)),
    ("mine=block_topk:block=64,topk=8", "mine", "block_topk", None, (("block", 64), ("topk", 8))),
])
def test_policy_strings(text, label, name, density, params):
    s = PolicySpec.parse(text)
    assert (s.label, s.name, s.density, s.params) == (label, name, density, params)


def test_policy_map_and_errors():
    s = PolicySpec.parse('{"model.layers.0.*": "dense", "*": "sink_window@0.25"}')
    r = s.resolve(1024)
    assert set(r) == {"model.layers.0.*", "*"} and r["*"].name == "sink_window"
    with pytest.raises(ValueError, match="unknown policy"):
        PolicySpec.parse("nope@0.1")
    with pytest.raises(ValueError, match="no parameter"):
        PolicySpec.parse("block_topk:bogus=3")


@pytest.mark.parametrize("n", [512, 2048, 8176])
@pytest.mark.parametrize("name", ["sink_window", "block_topk", "dsa", "longformer"])
@pytest.mark.parametrize("target", [0.25, 0.1])
def test_matched_density_is_close_to_target(name, target, n):
    pol = PolicySpec.parse(f"{name}@{target}").resolve(n)
    assert causal_density(pol, n) == pytest.approx(target, rel=0.2)


@pytest.mark.parametrize("spec", ["sink_window@0.25", "block_topk@0.25", "block_topk@0.1",
                                  "dsa@0.25:index_heads=2,index_dim=16", "longformer@0.25"])
def test_analytic_density_equals_measured(spec):
    """The closed-form count the solver uses is what planner.inspect measures."""
    lm, _ = tiny_llama_lm(layers=1)
    n = 300
    pol = PolicySpec.parse(spec).resolve(n)
    r = harness.Runner(lm, pol)
    with cpu_attend.enabled(), torch.no_grad():
        r.nll([i % 251 for i in range(n)])
    assert r.last_density["mean"] == pytest.approx(causal_density(pol, n), abs=1e-9)


@pytest.mark.parametrize("impl, pol", [
    pytest.param("sdpa", "dense", id="sdpa-dense"),
    pytest.param("sdpa", planner.policy("sink_window", sink=4, window=20), id="sdpa-sink_window"),
    pytest.param("sdpa", planner.policy("block_topk", block=16, topk=2), id="sdpa-block_topk"),
    pytest.param("eager", planner.policy("block_topk", block=16, topk=1, sink_blocks=0,
                                         local_blocks=2), id="eager-block_topk-local2"),
    pytest.param("eager", planner.policy("sink_window", sink=2, window=9), id="eager-sink_window"),
])
def test_fast_cpu_attend_matches_reference(impl, pol):
    """Same logits and same measured density as the runtime's reference, with the model's own
    masks (SDPA: none or a boolean padding mask; eager: additive float masks)."""
    from conftest import tiny_llama
    m = tiny_llama(impl, layers=2)
    x = torch.randint(0, 128, (2, 150))
    am = torch.ones(2, 150, dtype=torch.long)
    am[1, :7] = 0                                                   # left padding: a mask tensor
    cm = planner.compile(m, policy=pol)
    with torch.no_grad():
        for kw in ({}, {"attention_mask": am}):
            ref = cm(x, **kw).logits
            d_ref = [s.density for s in planner.inspect(cm).sites]
            served = cpu_attend.COUNTS["served"]
            with cpu_attend.enabled():
                got = cm(x, **kw).logits
            d_got = [s.density for s in planner.inspect(cm).sites]
            assert cpu_attend.COUNTS["served"] == served + 2
            assert (got - ref).abs().max().item() <= 1e-5
            assert d_got == pytest.approx(d_ref, abs=1e-12)
    assert planner.inspect(cm).sites[0].kernel == cpu_attend.NAME


def test_sink_window_pair_rule_matches_its_token_keep():
    from runtime import estimators
    spec = type("S", (), {"policy": planner.policy("sink_window", sink=3, window=7),
                          "causal": "lower_right"})()
    keep = estimators.get("sink_window").token_keep(spec, 40, 50, "cpu")(0, 40)[0, 0]
    pos = torch.arange(40)[:, None] + 10
    j = torch.arange(50)[None, :]
    assert torch.equal(cpu_attend._sink_window_at(spec.policy, pos, j), keep)


def test_greedy_exact_match_is_teacher_forced_argmax(corpus):
    """Scoring: all answer tokens argmax under teacher forcing <=> greedy decoding emits them."""
    codec, hay, _ = corpus
    lm, _ = tiny_llama_lm(layers=1)
    s = make_sample("passkey", codec, hay, 600, seed=1, depth=0.5)
    r = harness.Runner(lm, "dense")
    with cpu_attend.enabled(), torch.no_grad():
        _, hits = r.answer(s.ids, s.answer_ids)
        x = torch.tensor([list(s.ids)])
        greedy = lm.generate(x, max_new_tokens=len(s.answer_ids), do_sample=False,
                             min_new_tokens=len(s.answer_ids))[0, len(s.ids):].tolist()
    first_miss = next((i for i, h in enumerate(hits) if not h), len(hits))
    assert greedy[:first_miss] == list(s.answer_ids[:first_miss])
    if first_miss < len(hits):
        assert greedy[first_miss] != s.answer_ids[first_miss]


def test_harness_end_to_end(corpus, tmp_path):
    codec, hay, heldout = corpus
    lm, _ = tiny_llama_lm(layers=2)
    policies = ("dense", "sink_window@0.25",
                'hybrid={"model.layers.0.*": "dense", "*": "block_topk@0.25"}')
    cfg = harness.EvalConfig(lengths=(768,), policies=policies, tasks=("passkey", "niah_single"),
                             depths=(0.0, 1.0), trials=1, ppl_windows=1)
    out = tmp_path / "toy.json"
    res = harness.evaluate(lm, codec, hay, heldout, cfg, out_path=str(out), log=lambda s: None,
                           meta={"model": "tiny random Llama"})
    rows = {r["policy"]: r for r in res["rows"]}
    assert set(rows) == {"dense", "sink_window@25%", "hybrid"}
    assert rows["dense"]["density"] == 1.0 and rows["dense"]["ppl_delta"] == 0.0
    sw = rows["sink_window@25%"]
    assert sw["density"] == pytest.approx(sw["density_expected"], abs=1e-9)
    assert sw["sites"] == 2 and sw["dense_sites"] == 0
    assert 0.25 < rows["hybrid"]["density"] < 1.0                  # layer 0 dense, layer 1 sparse
    assert len(res["trials"]) == 3 * 3                               # 3 policies x 3 cells x 1
    assert {t["cell"] for t in res["trials"]} == {"passkey@0%", "passkey@100%", "niah_single"}
    assert json.loads(out.read_text())["rows"] == res["rows"]
    assert "passkey" in report.main_table(res) and "100%" in report.depth_table(res)
    md = report.markdown(res)
    assert "tiny random Llama" in md
    png = report.plot(res, str(tmp_path / "toy.png"), log=lambda s: None)
    assert png is None or os.path.getsize(png) > 0
    # resuming with the same configuration skips every finished row
    again = harness.evaluate(lm, codec, hay, heldout, cfg, out_path=str(out), resume=True,
                             log=lambda s: None)
    assert again["rows"] == res["rows"]


def test_check_attend_compares_fast_and_reference(corpus):
    codec, hay, _ = corpus
    lm, _ = tiny_llama_lm(layers=1)
    (c,) = harness.check_attend(lm, codec, hay, [PolicySpec.parse("block_topk@0.25")], 512, 0,
                                log=lambda s: None)
    assert c["max_abs_logit_diff"] < 1e-4 and c["density_fast"] == c["density_reference"]


def test_cli_parses_eval_arguments():
    from planner.__main__ import main
    from planner.quality.cli import _ints_per_length
    assert _ints_per_length("4") == 4 and _ints_per_length("2048=8,8192=1") == {2048: 8, 8192: 1}
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0


def test_fast_cpu_attend_serves_token_lists():
    """dsa's token lists through the fast CPU attend: same logits and density as the reference."""
    from conftest import tiny_llama
    m = tiny_llama("sdpa", layers=2)
    x = torch.randint(0, 128, (2, 120))
    cm = planner.compile(m, policy=planner.policy("dsa", topk=24, index_heads=2, index_dim=8))
    with torch.no_grad():
        ref = cm(x).logits
        d_ref = [s.density for s in planner.inspect(cm).sites]
        served = cpu_attend.COUNTS["served"]
        with cpu_attend.enabled():
            got = cm(x).logits
        d_got = [s.density for s in planner.inspect(cm).sites]
    assert cpu_attend.COUNTS["served"] == served + 2
    assert (got - ref).abs().max().item() <= 1e-5
    assert d_got == pytest.approx(d_ref, abs=1e-12)


def test_quest_matcher_budget():
    pol = PolicySpec.parse("quest@0.25").resolve(2048)
    assert pol.name == "quest" and pol.page == 16 and pol.budget % 16 == 0
    from planner.quality.policies import block_topk_pairs
    kept = block_topk_pairs(2048, 16, pol.budget // 16, 0, 1) / (2048 * 2049 / 2)
    assert kept == pytest.approx(0.25, rel=0.05)
