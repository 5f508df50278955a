"""A cost model that chooses: dense or sparse, which kernel schedule, and knows the crossover.

Costs are sympy expressions of (B, Hq, Hkv, Nq, Nkv, D, rho, block): the work of each candidate
(matrix FLOPs, scores, DRAM bytes, programs, the longest program's loop steps), turned into
time with a hardware profile::

    compute = (flops + exp_ratio * scores) / (peak * eff * (D / 128) ** d_exp)
    memory  = bytes / (bandwidth * bw_eff)
    time    = max(max(compute, memory) * fill, steps * step_us) + overhead
              + programs * program_cost / n_sm,        never below the host issue floor
    fill    = max(1, imbalance * sat * n_sm / programs)

* ``exp_ratio * scores``: every score needs an exponential, and an H100 SM does 16 of those per
  clock against 4096 bf16 tensor-core FLOPs (989 vs 3.9 TFLOP/s, FlashAttention-3, Shah et
  al. 2024): a score costs as much as 256 matrix FLOPs, so at D=64 attention is half softmax.
* DRAM bytes count q, out and K/V once. The query tiles of one head re-read the same K/V
  tiles from L2 (at 64k tokens, D=64, the 128-row tiles read 275 GB, 92 ms at DRAM speed;
  the kernel takes 23 ms), so re-reads cost time through ``eff``, not bandwidth.
* ``fill`` is the price of too few programs: a kernel whose programs cannot occupy every
  multiprocessor (``sat`` programs per SM reach the fitted rates), or whose longest program
  (``imbalance`` x the mean one: about 2 for causal prefill, where the last query tile sees
  every key) outlasts the rest, runs at that fraction of its rates.
* ``steps * step_us``: the longest program's serial loop (key tiles of a query tile, list
  entries of a decode row) at the latency of one step, which binds when few programs walk
  long lists (a decode list that is not split).

``rho`` is the fraction of the causal pairs a sparse candidate computes (its block density,
diagonal and partial blocks included); ``causal_frac`` the fraction of all pairs the causal
rule allows. Candidates are dense SDPA and *schedule variants* of the sparse kernels
(``VARIANTS``): ``block_sparse@m128n64w8s3`` is the block-sparse forward with 128-row query
tiles, 64-key steps, 8 warps, 3 pipeline stages; ``token_sparse_decode@split4`` the gather
kernel whose index list is split so that about 4 programs per SM run (``split0``: one program
per row). Each candidate's rates are fitted on measured times (``benchmarks/costmodel.py``,
the host issue floor shared by a family's variants, which share their host code); ``best``
picks the cheapest variant a site can run and the runtime launches it (``runtime.plan``).
Profiles live in one dict; a measured profile replaces the built-in numbers when
``benchmarks/results/profile_<name>.json`` exists.

    >>> est = estimate("block_sparse", PROFILES["h100"], B=1, Hq=16, Hkv=16, Nq=65536,
    ...                Nkv=65536, D=128, rho=0.1)
    >>> est < estimate("dense_sdpa", PROFILES["h100"], B=1, Hq=16, Hkv=16, Nq=65536,
    ...                Nkv=65536, D=128, rho=1.0)
    True
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import sympy as sp

from codegen.common import Schedule

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
    sat: float = 1.0           # programs per SM needed to reach the rates (see ``fill``)
    step_us: float = 0.0       # latency of one loop step of a program (see ``steps``)
    d_exp: float = 0.0         # eff scales as (D / 128) ** d_exp (tile shapes favour head dims)


@dataclass(frozen=True)
class Variant:
    """A schedule of one sparse kernel family, as a cost-model candidate the runtime can run.

    Block-sparse: the query tile (``block_m`` rows), key step (``block_n``), warps, pipeline
    stages and tensor-descriptor loads (``tma``). Token-sparse decode: ``per_sm``, the programs
    per SM the split of each index list aims at (0: no split, one program walks the list)."""
    family: str
    tag: str
    block_m: int = 0
    block_n: int = 0
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False
    per_sm: int = 0

    @property
    def name(self) -> str:
        return f"{self.family}@{self.tag}"

    def fits(self, block: int, head_dim: int, dtype) -> bool:
        """Whether a site (mask block, head dim, dtype name or torch dtype) can run it."""
        if str(dtype).replace("torch.", "") not in ("float16", "bfloat16") or head_dim > 128:
            return False              # measured only for half precision, D <= 128
        if self.family == "block_sparse":
            return self.block_m <= block and self.block_n <= block
        return True

    def schedule(self):
        """The block-sparse kernel's ``Schedule`` (token decode variants: see ``per_sm``)."""
        if self.family != "block_sparse":
            raise ValueError(f"{self.name}: only block_sparse variants carry a tile schedule")
        return Schedule(block_m=self.block_m, block_n=self.block_n, num_warps=self.num_warps,
                        num_stages=self.num_stages, tma=self.tma)


