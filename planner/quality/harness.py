"""Run a causal LM under each policy: perplexity, retrieval trials, measured density.

One ``Runner`` per (policy, length): the model's base (``lm.model`` for Llama/Gemma/Qwen) is
wrapped so that ``planner.compile`` sees the same module paths as in the HF model
(``model.layers.3.self_attn``) and returns hidden states plus the KV cache; the LM head runs
outside, on slices of positions, so an 8192-token window never materialises 8192 x vocab
logits.

* perplexity: one prefill of a window of ``T`` tokens; NLL of tokens 1..T-1 (fp64 sum).
* retrieval: prefill the prompt, then feed the gold answer one token at a time through the
  KV cache (each decode step goes through the compiled sites). Per answer token: log p and
  whether it is the argmax. ``exact`` = every answer token is the argmax, which is exactly
  "greedy decoding reproduces the answer"; ``logprob`` = sum of log p (teacher forced).
* density: mean over the sites the policy covers of ``planner.inspect(m).sites[i].density``
  right after each prefill (a site left dense counts as 1.0).
* sliding-window layers (``config.layer_types`` with ``sliding_attention``, e.g. Gemma 3: 15
  of 18 layers): by default (``sliding="dense"``) a policy covers only the full-attention
  layers and the sliding layers keep the model's own window (compiled with ``dense``, which
  attends to exactly the pairs the model's mask allows); the row's density is over the covered
  sites, ``density_all_sites`` over every site. ``sliding="policy"`` applies the policy to
  every layer, on top of the window.
* sequences start with the codec's ``lead`` ids (``<bos>`` for Gemma): perplexity windows are
  ``lead`` + text and keep their length; the lead token itself is never scored.
* calibrated policies (``threshold@D``, ``vertical_slash@D``: the kept pairs depend on the
  input): ``Calibrator`` bisects the free parameter, measuring each candidate on
  ``calibration_windows`` prefills of held-out text at the row's length. The windows come from
  the perplexity text, from the slots of its window grid that the perplexity windows of that
  length do not use (retrieval prompts are built from the other texts), so no evaluated token is
  calibrated on. The solved parameter is cached in the JSON (``calibration``), so ``--resume``
  and check/estimate runs reuse it, and the row's ``params`` says what was calibrated.

Every policy sees the same prompts and windows (seeded per length, task, cell and trial).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import gc
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

import planner
from runtime import cpu_attend
from planner.quality.protocol import cache_arg
from planner.quality.policies import (CALIBRATED, DEFAULT_POLICIES, PolicySpec, causal_density,
                                      describe)
from planner.quality.tasks import PASSKEY_DEPTHS, TASKS, cells, make_sample, sample_seed
from planner.quality.text import Codec, Haystack, lead_of

SLIDING_MODES = ("dense", "policy")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def place(lm: torch.nn.Module, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """Move ``lm`` (in place) to ``device`` and ``dtype`` (a name of ``DTYPES``): on a GPU the
    compiled sites run the runtime's kernels (Triton where a kernel takes the call), on the CPU
    the fast CPU attend or the reference."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return lm.to(device=dev, dtype=DTYPES[dtype])


