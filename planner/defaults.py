"""Process-wide defaults of ``planner.compile`` and ``planner.backend``: what a call uses for an
argument it is not given (``planner.set_defaults``). ``planner.backend`` reads them.
"""
from __future__ import annotations

DEFAULTS = {"cost_model": "auto", "remainder": "eager"}
REMAINDERS = ("eager", "inductor")


def check_remainder(remainder: str) -> str:
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    return remainder


def set_defaults(*, cost_model: str | None = None, remainder: str | None = None) -> dict:
    """Change what ``planner.compile`` / ``planner.backend`` use when an argument is not given
    (process-wide); returns the previous defaults. ``cost_model="off"`` suits runs that study a
    policy's effect at any length (quality measurements, tests of the policies' semantics).

    >>> import planner
    >>> prev = planner.set_defaults(cost_model="off"); _ = planner.set_defaults(**prev)
    """
    prev = dict(DEFAULTS)
    if cost_model is not None:
        if cost_model not in ("auto", "off"):
            raise ValueError(f"cost_model must be 'auto' or 'off', got {cost_model!r}")
        DEFAULTS["cost_model"] = cost_model
    if remainder is not None:
        DEFAULTS["remainder"] = check_remainder(remainder)
    return prev