VARIANTS: tuple = (
    Variant("block_sparse", "m128n128w8s3t", 128, 128, 8, 3, tma=True),
    Variant("block_sparse", "m128n64w8s3", 128, 64, 8, 3),
    Variant("block_sparse", "m128n32w8s4", 128, 32, 8, 4),
    Variant("block_sparse", "m64n64w4s3", 64, 64, 4, 3),
    Variant("block_sparse", "m64n32w4s3", 64, 32, 4, 3),
    Variant("token_sparse_decode", "split0", per_sm=0),
    Variant("token_sparse_decode", "split4", per_sm=4),
    Variant("token_sparse_decode", "split16", per_sm=16),
)
_BY_NAME = {v.name: v for v in VARIANTS}
FAMILIES = ("dense_sdpa", "block_sparse", "token_sparse_decode")


def variant(candidate: str) -> Optional[Variant]:
    """The Variant a candidate name denotes (None for a bare family name)."""
    if "@" not in candidate:
        return None
    if candidate not in _BY_NAME:
        raise ValueError(f"unknown candidate {candidate!r}; known variants: "
                         f"{', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[candidate]


def family(candidate: str) -> str:
    return candidate.split("@", 1)[0]


@dataclass(frozen=True)
class TokenSiteRates:
    """What a token-list site (``dsa``) costs beside dense attention: the lightning indexer with
    its top-k, and the gather attention over the lists.

    Prefill, per call: ``index_fixed_us + index_row_ns * B * Nq`` (the fused scorer + top-k
    and the indexer projections); decode (at most ``DECODE_MAX_ROWS`` rows): ``index_key_ns``
    per (row, cached key), the scan of every key's index score. The gather attention over
    ``k`` listed keys costs ``gather_ps`` per (row, listed key, KV head) at D=128 (scaled by
    D/128), and no less than its matrix work at half the peak. ``gather_dense``: the lists
    are attended through a dense mask, every pair computed (the CPU path)."""

    index_fixed_us: float
    index_row_ns: float
    index_key_ns: float
    gather_ps: float
    gather_dense: bool = False


#: H100, ``benchmarks/results/dsa_h100.md`` (B=1, 16 heads x 128, top-2048, indexer 4 x 64):
#: fused top-k 7.14 / 13.80 ms at N = 16384 / 65536 (a line through both: 4.9 ms + 136 ns per
#: row), projections 1.16 ms at 65536 (18 ns per row); gather attention 2.40 / 9.63 ms with one
#: KV head and 40.0 / 165.7 ms with 16 (72-74 ps per row, listed key and KV head); decode
#: (B=8, cache 131072) 1.81 ms a step, about 1.7 ns per cached key.
_TOKEN_GPU = TokenSiteRates(index_fixed_us=4900.0, index_row_ns=154.0, index_key_ns=1.7,
                            gather_ps=73.0)
#: 2 CPU cores: the lists become a keep mask under SDPA (``runtime.cpu_attend``), so the
#: attention costs at least the dense one; the indexer scores every visible pair in PyTorch.
_TOKEN_CPU = TokenSiteRates(index_fixed_us=2000.0, index_row_ns=2000.0, index_key_ns=20.0,
                            gather_ps=0.0, gather_dense=True)


@dataclass(frozen=True)
class EstimatorRates:
    """What a block policy's estimator and selection (``score`` then ``select``) cost per call
    beside its attention kernel: ``fixed_us`` (mostly the host's launches: a short call is
    bound by them) plus ``pair_ps`` per (batch x query head x query block x key block), per
    policy name (``rates``: ``((name, fixed_us, pair_ps), ...)``); a policy without a row
    costs ``default``. Static patterns (built once per shape and reused) cost about nothing."""

    rates: tuple = ()
    default: tuple = (0.0, 0.0)

    def seconds(self, name: str, *, B: int, Hq: int, Nq: int, Nkv: int, block: int) -> float:
        fixed, pair = next(((f, p) for n, f, p in self.rates if n == name), self.default)
        pairs = B * Hq * -(-Nq // block) * -(-Nkv // block)
        return fixed * 1e-6 + pairs * pair * 1e-12


@dataclass(frozen=True)
class SiteCalibration:
    """Whole sites measured beside SDPA on one card (``benchmarks/site_overhead.py``): rows of
    ``(Hq, Hkv, D, policy, N, sdpa_s, site_s, site_host_s)`` at B=1, causal, each policy's
    defaults (``site_s``: until the device is done; ``site_host_s``: until the call returned).

    ``plan.decide`` scales its dense and sparse estimates by measured / estimated at the
    measured call shapes nearest the asked one (the same head dim and the nearest head count;
    the correction interpolated in log N between the measured lengths, held beyond them): the
    analytic model can miss a kernel's efficiency at mid lengths by 2x either way, and the
    dense-or-sparse choice is where that shows as a slower model. A site measured host-bound
    alone (wall < 1.5 x host) says little about its device time, which a model's other layers
    overlap with the host's launches: there the measurement only ever lowers the estimate."""

    rows: tuple = ()

    def neighbours(self, policy: str, Hq: int, D: int) -> tuple:
        """The measured ``(N, sdpa_s, site_s, site_host_s)`` of ``policy`` at the nearest measured shape,
        with that shape's ``(Hq, Hkv, D)``; ``((), None)`` where the policy was not measured."""
        mine = [r for r in self.rows if r[3] == policy]
        if not mine:
            return (), None
        same_d = [r for r in mine if r[2] == D] or mine
        best = min(same_d, key=lambda r: (abs(math.log(r[0] / max(Hq, 1))), abs(r[2] - D)))
        shape = best[:3]
        pts = sorted((r[4], r[5], r[6], r[7]) for r in same_d if r[:3] == shape)
        return tuple(pts), shape


def interp_log(points: tuple, n: float) -> float:
    """Piecewise-linear interpolation of ``(N, value)`` points in log N and log value, held
    constant beyond the first and last point."""
    if n <= points[0][0]:
        return points[0][1]
    if n >= points[-1][0]:
        return points[-1][1]
    for (n0, v0), (n1, v1) in zip(points, points[1:]):
        if n0 <= n <= n1:
            t = math.log(n / n0) / math.log(n1 / n0)
            return math.exp(math.log(v0) + t * (math.log(v1) - math.log(v0)))
    return points[-1][1]


#: provisional GPU rates until ``site_overhead_<card>.json`` is measured (it replaces them): a
#: pooled estimator and its selection program at 65536 tokens, 16 heads, block 64 take about
#: 0.5 ms (``estimators_h100.md``: pooling 0.20, products 0.06, selection 0.26 ms), 30 ps per
#: block pair; a few launches of host work each.
_EST_GPU = EstimatorRates(rates=(("sink_window", 10.0, 0.0), ("longformer", 10.0, 0.0),
                                 ("bigbird", 10.0, 0.0)), default=(100.0, 30.0))


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_tflops: float          # dense bf16 matrix rate (measured GEMM)
    bandwidth_gbs: float        # device memory, read + write (measured copy)
    n_sm: int
    kernels: tuple              # ((candidate, KernelRates), ...)
    sparse_kernels: bool = True  # False: the sparse path is the fp32 reference (computes N^2)
    measured: str = ""          # where the numbers came from
    exp_ratio: float = 256.0    # matrix FLOPs one exponential costs (H100: 4096 / 16 per clock)
    tokens: TokenSiteRates = _TOKEN_GPU    # token-list (dsa) sites beside the attention
    estimators: EstimatorRates = _EST_GPU  # block policies' estimator + selection
    calibration: SiteCalibration = SiteCalibration()  # measured whole sites (plan.decide)

    def __hash__(self) -> int:
        # the estimates are memoised per profile (lru_cache keys): hashing every nested rate
        # tuple on each lookup cost ~100 us a decision; a frozen profile's hash is computed once
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", h)
        return h

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
    # 2 CPU cores: dense sites run SDPA, block policies gather their kept blocks
    # (runtime.cpu_attend). Rates measured on the CI machine (2 x86 cores, torch 2.13, fp32,
    # B=1, 8 heads x 64, causal, block 64, N = 1k-8k): SDPA reaches eff 1.07-1.62 of this nominal
    # 0.1 TFLOP/s peak, the gather 0.17-0.23 at densities 0.06-0.85 (about 9x SDPA's time per
    # kept pair), so sparse gains below about 10% density. Token lists (dsa) materialise a mask.
    "cpu": HardwareProfile("cpu", 0.1, 20.0, 2,
                           (("dense_sdpa", KernelRates(1.5, 1.0, 50.0)),
                            ("block_sparse", KernelRates(0.18, 0.3, 2000.0)),
                            ("token_sparse_decode", KernelRates(0.15, 0.3, 2000.0))),
                           sparse_kernels=True, measured="2 x86 cores, torch 2.13 (see above)",
                           exp_ratio=16.0, tokens=_TOKEN_CPU, estimators=EstimatorRates()),
}


def causal_frac(n_q, n_kv, causal: bool = True):
    """Fraction of the Nq x Nkv pairs a bottom-right causal rule allows (1 if not causal)."""
    if not causal:
        return sp.Integer(1)
    return (n_q * n_kv - n_q * (n_q - 1) / 2) / (n_q * n_kv)


DECODE_SPLIT_MIN = 128      # fewest index entries per program when a decode list is split
DECODE_MAX_ROWS = 16        # calls with at most this many query rows are costed as decode


def work(candidate: str, causal: bool = True, elem: int = 2, n_sm: int = 132) -> dict:
    """The work of one kernel call as sympy expressions: matrix ``flops``, ``scores`` (one
    exponential each), DRAM ``bytes``, ``programs`` (0: not modelled) and ``steps`` (loop
    steps of the longest program, 0: not modelled).

    Block-sparse: one program per (head, query tile), walking the key tiles of its list.
    Token-sparse decode: one program per (row, list chunk), 64 entries per step; a split list
    adds a combine pass over fp32 partial outputs."""
    fam, var = family(candidate), variant(candidate)
    cf = causal_frac(Nq, Nkv, causal)
    pairs = B * Hq * Nq * Nkv * cf
    qo = elem * B * Hq * Nq * D * 2                      # read q, write out
    kv = elem * B * Hkv * Nkv * D * 2                    # read k and v once
    zero = sp.Integer(0)
    if fam == "dense_sdpa":
        return dict(flops=4 * pairs * D, scores=pairs, bytes=qo + kv, programs=zero, steps=zero)
    if fam == "block_sparse":
        bm, bn = (var.block_m, var.block_n) if var else (blk, blk)
        return dict(flops=4 * pairs * rho * D, scores=pairs * rho, bytes=qo + kv,
                    programs=B * Hq * sp.ceiling(Nq / bm), steps=Nkv * rho / bn)
    if fam == "token_sparse_decode":
        k_sel = rho * Nkv                                 # gathered keys per query
        rows = B * Hkv * Nq                               # GQA groups share a program
        fl, sc = 4 * B * Hq * Nq * k_sel * D, B * Hq * Nq * k_sel
        by = elem * 2 * B * Hkv * k_sel * D + qo + 4 * B * Hkv * Nq * k_sel
        if var is None:
            return dict(flops=fl, scores=sc, bytes=by, programs=zero, steps=zero)
        n_split = sp.Integer(1) if var.per_sm == 0 else sp.Max(
            1, sp.Min(k_sel / DECODE_SPLIT_MIN, sp.Integer(var.per_sm * n_sm) / rows))
        partial = 4 * 2 * B * Hq * Nq * n_split * (D + 1)     # fp32 partials written, re-read
        return dict(flops=fl, scores=sc, bytes=by + (partial if var.per_sm else 0),
                    programs=rows * n_split, steps=k_sel / (64 * n_split))
    raise ValueError(f"unknown candidate {candidate!r}; known: {', '.join(FAMILIES)} and the "
                     f"variants {', '.join(sorted(_BY_NAME))}")


def flops_bytes(candidate: str, causal: bool = True, elem: int = 2, n_sm: int = 132):
    """(flops, bytes, programs) of one kernel call as sympy expressions (see ``work``)."""
    w = work(candidate, causal, elem, n_sm)
    return w["flops"], w["bytes"], w["programs"]


def imbalance(candidate: str, causal: bool = True):
    """Longest program / mean program: causal prefill tiles see 1/causal_frac of the mean."""
    if family(candidate) == "block_sparse" and causal:
        return 1 / causal_frac(Nq, Nkv, True)
    return sp.Integer(1)


@functools.lru_cache(maxsize=None)
def time_expr(candidate: str, profile: HardwareProfile, causal: bool = True):
    """Seconds of one call (the module docstring gives the formula)."""
    w = work(candidate, causal, n_sm=profile.n_sm)
    r = profile.rates(candidate)
    fill, steps = sp.Integer(1), w["steps"]
    if family(candidate) != "dense_sdpa" and not profile.sparse_kernels:
        w = work("dense_sdpa", causal)                    # the reference computes every pair
        steps = sp.Integer(0)
    elif w["programs"] != 0:
        fill = sp.Max(1, imbalance(candidate, causal) * r.sat * profile.n_sm / w["programs"])
    eff = r.eff * (D / 128) ** r.d_exp if r.d_exp else r.eff
    compute = (w["flops"] + profile.exp_ratio * w["scores"]) / (profile.peak_tflops * 1e12 * eff)
    memory = w["bytes"] / (profile.bandwidth_gbs * 1e9 * r.bw_eff)
    device = sp.Max(compute, memory) * fill
    if r.step_us and steps != 0:
        device = sp.Max(device, steps * r.step_us * 1e-6)
    device = device + r.overhead_us * 1e-6 + w["programs"] * r.program_us * 1e-6 / profile.n_sm
    return sp.Max(device, r.floor_us * 1e-6) if r.floor_us else device


@functools.lru_cache(maxsize=None)
def _fn(candidate: str, profile: HardwareProfile, causal: bool):
    return sp.lambdify((B, Hq, Hkv, Nq, Nkv, D, rho, blk), time_expr(candidate, profile, causal),
                       "math")


def estimate(candidate: str, profile: HardwareProfile, *, B: int, Hq: int, Hkv: int, Nq: int,
             Nkv: int, D: int, rho: float, block: int = 128, causal: bool = True) -> float:
    """Estimated seconds of one call."""
    return float(_fn(candidate, profile, causal)(B, Hq, Hkv, Nq, Nkv, D, rho, block))


def candidates(profile: HardwareProfile, fam: str, *, block: int = 128, head_dim: int = 128,
               dtype="bfloat16") -> list:
    """The candidates of a family a site can run: the profile's fitted variants that fit the
    site (mask block, head dim, dtype), else the bare family (its default schedule)."""
    names = [n for n, _ in profile.kernels if n.startswith(fam + "@")
             and n in _BY_NAME and _BY_NAME[n].fits(block, head_dim, dtype)]
    return names or [fam]


def best(profile: HardwareProfile, fam: str, *, dtype="bfloat16", **shape) -> tuple:
    """(candidate, seconds): the cheapest of ``candidates`` at this shape."""
    names = candidates(profile, fam, block=shape.get("block", 128), head_dim=shape["D"],
                       dtype=dtype)
    return min(((n, estimate(n, profile, **shape)) for n in names), key=lambda x: x[1])


def crossover(profile: HardwareProfile, *, B: int = 1, Hq: int, Hkv: int, D: int,
              rho_of_n, block: int = 128, decode: bool = False,
              dtype="bfloat16", estimator: Optional[str] = None,
              estimator_block: Optional[int] = None) -> Optional[float]:
    """Sequence length above which the sparse kernel (its best variant) is estimated faster
    than dense.

    ``rho_of_n`` gives the expected density at length N (a sympy expression in ``N`` or a
    number). The sparse time is the Min over the site's variants; the root of
    ``t_sparse - t_dense`` is solved with sympy (prefill: Nq = Nkv = N; decode: Nq = 1,
    Nkv = N) after a sign scan, bisection where the solver fails. None when sparse never wins.
    ``estimator``: a block policy's name, whose estimator and selection (``EstimatorRates``,
    on ``estimator_block``-sized blocks) count on the sparse side, as ``runtime.plan.decide``
    counts them."""
    fam = "token_sparse_decode" if decode else "block_sparse"
    subs = {sp.Symbol("B", positive=True): B, sp.Symbol("H_q", positive=True): Hq,
            sp.Symbol("H_kv", positive=True): Hkv, sp.Symbol("D", positive=True): D,
            sp.Symbol("block", positive=True): block}
    nq = sp.Integer(1) if decode else N
    t_d = time_expr("dense_sdpa", profile, True).subs(subs).subs({Nq: nq, Nkv: N})
    names = candidates(profile, fam, block=block, head_dim=D, dtype=dtype)
    t_s = sp.Min(*[time_expr(c, profile, True) for c in names]).subs(subs).subs(
        {Nq: nq, Nkv: N, rho: rho_of_n})
    if estimator is not None:
        fixed, pair = next(((f, p) for n, f, p in profile.estimators.rates if n == estimator),
                           profile.estimators.default)
        eb = estimator_block or block
        t_s = t_s + fixed * 1e-6 + B * Hq * sp.ceiling(nq / eb) * sp.ceiling(N / eb) * pair * 1e-12
    f = sp.lambdify(N, t_s - t_d, "math")
    grid = [2 ** e for e in range(7, 24)]
    vals = [f(n) for n in grid]
    for lo, hi, vlo, vhi in zip(grid, grid[1:], vals, vals[1:]):
        if vlo > 0 >= vhi:
            try:
                root = float(sp.nsolve(t_s - t_d, N, (lo + hi) / 2))
                if lo <= root <= hi:
                    return root
            except (ValueError, ZeroDivisionError, TypeError):
                pass
            a, b = lo, hi
            for _ in range(60):
                m = (a + b) / 2
                a, b = (m, b) if f(m) > 0 else (a, m)
            return (a + b) / 2
    return float(grid[0]) if vals[0] <= 0 else None


#: where the measured files a profile (and the kernels' tuned schedules) read live
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "benchmarks", "results")


