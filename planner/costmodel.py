"""A cost model that chooses: dense or sparse, and knows the crossover length.

Costs are sympy expressions of (B, Hq, Hkv, Nq, Nkv, D, rho, block): FLOPs and bytes of each
candidate, turned into time with a hardware profile::

    time = max(flops / (peak * eff), bytes / (bandwidth * bw_eff)) + overhead
           + programs * program_cost / n_sm

``rho`` is the fraction of the causal pairs a sparse candidate computes (its block density,
diagonal and partial blocks included); ``causal_frac`` the fraction of all pairs the causal
rule allows. Profiles live in one dict; a measured profile (from ``benchmarks/calibrate.py``)
replaces the built-in numbers when ``benchmarks/results/profile_<name>.json`` exists.

    >>> est = estimate("block_sparse", PROFILES["h100"], B=1, Hq=16, Hkv=16, Nq=65536,
    ...                Nkv=65536, D=128, rho=0.1)
    >>> est < estimate("dense_sdpa", PROFILES["h100"], B=1, Hq=16, Hkv=16, Nq=65536,
    ...                Nkv=65536, D=128, rho=1.0)
    True
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import sympy as sp

B, Hq, Hkv, Nq, Nkv, D, rho, blk = sp.symbols("B H_q H_kv N_q N_kv D rho block", positive=True)
N = sp.Symbol("N", positive=True)


@dataclass(frozen=True)
class KernelRates:
    """How one candidate kernel uses a device: the fraction of the matrix rate (``eff``) and of
    the bandwidth (``bw_eff``) it reaches, a fixed cost per call and a cost per program
    (query-block prologue/epilogue), the latter spread over the multiprocessors, and a floor:
    the host-side time to plan and issue one call, which bounds short calls from below."""

    eff: float
    bw_eff: float
    overhead_us: float
    program_us: float = 0.0
    floor_us: float = 0.0      # host issue time of one eager call: no call is faster


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_tflops: float          # dense bf16 matrix rate (measured GEMM)
    bandwidth_gbs: float        # device memory, read + write (measured copy)
    n_sm: int
    kernels: tuple              # ((candidate, KernelRates), ...)
    sparse_kernels: bool = True  # False: the sparse path is the fp32 reference (computes N^2)
    measured: str = ""          # where the numbers came from

    def rates(self, candidate: str) -> KernelRates:
        for name, r in self.kernels:
            if name == candidate:
                return r
        raise KeyError(f"profile {self.name!r} has no rates for {candidate!r}")


_GPU_DEFAULT = (("dense_sdpa", KernelRates(0.80, 0.8, 20.0)),
                ("block_sparse", KernelRates(0.65, 0.7, 40.0, 1.0)),
                ("token_sparse_decode", KernelRates(0.5, 0.6, 50.0)))

PROFILES: dict[str, HardwareProfile] = {
    # ANCHORS.md (H100 80GB HBM3): bf16 GEMM 710 TFLOP/s, SDPA causal 582-629 TFLOP/s, copy
    # 3.0 TB/s. Replaced by the fit of benchmarks/costmodel.py when profile_h100.json exists.
    "h100": HardwareProfile("h100", 710.0, 3000.0, 132, _GPU_DEFAULT,
                            measured="ANCHORS.md peer numbers"),
    "h200": HardwareProfile("h200", 790.0, 4200.0, 132, _GPU_DEFAULT,
                            measured="ANCHORS.md peer numbers"),
    # 2 CPU cores, fp32 reference kernels: the sparse path computes every score, then masks.
    "cpu": HardwareProfile("cpu", 0.1, 20.0, 2,
                           (("dense_sdpa", KernelRates(0.5, 0.5, 20.0)),
                            ("block_sparse", KernelRates(0.15, 0.3, 100.0)),
                            ("token_sparse_decode", KernelRates(0.15, 0.3, 100.0))),
                           sparse_kernels=False, measured="order of magnitude for 2 x86 cores"),
}


def causal_frac(n_q, n_kv, causal: bool = True):
    """Fraction of the Nq x Nkv pairs a bottom-right causal rule allows (1 if not causal)."""
    if not causal:
        return sp.Integer(1)
    return (n_q * n_kv - n_q * (n_q - 1) / 2) / (n_q * n_kv)


def flops_bytes(candidate: str, causal: bool = True, elem: int = 2):
    """(flops, bytes, programs) of one kernel call as sympy expressions."""
    cf = causal_frac(Nq, Nkv, causal)
    pairs = B * Hq * Nq * Nkv * cf
    qo = elem * B * Hq * Nq * D * 2                      # read q, write out
    kv = elem * B * Hkv * Nkv * D * 2                    # read k and v once
    if candidate == "dense_sdpa":
        return 4 * pairs * D, qo + kv, sp.Integer(0)
    if candidate == "block_sparse":
        # every computed tile streams a K and a V block; one program per (head, query block)
        tiles = B * Hq * (Nq / blk) * (Nkv / blk) * cf * rho
        kv_reads = elem * 2 * D * blk * tiles
        return 4 * pairs * rho * D, qo + kv_reads, B * Hq * sp.ceiling(Nq / blk)
    if candidate == "token_sparse_decode":
        k_sel = rho * Nkv                                 # gathered keys per query
        return (4 * B * Hq * Nq * k_sel * D,
                elem * 2 * B * Hkv * k_sel * D + qo + 4 * B * Hkv * Nq * k_sel, sp.Integer(0))
    raise ValueError(f"unknown candidate {candidate!r}; known: dense_sdpa, block_sparse, "
                     "token_sparse_decode")


@functools.lru_cache(maxsize=None)
def time_expr(candidate: str, profile: HardwareProfile, causal: bool = True):
    """Seconds: Max(compute, memory) + fixed cost + programs x per-program cost / SMs."""
    fl, by, programs = flops_bytes(candidate, causal)
    r = profile.rates(candidate)
    if candidate != "dense_sdpa" and not profile.sparse_kernels:
        fl, by, _ = flops_bytes("dense_sdpa", causal)     # the reference computes every pair
    compute = fl / (profile.peak_tflops * 1e12 * r.eff)
    memory = by / (profile.bandwidth_gbs * 1e9 * r.bw_eff)
    device = (sp.Max(compute, memory) + r.overhead_us * 1e-6
              + programs * r.program_us * 1e-6 / profile.n_sm)
    return sp.Max(device, r.floor_us * 1e-6) if r.floor_us else device


@functools.lru_cache(maxsize=None)
def _fn(candidate: str, profile: HardwareProfile, causal: bool):
    return sp.lambdify((B, Hq, Hkv, Nq, Nkv, D, rho, blk), time_expr(candidate, profile, causal),
                       "math")


def estimate(candidate: str, profile: HardwareProfile, *, B: int, Hq: int, Hkv: int, Nq: int,
             Nkv: int, D: int, rho: float, block: int = 128, causal: bool = True) -> float:
    """Estimated seconds of one call."""
    return float(_fn(candidate, profile, causal)(B, Hq, Hkv, Nq, Nkv, D, rho, block))


def crossover(profile: HardwareProfile, *, B: int = 1, Hq: int, Hkv: int, D: int,
              rho_of_n, block: int = 128, decode: bool = False) -> Optional[float]:
    """Sequence length above which the sparse candidate is estimated faster than dense.

    ``rho_of_n`` gives the expected density at length N (a sympy expression in ``N`` or a
    number). Solved symbolically on the compute-bound branches (prefill: Nq = Nkv = N; decode:
    Nq = 1, Nkv = N), then checked with the full expression. None when sparse never wins."""
    cand = "token_sparse_decode" if decode else "block_sparse"
    subs = {sp.Symbol("B", positive=True): B, sp.Symbol("H_q", positive=True): Hq,
            sp.Symbol("H_kv", positive=True): Hkv, sp.Symbol("D", positive=True): D,
            sp.Symbol("block", positive=True): block}
    nq = sp.Integer(1) if decode else N
    t_d = time_expr("dense_sdpa", profile, True).subs(subs).subs({Nq: nq, Nkv: N})
    t_s = time_expr(cand, profile, True).subs(subs).subs({Nq: nq, Nkv: N, rho: rho_of_n})
    f = sp.lambdify(N, t_s - t_d, "math")
    grid = [2 ** e for e in range(7, 24)]
    vals = [f(n) for n in grid]
    for lo, hi, vlo, vhi in zip(grid, grid[1:], vals, vals[1:]):
        if vlo > 0 >= vhi:
            try:
                return float(sp.nsolve(t_s - t_d, N, (lo + hi) / 2))
            except (ValueError, ZeroDivisionError, TypeError):
                a, b = lo, hi
                for _ in range(60):
                    m = (a + b) / 2
                    a, b = (m, b) if f(m) > 0 else (a, m)
                return (a + b) / 2
    return float(grid[0]) if vals[0] <= 0 else None


def load_profile(name: str, results_dir: Optional[str] = None) -> HardwareProfile:
    """The built-in profile, replaced by the fit in ``profile_<name>.json`` if present."""
    base = PROFILES[name]
    results_dir = results_dir or os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "benchmarks", "results")
    path = os.path.join(results_dir, f"profile_{name}.json")
    if not os.path.exists(path):
        return base
    with open(path) as f:
        fit = json.load(f)["fit"]
    return profile_from_fit(name, fit, measured=path, sparse_kernels=base.sparse_kernels)


def profile_from_fit(name: str, fit: dict, measured: str = "", sparse_kernels: bool = True):
    kernels = tuple((c, KernelRates(**r)) for c, r in fit["kernels"].items())
    return HardwareProfile(name, fit["peak_tflops"], fit["bandwidth_gbs"], int(fit["n_sm"]),
                           kernels, sparse_kernels=sparse_kernels, measured=measured)


def fit_rates(candidate: str, points: list, peak_tflops: float, bandwidth_gbs: float,
              n_sm: int) -> KernelRates:
    """Least relative error fit of one candidate's rates to measured points.

    ``points``: dicts with B, Hq, Hkv, Nq, Nkv, D, rho, block, ms. Grid search over the two
    efficiencies and the per-program cost; the fixed cost is the median residual; last, the
    host issue floor that lowers the error most (0 when none does)."""
    import statistics
    feats = []
    for p in points:
        sub = {B: p["B"], Hq: p["Hq"], Hkv: p["Hkv"], Nq: p["Nq"], Nkv: p["Nkv"], D: p["D"],
               rho: p["rho"], blk: p.get("block", 128)}
        fl, by, progs = (float(e.subs(sub)) for e in flops_bytes(candidate))
        feats.append((fl / (peak_tflops * 1e12), by / (bandwidth_gbs * 1e9), progs / n_sm,
                      p["ms"] * 1e-3))
    best = None
    effs = [x / 100 for x in range(20, 101, 2)]
    progs_us = [0.0] if candidate != "block_sparse" else [x / 4 for x in range(0, 41)]
    for e in effs:
        for be in effs:
            for pu in progs_us:
                base = [max(c / e, m / be) + g * pu * 1e-6 for c, m, g, _ in feats]
                over = max(0.0, statistics.median(t - b for b, (_, _, _, t) in zip(base, feats)))
                err = sum(abs(b + over - t) / t for b, (_, _, _, t) in zip(base, feats))
                if best is None or err < best[0]:
                    best = (err, KernelRates(e, be, over * 1e6, pu))
    # then the host issue floor: the largest that does not raise the error
    rates = best[1]
    base = [max(c / rates.eff, m / rates.bw_eff) + g * rates.program_us * 1e-6
            + rates.overhead_us * 1e-6 for c, m, g, _ in feats]
    for fl_us in [x * 2.5 for x in range(1, 41)]:
        err = sum(abs(max(b, fl_us * 1e-6) - t) / t for b, (_, _, _, t) in zip(base, feats))
        if err < best[0] - 1e-12:
            best = (err, KernelRates(rates.eff, rates.bw_eff, rates.overhead_us,
                                     rates.program_us, fl_us))
    return best[1]


def profile_for(device) -> HardwareProfile:
    """Pick the profile by the device the model runs on."""
    import torch
    dev = torch.device(device)
    if dev.type != "cuda":
        return load_profile("cpu")
    name = torch.cuda.get_device_name(dev)
    return load_profile("h200" if "H200" in name else "h100")


def expected_density(policy, n_q: int, n_kv: int) -> float:
    """Expected block density of a policy's budget at this shape (for planning; the measured
    density is what the report shows)."""
    b = int(getattr(policy, "block", 64))
    nkb = max(1, math.ceil(n_kv / b))
    avg_visible = max(1.0, (nkb + 1) / 2 if n_q > 1 else nkb)
    name = policy.name
    if name == "dense":
        return 1.0
    if name == "block_topk":
        k = policy.topk + policy.sink_blocks + policy.local_blocks
    elif name == "quest":
        k = math.ceil(policy.budget / policy.page) + policy.sink_pages + policy.local_pages
    elif name == "auto":
        return min(1.0, policy.target_density + 2 / avg_visible)
    elif name in ("sink_window", "longformer"):
        w = policy.window + (policy.sink if name == "sink_window" else policy.global_tokens)
        k = math.ceil(w / b) + 1
    elif name == "bigbird":
        k = 2 * math.ceil(policy.window / b) + 1 + math.ceil(policy.global_tokens / b) + policy.random_blocks
    elif name == "vertical_slash":
        k = math.ceil((policy.n_vertical + 2 * policy.n_slash) / b) + 2
    elif name == "threshold":
        return min(1.0, 0.3 + 2 / avg_visible)       # adaptive: planning guess only
    elif name == "dsa":
        visible = max(1.0, (n_kv + 1) / 2 if n_q > 1 else n_kv)
        return min(1.0, policy.topk / visible)
    else:
        return 1.0
    return min(1.0, k / avg_visible)
