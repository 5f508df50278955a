"""Every measured figure README.md quotes, checked against the result file it cites.

``FIGURES`` is the table: a README phrase whose ``{}`` are filled, in order, from one file under
``benchmarks/results/`` (a JSON value found by a path, a ratio or span of such values, a
Markdown table cell or a sentence of the Markdown), formatted as the README writes it. The
check renders each phrase from its file and looks for it in README.md (whitespace-insensitive).
A second check reads README's "Measured" table and the paragraphs in ``COVERED_PARAGRAPHS``: every
number there must lie inside one of the rendered phrases, and every phrase found in a table row
must come from a file that row cites.

    python scripts/readme_figures.py            # exit 1 with one line per problem
    python scripts/readme_figures.py --show     # print every phrase as the files render it

Paths: ``rows[case=decode&N=131072&impl=ours].ms`` selects the one element of ``rows`` whose
fields match (``=``: equal, numbers compared as numbers; ``~``: within 0.0005), then its ``ms``.
A Markdown file reads as ``{"tables": [row, ...], "text": str}``: each table row is a dict from
its header to the cell (``**``, backticks stripped), every table of the file in one list.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
README = os.path.join(ROOT, "README.md")
COVERED_PARAGRAPHS = ("Speed (H100, `benchmarks/results/dsa_h100.md`)",
                      "What the page shows (`benchmarks/results/explain/")


# ----------------------------------------------------------------------------- reading files

def _md_tables(text: str) -> list:
    rows, header = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip().replace("**", "").replace("`", "") for c in line.strip("|").split("|")]
        if header is None:
            header = cells
        elif not all(set(c) <= set("-: ") for c in cells):
            rows.append(dict(zip(header, cells)))
    return rows


_DOCS: dict = {}


def load(rel: str) -> Any:
    """The parsed file ``benchmarks/results/<rel>`` (cached)."""
    if rel not in _DOCS:
        path = os.path.join(RESULTS, rel)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        _DOCS[rel] = json.loads(text) if rel.endswith(".json") else {
            "tables": _md_tables(text), "text": text}
    return _DOCS[rel]


def _matches(value, want: str, approx: bool) -> bool:
    try:
        a, b = float(value), float(want)
        return abs(a - b) <= 5e-4 if approx else a == b
    except (TypeError, ValueError):
        return not approx and str(value) == want


_STEP = re.compile(r"\.?([^.\[\]]+)|\[([^\]]*)\]")


def select(doc: Any, path: str, many: bool = False) -> Any:
    """The value at ``path`` (see the module docstring); ``many``: every element matched by the
    last selector, as a list."""
    cur, matched = doc, None
    for key, sel in (m.groups() for m in _STEP.finditer(path)):
        if key is not None:
            cur = cur[int(key)] if isinstance(cur, list) else cur[key]
            if matched is not None:
                matched = [m[key] for m in matched]
            continue
        conds = []
        for c in sel.split("&"):
            i = min((c.find(op) for op in "=~" if op in c), default=-1)
            if i < 0:
                raise ValueError(f"selector {c!r} in {path!r} is not field=value or field~value")
            conds.append((c[:i], c[i + 1:], c[i] == "~"))
        found = [r for r in cur if all(f in r and _matches(r[f], v, ap) for f, v, ap in conds)]
        if many:
            matched, cur = found, found
            continue
        if len(found) != 1:
            raise LookupError(f"[{sel}] matches {len(found)} elements, expected one")
        cur = found[0]
    return matched if many else cur


# ----------------------------------------------------------------------------- values

def sig2(x: float) -> str:
    """Signed, two significant digits: 8.61 -> +8.6, 17.7 -> +18, 9.96 -> +10, 2.96 -> +3.0."""
    r = float(f"{x:.2g}")
    return f"{r:+.0f}" if abs(r) >= 10 else f"{r:+.1f}"


_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def _fmt(x: Any, spec: str) -> str:
    if spec == "sig2":
        return sig2(x)
    if spec == "words":
        return _WORDS.get(int(x), str(x))
    if spec == "str":
        return str(x)
    if spec == "d":
        if float(x) != int(x):
            raise ValueError(f"{x} is not a whole number")
        return str(int(x))
    return format(x, spec)


@dataclass(frozen=True)
class V:
    """The value at ``path`` of the figure's file, formatted with ``fmt`` (a format spec,
    ``sig2``, ``words`` or ``str``)."""
    path: str
    fmt: str = "str"

    def render(self, doc) -> str:
        return _fmt(float(select(doc, self.path)) if self.fmt != "str" else
                    select(doc, self.path), self.fmt)


@dataclass(frozen=True)
class Ratio:
    """``num / den`` of two paths."""
    num: str
    den: str
    fmt: str = ".2f"

    def render(self, doc) -> str:
        return _fmt(float(select(doc, self.num)) / float(select(doc, self.den)), self.fmt)


@dataclass(frozen=True)
class Fn:
    """A value derived by ``fn(doc)`` (for sums, shares and spans); ``what`` says how."""
    what: str
    fn: Callable
    fmt: str = "str"

    def render(self, doc) -> str:
        return _fmt(self.fn(doc), self.fmt)


@dataclass(frozen=True)
class Sentence:
    """The first group of ``pattern`` in the Markdown's text (a figure stated in prose)."""
    pattern: str

    def render(self, doc) -> str:
        m = re.search(self.pattern, doc["text"])
        if not m:
            raise LookupError(f"no sentence matches {self.pattern!r}")
        return m.group(1)


@dataclass(frozen=True)
class Figure:
    file: str                      # under benchmarks/results/
    phrase: str                    # README text; each {} is one of values, in order
    values: tuple = ()

    def render(self) -> str:
        doc = load(self.file)
        return self.phrase.format(*(v.render(doc) for v in self.values))


def span(values, fmt: str) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}-{hi:{fmt}}"


_FOUR = ("dense", "block_topk", "auto", "sink_window")


def _ev(doc, table: str, budget):
    """The eviction file's row of ``table`` at ``budget`` (None: the dense cache)."""
    return next(r for r in doc[table] if r["budget"] == budget)


def _speed_cells() -> tuple:
    """A model_speed file's count of cells of the four policies at >= 0.97x, their number, the
    lowest of them, and block_topk's speed at 65536 tokens on the three models."""
    return (Fn("cells of the four policies at >= 0.97x", lambda d: sum(
                r["speed"] >= 0.97 for r in d["rows"] if r["policy"] in _FOUR), "d"),
            Fn("cells of the four policies", lambda d: sum(
                r["policy"] in _FOUR for r in d["rows"]), "d"),
            Fn("lowest speed of the four policies", lambda d: min(
                r["speed"] for r in d["rows"] if r["policy"] in _FOUR), ".2f"),
            *(V(f"rows[model={m}&N=65536&policy=block_topk].speed", ".2f")
              for m in ("smollm2-135m", "llama3-8b-4l", "qwen2.5-7b-4l")))