@functools.lru_cache(maxsize=None)
def load_profile(name: str, results_dir: Optional[str] = None) -> HardwareProfile:
    """The built-in profile, replaced by the fit in ``profile_<name>.json`` if present (read
    once per process: the run-time plan asks for it on calls)."""
    base = PROFILES[name]
    results_dir = results_dir or RESULTS_DIR
    path = os.path.join(results_dir, f"profile_{name}.json")
    est, cal = _site_overhead(results_dir, name, base.estimators)
    if not os.path.exists(path):
        return (base if est is base.estimators and not cal.rows
                else dataclasses.replace(base, estimators=est, calibration=cal))
    with open(path) as f:
        fit = json.load(f)["fit"]
    return dataclasses.replace(
        profile_from_fit(name, fit, measured=path, sparse_kernels=base.sparse_kernels,
                         tokens=base.tokens), estimators=est, calibration=cal)


def _site_overhead(results_dir: str, name: str, base: EstimatorRates) -> tuple:
    """(EstimatorRates, SiteCalibration) from ``benchmarks/site_overhead.py``'s
    ``site_overhead_<name>.json`` where it was measured, else (``base``, empty)."""
    path = os.path.join(results_dir, f"site_overhead_{name}.json")
    if not os.path.exists(path):
        return base, SiteCalibration()
    with open(path) as f:
        data = json.load(f)
    rates = tuple((p, float(r["fixed_us"]), float(r["pair_ps"]))
                  for p, r in data["fit"].items())
    worst = max(rates, key=lambda r: r[1], default=None)
    est = EstimatorRates(rates, base.default if worst is None else (worst[1], worst[2]))
    cal = []
    for r in data.get("rows", ()):
        hq_hkv, d = r["shape"].split("x")
        hq, hkv = hq_hkv.split("/")
        if r.get("sdpa_ms") and r.get("site_wall_ms") and r.get("site_host_ms"):
            cal.append((int(hq), int(hkv), int(d), r["policy"], int(r["N"]),
                        float(r["sdpa_ms"]) * 1e-3, float(r["site_wall_ms"]) * 1e-3,
                        float(r["site_host_ms"]) * 1e-3))
    return est, SiteCalibration(tuple(cal))


