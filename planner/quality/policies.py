"""Policies for quality runs: CLI strings, per-layer maps, and parameters at a matched density.

Grammar of one policy string (``PolicySpec.parse``)::

    dense
    block_topk:block=64,topk=8            # any preset name with explicit parameters
    sink_window@0.1                       # parameters solved per length for 10% of causal pairs
    block_topk@0.25:block=32              # solve the free parameter(s), keep block=32
    threshold@0.1:block=16                # adaptive: calibrated on held-out text (see below)
    label=block_topk@0.1                  # a row label of your own
    {"model.layers.0.*": "dense", "*": "block_topk@0.1"}      # per-layer map (JSON)

Density is the fraction of the pairs a causal model attends to that the policy keeps. The
solvers below count kept pairs exactly for a causal prompt of ``n`` tokens; the harness then
reports the density that ``planner.inspect`` measured, which is what counts.

The adaptive policies ``threshold`` and ``vertical_slash`` keep a number of pairs that depends
on the input, so no pair count solves them. Their solvers (``CALIBRATED``) bisect one parameter
against a ``measure(policy) -> density`` callback: the harness (``harness.Calibrator``) compiles
the model with each candidate, prefills a few windows of held-out text at the evaluation length
and reads the density ``planner.inspect`` reports, exactly as for a row.

    >>> spec = PolicySpec.parse("sink_window@0.1")
    >>> spec.resolve(2048)
    SinkWindow(sink=4, window=101)
    >>> round(causal_density(spec.resolve(2048), 2048), 3)
    0.1
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import planner
from planner.policy import PRESETS, Policy


# ------------------------------------------------------------------ exact causal pair counts
def _causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def sink_window_pairs(n: int, sink: int, window: int) -> int:
    """Pairs (p, j), j <= p < n, with p - j < window or j < sink (the runtime's count,
    ``codegen.select.reference.window_pairs``)."""
    from codegen.select.reference import window_pairs
    return window_pairs(n, n, "lower_right", sink=sink, window=window)[0]


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
    defaults (64 tokens, 3 blocks); the window (a whole number of blocks, at least one) is
    solved, or, when ``window`` is given, ``random_blocks``. Where the global and random blocks
    beside a one-block window already exceed the target (short prompts, low densities), the
    random blocks and then the global tokens shrink, so the pattern keeps its sliding window."""
    kw = {"block": default_block(n), "global_tokens": 64, "random_blocks": 3, "seed": 0}
    kw.update(fixed)
    b = kw["block"]
    nb = -(-n // b)
    f = lambda **v: bigbird_pairs(n, b, *(v.get(k, kw.get(k)) for k in            # noqa: E731
                                          ("window", "global_tokens", "random_blocks"))) \
        / _causal_pairs(n)
    def shrink() -> None:              # the window is as small as it may be: shrink the rest
        if "random_blocks" not in fixed and f() > density:
            kw["random_blocks"] = _solve_int(lambda r: f(random_blocks=r), density, 0,
                                             kw["random_blocks"])
        if "global_tokens" not in fixed and f() > 1.05 * density:
            kw["global_tokens"] = _solve_int(lambda g: f(global_tokens=g), density, 0,
                                             kw["global_tokens"])

    if "window" not in fixed:
        w = _solve_int(lambda w: f(window=w * b), density, 1, max(nb, 1))
        kw["window"] = w * b
        if w == 1:
            shrink()
    elif "random_blocks" not in fixed:
        kw["random_blocks"] = _solve_int(lambda r: f(random_blocks=r), density, 0, nb)
        shrink()
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


# ------------------------------------------------------------------ calibrated solvers
def _check_target(name: str, density: float) -> None:
    if not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"{name}: target density {density!r} is outside (0, 1]; give the "
                         f"fraction of causal pairs to keep, e.g. {name}@0.25")


def _unreachable(name: str, n: int, density: float, lo: float, hi: float, why: str):
    return ValueError(f"{name}@{density:g}: target density {density:g} is not reachable at {n} "
                      f"tokens with these parameters; reachable range [{lo:.4f}, {hi:.4f}] "
                      f"({why})")


