"""What the runtime observed per site on its last call (shapes, measured density, calls)."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional


@dataclass
class SiteStats:
    calls: int = 0
    tensors: Optional[tuple] = None            # (q, k, v) shapes and dtype of the last call
    kernel: Optional[str] = None               # which implementation ran last
    rules: str = ""                            # the site's window / sinks / key lengths, last call
    # per query head (allowed, kept) pair counts of the last call as the kernel gave them
    # (device tensors stay on the device: read when a report asks, so a call never waits)
    pairs: Optional[tuple] = None
    _read: Optional[tuple] = None              # (pairs it was read from, density, per head)

    def _densities(self) -> tuple:
        if self.pairs is None:
            return None, None
        if self._read is None or self._read[0] is not self.pairs:
            allowed, kept = self.pairs
            allowed = allowed.tolist() if hasattr(allowed, "tolist") else list(allowed)
            kept = kept.tolist() if hasattr(kept, "tolist") else list(kept)
            tot = float(sum(allowed))
            dens = float(sum(kept)) / tot if tot > 0 else 1.0
            per_head = [k / a if a > 0 else 1.0 for k, a in zip(kept, allowed)]
            self._read = (self.pairs, dens, per_head)
        return self._read[1], self._read[2]

    @property
    def density(self) -> Optional[float]:
        """Kept / attended-by-the-model pairs of the last call (None: not measured)."""
        return self._densities()[0]

    @property
    def density_per_head(self) -> Optional[list]:
        return self._densities()[1]

    @property
    def shapes(self) -> Optional[str]:
        """Readable form of ``tensors``, built only when a report asks for it."""
        if self.tensors is None:
            return None
        q, k, v, dtype = self.tensors
        return f"q{list(q)} k{list(k)} v{list(v)} {str(dtype).replace('torch.', '')}"


_STATS: dict[str, SiteStats] = {}
_LOCK = threading.Lock()


def record(site: str, *, q, k, v, kernel: str, allowed=None, kept=None, rules: str = "") -> None:
    """Count a call of ``site`` (cheap: shapes are kept as tuples, formatted on demand, and the
    pair counts as given, read when a report asks for the density)."""
    with _LOCK:
        st = _STATS.setdefault(site, SiteStats())
        st.calls += 1
        st.tensors = (q.shape, k.shape, v.shape, q.dtype)
        st.kernel = kernel
        st.rules = rules
        st.pairs = None if allowed is None or kept is None else (allowed, kept)


def get(site: str) -> Optional[SiteStats]:
    return _STATS.get(site)


def reset(prefix: str = "") -> None:
    with _LOCK:
        for name in [n for n in _STATS if n.startswith(prefix)]:
            del _STATS[name]
