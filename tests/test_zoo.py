"""The attention zoo: every spelling of attention is found and rewritten exactly, and every
softmax left alone is explained.

For each case: the number of rewritten sites equals the number of attention computations,
``policy="dense"`` reproduces the model (fp32 max abs err <= 1e-5), negative cases have no
rewrite, and masks proved causal become ``spec.causal`` (the mask is dropped).
"""
import copy

import pytest
import torch

import planner
from conftest import max_err
from runtime.spec import lookup
from zoo_models import ANY, CASES

_RESULTS: dict = {}
BY_ID = {c.id: c for c in CASES}


def run_case(case):
    """Compile ``case`` with policy="dense" and call it once: (reference, output, report)."""
    if case.id not in _RESULTS:
        fn, args, kwargs = case.build()
        args_c, kwargs_c = copy.deepcopy((args, kwargs))    # a KV cache grows in place
        with torch.enable_grad() if case.grad else torch.no_grad():
            ref = case.out(fn(*args, **kwargs))
            cm = planner.compile(fn, policy="dense")
            out = case.out(cm(*args_c, **kwargs_c))
        _RESULTS[case.id] = ref, out, planner.inspect(cm)
    return _RESULTS[case.id]


def site_specs(rep) -> dict:
    """site name -> SiteSpec, read from the attend nodes of the rewritten graphs."""
    specs = {}
    for gm in rep._graphs:
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is torch.ops.sparse.attend.default:
                spec = lookup(n.args[-1])
                specs[spec.site] = spec
    return specs


def kinds(spec) -> tuple:
    return tuple(m[0] for m in spec.mods)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_zoo(case):
    ref, out, rep = run_case(case)
    rewritten = [s for s in rep.sites if s.status == "rewritten"]
    dense = [s for s in rep.sites if s.status != "rewritten"]
    assert len(rewritten) == case.sites, rep
    assert len(dense) == case.fallback, rep
    assert len(rep.unmatched()) == case.unmatched, rep
    for why in [s.reason for s in dense] + [u.reason for u in rep.unmatched()]:
        assert why and case.reason in why, rep
    assert all(s.calls >= 1 for s in rewritten), rep
    for o, r in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)):
        assert max_err(o.float(), r.float()) <= case.tol
    specs = site_specs(rep)
    assert len(specs) == case.sites
    for name, spec in specs.items():
        if case.causal is not ANY:
            assert spec.causal == case.causal, (name, spec)
        if callable(case.mods):
            assert case.mods(kinds(spec)), (name, spec)
        elif case.mods is not ANY:
            assert kinds(spec) == case.mods, (name, spec)
        if case.window is not ANY:
            assert spec.window == case.window, (name, spec)
        if case.kv_valid is not ANY:
            assert spec.kv_valid == case.kv_valid, (name, spec)
        for part, (causal, mods) in case.notes.items():
            if part in name:
                assert (spec.causal, kinds(spec)) == (causal, mods), (name, spec)


CAUSAL_DROPPED = ["causal-masked-fill-tril", "causal-where-arange-finfo-min",
                  "causal-triu-additive", "causal-bool-sdpa", "causal-buffer-slice-nanogpt",
                  "bias-alibi-causal", "bias-tanh-softcap-causal", "hf-llama-gqa3-eager",
                  "hf-llama-decode-eager", "hf-gpt2-eager", "hf-qwen3-eager", "hf-opt-eager",
                  "hf-t5-eager"]


@pytest.mark.parametrize("cid", CAUSAL_DROPPED)
def test_causal_mask_is_dropped(cid):
    """A mask built from tril/triu, index comparisons, a causal buffer or HF's kv <= q is
    proved causal from the graph: the spec is causal and the mask tensor is gone."""
    _, _, rep = run_case(BY_ID[cid])
    specs = site_specs(rep)
    assert specs
    causal_sites = [s for n, s in specs.items() if "EncDecAttention" not in n
                    and "encoder" not in n]
    assert causal_sites
    for spec in causal_sites:
        assert spec.causal == "lower_right", spec
        assert spec.n_mod_tensors() == len([m for m in spec.mods if m[0] == "add"
                                            and cid in ("bias-alibi-causal", "hf-t5-eager")]), spec