def profile_from_fit(name: str, fit: dict, measured: str = "", sparse_kernels: bool = True,
                     tokens: TokenSiteRates = _TOKEN_GPU):
    kernels = tuple((c, KernelRates(**r)) for c, r in fit["kernels"].items())
    return HardwareProfile(name, fit["peak_tflops"], fit["bandwidth_gbs"], int(fit["n_sm"]),
                           kernels, sparse_kernels=sparse_kernels, measured=measured,
                           exp_ratio=float(fit.get("exp_ratio", 256.0)), tokens=tokens)


def token_site_seconds(profile: HardwareProfile, *, B: int, Hq: int, Hkv: int, Nq: int,
                       Nkv: int, D: int, topk: int, dtype="bfloat16") -> tuple:
    """(candidate, seconds) of one call of a token-list (``dsa``) site: the indexer and its
    top-k plus the attention over each row's ``topk`` keys (``TokenSiteRates``). Decode calls
    (at most ``DECODE_MAX_ROWS`` rows) take the cheapest split of the gather kernel; the
    candidate is None for prefill (the gather kernel's default schedule)."""
    r = profile.tokens
    shape = dict(B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nkv=Nkv, D=D)
    k_sel = min(topk, Nkv)
    if r.gather_dense:
        cand, attend = None, estimate("dense_sdpa", profile, rho=1.0, **shape)
    elif Nq <= DECODE_MAX_ROWS:
        cand, attend = best(profile, "token_sparse_decode", dtype=dtype, rho=k_sel / Nkv,
                            **shape)
    else:
        gather = B * Hkv * Nq * k_sel * r.gather_ps * 1e-12 * D / 128
        matrix = 4 * B * Hq * Nq * k_sel * D / (profile.peak_tflops * 1e12 * 0.5)
        cand, attend = None, max(gather, matrix)
    if Nq <= DECODE_MAX_ROWS:
        index = B * Nq * Nkv * r.index_key_ns * 1e-9
    else:
        index = r.index_fixed_us * 1e-6 + B * Nq * r.index_row_ns * 1e-9
    return cand, index + attend