def vertical_slash_pairs(n: int, block: int, cols, offsets) -> int:
    """Causal pairs of a causal ``n``-token prompt kept by ``vertical_slash`` when the chosen
    columns are ``cols`` and the chosen diagonal offsets (query - key) are ``offsets``: the block
    cover of ``codegen.select.policies.select_vslash``. Key block j is kept for query block i
    (j <= i) when it holds a chosen column at or before the block's last query, or when a chosen
    offset o lies in [first_i - hi_j, last_i - lo_j]. Kept blocks below the diagonal count every
    pair, the diagonal block its causal triangle."""
    nb = -(-n // block)
    col_blocks = sorted({c // block for c in cols if 0 <= c < n})
    first_col = {}
    for c in sorted(c for c in cols if 0 <= c < n):
        first_col.setdefault(c // block, c)
    offs = sorted({o for o in offsets if 0 <= o < n})
    total = 0
    for i in range(nb):
        first, last = i * block, min((i + 1) * block, n) - 1
        rows = last - first + 1
        kept = {j for j in col_blocks if j <= i and first_col[j] <= last}
        for j in range(i + 1):
            if j in kept:
                continue
            lo, hi = max(0, first - min((j + 1) * block, n) + 1), last - j * block
            k = bisect.bisect_left(offs, lo)
            if k < len(offs) and offs[k] <= hi:
                kept.add(j)
        for j in kept:
            total += rows * (rows + 1) // 2 if j == i else block * rows
    return total


def vertical_slash_floor(n: int, block: int, sink_tokens: int, local_tokens: int) -> float:
    """Density of ``vertical_slash`` with no chosen lines (n_vertical = n_slash = 0): the forced
    first ``sink_tokens`` columns and ``local_tokens`` nearest diagonals, whatever the input."""
    return vertical_slash_pairs(n, block, range(sink_tokens), range(local_tokens)) \
        / _causal_pairs(n)


def _bisect_measured(measure: Callable[[Any], float], target: float, lo, hi, *, integer: bool,
                     steps: int, tol: float, log: Callable[[str], None], what: str) -> tuple:
    """Bisection of a parameter x in (lo, hi) whose measured density is non-decreasing in x:
    (best x, its density, [(x, density), ...]). Integers are split at the geometric mean (the
    densities grow about linearly in the line / block counts, so this reaches a given relative
    precision in fewer steps); stops after ``steps`` measurements or within ``tol``."""
    trace: list = []
    a, b = lo, hi
    for _ in range(steps):
        if integer:
            mid = int(round(math.sqrt(max(a, 1) * b)))
            mid = min(max(mid, a + 1), b - 1)
            if mid <= a or mid >= b:
                break
        else:
            mid = round((a + b) / 2, 4)
            if not a < mid < b:
                break
        d = measure(mid)
        trace.append((mid, d))
        log(f"   calibrate {what}={mid}: density {d:.4f} (target {target:g})")
        if abs(d - target) <= tol:
            break
        if d < target:
            a = mid
        else:
            b = mid
    if not trace:
        raise ValueError(f"calibration of {what}: empty range ({lo}, {hi}) or steps={steps}")
    x, d = min(trace, key=lambda t: (abs(t[1] - target), t[0]))
    if abs(d - target) > tol:
        log(f"   calibrate {what}: no value measured within {tol:.4f} of the target; the "
            f"closest, {what}={x}, keeps {d:.4f}")
    return x, d, trace


#: early stop of a calibration: measured density within this fraction of the target
CALIBRATION_RTOL = 0.02
#: most calibration measurements per solved parameter (each: one compile + the windows' prefills)
CALIBRATION_STEPS = 10


def _calibrate_threshold(n: int, density: float, fixed: dict, measure, log) -> tuple:
    """Block = ``default_block(n)``, min_budget / sink / local blocks at the policy's defaults.
    Solves ``gamma`` (the attention-mass target) by bisection on (0, 1], or, when ``gamma`` is
    given, ``max_budget`` (blocks beyond the forced ones) by bisection on [min_budget, blocks].
    Bounds known without a prefill: gamma -> 0 keeps the forced blocks plus ``min_budget``
    (block_topk's count with topk = min_budget), ``max_budget`` caps it from above like
    block_topk's topk; gamma = 1 keeps every block the cap allows."""
    _check_target("threshold", density)
    kw = {"block": default_block(n), **fixed}
    base = planner.policy("threshold", **kw)
    b, nb = base.block, -(-n // base.block)
    cnt = lambda t: block_topk_pairs(n, b, t, base.sink_blocks, base.local_blocks) \
        / _causal_pairs(n)                                                         # noqa: E731
    floor = cnt(base.min_budget)
    ceil = cnt(base.max_budget) if base.max_budget else 1.0
    tol = CALIBRATION_RTOL * density
    if "gamma" not in fixed:
        if not floor - tol <= density <= ceil + tol:
            raise _unreachable("threshold", n, density, floor, ceil,
                               f"gamma -> 0 keeps the {base.sink_blocks} sink + "
                               f"{base.local_blocks} local blocks + min_budget={base.min_budget} "
                               f"blocks of {b} per query block"
                               + (f"; max_budget={base.max_budget} caps it" if base.max_budget
                                  else ""))
        g, d, trace = _bisect_measured(
            lambda g: measure(dataclasses.replace(base, gamma=g)), density, 0.0, 1.0,
            integer=False, steps=CALIBRATION_STEPS, tol=tol, log=log, what="gamma")
        return dataclasses.replace(base, gamma=g), {"param": "gamma", "value": g, "density": d,
                                                    "steps": trace}
    if "max_budget" in fixed:
        return base, None
    lo = max(base.min_budget, 1)
    uncapped = dataclasses.replace(base, max_budget=0)
    top = measure(uncapped)
    log(f"   calibrate max_budget=0 (no cap, gamma={base.gamma}): density {top:.4f}")
    if not cnt(lo) - tol <= density <= top + tol:
        raise _unreachable("threshold", n, density, cnt(lo), top,
                           f"gamma={base.gamma} fixed: max_budget=min_budget keeps block_topk's "
                           f"count, no cap keeps what gamma asks for on the calibration text; "
                           f"raise gamma or leave it free")
    t, d, trace = _bisect_measured(
        lambda t: measure(dataclasses.replace(base, max_budget=t)), density, lo - 1, nb + 1,
        integer=True, steps=CALIBRATION_STEPS, tol=tol, log=log, what="max_budget")
    trace = [(0, top)] + trace
    if abs(top - density) < abs(d - density):
        t, d = 0, top
    return dataclasses.replace(base, max_budget=t), {"param": "max_budget", "value": t,
                                                     "density": d, "steps": trace}


def _calibrate_vertical_slash(n: int, density: float, fixed: dict, measure, log) -> tuple:
    """Block = ``default_block(n)``, ``local_tokens`` = block (the policy's defaults have both at
    64: the nearest diagonals cover the diagonal block), ``last_q`` and ``sink_tokens`` at the
    policy's defaults. Solves one count k with ``n_vertical = n_slash = k`` (the defaults' 1:1
    ratio) by bisection on [0, n]; with one of the two given, k is the other. The lines chosen
    depend on the input (columns and diagonals that fall in the same block share it), so each
    step is measured; k = 0 keeps only the forced lines, counted exactly
    (``vertical_slash_floor``), and k = n every line with attention mass (about dense)."""
    _check_target("vertical_slash", density)
    kw = {"block": default_block(n), **fixed}
    kw.setdefault("local_tokens", kw["block"])
    base = planner.policy("vertical_slash", **kw)
    free = [p for p in ("n_vertical", "n_slash") if p not in fixed]
    if not free:
        return base, None
    floor = vertical_slash_floor(n, base.block, base.sink_tokens, base.local_tokens)
    fixed_lines = {p: getattr(base, p) for p in ("n_vertical", "n_slash") if p in fixed}
    if fixed_lines:
        floor_pol = dataclasses.replace(base, **{p: 0 for p in free})
        floor = measure(floor_pol) if any(fixed_lines.values()) else floor
    tol = CALIBRATION_RTOL * density
    if density < floor - tol:
        raise _unreachable("vertical_slash", n, density, floor, 1.0,
                           f"the forced sink_tokens={base.sink_tokens} columns and "
                           f"local_tokens={base.local_tokens} diagonals at block {base.block}"
                           + (f" with {fixed_lines}" if fixed_lines else "")
                           + " keep the lower end; lower local_tokens or the block")
    at = lambda k: dataclasses.replace(base, **{p: k for p in free})                # noqa: E731
    k, d, trace = _bisect_measured(lambda k: measure(at(k)), density, -1, n + 1, integer=True,
                                   steps=CALIBRATION_STEPS, tol=tol, log=log,
                                   what="=".join(free))
    if abs(d - density) > tol and k >= n:
        raise _unreachable("vertical_slash", n, density, floor, d,
                           "every line with attention mass is already kept")
    return at(k), {"param": "=".join(free), "value": k, "density": d, "steps": trace}


#: name -> solver(n_tokens, density, fixed_params, measure, log) -> (Policy, info or None), where
#: ``measure(policy)`` is the density planner.inspect reports for it on calibration prompts and
#: ``info`` = {"param", "value", "density", "steps": [(value, density), ...]} (None: nothing
#: was solved because every free parameter was given)
CALIBRATED: dict[str, Callable[..., tuple]] = {
    "threshold": _calibrate_threshold,
    "vertical_slash": _calibrate_vertical_slash,
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
            if name not in MATCHERS and name not in CALIBRATED:
                raise ValueError(f"no density solver for policy {name!r} (solvers: "
                                 f"{sorted(set(MATCHERS) | set(CALIBRATED))}); give its "
                                 f"parameters explicitly")
        if label is None:
            label = name if density is None else f"{name}@{density:.0%}"
            if params:
                label += ":" + ",".join(f"{k}={v}" for k, v in params)
        spec = PolicySpec(label=label, name=name, params=tuple(params), density=density)
        if density is None:
            planner.policy(name, **dict(params))           # validate now, not mid-run
        return spec

    def resolve(self, n_tokens: int,
                calibrate: Optional[Callable[["PolicySpec", int], Policy]] = None):
        """The policy (or ``{glob: Policy}`` map) to compile for prompts of ``n_tokens``.
        ``calibrate(spec, n_tokens) -> Policy`` solves the specs that need prefills on the model
        (``needs_calibration``; the harness passes its ``Calibrator``). In a per-layer map, a
        calibrated entry is calibrated as if it covered every layer."""
        if self.layers:
            return {glob: sub.resolve(n_tokens, calibrate) for glob, sub in self.layers}
        if self.density is None:
            return planner.policy(self.name, **dict(self.params))
        if self.name in CALIBRATED:
            if calibrate is None:
                raise ValueError(f"{self.label}: {self.name} keeps an input-dependent number of "
                                 f"pairs, so solving it for density {self.density:g} needs "
                                 f"calibration prefills on the model; resolve it with "
                                 f"calibrate=planner.quality.harness.Calibrator(...)")
            return calibrate(self, n_tokens)
        return MATCHERS[self.name](n_tokens, self.density, dict(self.params))

    def leaves(self) -> tuple:
        """The single-policy specs of this spec (itself, or the entries of a per-layer map)."""
        if self.layers:
            return tuple(x for _, sub in self.layers for x in sub.leaves())
        return (self,)

    @property
    def needs_calibration(self) -> bool:
        """Whether resolving needs prefills on the model (a calibrated solver)."""
        return any(x.density is not None and x.name in CALIBRATED for x in self.leaves())

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
