"""Text for quality runs: token codecs and tokenised corpora (haystacks, perplexity windows).

``Codec`` is what the harness needs of a tokenizer: ``encode(str) -> list[int]`` without
special tokens, ``decode(list[int]) -> str``, and ``lead``: the token ids every sequence the
model sees starts with (``(bos,)`` for models trained with one, such as Gemma; empty for
SmolLM2). Prompts and perplexity windows begin with ``lead`` and keep their requested length.
``HFCodec`` wraps a transformers tokenizer, ``ByteCodec`` is the UTF-8 byte tokenizer the tests
use (vocabulary 256, no downloads).

    >>> codec = ByteCodec()
    >>> codec.encode("Hi.")
    [72, 105, 46]
    >>> hay = Haystack.from_text(codec, "One. Two. Three. " * 10)
    >>> hay.snap(hay.ids.tolist(), 6)          # the sentence start nearest to token 6
    4
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:                      # numpy is imported where it is used: the CLI's other
    import numpy as np                 # commands (demo) run without it

_SENTENCE_END = (".", "!", "?", "\n", '."', '!"', '?"', ".'", "!'", "?'")


class Codec(Protocol):
    lead: tuple

    def encode(self, text: str) -> list: ...
    def decode(self, ids: Sequence[int]) -> str: ...


def lead_of(codec) -> list:
    """The ids every sequence starts with (``codec.lead``; none when it has no such attribute)."""
    return [int(t) for t in getattr(codec, "lead", ())]


class ByteCodec:
    """UTF-8 bytes as tokens 0..255 (tests and tiny models); ``lead``: ids put before every
    sequence (e.g. a bos id >= 256 of a model with a larger vocabulary)."""

    vocab_size = 256

    def __init__(self, lead: Sequence[int] = ()):
        self.lead = tuple(int(t) for t in lead)

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class HFCodec:
    """A transformers tokenizer, without special tokens; ``lead`` (e.g. ``[bos]``) is put
    before each sequence by the harness (``planner.quality.assets.leading_tokens``)."""

    def __init__(self, tokenizer, lead: Sequence[int] = ()):
        self.tok = tokenizer
        self.lead = tuple(int(t) for t in lead)

    def encode(self, text: str) -> list:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))


@dataclass
class Haystack:
    """A tokenised corpus: ``ids`` int64 [T]; ``end_tokens``: the token ids whose text ends a
    sentence (a needle inserted right after one starts a sentence)."""

    ids: np.ndarray
    end_tokens: np.ndarray
    name: str = ""

    @staticmethod
    def from_text(codec: Codec, text: str, name: str = "", chunk_chars: int = 200_000) -> "Haystack":
        """Tokenise ``text`` in paragraph-aligned pieces (bounded tokenizer calls)."""
        ids: list = []
        i = 0
        while i < len(text):
            j = min(len(text), i + chunk_chars)
            if j < len(text):
                cut = text.rfind("\n\n", i + chunk_chars // 2, j)
                j = cut + 2 if cut > 0 else j
            ids += codec.encode(text[i:j])
            i = j
        import numpy as np
        arr = np.asarray(ids, dtype=np.int64)
        ends = [int(t) for t in np.unique(arr)
                if codec.decode([int(t)]).rstrip(" ").endswith(_SENTENCE_END)]
        return Haystack(arr, np.asarray(sorted(ends), dtype=np.int64), name)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def _ends(self, toks) -> np.ndarray:
        import numpy as np
        return np.isin(np.asarray(toks, dtype=np.int64), self.end_tokens)

    def slice(self, rng: random.Random, n: int) -> list:
        """``n`` consecutive tokens starting at a sentence start, at a random place."""
        if n > len(self) - 1:
            raise ValueError(f"haystack {self.name!r} has {len(self)} tokens, {n} requested")
        import numpy as np
        start = rng.randrange(0, len(self) - n)
        nxt = np.flatnonzero(self._ends(self.ids[start:min(len(self) - n, start + 512)]))
        if nxt.size:
            start = start + int(nxt[0]) + 1
        return self.ids[start:start + n].tolist()

    def snap(self, chunk: Sequence[int], pos: int, radius: int = 48) -> int:
        """The sentence start in ``chunk`` nearest to ``pos`` within ``radius`` tokens (``pos``
        itself when there is none; 0 and len(chunk) stay as they are)."""
        n = len(chunk)
        pos = max(0, min(n, pos))
        if pos in (0, n):
            return pos
        import numpy as np
        lo, hi = max(1, pos - radius), min(n - 1, pos + radius)
        cand = np.flatnonzero(self._ends(chunk[lo - 1:hi])) + lo   # right after a sentence end
        if cand.size == 0:
            return pos
        return int(cand[np.argmin(np.abs(cand - pos))])