_EFFS = tuple(x / 100 for x in range(10, 161, 4))   # > 1: softmax overlaps the MMAs
_BW_EFFS = tuple(x / 100 for x in range(20, 121, 4))
_SATS = (1.0, 2.0, 4.0, 8.0, 16.0)
_STEPS_US = tuple(x / 2 for x in range(0, 17))
_FLOORS_US = tuple(x * 2.5 for x in range(0, 33))
_D_EXPS = (-0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6)


def _features(candidate: str, points: list, peak_tflops: float, bandwidth_gbs: float,
              n_sm: int, exp_ratio: float):
    """Per point: compute and memory seconds at full rates, the fill factor per unit ``sat``,
    the longest program's steps, D / 128 and the measured seconds (numpy arrays)."""
    import numpy as np
    w = work(candidate, n_sm=n_sm)
    imb = imbalance(candidate)
    cols = []
    for p in points:
        sub = {B: p["B"], Hq: p["Hq"], Hkv: p["Hkv"], Nq: p["Nq"], Nkv: p["Nkv"], D: p["D"],
               rho: p["rho"], blk: p.get("block", 128)}
        progs = float(w["programs"].subs(sub))
        cols.append(((float(w["flops"].subs(sub)) + exp_ratio * float(w["scores"].subs(sub)))
                     / (peak_tflops * 1e12),
                     float(w["bytes"].subs(sub)) / (bandwidth_gbs * 1e9),
                     float(imb.subs(sub)) * n_sm / progs if progs else 0.0,
                     float(w["steps"].subs(sub)), p["D"] / 128, p["ms"] * 1e-3))
    return tuple(np.array(c) for c in zip(*cols))