def _ev_at(doc, length: int):
    """The eviction file's dense row at one prompt length."""
    return next(r for r in doc["rows"] if r["budget"] is None and r["length"] == length)


def _verdicts(doc) -> dict:
    """The architecture sweep's count per verdict (its first table)."""
    return {r["verdict"]: int(r["architectures"]) for r in doc["tables"]
            if "architectures" in r and "verdict" in r}


def _dsa(doc, impl: str, n=None) -> list:
    """The native-DSA file's prefill rows of ``impl`` (at ``n`` tokens where given)."""
    return [r for r in doc["rows"] if r.get("case") == "prefill" and r.get("impl") == impl
            and (n is None or r["N"] == n)]


def _cp(doc, policy: str) -> list:
    """The context-parallel file's rows of ``policy`` (its name, parameters aside)."""
    return [r for r in doc["rows"] if r["policy"].split("(")[0] == policy]


# ----------------------------------------------------------------------------- the table

def _kr(case: str, N: int, impl: str, dens: Optional[str] = None) -> str:
    d = f"&density~{dens}" if dens else ""
    return f"rows[case={case}&N={N}{d}&impl={impl}].ms"


def _share(doc, N, policy, graph=False):
    r = select(doc, f"rows[case=prefill&N={N}&policy={policy}]")
    g = "_graph" if graph else ""
    tot = r[f"estimator{g}_ms"] + r[f"selection{g}_ms"] + r[f"attend{g}_ms"] if graph else \
        r["total_ms"]
    return (r[f"estimator{g}_ms"] + r[f"selection{g}_ms"]) / tot


def _repeat_ideal(doc) -> list:
    """ours / ideal at 3% (N = 65536) in each run of the repeats file."""
    runs = sorted({r["repeat"] for r in doc["rows"] if "repeat" in r})
    return [select(doc, f"rows[repeat={i}&density~0.031&impl=ours].ms")
            / select(doc, f"rows[repeat={i}&density~0.031&impl=ideal].ms") for i in runs]


def _q(policy: str, length: int, field: str, fmt: str) -> V:
    return V(f"rows[policy={policy}&length={length}].{field}", fmt)


def _acc(policy, length):
    return _q(policy, length, "retrieval_acc", ".2f")


def _ppl(policy, length):
    return _q(policy, length, "ppl_delta_pct", "sig2")


def _hits(policy, length):
    return Fn("exact-match hits", lambda d: round(
        select(d, f"rows[policy={policy}&length={length}].retrieval_acc")
        * select(d, f"rows[policy={policy}&length={length}].retrieval_n")), "d")


def _quality(file: str, length: int, head: str, items, tail: str = "", tail_values=(),
             ppl_label: bool = True) -> Figure:
    """``head``, then ``name acc (ppl)`` for each (README name, policy label) of ``items``, then
    ``tail`` (filled from ``tail_values``); ``ppl_label``: the first item says ``(ppl +x%)``."""
    parts, values = [], []
    for i, (name, label) in enumerate(items):
        parts.append(f"{name} {{}} ({'ppl ' if i == 0 and ppl_label else ''}{{}}%)")
        values += [_acc(label, length), _ppl(label, length)]
    return Figure(file, head + ", ".join(parts) + tail, tuple(values) + tuple(tail_values))


K = "kernels_h100.json"
REP = "kernels_h100_65536_repeats.json"
SQ = "quality/smollm2_135m.json"
SH = "quality/smollm2_135m_h100.json"
S50 = "quality/smollm2_135m_h100_2048x50.json"
GM = "quality/gemma3_270m.json"
EX = "explain/explain_smollm2_135m_4096.json"
EQ = "quality/eviction_vs_kvpress.json"


def _eq_best(doc, protocol: str = "aware") -> str:
    """The one policy that is best at every budget of ``protocol`` on the planner's side and,
    by its kvpress namesake, on kvpress's (else an error)."""
    best = [b for b in doc["best"] if b["protocol"] == protocol]
    names = {b["planner_best"] for b in best}
    if len(names) != 1 or any(not (b["kvpress_best"] or "").lower().startswith(
            b["planner_best"].replace("_", "")) for b in best):
        raise LookupError(f"not one best policy on both sides: {best}")
    return names.pop()


def _eq(doc, protocol: str) -> list:
    """The eviction-quality rows of ``protocol`` that have a kvpress namesake on the same
    prompts."""
    return [r for r in doc["rows"] if r["protocol"] == protocol and "agree" in r]


def _ex(doc, policy: str) -> dict:
    return next(p for p in doc["policies"] if p["policy"] == policy)


def _layer(site: str) -> int:
    return int(re.search(r"\d+", site).group())


def _needle_layers(doc, i: int, field: str):
    """Of threshold's sites, the three where the needle holds the most of the last row's dense
    attention, in layer order: the i-th one's ``field``."""
    top = sorted(_ex(doc, "threshold")["sites"], key=lambda s: -s["needle_dense_mass"])[:3]
    site = sorted(top, key=lambda s: _layer(s["site"]))[i]
    return _layer(site["site"]) if field == "layer" else f"{100 * site[field]:.0f}%"


def _window_mass(doc, i: int, field: str):
    """Of sink_window's sites, the two where the dropped needle held the most attention."""
    top = sorted(_ex(doc, "sink_window@25%")["sites"], key=lambda s: -s["needle_dense_mass"])[:2]
    site = sorted(top, key=lambda s: _layer(s["site"]))[i]
    return _layer(site["site"]) if field == "layer" else f"{100 * site[field]:.0f}%"


def _low_recall_layers(doc) -> str:
    """sink_window's layers of recall under 0.6 (one run of layers): "first-last"."""
    low = [_layer(s["site"]) for s in _ex(doc, "sink_window@25%")["sites"] if s["recall"] < 0.6]
    if low != list(range(low[0], low[-1] + 1)):
        raise ValueError(f"layers of recall under 0.6 are not one run: {low}")
    return f"{low[0]}-{low[-1]}"


def _threshold_dropped(doc) -> list:
    return [s for s in _ex(doc, "threshold")["sites"] if s["needle_kept"] == 0.0]

