"""RULER-style synthetic retrieval prompts built offline from real text, exact to the token.

Every prompt is ``lead + prefix + haystack (with needles inserted) + question`` (``lead``: the
codec's leading ids, ``<bos>`` for Gemma, none for SmolLM2): exactly the requested number of tokens, with each needle at a sentence boundary near its requested depth, and an
answer (``Sample.answer_ids``) the model must continue with. Tasks:

* ``passkey``        one needle "The pass key is 71432. Remember it. 71432 is the pass key.",
                     at a depth from a grid (0% = right after the instruction, 100% = right
                     before the question); answer: the 5 digits.
* ``niah_single``    one "special magic number" for a two-word key, at a random depth; 7 digits.
* ``niah_multikey``  four such needles with distinct keys at random depths; the question names
                     one of them (the others are distractors).
* ``vt``             variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... spread
                     through the text; the question asks for the value of the last variable.

Tokenisation is done piecewise (prefix, haystack tokens, needles, question) so lengths are
exact; a leading whitespace-only token of the answer is moved into the prompt, so the scored
answer starts with content (for SmolLM2, " 71432" is " " then one token per digit).

    >>> from planner.quality.text import ByteCodec, Haystack
    >>> codec = ByteCodec()
    >>> hay = Haystack.from_text(codec, "It rained. The end came. " * 400)
    >>> s = make_sample("passkey", codec, hay, 600, seed=1, depth=0.5)
    >>> len(s.ids), codec.decode(s.answer_ids) in codec.decode(s.ids[slice(*s.needle_span)])
    (600, True)
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

from planner.quality.text import Codec, Haystack, lead_of

TASKS = ("passkey", "niah_single", "niah_multikey", "vt")
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

_ADJ = ("amber", "bitter", "brave", "calm", "clever", "crimson", "dusty", "eager", "fancy",
        "gentle", "golden", "hollow", "icy", "jolly", "lively", "misty", "noble", "olive",
        "proud", "quiet", "rapid", "rusty", "silent", "tidy", "velvet", "wild", "young")
_NOUN = ("anchor", "badger", "candle", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river",
         "saddle", "thistle", "umbrella", "valley", "walnut", "willow", "window", "zephyr")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Sample:
    """One prompt: ``ids`` (exactly the requested length) to be continued with ``answer_ids``."""

    task: str
    ids: tuple                      # prompt token ids
    answer: str                     # answer text as scored (decoded answer_ids)
    answer_ids: tuple
    needle_span: tuple              # (start, end) token span of the needle holding the answer
    needle_spans: tuple             # spans of every needle, in prompt order
    depth: float                    # requested depth of the answer's needle, in [0, 1]
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def needle_pos(self) -> float:
        """Where the answer's needle starts, as a fraction of the prompt."""
        return self.needle_span[0] / len(self.ids)


def sample_seed(*parts) -> int:
    """A stable seed from any parts (same prompts for every policy of a run)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"


def _var(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(5))


def _spec(task: str, rng: random.Random, depth: Optional[float], hops: int, n_keys: int):
    """(prefix, [(needle text, depth)], index of the answer's needle, question, answer)."""
    if task == "passkey":
        k = str(rng.randint(10000, 99999))
        prefix = ("There is a pass key hidden inside a lot of irrelevant text. Find it and "
                  "memorize it. I will quiz you about the pass key.\n\n")
        needle = f" The pass key is {k}. Remember it. {k} is the pass key."
        return (prefix, [(needle, rng.random() if depth is None else depth)], 0,
                "\n\nWhat is the pass key? The pass key is", f" {k}")
    prefix_niah = ("Some special magic numbers are hidden within the following text. Make sure "
                   "to memorize them. I will quiz you about the numbers afterwards.\n\n")
    if task in ("niah_single", "niah_multikey"):
        n = 1 if task == "niah_single" else n_keys
        keys: list = []
        while len(keys) < n:
            k = _key(rng)
            if k not in keys:
                keys.append(k)
        values = [str(rng.randint(1000000, 9999999)) for _ in keys]
        which = rng.randrange(n)
        depths = [rng.random() for _ in keys]
        if depth is not None:
            depths[which] = depth
        needles = [(f" One of the special magic numbers for {k} is: {v}.", d)
                   for k, v, d in zip(keys, values, depths)]
        q = (f"\n\nWhat is the special magic number for {keys[which]} mentioned in the provided "
             f"text? The special magic number for {keys[which]} mentioned in the provided text is")
        return prefix_niah, needles, which, q, f" {values[which]}"
    if task == "vt":
        names: list = []
        while len(names) < hops + 1:
            v = _var(rng)
            if v not in names:
                names.append(v)
        value = str(rng.randint(10000, 99999))
        texts = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in
                                                   zip(names, names[1:])]
        lo = 0.0 if depth is None else depth
        depths = sorted(rng.uniform(lo, 1.0) for _ in texts)
        if depth is not None:
            depths[0] = depth
        prefix = ("Memorize and track the chain of variable assignments hidden in the following "
                  "text.\n\n")
        q = (f"\n\nQuestion: what is the value of VAR {names[-1]}? Follow the chain of "
             f"assignments. Answer: the value of VAR {names[-1]} is")
        return prefix, list(zip(texts, depths)), 0, q, f" {value}"
    raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")


