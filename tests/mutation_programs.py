"""Random attention programs with in-place writes, for the mutation-safety property tests.

``program(seed)`` writes the source of a small ``nn.Module`` that computes one or two attentions
in one of several spellings and writes tensors in place before, inside and after them, the way
model code does: K assembled in a ``new_empty`` tensor with ``copy_`` into slices (Hugging Face
MLA), a cache filled with ``index_copy_`` / slice assignment (static KV caches), masks applied
with ``masked_fill_`` / ``+=`` / ``add_``, scores scaled in place, outputs accumulated in place,
graph inputs written in place. Each program is returned with the number of attention
computations it has and how many of them read an input that is written in place between the
attention's first read and its output (those must stay dense).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class Program:
    seed: int
    source: str
    inputs: dict                   # name -> tensor (cloned per run)
    sites: int                     # attention computations
    must_stay_dense: int           # of which read an input written mid-attention
    notes: list = field(default_factory=list)

    def module(self) -> torch.nn.Module:
        scope: dict = {"torch": torch, "F": torch.nn.functional, "math": __import__("math")}
        exec(compile(self.source, f"<mutation program {self.seed}>", "exec"), scope)
        return scope["M"]()

    def fresh_inputs(self) -> list:
        return [t.clone() for t in self.inputs.values()]


class _Writer:
    def __init__(self):
        self.lines: list = []

    def __call__(self, line: str) -> None:
        self.lines.append("        " + line)


def program(seed: int, setitem: bool = True) -> Program:
    """A random attention program with in-place writes (see the module docstring).
    ``setitem=False`` spells slice assignment as ``select(..).fill_`` (``torch.fx.symbolic_trace``
    cannot trace ``x[i] = y``)."""
    rnd = random.Random(seed)
    B, H = rnd.choice([1, 2]), rnd.choice([1, 2, 3])
    N = rnd.randint(3, 21)
    D = rnd.choice([4, 8])
    causal = rnd.random() < 0.6
    inputs = {"q": torch.randn(B, H, N, D), "k": torch.randn(B, H, N, D),
              "v": torch.randn(B, H, N, D)}
    use_cache = rnd.random() < 0.25
    if use_cache:
        inputs["cache"] = torch.randn(B, H, N + 3, D)
    add_mask = rnd.random() < 0.3
    if add_mask:
        inputs["bias"] = torch.randn(1, 1, N, N) * 0.5
    w = _Writer()
    notes: list = []
    scale = D ** -0.5

    # ---- inputs prepared with in-place writes
    pre = rnd.sample(["mla_k", "scale_q", "set_v", "cache_k", "input_q", "none", "none"],
                     k=rnd.randint(1, 3))
    for p in pre:
        if p == "mla_k":                             # DeepSeek-V3 / GLM-MoE-DSA expand_kv
            h = rnd.randint(1, D - 1)
            w(f"k2 = k.new_empty({B}, {H}, {N}, {D})")
            w(f"k2[..., :{h}].copy_(k[..., :{h}])")
            w(f"k2[..., {h}:].copy_(k[..., {h}:] * 1.5)")
            w("k = k2")
        elif p == "scale_q":                          # a fresh q scaled in place (statement)
            w("q = q * 1.0")
            w(f"q.mul_({rnd.choice([0.5, 2.0])})")
        elif p == "set_v":
            w("v = v.clone()")
            if setitem:
                w(f"v[:, :, {rnd.randrange(N)}] = {rnd.choice([0.0, 3.0])}")
            else:
                w(f"v.select(2, {rnd.randrange(N)}).fill_({rnd.choice([0.0, 3.0])})")
        elif p == "cache_k" and use_cache:            # a static cache written in place
            if rnd.random() < 0.5:
                w(f"cache[:, :, :{N}].copy_(k)")
            else:
                w(f"cache.index_copy_(2, torch.arange({N}), k)")
            w(f"k = cache[:, :, :{N}]")
        elif p == "input_q":                          # a graph input written in place
            w("q.add_(0.25)")
        notes.append(p)

    n_sites = rnd.choice([1, 1, 2])
    dense_needed = 0
    out_names = []
    for site in range(n_sites):
        spelling = rnd.choice(["sdpa", "matmul", "matmul", "matmul_inplace_scale"])
        mid = rnd.choice(["none", "none", "none", "write_k", "write_v", "write_q"]) \
            if spelling != "sdpa" else "none"
        o = f"o{site}"
        if spelling == "sdpa":
            mask = ", attn_mask=bias" if add_mask and not causal else ""
            w(f"{o} = F.scaled_dot_product_attention(q, k, v{mask}, is_causal={causal})")
        else:
            if mid != "none":
                # the written tensor is a fresh copy (writing a graph input would change eager's
                # later sites too, which is fine, but keep the cases separable)
                t = mid[-1]
                w(f"{t} = {t} * 1.0")
            if spelling == "matmul_inplace_scale":
                w("s = torch.matmul(q, k.transpose(-2, -1))")
                w(f"s.mul_({scale!r})")
            else:
                form = rnd.choice(["mul", "div", "pre"])
                if form == "mul":
                    w(f"s = (q @ k.transpose(-2, -1)) * {scale!r}")
                elif form == "div":
                    w(f"s = (q @ k.transpose(-2, -1)) / math.sqrt({D})")
                else:
                    w(f"s = (q * {scale!r}) @ k.transpose(-2, -1)")
            if causal:
                how = rnd.choice(["masked_fill", "masked_fill_", "iadd", "add_", "where"])
                w(f"cm = torch.ones({N}, {N}, dtype=torch.bool).triu(1)")
                if how == "masked_fill":
                    w('s = s.masked_fill(cm, float("-inf"))')
                elif how == "masked_fill_":
                    w('s.masked_fill_(cm, float("-inf"))')
                elif how == "iadd":
                    w('s += torch.zeros(1, 1, ' f'{N}, {N}).masked_fill(cm, -1e30)')
                elif how == "add_":
                    w(f"s.add_(torch.zeros({N}, {N}).masked_fill(cm, -1e30))")
                else:
                    w("s = torch.where(~cm, s, -1e30)")
            if add_mask:
                w(rnd.choice(["s = s + bias", "s += bias", "s.add_(bias)"]))
            if mid == "write_k":
                w("k.mul_(2.0)")
            elif mid == "write_q":
                w("q.add_(1.0)")
            elif mid == "write_v":
                w("v.mul_(-1.0)")
            w("p = s.softmax(dim=-1)")
            w(f"{o} = p @ v")
            if mid != "none":
                dense_needed += 1
        post = rnd.choice(["none", "none", "scale_out", "accumulate", "zero_k"])
        if post == "scale_out":
            w(f"{o}.mul_(2.0)")
        elif post == "accumulate":
            w(f"acc = torch.zeros_like({o})")
            w(f"acc += {o}")
            w(f"{o} = acc")
        elif post == "zero_k":
            w("k = k * 1.0")
            w("k.zero_()")
        out_names.append(o)
        if site + 1 < n_sites:
            w(f"q = {o}")
    w(f"return {' + '.join(out_names)}")
    args = ", ".join(inputs)
    src = "class M(torch.nn.Module):\n    def forward(self, " + args + "):\n" + \
        "\n".join(w.lines) + "\n"
    return Program(seed, src, inputs, n_sites, dense_needed, notes)