FIGURES = [
    # ---- kernels_h100
    Figure(K, "decode top-2048 at 128k: {}x faster than gather+SDPA, {}x the bandwidth floor "
              "({}x as CUDA-graph replays)",
           (Ratio(_kr("decode", 131072, "torch_gather_sdpa"), _kr("decode", 131072, "ours"), ".1f"),
            Ratio(_kr("decode", 131072, "ours"), _kr("decode", 131072, "floor"), ".1f"),
            Ratio(_kr("decode", 131072, "ours_graph"), _kr("decode", 131072, "floor"), ".1f"))),
    Figure(K, "block-sparse prefill 64k: {}x faster than FlexAttention at its best (`{}`: the "
              "full blocks apart from the partial ones, as `create_block_mask` builds them) at "
              "12% density ({} of the ideal), {}x at 3% (`{}`; {} of the ideal,",
           (Ratio(_kr("prefill_blocksparse", 65536, "flex_best", "0.121"),
                  _kr("prefill_blocksparse", 65536, "ours", "0.121")),
            V("rows[case=prefill_blocksparse&N=65536&density~0.121&impl=flex_best].of"),
            Ratio(_kr("prefill_blocksparse", 65536, "ours", "0.121"),
                  _kr("prefill_blocksparse", 65536, "ideal", "0.121"), ".0%"),
            Ratio(_kr("prefill_blocksparse", 65536, "flex_best", "0.031"),
                  _kr("prefill_blocksparse", 65536, "ours", "0.031")),
            V("rows[case=prefill_blocksparse&N=65536&density~0.031&impl=flex_best].of"),
            Ratio(_kr("prefill_blocksparse", 65536, "ours", "0.031"),
                  _kr("prefill_blocksparse", 65536, "ideal", "0.031"), ".0%"))),
    Figure(REP, "{}-{}% in {} earlier runs of the same kernel, `kernels_h100_65536_repeats.md`)",
           (Fn("lowest ours / ideal at 3% over the runs, in %",
               lambda d: 100 * min(_repeat_ideal(d)), ".0f"),
            Fn("highest ours / ideal at 3% over the runs, in %",
               lambda d: 100 * max(_repeat_ideal(d)), ".0f"),
            Fn("runs", lambda d: len(_repeat_ideal(d)), "words"))),
    Figure(K, "against FlexAttention with every block partial (`flex`), {}x / {}x",
           (Ratio(_kr("prefill_blocksparse", 65536, "flex", "0.121"),
                  _kr("prefill_blocksparse", 65536, "ours", "0.121")),
            Ratio(_kr("prefill_blocksparse", 65536, "flex", "0.031"),
                  _kr("prefill_blocksparse", 65536, "ours", "0.031")))),
    Figure(K, "full causal {}x / {}x SDPA's time at 16k / 64k (head dim 64: "
              "`kernels_h100_d64.md`)",
           (Ratio(_kr("prefill_causal", 16384, "ours"), _kr("prefill_causal", 16384, "sdpa")),
            Ratio(_kr("prefill_causal", 65536, "ours"), _kr("prefill_causal", 65536, "sdpa")))),
    # ---- policies_h100, policies_decode_h100
    Figure("policies_h100.json",
           "64k, estimator+selection share of the sparse total (target <= 15%): block_topk {} "
           "({}x faster than dense SDPA), threshold {}, vertical_slash {}, auto {} ({}x faster "
           "than dense; {} of the GPU time without launches), quest {} (page-16 prefill: its page "
           "bounds alone are 1/16 of dense attention's arithmetic); all estimators in Triton",
           (Fn("(est+sel)/total", lambda d: _share(d, 65536, "block_topk"), ".1%"),
            Ratio("rows[N=65536&policy=block_topk].dense_ms",
                  "rows[N=65536&policy=block_topk].total_ms", ".1f"),
            Fn("(est+sel)/total", lambda d: _share(d, 65536, "threshold"), ".1%"),
            Fn("(est+sel)/total", lambda d: _share(d, 65536, "vertical_slash"), ".1%"),
            Fn("(est+sel)/total", lambda d: _share(d, 65536, "auto"), ".1%"),
            Ratio("rows[N=65536&policy=auto].dense_ms", "rows[N=65536&policy=auto].total_ms",
                  ".1f"),
            Fn("graph (est+sel)/total", lambda d: _share(d, 65536, "auto", graph=True), ".1%"),
            Fn("(est+sel)/total", lambda d: _share(d, 65536, "quest"), ".1%"))),
    Figure("policies_decode_h100.json",
           "quest decode step (B=8, 128k): {}x faster than dense with the page summaries kept "
           "with the cache (`policies_decode_h100.md`), {}x when they are recomputed each step",
           (Ratio("rows[case=decode B=8, summaries kept&N=131072].dense_ms",
                  "rows[case=decode B=8, summaries kept&N=131072].total_ms", ".1f"),
            Ratio("rows[case=decode B=8&N=131072].dense_ms",
                  "rows[case=decode B=8&N=131072].total_ms", ".1f"))),
    # ---- costmodel_h100
    Figure("costmodel_h100.json",
           "dense + {} block-sparse tile schedules + {} decode splits per point: chosen candidate "
           "within 10% of the fastest in {} of {} points (fitted on all of them; fitted on D=128 "
           "alone, {} of the D=64 points); estimate error median {}; at N=1024 the compiled model "
           "runs at {}x of the original's speed (dense planned), at 16k {}x (block_topk through "
           "the variant the model chose)",
           (Fn("block_sparse@ schedules fitted", lambda d: sum(
               k.startswith("block_sparse@") for k in d["fit"]["kernels"]), "d"),
            Fn("token_sparse_decode@ splits fitted", lambda d: sum(
                k.startswith("token_sparse_decode@") for k in d["fit"]["kernels"]), "d"),
            V("summary.chosen_within_10pct", ".0%"), V("summary.points", ".0f"),
            V("summary.chosen_within_10pct_D64_fitted_on_D128", ".0%"),
            V("summary.est_err_median", ".0%"),
            V("end_to_end[N=1024].speed_ratio", ".2f"),
            V("end_to_end[N=16384].speed_ratio", ".2f"))),
    # ---- DSA: dsa_h100, dsa_mqa_h100, indexer_h100, dsa_decode_h100
    Figure("dsa_h100.json",
           "64k, MQA 16x128, top-2048: forward {} ms vs dense SDPA {} ms = {}x (fused top-k {} "
           "ms, gather attention {} ms; target 3x missed);",
           (V("rows[case=fwd&N=65536&layout=mqa&impl=dsa_fwd].ms", ".1f"),
            V("rows[case=fwd&N=65536&layout=mqa&impl=dense_sdpa].ms", ".1f"),
            Ratio("rows[case=fwd&N=65536&layout=mqa&impl=dense_sdpa].ms",
                  "rows[case=fwd&N=65536&layout=mqa&impl=dsa_fwd].ms"),
            V("rows[case=fwd&N=65536&layout=mqa&impl=indexer_topk].ms", ".1f"),
            V("rows[case=fwd&N=65536&layout=mqa&impl=sparse_attend].ms", ".1f"))),
    Figure("dsa_mqa_h100.json",
           "the gather attention is {}x its floor, a kernel that only reads the selected K/V rows "
           "({} ms, {} TB/s from L2; `dsa_mqa_h100.md`)",
           (Ratio("rows[case=fwd&N=65536&impl=sparse_attend].ms",
                  "rows[case=fwd&N=65536&impl=gather_floor].ms"),
            V("rows[case=fwd&N=65536&impl=gather_floor].ms", ".1f"),
            Fn("gathered GB / floor ms", lambda d: select(
                d, "rows[case=fwd&N=65536&impl=gather_floor].gathered_gb") / select(
                d, "rows[case=fwd&N=65536&impl=gather_floor].ms"), ".1f"))),
    Figure("dsa_h100.json",
           "sparse backward {}x faster than SDPA's; fused top-k {}x faster than the naive N x N "
           "path at 16k",
           (Ratio("rows[case=bwd&N=65536&layout=mqa&impl=dense_bwd].ms",
                  "rows[case=bwd&N=65536&layout=mqa&impl=sparse_bwd].ms"),
            Ratio("rows[case=fwd&N=16384&impl=naive_indexer].ms",
                  "rows[case=fwd&N=16384&layout=mqa&impl=indexer_topk].ms", ".1f"))),
    Figure("indexer_h100.json", "({}x in the indexer probe, `indexer_h100.md`)",
           (Ratio("timings[case=naive scores + torch.topk N=16384].ms",
                  "timings[case=indexer_topk N=16384].ms", ".1f"),)),
    Figure("dsa_decode_h100.json",
           "decode step (B=8, 128k) as CUDA-graph replays {} ms with the indexer keys kept with "
           "the cache vs {} ms projecting the cache each step and dense SDPA {} ms: {}x faster "
           "(`dsa_decode_h100.md`; eager steps are host-bound there, {} ms vs dense {})",
           (V("rows[case=decode_graph&impl=dsa_step_kept_keys].ms", ".2f"),
            V("rows[case=decode_graph&impl=dsa_step].ms", ".2f"),
            V("rows[case=decode_graph&impl=dense_sdpa].ms", ".2f"),
            Ratio("rows[case=decode_graph&impl=dense_sdpa].ms",
                  "rows[case=decode_graph&impl=dsa_step_kept_keys].ms", ".1f"),
            V("rows[case=decode&impl=dsa_step_kept_keys].ms", ".2f"),
            V("rows[case=decode&impl=dense_sdpa].ms", ".2f"))),
    Figure("dsa_h100.json", "MHA (16 KV heads) re-gathers per head: {}x slower than dense",
           (Ratio("rows[case=fwd&N=65536&layout=mha&impl=dsa_fwd].ms",
                  "rows[case=fwd&N=65536&layout=mha&impl=dense_sdpa].ms", ".0f"),)),
    Figure("dsa_h100.json",
           "at 64k, 16 heads x 128 over one K/V head, top-2048, the forward is {}x faster than "
           "dense SDPA and the backward {}x; with 16 K/V heads (MHA) every head gathers its own "
           "rows and DSA is {}x slower than dense.",
           (Ratio("rows[case=fwd&N=65536&layout=mqa&impl=dense_sdpa].ms",
                  "rows[case=fwd&N=65536&layout=mqa&impl=dsa_fwd].ms"),
            Ratio("rows[case=bwd&N=65536&layout=mqa&impl=dense_bwd].ms",
                  "rows[case=bwd&N=65536&layout=mqa&impl=sparse_bwd].ms"),
            Ratio("rows[case=fwd&N=65536&layout=mha&impl=dsa_fwd].ms",
                  "rows[case=fwd&N=65536&layout=mha&impl=dense_sdpa].ms", ".0f"))),
    # ---- DSA indexer warm-up
    Figure("quality/dsa_warmup_smollm2.json",
           "{} tokens, top-{}: held-out recall {} -> {}, KL {} -> {}, perplexity with dsa {} -> {} "
           "(dense {})",
           (V("seq", "d"), V("topk", "d"), V("before.recall", ".2f"), V("after.recall", ".2f"),
            V("before.kl", ".2f"), V("after.kl", ".2f"), V("before.ppl_dsa", ".1f"),
            V("after.ppl_dsa", ".1f"), V("ppl_dense", ".1f"))),
    # ---- quality, SmolLM2 on CPU
    _quality(SQ, 2048, "2048 tokens, ~25% density: retrieval (48 prompts) ", [
        ("vertical_slash", "vertical_slash@25%:block=16"), ("threshold", "threshold@25%:block=16"),
        ("auto", "auto@25%"), ("quest", "quest@25%"), ("block_topk", "block_topk@25%"),
        ("bigbird", "bigbird@25%"), ("sink_window", "sink_window@25%")]),
    Figure(SQ, "dsa {} untrained ({}%) and warmed up ({}%); dense {}. ~10%:",
           (_acc("dsa@25%:index_heads=4,index_dim=32", 2048),
            _ppl("dsa@25%:index_heads=4,index_dim=32", 2048), _ppl("dsa-warm", 2048),
            _acc("dense", 2048))),
    _quality(SQ, 2048, "~10%: ", [
        ("threshold", "threshold@10%:block=16"), ("vertical_slash", "vertical_slash@10%:block=16"),
        ("auto", "auto@10%"), ("block_topk", "block_topk@10%"), ("quest", "quest@10%"),
        ("sink_window", "sink_window@10%"), ("longformer", "longformer@10%"),
        ("bigbird", "bigbird@10%")], ppl_label=False),
    Figure(SQ, "dsa untrained {} ({}%) and warmed up {} ({}%)",
           (_acc("dsa@10%:index_heads=4,index_dim=32", 2048),
            _ppl("dsa@10%:index_heads=4,index_dim=32", 2048),
            _acc("dsa-warm~10%", 2048), _ppl("dsa-warm~10%", 2048))),
    # ---- quality, SmolLM2 on the H100
    _quality(SH, 8192, "8192 tokens, 48 prompts per row: ~25% density: retrieval ", [
        ("threshold", "threshold~25%"), ("vertical_slash", "vertical_slash~25%"),
        ("auto", "auto@25%"), ("quest", "quest@25%"), ("dsa warmed up", "dsa-warm"),
        ("block_topk", "block_topk@25%:block=16"), ("bigbird", "bigbird@25%"),
        ("sink_window", "sink_window@25%"), ("longformer", "longformer@25%")],
        "; dense {}. ~10%: ", (_acc("dense", 8192),)),
    _quality(SH, 8192, "~10%: ", [
        ("threshold", "threshold~10%"), ("vertical_slash", "vertical_slash~10%"),
        ("auto", "auto@10%"), ("quest", "quest@10%"), ("block_topk", "block_topk@10%:block=16"),
        ("sink_window", "sink_window@10%"), ("longformer", "longformer@10%"),
        ("bigbird", "bigbird@10%"), ("dsa warmed up", "dsa-warm~10%")], ppl_label=False),
    Figure(SH, "untrained {} ({}%; at 25%: {}, {}%)",
           (_acc("dsa@10%:index_heads=4,index_dim=32", 8192),
            _ppl("dsa@10%:index_heads=4,index_dim=32", 8192),
            _acc("dsa@25%:index_heads=4,index_dim=32", 8192),
            _ppl("dsa@25%:index_heads=4,index_dim=32", 8192))),
    # ---- quality, the 50-trial contrast
    Figure(S50, "2048 tokens, 400 prompts per row: threshold at {} density retrieves {} ({}/{}; "
                "ppl {}%), as dense ({}, {}/{}); sink_window at {} {} ({}%); at ~10%: threshold "
                "{} ({}/{}, {}%), sink_window {} ({}%)",
           (V("rows[policy=threshold~25%&length=2048].density", ".0%"),
            _acc("threshold~25%", 2048), _hits("threshold~25%", 2048),
            V("rows[policy=threshold~25%&length=2048].retrieval_n", "d"),
            _ppl("threshold~25%", 2048),
            _acc("dense", 2048), _hits("dense", 2048),
            V("rows[policy=dense&length=2048].retrieval_n", "d"),
            V("rows[policy=sink_window@25%&length=2048].density", ".0%"),
            _acc("sink_window@25%", 2048), _ppl("sink_window@25%", 2048),
            _acc("threshold~10%", 2048), _hits("threshold~10%", 2048),
            V("rows[policy=threshold~10%&length=2048].retrieval_n", "d"),
            _ppl("threshold~10%", 2048),
            _acc("sink_window@10%", 2048), _ppl("sink_window@10%", 2048))),
    # ---- quality, Gemma-3-270m on CPU
    _quality(GM, 2048, "2048 tokens, ~25% density on the global layers: retrieval (48 prompts) ", [
        ("threshold", "threshold@25%:block=16"), ("vertical_slash", "vertical_slash@25%:block=16"),
        ("block_topk", "block_topk@25%"), ("auto", "auto@25%"), ("quest", "quest@25%"),
        ("bigbird", "bigbird@25%"), ("sink_window", "sink_window@25%"),
        ("longformer", "longformer@25%")], "; dense {}", (_acc("dense", 2048),)),
    # ---- model_prefill_h100
    Figure("model_prefill_h100.json",
           "host-bound: threshold {} ms of GPU work and {} kernels per prefill, {}-{} ms wall",
           (V("rows[policy=threshold:gamma=0.8281,block=16&density_counting=True].gpu_busy_ms",
              ".1f"),
            V("rows[policy=threshold:gamma=0.8281,block=16&density_counting=True].kernels", "d"),
            V("rows[policy=threshold:gamma=0.8281,block=16&density_counting=False].wall_ms",
              ".0f"),
            V("rows[policy=threshold:gamma=0.8281,block=16&density_counting=True].wall_ms",
              ".0f"))),
    Figure("model_prefill_h100.md",
           "(was {} ms, {} kernels, {} ms) with its pooled part and selection in Triton; "
           "block_topk",
           (V("tables[policy=threshold&run=before].GPU busy ms"),
            V("tables[policy=threshold&run=before].kernels (density counted)"),
            Sentence(r"against (\d+-\d+) ms in earlier runs"))),
    Figure("model_prefill_h100.json", "block_topk {} ms GPU with its GQA groups in Triton",
           (V("rows[policy=block_topk@0.25:block=16&density_counting=True].gpu_busy_ms", ".1f"),)),
    Figure("model_prefill_h100.md",
           "(was {} ms); dense {} ms GPU, {} ms wall; density counting {} kernels per layer",
           (V("tables[policy=block_topk&run=before its GQA path].GPU busy ms"),
            V("tables[policy=dense&density counted=yes].GPU busy ms"),
            Fn("wall ms, rounded", lambda d: float(select(
                d, "tables[policy=dense&density counted=yes].wall ms / prefill")), ".0f"),
            Sentence(r"costs (\d+) kernels per layer"))),
    # ---- e2e_h100
    Figure("e2e_h100.json",
           "N=65536: block_topk {}x (through the Hopper kernel), sink_window {}x faster than the "
           "original; N=4096: dense planned, {}x",
           (V("rows[N=65536&impl=block_topk(block=128, topk=16)].speed", ".2f"),
            V("rows[N=65536&impl=sink_window(sink=128, window=2048)].speed", ".2f"),
            Fn("span of the compiled rows' speed at N=4096", lambda d: span(
                [r["speed"] for r in select(d, "rows[N=4096]", many=True)
                 if not r["impl"].startswith("original")], ".2f")))),
    # ---- explain (README "Seeing what was kept")
    Figure(EX, "one passkey prompt of {} tokens, the needle at depth {}, {} s for both policies "
           "on {} CPU threads",
           (V("meta.tokens", "d"), V("meta.depth"), V("meta.wall_s", ".0f"),
            V("meta.threads", "d"))),
    Figure(EX, "threshold keeps {} of the pairs and {} of the dense attention mass. For the "
           "question (the last query row) it keeps only {} of the needle's (head, token) pairs, "
           "but where the needle draws the attention: in layers {}, {} and {} the needle holds "
           "{}, {} and {} of that row's dense attention and threshold keeps {}, {} and {} of it; "
           "the {} layers that drop the needle whole gave it at most {} of theirs. It answers "
           "({}/{} answer tokens)",
           (Fn("threshold density", lambda d: _ex(d, "threshold")["density"], ".2f"),
            Fn("threshold recall", lambda d: _ex(d, "threshold")["recall"], ".2f"),
            Fn("threshold needle kept", lambda d: _ex(d, "threshold")["needle_kept"], ".2f"))
           + tuple(Fn(f"needle layer {i}", lambda d, i=i: _needle_layers(d, i, "layer"), "d")
                   for i in range(3))
           + tuple(Fn(f"needle mass {i}", lambda d, i=i: _needle_layers(
               d, i, "needle_dense_mass")) for i in range(3))
           + tuple(Fn(f"needle mass kept {i}", lambda d, i=i: _needle_layers(
               d, i, "needle_mass_kept")) for i in range(3))
           + (Fn("layers dropping the needle whole", lambda d: len(_threshold_dropped(d)), "d"),
              Fn("most needle mass among them", lambda d: "{:.0f}%".format(100 * max(
                  s["needle_dense_mass"] for s in _threshold_dropped(d)))),
              V("policies[policy=threshold].answer_tokens_correct", "d"),
              V("policies[policy=threshold].answer_tokens", "d"))),
    Figure(EX, "its worst sampled row keeps {} of its mass (layer {})",
           (Fn("threshold worst row", lambda d: _ex(d, "threshold")["recall_worst"], ".2f"),
            Fn("its layer", lambda d: _layer(min(_ex(d, "threshold")["sites"],
                                                 key=lambda s: s["recall_worst"])["site"]), "d"))),
    Figure(EX, "sink_window@25% ({}) keeps {} of the pairs and {} of the mass, but no layer "
           "keeps any of the needle "
           "(needle kept {}), though it held {} and {} of the last row's attention in layers "
           "{} and {}: the answer is missed (log-probability {} against threshold's {}). Its "
           "recall is lowest in layers {}",
           (V("policies[policy=sink_window@25%].params"),
            Fn("window density", lambda d: _ex(d, "sink_window@25%")["density"], ".2f"),
            Fn("window recall", lambda d: _ex(d, "sink_window@25%")["recall"], ".2f"),
            Fn("window needle kept", lambda d: _ex(d, "sink_window@25%")["needle_kept"], ".2f"),
            Fn("mass 0", lambda d: _window_mass(d, 0, "needle_dense_mass")),
            Fn("mass 1", lambda d: _window_mass(d, 1, "needle_dense_mass")),
            Fn("layer 0", lambda d: _window_mass(d, 0, "layer"), "d"),
            Fn("layer 1", lambda d: _window_mass(d, 1, "layer"), "d"),
            Fn("window log p", lambda d: _ex(d, "sink_window@25%")["answer_logprob"], ".1f"),
            Fn("threshold log p", lambda d: _ex(d, "threshold")["answer_logprob"], ".2f"),
            Fn("low-recall layers", _low_recall_layers))),
    Figure(EX, "({}-{})", (
        Fn("lowest", lambda d: min(s["recall"] for s in _ex(d, "sink_window@25%")["sites"]
                                   if s["recall"] < 0.6), ".2f"),
        Fn("highest under 0.6", lambda d: max(
            s["recall"] for s in _ex(d, "sink_window@25%")["sites"] if s["recall"] < 0.6),
            ".2f"))),
    # ---- model_speed_cpu
    Figure("model_speed_cpu.json",
           "{} to {} tokens, the default cost model on: every catalogue policy's default at "
           "{}-{}x the original's speed (the sites run densely there); dsa {}-{}x (it runs "
           "densely there too, its indexer no longer run)",
           (Fn("shortest length", lambda d: min(r["N"] for r in d["rows"]), "d"),
            Fn("longest length", lambda d: max(r["N"] for r in d["rows"]), "d"),
            Fn("lowest speed but dsa", lambda d: min(
                r["speed"] for r in d["rows"] if r["policy"] != "dsa"), ".2f"),
            Fn("highest speed but dsa", lambda d: max(
                r["speed"] for r in d["rows"] if r["policy"] != "dsa"), ".2f"),
            Fn("lowest dsa speed", lambda d: min(
                r["speed"] for r in d["rows"] if r["policy"] == "dsa"), ".2f"),
            Fn("highest dsa speed", lambda d: max(
                r["speed"] for r in d["rows"] if r["policy"] == "dsa"), ".2f"))),
    # ---- architectures_cpu
    Figure("architectures_cpu.md",
           "With transformers {} (`architectures_cpu.md`), {} of its {} classes built from a "
           "tiny\nconfig and every one of them is exact under `dense`: {} with their sites "
           "rewritten, {} whose\nsites stay dense with the reason (ProphetNet), {} whose softmax "
           "is left alone with the reason,\n{} without attention (Mamba, Mamba2, FalconMamba, "
           "RWKV); {} wrong, {} failing. The other {} did\nnot build",
           (Sentence(r"transformers (\d+\.\d+\.\d+), torch"),
            Fn("built", lambda d: sum(n for v, n in _verdicts(d).items()
                                      if v.startswith("exact")), "d"),
            Fn("classes", lambda d: sum(_verdicts(d).values()), "d"),
            *(Fn(f"architectures '{v}'", lambda d, v=v: _verdicts(d)[v], "d")
              for v in ("exact, rewritten", "exact, dense with reason",
                        "exact, no site (softmax left alone, reason shown)", "exact, no site",
                        "WRONG", "FAILS", "not built")))),
    # ---- model_speed_h100
    Figure("model_speed_h100.json",
           "1024 to 65536 tokens, the default cost model on, dense, block_topk, auto and "
           "sink_window: {} of {} cells at or above 0.97x the original's speed (lowest {}x); at "
           "65536 tokens block_topk {}x (SmolLM2-shaped), {}x (Llama), {}x (Qwen); with the ops "
           "outside attention compiled by Inductor, block_topk {}x the eager original and {}x "
           "torch.compile of it (Llama, 65536 tokens)",
           (*_speed_cells(),
            V("rows[model=llama3-8b-4l&N=65536&policy=block_topk@inductor].speed", ".2f"),
            Fn("torch.compile's time / the Inductor remainder's, same run", lambda d: select(
                d, "rows[model=llama3-8b-4l&N=65536&policy=torch.compile].compiled_ms")
                / select(d, "rows[model=llama3-8b-4l&N=65536&policy=block_topk@inductor]"
                         ".compiled_ms"), ".2f"))),
    # ---- eviction_h100
    Figure("eviction_h100.json",
           "Llama-3-8B-shaped (4 layers, bf16), a {}-token prompt, snapkv keeping {}: KV bytes "
           "{}% of dense, the largest batch that decodes {} -> {} sequences, {}x the tokens/s; "
           "the batch-1 decode step {}x",
           (Fn("prompt length", lambda d: _ev(d, "rows", 0.1)["length"], "d"),
            Fn("budget as a percentage", lambda d: f"{_ev(d, 'rows', 0.1)['budget']:.0%}"),
            Fn("KV share", lambda d: 100 * _ev(d, "rows", 0.1)["kv_bytes"]
               / _ev(d, "rows", None)["kv_bytes"], ".1f"),
            Fn("largest dense batch", lambda d: _ev(d, "largest_batch", None)["max_batch"], "d"),
            Fn("largest batch at 10%", lambda d: _ev(d, "largest_batch", 0.1)["max_batch"], "d"),
            Fn("tokens/s ratio", lambda d: _ev(d, "largest_batch", 0.1)["tokens_per_s"]
               / _ev(d, "largest_batch", None)["tokens_per_s"], ".2f"),
            Fn("decode speed-up", lambda d: _ev(d, "rows", None)["decode_ms_per_step"]
               / _ev(d, "rows", 0.1)["decode_ms_per_step"], ".2f"))),
    # ---- model_speed_h200
    Figure("model_speed_h200.json",
           "{} to {} tokens, the default cost model on (before the whole-call check of "
           "`runtime/guard.py` "
           "existed): {} of {} cells of dense, block_topk, auto and sink_window at or above "
           "0.97x the original's speed; lowest {}x (auto, SmolLM2-shaped, 16384 tokens: 30 "
           "host-bound sparse sites); at 65536 tokens block_topk {}x (SmolLM2-shaped), {}x "
           "(Llama), {}x (Qwen)",
           (Fn("shortest", lambda d: min(r["N"] for r in d["rows"]), "d"),
            Fn("longest", lambda d: max(r["N"] for r in d["rows"]), "d"),
            *_speed_cells())),
    Figure("model_speed_h200.json",
           "SmolLM2-shaped at {} tokens on an H200: `auto` {}x, `block_topk` {}x the original",
           (V("rows[model=smollm2-135m&N=16384&policy=auto].N", "d"),
            V("rows[model=smollm2-135m&N=16384&policy=auto].speed", ".2f"),
            V("rows[model=smollm2-135m&N=16384&policy=block_topk].speed", ".2f"))),
    # ---- eviction_h200
    Figure("eviction_h200.json",
           "Llama-3-8B-shaped (4 layers, bf16), a {}-token prompt, snapkv keeping 10%: the "
           "largest batch that decodes {} -> {} sequences, {}x the tokens/s; batch-1 decode "
           "steps are bound by the host and noisy on that machine (dense {} ms a step at {} "
           "tokens, {} ms at {})",
           (Fn("prompt length", lambda d: _ev(d, "largest_batch", 0.1)["length"], "d"),
            Fn("largest dense batch", lambda d: _ev(d, "largest_batch", None)["max_batch"], "d"),
            Fn("largest batch at 10%", lambda d: _ev(d, "largest_batch", 0.1)["max_batch"], "d"),
            Fn("tokens/s ratio", lambda d: _ev(d, "largest_batch", 0.1)["tokens_per_s"]
               / _ev(d, "largest_batch", None)["tokens_per_s"], ".2f"),
            Fn("dense step, shorter prompt", lambda d: _ev_at(d, 32768)["decode_ms_per_step"],
               ".2f"),
            Fn("shorter prompt", lambda d: _ev_at(d, 32768)["length"], "d"),
            Fn("dense step, longer prompt", lambda d: _ev_at(d, 131072)["decode_ms_per_step"],
               ".2f"),
            Fn("longer prompt", lambda d: _ev_at(d, 131072)["length"], "d"))),
    # ---- eviction quality beside kvpress (CPU)
    Figure(EQ, "4096 tokens, question-aware, {} prompts per row, budgets 50/25/10%: the "
               "planner's policies and kvpress's presses of the same name give the same verdict "
               "on {} of {} prompts (the {} that differ are {}'s, whose kvpress "
               "namesake falls back to one budget for every layer at 4k); the best on both "
               "sides is {}, retrieval {} / {} / {} (kvpress {} / {} / {}); dense {}",
           (V("per_row.aware", "d"),
            Fn("same verdicts", lambda d: sum(r["agree"] for r in _eq(d, "aware")), "d"),
            Fn("prompt pairs", lambda d: sum(r["n"] for r in _eq(d, "aware")), "d"),
            Fn("differing", lambda d: sum(r["n"] - r["agree"] for r in _eq(d, "aware")), "d"),
            Fn("policies that differ", lambda d: ", ".join(sorted(
                {r["policy"] for r in _eq(d, "aware") if r["agree"] < r["n"]}))),
            Fn("the best policy of every budget, the same on both sides", lambda d: _eq_best(d)),
            *(V(f"best[protocol=aware&budget~{b}].planner_best_retrieval", ".2f")
              for b in (0.5, 0.25, 0.1)),
            *(V(f"best[protocol=aware&budget~{b}].kvpress_best_retrieval", ".2f")
              for b in (0.5, 0.25, 0.1)),
            V("dense.aware.planner", ".2f"))),
    Figure(EQ, "question-agnostic (the context evicted before the question is read), {} "
               "prompts per row: the best evicting row on either side retrieves {} (dense {}); "
               "same verdict on {} of {} prompts",
           (V("per_row.agnostic", "d"),
            Fn("best retrieval of any evicting row, either side", lambda d: max(
                max(r["planner_retrieval"], r.get("kvpress_retrieval") or 0.0)
                for r in d["rows"] if r["protocol"] == "agnostic"), ".2f"),
            V("dense.agnostic.planner", ".2f"),
            Fn("same verdicts", lambda d: sum(r["agree"] for r in _eq(d, "agnostic")), "d"),
            Fn("prompt pairs", lambda d: sum(r["n"] for r in _eq(d, "agnostic")), "d"))),
    # ---- eviction_h100_cudnn
    Figure("eviction_h100_cudnn.json",
           "with PyTorch's default, cuDNN attention, the dense step takes {} ms",
           (Fn("dense decode ms per step", lambda d: _ev(d, "rows", None)["decode_ms_per_step"],
               ".2f"),)),
    # ---- dsa_native_h100
    Figure("dsa_native_h100.json",
           "the planner's layer runs at {} tokens in {} GB, where Hugging Face's\nlayer would "
           "need about {} GB of index scores and masks, and selects the model's sets (recall\n"
           "{} at {} tokens); its sparse MLA kernel runs at {} TFLOP/s (FlashMLA reports 640 on "
           "an\nH800), yet the layer is slower than dense SDPA over the decompressed K/V at {} "
           "tokens ({}x)\nand level with it at {} ({}x): the indexer with its top-k takes {} of "
           "the {} ms there. A\ndecode step over {} cached tokens at batch {} takes {} ms as a "
           "CUDA-graph replay against\ndense's {} ms ({}x)",
           (Fn("longest planner prefill", lambda d: max(r["N"] for r in _dsa(d, "planner")), "d"),
            Fn("its peak GB", lambda d: max(_dsa(d, "planner"), key=lambda r: r["N"])["peak_gb"],
               ".1f"),
            Fn("HF's need at that length", lambda d: re.search(r"~(\d+) GB", max(
                _dsa(d, "hf"), key=lambda r: r["N"])["skipped"]).group(1)),
            V("rows[case=check].recall", ".4f"),
            V("rows[case=check].N", "d"),
            Fn("best sparse MLA TFLOP/s", lambda d: max(
                r["sparse_mla_tflops"] for r in _dsa(d, "planner")), ".0f"),
            V("rows[case=prefill&impl=planner&N=65536].N", "d"),
            Ratio("rows[case=prefill&impl=dense&N=65536].ms",
                  "rows[case=prefill&impl=planner&N=65536].ms"),
            V("rows[case=prefill&impl=planner&N=131072].N", "d"),
            Ratio("rows[case=prefill&impl=dense&N=131072].ms",
                  "rows[case=prefill&impl=planner&N=131072].ms"),
            V("rows[case=prefill&impl=planner&N=131072].indexer_topk_ms", ".0f"),
            V("rows[case=prefill&impl=planner&N=131072].ms", ".0f"),
            V("rows[case=decode&impl=planner&T=131072&B=8].T", "d"),
            V("rows[case=decode&impl=planner&T=131072&B=8].B", "d"),
            V("rows[case=decode&impl=planner&T=131072&B=8].graph_ms", ".3f"),
            V("rows[case=decode&impl=dense&T=131072&B=8].graph_ms", ".3f"),
            Ratio("rows[case=decode&impl=dense&T=131072&B=8].graph_ms",
                  "rows[case=decode&impl=planner&T=131072&B=8].graph_ms"))),
    # ---- dsa_native_h200
    Figure("dsa_native_h200.json",
           "the sparse MLA kernel runs at {} TFLOP/s and the\nlayer at {} tokens takes {} ms "
           "against dense SDPA's {} ms ({}x; at {} tokens\n{}x, the indexer and its top-k now "
           "half of the layer); a decode step over {} cached tokens\nat batch {} takes {} ms as "
           "a CUDA-graph replay against dense's {} ms ({}x; {}x as eager\ncalls",
           (Fn("best sparse MLA TFLOP/s", lambda d: max(
                r["sparse_mla_tflops"] for r in _dsa(d, "planner")), ".0f"),
            V("rows[case=prefill&impl=planner&N=131072].N", "d"),
            V("rows[case=prefill&impl=planner&N=131072].ms", ".2f"),
            V("rows[case=prefill&impl=dense&N=131072].ms", ".2f"),
            Ratio("rows[case=prefill&impl=dense&N=131072].ms",
                  "rows[case=prefill&impl=planner&N=131072].ms"),
            V("rows[case=prefill&impl=planner&N=65536].N", "d"),
            Ratio("rows[case=prefill&impl=dense&N=65536].ms",
                  "rows[case=prefill&impl=planner&N=65536].ms"),
            V("rows[case=decode&impl=planner&T=131072&B=8].T", "d"),
            V("rows[case=decode&impl=planner&T=131072&B=8].B", "d"),
            V("rows[case=decode&impl=planner&T=131072&B=8].graph_ms", ".3f"),
            V("rows[case=decode&impl=dense&T=131072&B=8].graph_ms", ".3f"),
            Ratio("rows[case=decode&impl=dense&T=131072&B=8].graph_ms",
                  "rows[case=decode&impl=planner&T=131072&B=8].graph_ms"),
            Ratio("rows[case=decode&impl=dense&T=131072&B=8].ms",
                  "rows[case=decode&impl=planner&T=131072&B=8].ms"))),
    # ---- context_parallel_cpu
    Figure("context_parallel_cpu.json",
           "{} and {} gloo processes, {} to {} tokens: block lists equal to the single-device "
           "estimator's in {} of {} sparse runs, dense within {} of SDPA; bytes received / "
           "ring attention's at the same sharding: block_topk {} at {}% block density, "
           "threshold {} ({}%), dense {} (only the causally visible blocks move); no GPU run",
           (Fn("fewest ranks", lambda d: min(r["world"] for r in d["rows"]), "d"),
            Fn("most ranks", lambda d: max(r["world"] for r in d["rows"]), "d"),
            Fn("shortest length", lambda d: min(r["n"] for r in d["rows"]), "d"),
            Fn("longest length", lambda d: max(r["n"] for r in d["rows"]), "d"),
            Fn("sparse runs with equal lists", lambda d: sum(
                r.get("lists_equal") is True for r in d["rows"]), "d"),
            Fn("sparse runs", lambda d: sum("lists_equal" in r for r in d["rows"]), "d"),
            Fn("dense's largest error", lambda d: max(
                r["max_abs_err"] for r in _cp(d, "dense")), ".0e"),
            Fn("block_topk's bytes / ring", lambda d: span(
                [r["bytes_vs_ring"] for r in _cp(d, "block_topk")], ".2f")),
            Fn("block_topk's density", lambda d: span(
                [100 * r["block_density"] for r in _cp(d, "block_topk")], ".0f")),
            Fn("threshold's bytes / ring", lambda d: span(
                [r["bytes_vs_ring"] for r in _cp(d, "threshold")], ".2f")),
            Fn("threshold's density", lambda d: span(
                [100 * r["block_density"] for r in _cp(d, "threshold")], ".0f")),
            Fn("dense's bytes / ring", lambda d: span(
                [r["bytes_vs_ring"] for r in _cp(d, "dense")], ".2f")))),
]