def make_sample(task: str, codec: Codec, hay: Haystack, n_tokens: int, *, seed: int,
                depth: Optional[float] = None, hops: int = 3, n_keys: int = 4) -> Sample:
    """Build one prompt of exactly ``n_tokens`` tokens (see the module docstring).

    ``depth`` (in [0, 1]) places the needle holding the answer (for ``vt``: the chain's first
    assignment); None draws it at random. ``seed`` fixes everything drawn."""
    rng = random.Random(seed)
    prefix, needles, which, question, answer = _spec(task, rng, depth, hops, n_keys)
    pre = lead_of(codec) + list(codec.encode(prefix))
    suf = list(codec.encode(question))
    ans = list(codec.encode(answer))
    while len(ans) > 1 and not codec.decode(ans[:1]).strip():
        suf.append(ans.pop(0))                 # whitespace-only lead token: part of the prompt
    need = [list(codec.encode(t)) for t, _ in needles]
    n_hay = n_tokens - len(pre) - len(suf) - sum(map(len, need))
    if n_hay < 8:
        raise ValueError(f"{task}: {n_tokens} tokens leave {n_hay} for the haystack; the prompt "
                         f"frame alone takes {n_tokens - n_hay}")
    chunk = hay.slice(rng, n_hay)                                       # list of ids, sentence start
    # insertion points: sentence boundaries nearest to each depth (in haystack coordinates)
    cuts = [hay.snap(chunk, round(d * n_hay)) for _, d in needles]
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    ids: list = list(pre)
    spans = [None] * len(needles)
    prev = 0
    for i in order:
        ids += chunk[prev:cuts[i]]
        spans[i] = (len(ids), len(ids) + len(need[i]))
        ids += need[i]
        prev = cuts[i]
    ids += chunk[prev:]
    ids += suf
    assert len(ids) == n_tokens, (len(ids), n_tokens)
    return Sample(task=task, ids=tuple(ids), answer=codec.decode(ans), answer_ids=tuple(ans),
                  needle_span=spans[which], needle_spans=tuple(spans[i] for i in order),
                  depth=float(needles[which][1]),
                  meta={"n_needles": len(needles), "hay_tokens": n_hay,
                        "question_tokens": len(suf)})


@dataclass(frozen=True)
class Cell:
    """A group of trials reported together: a task and, for passkey, a depth."""

    task: str
    depth: Optional[float] = None

    @property
    def name(self) -> str:
        return self.task if self.depth is None else f"{self.task}@{self.depth:.0%}"


def cells(tasks: Sequence[str], depths: Sequence[float] = PASSKEY_DEPTHS) -> list:
    """passkey: one cell per depth; other tasks: one cell (random depths)."""
    out = []
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; valid: {', '.join(TASKS)}")
        out += [Cell(t, d) for d in depths] if t == "passkey" else [Cell(t)]
    return out
