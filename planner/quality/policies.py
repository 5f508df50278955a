"""Policies for quality runs: CLI strings, per-layer maps, and parameters at a matched density.

Grammar of one policy string (``PolicySpec.parse``)::

    dense
    block_topk:block=64,topk=8            # any preset name with explicit parameters
    sink_window@0.1                       # parameters solved per length for 10% of causal pairs
    block_topk@0.25:block=32              # solve the free parameter(s), keep block=32
    label=block_topk@0.1                  # a row label of your own
    {"model.layers.0.*": "dense", "*": "block_topk@0.1"}      # per-layer map (JSON)

Density is the fraction of the pairs a causal model attends to that the policy keeps. The
solvers below count kept pairs exactly for a causal prompt of ``n`` tokens; the harness then
reports the density that ``planner.inspect`` measured, which is what counts.

    >>> spec = PolicySpec.parse("sink_window@0.1")
    >>> spec.resolve(2048)
    SinkWindow(sink=4, window=101)
    >>> round(causal_density(spec.resolve(2048), 2048), 3)
    0.1
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import planner
from planner.policy import PRESETS, Policy


# ------------------------------------------------------------------ exact causal pair counts
def _causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def sink_window_pairs(n: int, sink: int, window: int) -> int:
    """Pairs (p, j), j <= p < n, with p - j < window or j < sink."""
    p = range(n)
    return sum(min(i + 1, window) + max(0, min(sink, i + 1 - window)) for i in p)


def block_topk_pairs(n: int, block: int, topk: int, sink_blocks: int, local_blocks: int) -> int:
    """Causal pairs kept when each query block keeps sink + local + ``topk`` other visible key
    blocks (every non-diagonal visible block is full, so which ones are chosen does not change
    the count)."""
    nb = -(-n // block)
    total = 0
    for i in range(nb):
        rows = min(block, n - i * block)
        visible = i + 1                                     # key blocks 0..i
        forced = (set(range(min(sink_blocks, visible)))
                  | set(range(max(0, i - local_blocks + 1), i + 1)))
        n_kept = min(visible, len(forced) + topk)
        # the diagonal block is forced when local_blocks >= 1; without local blocks it is
        # counted as kept only when every visible block is (exact for local_blocks >= 1)
        diag = i in forced or n_kept == visible
        total += (n_kept - diag) * block * rows + diag * rows * (rows + 1) // 2
    return total


def bigbird_pairs(n: int, block: int, window: int, global_tokens: int, random_blocks: int) -> int:
    """Causal pairs kept by ``bigbird`` (``codegen.select.policies.bigbird_blocks``): query
    block i keeps key blocks i - ceil(window / block) .. i, the first ceil(global_tokens /
    block) blocks, every visible block when it is itself a global block, and then
    ``random_blocks`` more of the visible blocks not yet kept (as many as there are). All kept
    blocks but the diagonal one are full, so which random blocks are drawn does not change the
    count."""
    nb = -(-n // block)
    w, g = -(-window // block), -(-global_tokens // block)
    total = 0
    for i in range(nb):
        rows = min(block, n - i * block)
        visible = i + 1
        if i < g:
            kept = visible
        else:
            kept = min(w, i) + 1 + max(0, min(g, i - w))           # window blocks + global keys
            kept = min(visible, kept + random_blocks)
        total += (kept - 1) * block * rows + rows * (rows + 1) // 2
    return total


def dsa_pairs(n: int, topk: int) -> int:
    """Causal pairs kept when query ``i`` keeps ``min(i + 1, topk)`` keys."""
    k = min(topk, n)
    return k * (k + 1) // 2 + (n - k) * k


def causal_density(pol: Policy, n: int) -> Optional[float]:
    """Kept / attended pairs of ``pol`` on a causal prompt of ``n`` tokens, where known in closed
    form (None otherwise)."""
    if pol.name == "dense":
        return 1.0
    if pol.name == "sink_window":
        return sink_window_pairs(n, pol.sink, pol.window) / _causal_pairs(n)
    if pol.name == "block_topk":
        return block_topk_pairs(n, pol.block, pol.topk, pol.sink_blocks,
                                pol.local_blocks) / _causal_pairs(n)
    if pol.name == "dsa":
        return dsa_pairs(n, pol.topk) / _causal_pairs(n)
    if pol.name == "longformer":        # causal: global keys act as sinks, global queries see all
        return sink_window_pairs(n, pol.global_tokens, pol.window) / _causal_pairs(n)
    if pol.name == "bigbird":
        return bigbird_pairs(n, pol.block, pol.window, pol.global_tokens,
                             pol.random_blocks) / _causal_pairs(n)
    return None


# ------------------------------------------------------------------ matched-density solvers
def _solve_int(f: Callable[[int], float], target: float, lo: int, hi: int) -> int:
    """Integer x in [lo, hi] with f(x) closest to target (f non-decreasing)."""
    a, b = lo, hi
    while a < b:
        mid = (a + b) // 2
        if f(mid) < target:
            a = mid + 1
        else:
            b = mid
    cands = [x for x in (a - 1, a) if lo <= x <= hi]
    return min(cands, key=lambda x: abs(f(x) - target))


def default_block(n: int) -> int:
    """Block size for block policies at ``n`` tokens: a power of two in [16, 64] giving about
    128 blocks per sequence (so a 10% budget still leaves several blocks to choose)."""
    b = 16
    while b < 64 and n / (2 * b) >= 96:
        b *= 2
    return b


def _match_sink_window(n: int, density: float, fixed: dict) -> Policy:
    sink = int(fixed.get("sink", 4))
    if "window" in fixed:
        return planner.policy("sink_window", **fixed)
    w = _solve_int(lambda w: sink_window_pairs(n, sink, w) / _causal_pairs(n), density, 1, n)
    return planner.policy("sink_window", sink=sink, window=w)


def _match_block_topk(n: int, density: float, fixed: dict) -> Policy:
    kw = {"block": default_block(n), "sink_blocks": 1, "local_blocks": 1}
    kw.update(fixed)
    if "topk" in fixed:
        return planner.policy("block_topk", **kw)
    nb = -(-n // kw["block"])
    t = _solve_int(lambda t: block_topk_pairs(n, kw["block"], t, kw["sink_blocks"],
                                              kw["local_blocks"]) / _causal_pairs(n),
                   density, 0, nb)
    return planner.policy("block_topk", **{**kw, "topk": t})


def _match_auto(n: int, density: float, fixed: dict) -> Policy:
    return planner.policy("auto", **{"target_density": density, **fixed})


def _match_dsa(n: int, density: float, fixed: dict) -> Policy:
    if "topk" in fixed:
        return planner.policy("dsa", **fixed)
    t = _solve_int(lambda t: dsa_pairs(n, t) / _causal_pairs(n), density, 1, n)
    return planner.policy("dsa", **{**fixed, "topk": t})


def _match_longformer(n: int, density: float, fixed: dict) -> Policy:
    g = int(fixed.get("global_tokens", 16))
    if "window" in fixed:
        return planner.policy("longformer", **fixed)
    w = _solve_int(lambda w: sink_window_pairs(n, g, w) / _causal_pairs(n), density, 1, n)
    return planner.policy("longformer", **{**fixed, "global_tokens": g, "window": w})


def _match_bigbird(n: int, density: float, fixed: dict) -> Policy:
    """Block = ``default_block(n)``, ``global_tokens`` and ``random_blocks`` at the policy's
    defaults (64 tokens, 3 blocks); the window (a whole number of blocks) is solved, or, when
    ``window`` is given, ``random_blocks``."""
    kw = {"block": default_block(n), "global_tokens": 64, "random_blocks": 3, "seed": 0}
    kw.update(fixed)
    b = kw["block"]
    nb = -(-n // b)
    f = lambda **v: bigbird_pairs(n, b, *(v.get(k, kw.get(k)) for k in            # noqa: E731
                                          ("window", "global_tokens", "random_blocks"))) \
        / _causal_pairs(n)
    if "window" not in fixed:
        w = _solve_int(lambda w: f(window=w * b), density, 0, nb)
        kw["window"] = w * b
        if w == 0 and "random_blocks" not in fixed and f(window=0) > density:
            # short prompts: the global and random blocks alone exceed the target
            kw["random_blocks"] = _solve_int(lambda r: f(window=0, random_blocks=r), density,
                                             0, kw["random_blocks"])
    elif "random_blocks" not in fixed:
        kw["random_blocks"] = _solve_int(lambda r: f(random_blocks=r), density, 0, nb)
    return planner.policy("bigbird", **kw)


def _match_quest(n: int, density: float, fixed: dict) -> Policy:
    """Quest keeps ``ceil(budget / page)`` pages (+ sink and own pages) per block of ``page``
    queries in prefill: the pair count of block_topk with block = page."""
    kw = {"page": 16, "sink_pages": 0, "local_pages": 1}
    kw.update(fixed)
    if "budget" in fixed:
        return planner.policy("quest", **kw)
    pg = kw["page"]
    t = _solve_int(lambda t: block_topk_pairs(n, pg, t, kw["sink_pages"], kw["local_pages"])
                   / _causal_pairs(n), density, 1, -(-n // pg))
    return planner.policy("quest", **{**kw, "budget": t * pg})


#: name -> solver(n_tokens, density, fixed_params) -> Policy; extend for new policies
MATCHERS: dict[str, Callable[[int, float, dict], Policy]] = {
    "sink_window": _match_sink_window,
    "block_topk": _match_block_topk,
    "auto": _match_auto,
    "dsa": _match_dsa,
    "quest": _match_quest,
    "longformer": _match_longformer,
    "bigbird": _match_bigbird,
}


# ------------------------------------------------------------------ parsing
def _convert(cls: type, key: str, raw: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise ValueError(f"policy {cls.name!r} has no parameter {key!r}; valid: {sorted(fields)}")
    f = fields[key]
    typ = f.type if not isinstance(f.type, str) else typing.get_type_hints(cls).get(key, str)
    if typ is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    for t in (int, float):
        if typ is t:
            try:
                return t(raw)
            except ValueError as e:
                raise ValueError(f"policy {cls.name!r}: parameter {key!r} expects {t.__name__}, "
                                 f"got {raw!r}") from e
    try:                                  # Optional[...] or unannotated: best effort
        return int(raw)
    except ValueError:
        try:
            return float(raw)
        except ValueError:
            return raw


@dataclass(frozen=True)
class PolicySpec:
    """One policy of a quality run: a fixed policy, one solved per length, or a per-layer map."""

    label: str
    name: str = ""                                   # preset name ("" for a map)
    params: tuple = ()                               # fixed (key, value) pairs
    density: Optional[float] = None                  # target density, solved per length
    layers: tuple = ()                               # per-layer map: ((glob, PolicySpec), ...)

    @staticmethod
    def parse(text: Union[str, Mapping, "PolicySpec"]) -> "PolicySpec":
        if isinstance(text, PolicySpec):
            return text
        if isinstance(text, Mapping):
            rules = tuple((str(k), PolicySpec.parse(v)) for k, v in text.items())
            label = "{" + ", ".join(f"{k}: {v.label}" for k, v in rules) + "}"
            return PolicySpec(label=label, layers=rules)
        s = str(text).strip()
        label = None
        if "=" in s.split("{")[0].split(":")[0].split("@")[0]:
            label, s = (x.strip() for x in s.split("=", 1))
        if s.startswith("{"):
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise ValueError(f"per-layer policy map is not valid JSON: {s!r} ({e})") from e
            spec = PolicySpec.parse(obj)
            return dataclasses.replace(spec, label=label or spec.label)
        head, _, rest = s.partition(":")
        name, _, dens = head.partition("@")
        name = name.strip()
        if name not in PRESETS:
            raise ValueError(f"unknown policy {name!r} in {text!r}; valid names: "
                             f"{', '.join(sorted(PRESETS))}")
        cls = PRESETS[name]
        params = []
        for item in filter(None, (x.strip() for x in rest.split(","))):
            if "=" not in item:
                raise ValueError(f"policy parameter {item!r} in {text!r} is not key=value")
            k, v = (x.strip() for x in item.split("=", 1))
            params.append((k, _convert(cls, k, v)))
        density = None
        if dens:
            density = float(dens.rstrip("%")) / (100.0 if dens.endswith("%") else 1.0)
            if not 0.0 < density <= 1.0:
                raise ValueError(f"target density in {text!r} must be in (0, 1], got {density}")
            if name not in MATCHERS:
                raise ValueError(f"no density solver for policy {name!r} (solvers: "
                                 f"{sorted(MATCHERS)}); give its parameters explicitly")
        if label is None:
            label = name if density is None else f"{name}@{density:.0%}"
            if params:
                label += ":" + ",".join(f"{k}={v}" for k, v in params)
        spec = PolicySpec(label=label, name=name, params=tuple(params), density=density)
        if density is None:
            planner.policy(name, **dict(params))           # validate now, not mid-run
        return spec

    def resolve(self, n_tokens: int):
        """The policy (or ``{glob: Policy}`` map) to compile for prompts of ``n_tokens``."""
        if self.layers:
            return {glob: sub.resolve(n_tokens) for glob, sub in self.layers}
        if self.density is None:
            return planner.policy(self.name, **dict(self.params))
        return MATCHERS[self.name](n_tokens, self.density, dict(self.params))

    def family(self) -> str:
        """Policy name (``map`` for per-layer maps)."""
        return self.name or "map"

    def series(self) -> str:
        """Rows drawn as one line in plots: the name plus the parameters held fixed while the
        density is solved (``block_topk:block=16``); per-layer maps: their label."""
        if self.layers:
            return self.label
        if self.density is not None and self.params:
            return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params)
        return self.name


def describe(resolved) -> str:
    """Short text of a resolved policy or map."""
    if isinstance(resolved, Mapping):
        return "{" + ", ".join(f"{k}: {v.short()}" for k, v in resolved.items()) + "}"
    return resolved.short()


DEFAULT_POLICIES = ("dense", "sink_window@0.25", "block_topk@0.25", "sink_window@0.1",
                    "block_topk@0.1")