def _fit_per_floor(feats, floors_us, d_exps=_D_EXPS):
    """For each host floor: the least relative error rates of one candidate (grid search over
    the efficiencies, their head-dim exponent, ``sat`` and ``step_us``; the fixed cost is the
    median residual). Returns [(error, KernelRates)] in the order of ``floors_us``."""
    import numpy as np
    c, m, u, st, dr, t = (x[None, None, :] for x in feats)
    effs, bws = np.array(_EFFS)[:, None, None], np.array(_BW_EFFS)[None, :, None]
    floors = np.array(floors_us)[:, None, None, None] * 1e-6               # [floor, 1, 1, 1]
    mem = m / bws
    sats = _SATS if u.any() else (1.0,)
    steps = _STEPS_US if st.any() else (0.0,)
    d_exps = d_exps if np.ptp(dr) > 0 else (0.0,)
    best = [None] * len(floors_us)
    for de in d_exps:
        roof = np.maximum(c / (effs * dr ** de), mem)                       # [eff, bw, point]
        for sat in sats:
            filled = roof * np.maximum(1.0, u * sat)
            for su in steps:
                base = np.maximum(filled, st * su * 1e-6)
                over = np.maximum(0.0, np.median(t - base, axis=-1, keepdims=True))
                est = np.maximum((base + over)[None], floors)               # [floor, eff, bw, pt]
                err = (np.abs(est - t[None]) / t[None]).sum(-1)             # [floor, eff, bw]
                flat = err.reshape(len(floors_us), -1)
                arg = flat.argmin(-1)
                for f, a in enumerate(arg):
                    if best[f] is None or flat[f, a] < best[f][0]:
                        i, j = np.unravel_index(int(a), err.shape[1:])
                        best[f] = (float(flat[f, a]), KernelRates(
                            float(effs[i, 0, 0]), float(bws[0, j, 0]), float(over[i, j, 0]) * 1e6,
                            0.0, float(floors_us[f]), sat, su, de))
    return best


