"""The eviction-quality harness (``planner.quality.eviction run``): one prefill per prompt
serves every (policy, budget) cell, and gives the scores a prefill per cell gives.

A tiny random Llama (GQA 4/2) saved to a temporary folder, random prompts: the shared run checks
every prompt of every cell against the compiled model evicting inside its own prefill (verdict,
cache lengths, nll), and raises on a difference.
"""
import json

import pytest
import torch

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=256)
    d = tmp_path_factory.mktemp("tiny_llama")
    T.LlamaForCausalLM(cfg).save_pretrained(d)
    g = torch.Generator().manual_seed(1)
    rows = []
    for i, n in enumerate((41, 41, 41)):      # one length: one compile per graph
        ids = torch.randint(3, 64, (n + 8,), generator=g).tolist()
        rows.append({"length": n, "cell": f"c{i}", "task": "t", "trial": 0,
                     "context": ids[:n], "question": ids[n:n + 5], "answer": ids[n + 5:]})
    return {"model": "tiny", "model_dir": str(d), "text": "random ids", "seed": 0,
            "lengths": [48], "trials": 1, "tasks": ["t"], "samples": rows}


def _rows(res):
    return {(c["protocol"], c["policy"], c["budget"]): [(r["correct"], r["cache"], r["nll"])
                                                        for r in c["rows"]]
            for c in res["cells"]}


@pytest.mark.parametrize("protocol", ["agnostic", "aware"])
def test_one_prefill_per_prompt_scores_as_a_prefill_per_cell(prompts, protocol, tmp_path):
    """Every prompt of every cell is checked (``check=3``, the smallest budget is the only
    one): the shared prefill's verdict, cache lengths and nll equal the compiled model evicting
    inside its own prefill, or ``run_planner`` raises."""
    from planner.quality.eviction import run_planner
    pols = ["snapkv", "h2o", "pyramidkv", "adakv"]     # window votes, all queries, per layer, per head
    res = run_planner(prompts, pols, [0.3], [protocol], str(tmp_path / "a.json"),
                      log=lambda *a: None, check=3)
    rows = _rows(res)
    assert len(rows) == 1 + len(pols) and all(len(v) == 3 for v in rows.values())
    assert all(c["checked"] == 3 for c in res["cells"])
    caches = {k: v[0][1] for k, v in rows.items()}
    assert caches[(protocol, "snapkv", 0.3)] < caches[(protocol, "dense", None)]  # it evicted
    written = json.load(open(tmp_path / "a.json"))
    assert written["shared_prefill"] is True and written["prefill_seconds"] > 0


def test_a_difference_stops_the_run(prompts, tmp_path, monkeypatch):
    """A shared-prefill score that differs from the direct one raises (the check can fail)."""
    from planner.quality import eviction as E
    real = E.finish
    monkeypatch.setattr(E, "finish", lambda *a: (lambda r: (r[0], r[1] + 0.5, r[2]))(real(*a)))
    with pytest.raises(RuntimeError, match="the shared prefill gives"):
        E.run_planner(prompts, ["snapkv"], [0.3], ["aware"], str(tmp_path / "b.json"),
                      log=lambda *a: None, check=1)


def test_the_cache_goes_by_the_name_the_model_takes():
    """transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name warns and goes in
    5.40); kvpress's environment pins a release that knows only the old one."""
    from planner.quality.protocol import cache_arg

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return cache

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return past_key_values

    for cls, name in ((New, "cache"), (Old, "past_key_values")):
        m = cls()
        assert cache_arg(m, 7) == {name: 7} and m(**cache_arg(m, 7)) == 7
    import transformers
    if hasattr(transformers, "LlamaForCausalLM"):
        from inspect import signature
        want = "cache" if "cache" in signature(transformers.LlamaForCausalLM.forward).parameters \
            else "past_key_values"
        assert list(cache_arg(transformers.LlamaForCausalLM.__new__(
            transformers.LlamaForCausalLM), None)) == [want]
