"""What the runtime observed per site on its last call (shapes, measured density, calls)."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional


@dataclass
class SiteStats:
    calls: int = 0
    tensors: Optional[tuple] = None            # (q, k, v) shapes and dtype of the last call
    density: Optional[float] = None            # kept / attended-by-the-model pairs, last call
    density_per_head: Optional[list] = None    # same per query head
    kernel: Optional[str] = None               # which implementation ran last
    rules: str = ""                            # the site's window / sinks / key lengths, last call

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
    """Count a call of ``site`` (cheap: shapes are kept as tuples, formatted on demand)."""
    with _LOCK:
        st = _STATS.setdefault(site, SiteStats())
        st.calls += 1
        st.tensors = (q.shape, k.shape, v.shape, q.dtype)
        st.kernel = kernel
        st.rules = rules
        if allowed is None or kept is None:
            st.density = st.density_per_head = None      # not measured by this kernel
        else:
            allowed = allowed.tolist() if hasattr(allowed, "tolist") else list(allowed)
            kept = kept.tolist() if hasattr(kept, "tolist") else list(kept)
            tot = float(sum(allowed))
            st.density = float(sum(kept)) / tot if tot > 0 else 1.0
            st.density_per_head = [k / a if a > 0 else 1.0 for k, a in zip(kept, allowed)]


def get(site: str) -> Optional[SiteStats]:
    return _STATS.get(site)


def reset(prefix: str = "") -> None:
    with _LOCK:
        for name in [n for n in _STATS if n.startswith(prefix)]:
            del _STATS[name]