def fit_rates(candidate: str, points: list, peak_tflops: float, bandwidth_gbs: float,
              n_sm: int, exp_ratio: float = 256.0, floor_us: Optional[float] = None
              ) -> KernelRates:
    """Least relative error fit of one candidate's rates to measured points.

    ``points``: dicts with B, Hq, Hkv, Nq, Nkv, D, rho, block, ms. Grid search over the two
    efficiencies, their head-dim exponent (points of one head dim: 0), the programs per SM
    that saturate (``sat``), the loop-step latency and the host issue floor (``floor_us``
    fixes it); the fixed cost is the median residual."""
    feats = _features(candidate, points, peak_tflops, bandwidth_gbs, n_sm, exp_ratio)
    floors = _FLOORS_US if floor_us is None else (floor_us,)
    return min(_fit_per_floor(feats, floors), key=lambda x: x[0])[1]


def fit_family(points_by_candidate: dict, peak_tflops: float, bandwidth_gbs: float, n_sm: int,
               exp_ratio: float = 256.0) -> dict:
    """Fit the candidates of one kernel family together: one host issue floor for all of
    them (they run the same host code), each its own device rates. Returns
    {candidate: KernelRates}."""
    per = {c: _fit_per_floor(_features(c, pts, peak_tflops, bandwidth_gbs, n_sm, exp_ratio),
                             _FLOORS_US) for c, pts in points_by_candidate.items()}
    f = min(range(len(_FLOORS_US)), key=lambda k: sum(v[k][0] for v in per.values()))
    return {c: v[f][1] for c, v in per.items()}


def profile_for(device) -> HardwareProfile:
    """Pick the profile by the device the model runs on (any CUDA card but an H200: h100)."""
    import torch
    if torch.device(device).type != "cuda":
        return load_profile("cpu")
    return load_profile(card_name(device) or "h100")


def card_name(device) -> Optional[str]:
    """``"h100"`` / ``"h200"`` for those CUDA cards (the suffix of their measured files under
    ``RESULTS_DIR``), None for any other device."""
    import torch
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return _cuda_card(dev.index if dev.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_card(index: int) -> Optional[str]:
    import torch
    name = torch.cuda.get_device_name(index)
    return "h200" if "H200" in name else "h100" if "H100" in name else None


def expected_density(policy, n_q: int, n_kv: int) -> float:
    """Expected block density of a policy's budget at this shape (``Policy.expected_density``;
    for planning, the measured density is what the report shows)."""
    return policy.expected_density(n_q, n_kv)