# ----------------------------------------------------------------------------- checks

def _norm(text: str) -> str:
    return " ".join(text.split())


_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)?")


def measured_rows(readme: str) -> list:
    """(cited text, headline) of each row of README's "Measured" table."""
    m = re.search(r"^### Measured\b.*?$(.*?)(?=^#)", readme, flags=re.M | re.S)
    if not m:
        raise LookupError("README.md has no '### Measured' section")
    rows = []
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("what", "---"):
            rows.append((cells[1] + " " + cells[2], cells[2]))
    return rows


def paragraphs(readme: str) -> list:
    out = []
    for para in re.split(r"\n\s*\n", readme):
        if para.strip().startswith(COVERED_PARAGRAPHS):
            out.append(para)
    return out


def check(readme_path: str = README) -> list:
    """One line per problem (empty when every figure matches its file)."""
    with open(readme_path, encoding="utf-8") as f:
        readme = f.read()
    text = _norm(readme)
    problems, rendered = [], []
    for fig in FIGURES:
        try:
            phrase = _norm(fig.render())
        except (OSError, LookupError, KeyError, ValueError, TypeError, IndexError) as e:
            problems.append(f"{fig.file}: cannot fill {fig.phrase[:60]!r}...: "
                            f"{type(e).__name__}: {e}")
            continue
        rendered.append((fig, phrase))
        if phrase not in text:
            problems.append(f"{fig.file}: README.md does not say (as the file does): {phrase!r}")
    blocks = [(cited, head) for cited, head in measured_rows(readme)]
    blocks += [(p, p) for p in paragraphs(readme)]
    for cited, block in blocks:
        block = _norm(block)
        covered = [False] * len(block)
        for fig, phrase in rendered:
            for m in re.finditer(re.escape(phrase), block):
                stem = os.path.splitext(os.path.basename(fig.file))[0]
                if stem + ".md" not in cited and stem + ".json" not in cited:
                    problems.append(f"{fig.file}: quoted in a README row that does not cite it: "
                                    f"{phrase[:60]!r}...")
                covered[m.start():m.end()] = [True] * (m.end() - m.start())
        for m in _NUMBER.finditer(block):
            if not all(covered[m.start():m.end()]):
                ctx = block[max(0, m.start() - 40):m.end() + 20]
                problems.append(f"README.md: figure {m.group()!r} is checked against no file "
                                f"(...{ctx}...)")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--show", action="store_true", help="print every phrase as the files say it")
    ap.add_argument("--readme", default=README, help="the README to check (default: the repo's)")
    args = ap.parse_args(argv)
    if args.show:
        for fig in FIGURES:
            print(f"[{fig.file}] {fig.render()}")
        return 0
    problems = check(args.readme)
    for p in problems:
        print(p)
    print(f"{len(FIGURES)} README phrases checked against benchmarks/results: "
          f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