class _Body(torch.nn.Module):
    """The LM without its head: ``(input_ids [1, N], cache) -> (hidden [1, N, d], cache)``."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        prefix = getattr(lm, "base_model_prefix", "model") or "model"
        self.prefix = prefix
        self.add_module(prefix, getattr(lm, prefix))

    def forward(self, input_ids, past_key_values=None):
        base = getattr(self, self.prefix)
        out = base(input_ids=input_ids, **cache_arg(base, past_key_values), use_cache=True)
        return out.last_hidden_state, out.past_key_values


def sliding_layers(lm: torch.nn.Module) -> tuple:
    """(indices of the sliding-window layers, indices of the full-attention layers) from
    ``config.layer_types``; ((), all layers) for a model without sliding-window layers."""
    cfg = getattr(lm, "config", None)
    types = list(getattr(cfg, "layer_types", None) or [])
    if not any("sliding" in str(t) for t in types):
        n = int(getattr(cfg, "num_hidden_layers", 0) or 0)
        return (), tuple(range(n))
    return (tuple(i for i, t in enumerate(types) if "sliding" in str(t)),
            tuple(i for i, t in enumerate(types) if t == "full_attention"))


def scope_policy(lm: torch.nn.Module, policy: Any, sliding: str = "dense") -> tuple:
    """(what to compile, globs of the sites the policy covers or None for all, a description).

    With ``sliding="dense"`` and a model with sliding-window layers, a single policy becomes
    ``{"*.layers.<i>.*": policy for each full-attention layer i, "*": "dense"}``. Per-layer
    maps are compiled as given."""
    if sliding not in SLIDING_MODES:
        raise ValueError(f"sliding must be one of {SLIDING_MODES}, got {sliding!r}")
    slide, full = sliding_layers(lm)
    n = len(slide) + len(full) if slide else len(full)
    if isinstance(policy, Mapping):
        return policy, None, "per-layer map as given"
    if not slide:
        return policy, None, f"all {n} layers" if n else "all layers"
    if sliding == "policy":
        return policy, None, (f"all {n} layers (on top of the window in the {len(slide)} "
                              f"sliding-window layers)")
    if not full:
        raise ValueError("every layer of this model uses a sliding window: no full-attention "
                         "layer for the policy to cover (use sliding='policy')")
    globs = [f"*.layers.{i}.*" for i in full]
    mapped = {g: policy for g in globs}
    mapped["*"] = "dense"
    return mapped, globs, (f"full-attention layers {', '.join(map(str, full))} ({len(full)} of "
                           f"{n}); the {len(slide)} sliding-window layers dense within their "
                           f"window")


class Runner:
    """A causal LM compiled with one policy (or per-layer map); ``sliding``: see
    ``scope_policy``."""

    def __init__(self, lm: torch.nn.Module, policy: Any, *, logits_chunk: int = 1024,
                 indexers: Optional[str] = None, sliding: str = "dense"):
        self.lm = lm
        compiled, self.covered, self.scope = scope_policy(lm, policy, sliding)
        # cost_model="off": every covered site follows the policy (on a GPU the cost model
        # would otherwise run short or dense-ish sites densely, and the row would measure dense)
        self.model = planner.compile(_Body(lm), policy=compiled, cost_model="off")
        bank = getattr(self.model, "sparse_indexers", None)
        if indexers and bank is not None:          # trained DSA indexers (a saved export)
            bank.preload(torch.load(indexers, map_location="cpu")["sites"])
        self.head = lm.get_output_embeddings()
        self.device = self.head.weight.device
        self.cap = getattr(lm.config, "final_logit_softcapping", None)
        self.logits_chunk = logits_chunk
        self.last_density: Optional[dict] = None
        self.recorded = None               # Report of the last recorded prefill (answer(record=))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        z = self.head(h).float()
        return torch.tanh(z / self.cap) * self.cap if self.cap else z

    def _prefill(self, ids: Sequence[int]):
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)   # [1, N]
        h, cache = self.model(x)
        self.last_density = density_of(self.model, self.covered)
        return h, cache

    @torch.no_grad()
    def nll(self, ids: Sequence[int]) -> tuple:
        """(sum of -log p(t_i | t_<i) for i = 1..N-1, number of predicted tokens)."""
        h, _ = self._prefill(ids)
        tgt = torch.tensor(list(ids[1:]), dtype=torch.long, device=self.device)
        total = 0.0
        for s in range(0, len(ids) - 1, self.logits_chunk):
            e = min(s + self.logits_chunk, len(ids) - 1)
            z = self._logits(h[0, s:e])                                  # [chunk, V]
            total += float(F.cross_entropy(z, tgt[s:e], reduction="sum").double())
        return total, len(ids) - 1

    @torch.no_grad()
    def answer(self, ids: Sequence[int], answer_ids: Sequence[int], *, record: int = 0) -> tuple:
        """Teacher-forced (log p per answer token, argmax hit per answer token). ``record > 0``:
        the prompt's prefill is recorded (``planner.recording``, that many sampled query rows
        per site) and ``self.recorded`` is ``planner.inspect`` right after it (the decode steps
        that follow change the sites' density, not that report), to draw what each site kept."""
        if record:
            with planner.recording(self.model, rows=record):
                h, cache = self._prefill(ids)
            self.recorded = planner.inspect(self.model)
        else:
            self.recorded = None
            h, cache = self._prefill(ids)
        lps, hits = [], []
        z = self._logits(h[0, -1:])[0]
        for j, tok in enumerate(answer_ids):
            lp = torch.log_softmax(z, dim=-1)
            lps.append(float(lp[tok]))
            hits.append(bool(int(z.argmax()) == int(tok)))
            if j + 1 < len(answer_ids):
                h, cache = self.model(torch.tensor([[int(tok)]], device=self.device),
                                      past_key_values=cache)
                z = self._logits(h[0, -1:])[0]
        return lps, hits


def density_of(m, covered: Optional[Sequence[str]] = None) -> dict:
    """Mean / min / max density of the last call over the sites matching a glob of ``covered``
    (None: every site; sites left dense count as 1.0). ``sites``: all sites, ``policy_sites``:
    the covered ones, ``dense_sites``: sites the planner left dense (not rewritten),
    ``mean_all_sites``: the mean over every site."""
    rep = planner.inspect(m)
    dens = lambda s: s.density if s.density is not None else 1.0          # noqa: E731
    mine = [s for s in rep.sites
            if covered is None or any(fnmatch.fnmatchcase(s.name, g) for g in covered)]
    if not mine:
        return {"mean": None, "min": None, "max": None, "sites": len(rep.sites),
                "policy_sites": 0, "dense_sites": 0, "mean_all_sites": None}
    d = [dens(s) for s in mine]
    return {"mean": sum(d) / len(d), "min": min(d), "max": max(d), "sites": len(rep.sites),
            "policy_sites": len(mine),
            "dense_sites": sum(s.status != "rewritten" for s in rep.sites),
            "mean_all_sites": sum(map(dens, rep.sites)) / len(rep.sites),
            "kernel": mine[0].kernel}


def _per_length(value, length: int, default: int) -> int:
    if isinstance(value, dict):
        return int(value.get(length, value.get(str(length), default)))
    return default if value is None else int(value)


@dataclass(frozen=True)
class EvalConfig:
    """What a quality run measures. ``trials`` / ``ppl_windows``: an int or ``{length: int}``."""

    lengths: tuple = (2048, 8192)
    policies: tuple = DEFAULT_POLICIES
    tasks: tuple = TASKS
    depths: tuple = PASSKEY_DEPTHS
    trials: Any = 4
    ppl_windows: Any = 1
    seed: int = 0
    answer_room: int = 16          # prompts end this many positions before the model's limit
    fast_attend: bool = True       # serve sparse.attend on CPU with runtime.cpu_attend
    check_attend: int = 0          # >0: compare fast vs reference attend at this many tokens
    indexers: Optional[str] = None  # DSA indexer weights (examples/train_dsa_indexer.py --save)
    sliding: str = "dense"         # sliding-window layers: "dense" (own window) or "policy"
    calibration_windows: int = 2   # held-out prefills per step of a calibrated solver
    device: str = "cpu"            # where the model runs (evaluate moves it there): cpu, cuda
    dtype: str = "float32"         # the model's dtype there (a name of DTYPES)
    explain_failures: int = 0      # >0: record the prompts' prefills (runtime.recall) until
                                   # this many failed prompts per row have their needle map

    def prompt_tokens(self, length: int, max_positions: Optional[int]) -> int:
        if max_positions:
            return min(length, int(max_positions) - self.answer_room)
        return length


#: settings that define what a (policy, length) row contains: a run may resume (and add rows to)
#: a JSON written with the same values; lengths and policies may differ
_ROW_DEFINING = ("tasks", "depths", "trials", "ppl_windows", "seed", "answer_room", "fast_attend",
                 "sliding", "device", "dtype")
#: values of settings added later, for JSON files written before them
_ROW_DEFAULTS = {"sliding": "dense", "device": "cpu", "dtype": "float32"}


def _ppl_slots(ppl_ids: Sequence[int], n_text: int, n_tokens: int, count: int,
               seed: int) -> list:
    """Indices of the ``n_text``-token slots of the perplexity text that the perplexity windows
    of ``n_tokens`` use."""
    if n_text < 2 or len(ppl_ids) < n_text:
        raise ValueError(f"perplexity text has {len(ppl_ids)} tokens, a window needs {n_text}")
    n_slots = len(ppl_ids) // n_text
    import random
    rng = random.Random(sample_seed("ppl", n_tokens, seed))
    return sorted(rng.sample(range(n_slots), min(count, n_slots)))


def _ppl_windows(ppl_ids: Sequence[int], n_tokens: int, count: int, seed: int,
                 lead: Sequence[int] = ()) -> list:
    """``count`` disjoint windows of ``n_tokens`` at seeded offsets in the perplexity text, each
    ``lead`` + ``n_tokens - len(lead)`` text tokens."""
    lead = list(lead)
    n_text = n_tokens - len(lead)
    slots = _ppl_slots(ppl_ids, n_text, n_tokens, count, seed)
    return [lead + list(ppl_ids[s * n_text:(s + 1) * n_text]) for s in slots]


def calibration_windows(ppl_ids: Sequence[int], n_tokens: int, count: int, seed: int,
                        ppl_count: int, lead: Sequence[int] = ()) -> list:
    """``count`` windows of ``n_tokens`` (``lead`` + text) for calibrating policies: slots of
    the perplexity text's window grid at this length that its ``ppl_count`` perplexity windows
    do not use, drawn with their own seed. Disjoint from every evaluated window of this length."""
    lead = list(lead)
    n_text = n_tokens - len(lead)
    used = set(_ppl_slots(ppl_ids, n_text, n_tokens, ppl_count, seed))
    free = [s for s in range(len(ppl_ids) // n_text) if s not in used]
    if len(free) < count:
        raise ValueError(f"calibration needs {count} windows of {n_text} text tokens beside the "
                         f"{len(used)} perplexity window(s); the perplexity text "
                         f"({len(ppl_ids)} tokens) has {len(free)} more")
    import random
    rng = random.Random(sample_seed("calibration", n_tokens, seed))
    slots = sorted(rng.sample(free, count))
    return [lead + list(ppl_ids[s * n_text:(s + 1) * n_text]) for s in slots]


class Calibrator:
    """Solves calibrated specs (``policies.CALIBRATED``: threshold, vertical_slash) for a target
    density on held-out text: ``calibrator(spec, n_tokens) -> Policy`` (pass it to
    ``PolicySpec.resolve``). Each measurement compiles the model with the candidate (scoped as
    its rows are, ``sliding``) and prefills ``cfg.calibration_windows`` windows of
    ``calibration_windows``; the density is the row's: the mean over the covered sites of
    ``planner.inspect``'s density, averaged over the windows. ``records`` (the JSON's
    ``calibration`` list) caches the solved policies: a spec already solved for the same fixed
    parameters, target, prompt tokens and number of windows on the same model is not measured
    again."""

    def __init__(self, lm: torch.nn.Module, ppl_ids: Sequence[int], cfg: "EvalConfig", *,
                 lead: Sequence[int] = (), records: Optional[list] = None,
                 log: Callable[[str], None] = print):
        self.lm, self.ppl_ids, self.cfg, self.lead = lm, ppl_ids, cfg, list(lead)
        self.records = records if records is not None else []
        self.log = log
        self._windows: dict = {}

    def windows(self, n_tokens: int) -> list:
        if n_tokens not in self._windows:
            length = next((L for L in self.cfg.lengths
                           if self.cfg.prompt_tokens(L, getattr(self.lm.config,
                                                                "max_position_embeddings", None))
                           == n_tokens), n_tokens)
            self._windows[n_tokens] = calibration_windows(
                self.ppl_ids, n_tokens, self.cfg.calibration_windows, self.cfg.seed,
                _per_length(self.cfg.ppl_windows, length, 1), self.lead)
        return self._windows[n_tokens]

    def model_id(self) -> str:
        """The model's name (its folder's name, else its type and size) for the cache key."""
        c = self.lm.config
        path = str(getattr(c, "_name_or_path", "") or "").rstrip("/")
        return os.path.basename(path) or (f"{getattr(c, 'model_type', '?')}-"
                                          f"{getattr(c, 'num_hidden_layers', '?')}x"
                                          f"{getattr(c, 'hidden_size', '?')}")

    def _key(self, spec: PolicySpec, n_tokens: int) -> dict:
        return {"model": self.model_id(), "name": spec.name,
                "fixed": {k: v for k, v in spec.params},
                "target": spec.density, "tokens": n_tokens,
                "windows": self.cfg.calibration_windows}

    def record(self, spec: PolicySpec, n_tokens: int) -> Optional[dict]:
        """The cached calibration of ``spec`` at ``n_tokens`` (None if not solved yet)."""
        key = self._key(spec, n_tokens)
        return next((r for r in self.records if all(r.get(k) == v for k, v in key.items())),
                    None)

    def measure(self, policy, n_tokens: int) -> float:
        runner = Runner(self.lm, policy, indexers=self.cfg.indexers, sliding=self.cfg.sliding)
        dens = []
        with cpu_attend.enabled(self.cfg.fast_attend), torch.no_grad():
            for w in self.windows(n_tokens):
                runner._prefill(w)
                dens.append(runner.last_density["mean"])
        del runner
        _release()
        return sum(dens) / len(dens)

    def __call__(self, spec: PolicySpec, n_tokens: int):
        rec = self.record(spec, n_tokens)
        if rec is None:
            t0 = time.perf_counter()
            n_meas = [0]

            def measure(pol):
                n_meas[0] += 1
                return self.measure(pol, n_tokens)

            self.log(f"   calibrating {spec.label} at {n_tokens} tokens on "
                     f"{self.cfg.calibration_windows} held-out window(s)")
            pol, info = CALIBRATED[spec.name](n_tokens, spec.density, dict(spec.params), measure,
                                              self.log)
            rec = {**self._key(spec, n_tokens), "label": spec.label,
                   "policy": {f.name: getattr(pol, f.name) for f in dataclasses.fields(pol)},
                   "params": describe(pol), "solved": info and info["param"],
                   "value": info and info["value"], "density": info and info["density"],
                   "steps": [list(t) for t in info["steps"]] if info else [],
                   "prefills": n_meas[0] * self.cfg.calibration_windows,
                   "wall_s": round(time.perf_counter() - t0, 1)}
            self.records.append(rec)
            if info:
                self.log(f"   calibrated {spec.label}: {info['param']}={info['value']} -> "
                         f"density {info['density']:.4f} on held-out text ({n_meas[0]} "
                         f"measurements, {rec['wall_s']:.0f}s)")
        return planner.policy(rec["name"], **rec["policy"])

    def note(self, spec: PolicySpec, n_tokens: int) -> str:
        """What was calibrated for ``spec`` (its leaves) at ``n_tokens``, for the params column."""
        out = []
        for leaf in spec.leaves():
            rec = self.record(leaf, n_tokens) if leaf.needs_calibration else None
            if rec and rec.get("solved"):
                out.append(f"{rec['solved']} calibrated: density {rec['density']:.3f} on "
                           f"{rec['windows']} held-out window(s)")
        return "; ".join(out)


def build_samples(cfg: EvalConfig, codec: Codec, hay: Haystack, n_tokens: int,
                  trials: int) -> list:
    """[(Cell, trial index, Sample)] for one length, identical for every policy."""
    out = []
    for cell in cells(cfg.tasks, cfg.depths):
        for t in range(trials):
            seed = sample_seed(cfg.seed, n_tokens, cell.name, t)
            out.append((cell, t, make_sample(cell.task, codec, hay, n_tokens, seed=seed,
                                             depth=cell.depth)))
    return out


def evaluate(lm: torch.nn.Module, codec: Codec, hay: Haystack, ppl_ids: Sequence[int],
             cfg: EvalConfig, *, out_path: Optional[str] = None, meta: Optional[dict] = None,
             log: Callable[[str], None] = print, resume: bool = False,
             progress: Optional[Callable[[str, int, str, int, int], None]] = None) -> dict:
    """Run every policy of ``cfg`` at every length; returns (and writes to ``out_path`` after
    each policy) ``{"meta", "rows", "trials", "checks"}``. The model is moved to ``cfg.device``
    and ``cfg.dtype`` first (``place``). ``progress(policy, length, what, i, n)`` is called
    after each perplexity window (``what="window"``) and retrieval prompt (``"trial"``)."""
    place(lm, cfg.device, cfg.dtype).eval()
    max_pos = getattr(lm.config, "max_position_embeddings", None)
    specs = [PolicySpec.parse(p) for p in cfg.policies]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"policy labels must be distinct, got {labels}; name them label=...")
    result = {"meta": dict(meta or {}), "rows": [], "trials": [], "checks": [],
              "calibration": []}
    result["meta"].update({"config": _jsonable(asdict(cfg)), "torch": torch.__version__,
                           "threads": torch.get_num_threads()})
    done, wall_before = set(), 0.0
    if resume and out_path and os.path.exists(out_path):
        with open(out_path) as f:
            old = json.load(f)
        oc, nc = old.get("meta", {}).get("config", {}), result["meta"]["config"]
        oc = {**_ROW_DEFAULTS, **oc}
        if all(oc.get(k) == nc.get(k) for k in _ROW_DEFINING):
            result["rows"], result["trials"] = old["rows"], old["trials"]
            result["checks"] = old.get("checks", [])
            result["calibration"] = old.get("calibration", [])
            for r in result["rows"]:
                r.setdefault("series", r["family"])
            for k in ("lengths", "policies"):             # rows of both runs are kept
                nc[k] = list(dict.fromkeys(list(oc.get(k, [])) + list(nc[k])))
            prev = old["meta"].get("commands") or [old["meta"].get("command")]
            result["meta"]["commands"] = [c for c in prev if c] + [result["meta"].get("command")]
            wall_before = float(old["meta"].get("wall_s", 0.0))
            prev_notes = list(old["meta"].get("notes", []))       # notes of earlier runs stay
            result["meta"]["notes"] = prev_notes + [n for n in result["meta"].get("notes", [])
                                                    if n not in prev_notes]
            done = {(r["policy"], r["length"]) for r in result["rows"]}
            log(f"resuming: {len(done)} (policy, length) rows already in {out_path}")
        else:
            diff = [k for k in _ROW_DEFINING if oc.get(k) != nc.get(k)]
            log(f"not resuming: {out_path} differs in {diff}; starting afresh")
    t_start = time.perf_counter()
    calibrate = Calibrator(lm, ppl_ids, cfg, lead=lead_of(codec), records=result["calibration"],
                           log=log)
    if cfg.check_attend and cfg.fast_attend and torch.device(cfg.device).type != "cpu":
        log(f"   no attend check on {cfg.device}: the fast CPU attend serves CPU tensors only")
    elif cfg.check_attend and cfg.fast_attend:
        checked = {c["policy"] for c in result["checks"]}
        todo = [s for s in specs if s.label not in checked]
        if todo:
            result["checks"] += check_attend(lm, codec, hay, todo, cfg.check_attend, cfg.seed, log,
                                            indexers=cfg.indexers, sliding=cfg.sliding,
                                            calibrate=calibrate)
            _write(result, out_path)
    for length in cfg.lengths:
        n_tok = cfg.prompt_tokens(length, max_pos)
        trials = _per_length(cfg.trials, length, 4)
        samples = build_samples(cfg, codec, hay, n_tok, trials)
        windows = _ppl_windows(ppl_ids, n_tok, _per_length(cfg.ppl_windows, length, 1), cfg.seed,
                               lead_of(codec))
        log(f"== length {length}: {n_tok} tokens per prompt, {len(windows)} perplexity "
            f"window(s), {len(samples)} retrieval prompts ({trials} per cell)")
        for spec in specs:
            if (spec.label, length) in done:
                continue
            row, trial_rows = _run_policy(lm, spec, length, n_tok, windows, samples, cfg, log,
                                          calibrate, progress, pictures_of(out_path))
            result["rows"].append(row)
            result["trials"] += trial_rows
            _fill_deltas(result["rows"])
            result["meta"]["wall_s"] = round(wall_before + time.perf_counter() - t_start, 1)
            _write(result, out_path)
            gc.collect()
    _fill_deltas(result["rows"])
    result["meta"]["wall_s"] = round(wall_before + time.perf_counter() - t_start, 1)
    _write(result, out_path)
    return result


def pictures_of(out_path: Optional[str]) -> Optional[str]:
    """Folder of the failure pictures of the results at ``out_path`` (``<stem>_explain``)."""
    return None if not out_path else os.path.splitext(out_path)[0] + "_explain"


def explain_failure(runner: "Runner", sample, folder: str, name: str, title: str) -> dict:
    """Draw the needle map of ``runner``'s last recorded prefill (``answer(record=)``) for
    ``sample``'s answer needle into ``folder/name.png``; returns the trial row's fields: the
    picture (relative to the results' folder) and the sites that dropped part of the needle for
    the prompt's last query row."""
    from planner import pictures
    span = [tuple(sample.needle_span)]
    rows = pictures.needle_rows(runner.recorded, span)
    path = os.path.join(folder, name + ".png")
    fig = pictures.needle_map(runner.recorded, span, path, title=title)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return {"explain_png": os.path.join(os.path.basename(folder), name + ".png"),
            "needle_dropped_by": [r["site"] for r in rows if r["kept"] < 0.999],
            "needle_kept": round(sum(r["kept"] for r in rows) / len(rows), 4)}


def _run_policy(lm, spec: PolicySpec, length: int, n_tok: int, windows: list, samples: list,
                cfg: EvalConfig, log, calibrate: Optional[Calibrator] = None,
                progress=None, picture_dir: Optional[str] = None) -> tuple:
    resolved = spec.resolve(n_tok, calibrate)
    note = calibrate.note(spec, n_tok) if calibrate is not None else ""
    t0 = time.perf_counter()
    runner = Runner(lm, resolved, indexers=cfg.indexers, sliding=cfg.sliding)
    dens: list = []
    fwd_times: list = []
    nll, count = 0.0, 0
    with cpu_attend.enabled(cfg.fast_attend):
        for i, w in enumerate(windows):
            ts = time.perf_counter()
            a, b = runner.nll(w)
            fwd_times.append(time.perf_counter() - ts)
            nll, count = nll + a, count + b
            dens.append(runner.last_density)
            if progress:
                progress(spec.label, length, "window", i + 1, len(windows))
        trial_rows = []
        drawn = 0
        explain = cfg.explain_failures if picture_dir else 0
        for i, (cell, t, s) in enumerate(samples):
            ts = time.perf_counter()
            lps, hits = runner.answer(s.ids, s.answer_ids,
                                      record=64 if drawn < explain else 0)
            fwd_times.append(time.perf_counter() - ts)
            dens.append(runner.last_density)
            trial_rows.append({
                "policy": spec.label, "length": length, "tokens": n_tok, "task": cell.task,
                "cell": cell.name, "trial": t, "depth": s.depth,
                "needle_pos": round(s.needle_pos, 4), "answer": s.answer,
                "exact": all(hits), "tokens_correct": sum(hits), "answer_tokens": len(hits),
                "logprob": sum(lps), "density": runner.last_density["mean"]})
            if not all(hits) and runner.recorded is not None:
                name = re.sub(r"[^A-Za-z0-9]+", "_", f"{spec.label}_{length}_{cell.name}_{t}")
                trial_rows[-1].update(explain_failure(
                    runner, s, picture_dir, name.strip("_"),
                    f"{spec.label}, {n_tok} tokens, {cell.name} trial {t}: missed "
                    f"{s.answer!r}; keys kept for the last query row"))
                drawn += 1
            if progress:
                progress(spec.label, length, "trial", i + 1, len(samples))
    means = [d["mean"] for d in dens if d and d["mean"] is not None]
    alls = [d["mean_all_sites"] for d in dens if d and d.get("mean_all_sites") is not None]
    row = {
        "policy": spec.label, "family": spec.family(), "series": spec.series(),
        "length": length, "tokens": n_tok,
        "params": describe(resolved) + (f" [{note}]" if note else ""),
        "scope": runner.scope,
        "density_expected": _expected(resolved, n_tok),
        "density": sum(means) / len(means) if means else None,
        "density_min": min((d["min"] for d in dens if d and d["min"] is not None), default=None),
        "density_max": max((d["max"] for d in dens if d and d["max"] is not None), default=None),
        "density_all_sites": sum(alls) / len(alls) if alls else None,
        "sites": dens[0]["sites"] if dens else None,
        "policy_sites": dens[0].get("policy_sites") if dens else None,
        "dense_sites": dens[0]["dense_sites"] if dens else None,
        "kernel": dens[0].get("kernel") if dens else None,
        "ppl_windows": len(windows), "ppl_tokens": count,
        "nll_per_token": nll / count if count else None,
        "ppl": math.exp(nll / count) if count else None,
        "forward_s_median": sorted(fwd_times)[len(fwd_times) // 2] if fwd_times else None,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if note:
        row["calibration"] = [calibrate.record(x, n_tok) for x in spec.leaves()
                              if x.needs_calibration]
        row["calibration"] = [{k: r[k] for k in ("solved", "value", "density", "windows",
                                                 "prefills", "wall_s")} for r in row["calibration"]]
    row["tasks"] = summarize_trials(trial_rows)
    acc = [r["exact"] for r in trial_rows]
    row["retrieval_acc"] = sum(acc) / len(acc) if acc else None
    row["retrieval_n"] = len(acc)
    fmt = lambda x, f: "-" if x is None else format(x, f)             # noqa: E731
    log(f"   {spec.label:<24} {row['params']:<60} density {fmt(row['density'], '.3f')} "
        f"ppl {fmt(row['ppl'], '.3f')} retrieval {fmt(row['retrieval_acc'], '.2f')} "
        f"(n={len(acc)}) {row['wall_s']:.0f}s"
        + (f" [policy on {runner.scope}]" if runner.covered is not None else ""))
    del runner
    _release()
    return row, trial_rows


def _release() -> None:
    """Drop a finished runner's compiled graphs (and, on a GPU, its cached blocks)."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _expected(resolved, n_tok: int) -> Optional[float]:
    if isinstance(resolved, dict):
        return None
    return causal_density(resolved, n_tok)


def summarize_trials(trial_rows: list) -> dict:
    """{cell name: {acc, n, logprob}} plus {task: ...} over its cells."""
    out: dict = {}
    for key in ("cell", "task"):
        groups: dict = {}
        for r in trial_rows:
            groups.setdefault(r[key], []).append(r)
        for name, rs in groups.items():
            if key == "cell" and name == rs[0]["task"]:
                continue                                    # single-cell task: same as task
            out[name] = {"acc": sum(r["exact"] for r in rs) / len(rs), "n": len(rs),
                         "logprob": sum(r["logprob"] for r in rs) / len(rs)}
    return out


def _fill_deltas(rows: list) -> None:
    for r in rows:
        base = next((d for d in rows if d["length"] == r["length"] and d["family"] == "dense"),
                    None)
        if base and base.get("ppl") and r.get("ppl"):
            r["ppl_delta"] = r["ppl"] - base["ppl"]
            r["ppl_delta_pct"] = 100.0 * (r["ppl"] / base["ppl"] - 1.0)
        else:
            r["ppl_delta"] = r["ppl_delta_pct"] = None


def check_attend(lm, codec: Codec, hay: Haystack, specs: list, n_tokens: int, seed: int,
                 log, indexers: Optional[str] = None, sliding: str = "dense",
                 calibrate: Optional[Calibrator] = None) -> list:
    """Fast CPU attend vs the runtime's reference on one prompt of ``n_tokens`` per policy:
    max |logit difference| at the last position and the two measured densities."""
    s = make_sample("passkey", codec, hay, n_tokens, seed=sample_seed(seed, "check"), depth=0.5)
    out = []
    for spec in specs:
        resolved = spec.resolve(n_tokens, calibrate)
        runner = Runner(lm, resolved, indexers=indexers, sliding=sliding)
        with torch.no_grad():
            h_ref, _ = runner._prefill(s.ids)
            d_ref = runner.last_density["mean"]
            with cpu_attend.enabled():
                h_fast, _ = runner._prefill(s.ids)
            d_fast = runner.last_density["mean"]
            err = float((runner._logits(h_ref[0]) - runner._logits(h_fast[0])).abs().max())
        out.append({"policy": spec.label, "tokens": n_tokens, "params": describe(resolved),
                    "max_abs_logit_diff": err, "density_reference": d_ref,
                    "density_fast": d_fast})
        log(f"   check {spec.label:<24} max |logit diff| {err:.2e}  density ref {d_ref:.4f} "
            f"fast {d_fast:.4f}")
        del runner
        torch._dynamo.reset()
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _write(result: dict, path: Optional[str]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