@pytest.mark.parametrize("cid, kept", [
    ("mask-shifted-causal-kept", ("add",)),
    ("mask-padding-b11n", ("add",)),            # (1 - am.float()) * min: arithmetic on the input
    ("nn-mha-padding-and-causal", ("add",)),
])
def test_mask_that_is_not_purely_causal_is_kept(cid, kept):
    _, _, rep = run_case(BY_ID[cid])
    for spec in site_specs(rep).values():
        assert spec.causal is None and kinds(spec) == kept and not spec.kv_valid, spec


@pytest.mark.parametrize("cid, causal, empty", [
    ("causal-plus-padding", "lower_right", "zero"),          # masked_fill(-inf)
    ("cross-attention-padded", None, "mean"),                 # masked_fill(finfo.min)
    ("hf-bert-padding-eager", None, "mean"),                  # additive finfo.min
    ("hf-bert-padding-sdpa", None, "zero"),                   # boolean SDPA mask
    ("hf-bloom-alibi-baddbmm-padded", "lower_right", "mean"),
])
def test_padding_becomes_per_row_key_lengths(cid, causal, empty):
    """A mask that is the rules and ``pad[b, kv] != 0`` of a [B, N] input (Hugging Face's
    padding mask) is replaced by the rules and the input itself: the kernels read per-row key
    lengths from it at run time; a row that sees no key gives what the model's mask gave."""
    _, _, rep = run_case(BY_ID[cid])
    for spec in site_specs(rep).values():
        assert spec.kv_valid and spec.causal == causal and spec.empty_rows == empty, spec
        assert "padding" not in [m[0] for m in spec.mods]
    assert all("lengths" in s.rules for s in rep.sites), rep


@pytest.mark.parametrize("cid, window", [("mask-sliding-window", 5),
                                         ("hf-mistral-window6-eager", 6),
                                         ("hf-mistral-window6-sdpa", 6)])
def test_sliding_window_becomes_the_kernels_rule(cid, window):
    """causal AND a window, proved from the mask's construction: the mask tensor is dropped,
    the spec carries causal and the window (the kernels' rule), the output stays exact."""
    _, _, rep = run_case(BY_ID[cid])
    for spec in site_specs(rep).values():
        assert spec.causal == "lower_right" and spec.window == window, spec
        assert spec.n_mod_tensors() == 0, spec
    assert all(s.rules == f"window {window}" for s in rep.sites), rep


def test_unmatched_reasons_are_specific():
    reasons = {cid: [u.reason for u in run_case(BY_ID[cid])[2].unmatched()]
               for cid in ("neg-softmax-query-axis", "neg-classifier", "neg-learned-temperature")}
    assert "softmax over dim -2" in reasons["neg-softmax-query-axis"][0]
    assert "linear" in reasons["neg-classifier"][0]           # names what feeds the softmax
    assert "shape [4, 1, 1]" in reasons["neg-learned-temperature"][0]
    (site,) = run_case(BY_ID["neg-mha-weights-returned"])[2].sites
    assert site.status == "dense-fallback" and "need_weights=False" in site.reason


def test_debug_names_one_node(monkeypatch, capsys):
    def f(q, k, v):
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        return torch.softmax(a @ k.transpose(-2, -1), dim=-2) @ v
    q = torch.randn(1, 2, 8, 4)
    monkeypatch.setenv("PLANNER_DEBUG", "match:softmax_1")
    planner.compile(f, policy="dense")(q, q, q)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "[planner.match]" in ln]
    assert len(lines) == 1 and lines[0].startswith("[planner.match] softmax_1") \
        and "not the key axis" in lines[0], lines


class _FloatScale(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1) @ v


def test_scale_known_only_at_run_time():
    """A float attribute that differs between compiled instances becomes a run-time scalar in
    Dynamo's graph (``self.scale`` -> ``tensor.item()``); it is applied to q, exactly."""
    q, k, v = torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    for scale in (0.3, 0.2, 0.1):
        m = _FloatScale(scale)
        cm = planner.compile(m, policy="dense")
        assert max_err(cm(q, k, v), m(q, k, v)) <= 1e-5
        (site,) = planner.inspect(cm).sites
        assert site.status == "rewritten", planner.inspect(cm)
    assert ".item()" in planner.inspect(cm).graph_code()     # the last one was run-time
