"""Kernel cache: built kernels in memory, keyed by a frozen key, with hit/miss/compile counters
(the rendered sources on disk are ``runtime.loader``'s).

The key never contains a sequence length, only its bucket (``seq_bucket``): lengths,
index tensors and offsets are runtime arguments of the kernels.

Example::

    >>> cache = KernelCache()
    >>> k = cache.get(("toy", 64), lambda: "compiled")
    >>> cache.get(("toy", 64), lambda: "again")
    'compiled'
    >>> cache.stats()
    {'hits': 1, 'misses': 1, 'compiles': 1, 'entries': 1}
"""
from __future__ import annotations

import hashlib
import threading
from typing import Any, Callable, Hashable

from runtime.loader import cache_dir  # noqa: F401  (where rendered kernels are written)


def seq_bucket(n: int, minimum: int = 128) -> int:
    """Smallest power of two >= n (and >= ``minimum``): the length part of a cache key.

    >>> seq_bucket(1), seq_bucket(129), seq_bucket(4096), seq_bucket(4097)
    (128, 256, 4096, 8192)
    """
    if n < 0:
        raise ValueError(f"seq_bucket: length must be >= 0, got {n}")
    b = max(int(minimum), 1)
    while b < n:
        b *= 2
    return b


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hash of ``repr(obj)`` that is stable across processes (unlike ``hash``)."""
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:n]


class KernelCache:
    """Thread-safe map from a hashable key to a built object, counting hits/misses/compiles."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, Any] = {}
        self._building: dict[Hashable, threading.Lock] = {}   # one lock per key being built
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.compiles = 0

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The value cached under ``key``, else ``build()`` (run once per key: a thread that
        asks for a key being built waits for that build and counts a hit)."""
        with self._lock:
            if key in self._entries:
                self.hits += 1
                return self._entries[key]
            key_lock = self._building.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._entries:
                    self.hits += 1
                    return self._entries[key]
                self.misses += 1
            value = build()
            with self._lock:
                self.compiles += 1
                self._entries[key] = value
                self._building.pop(key, None)
            return value

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._building.clear()
            self.hits = self.misses = self.compiles = 0

    def stats(self) -> dict:
        """``misses``: builds started, ``compiles``: builds finished, ``entries``: keys held."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "compiles": self.compiles,
                    "entries": len(self._entries)}


# The process-wide cache of compiled kernels.
KERNELS = KernelCache()
