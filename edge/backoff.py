"""Exponential backoff with full jitter, shared by every retry loop of the agent."""

from __future__ import annotations

import random


def full_jitter(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Uniform in [0, min(cap_s, base_s * 2^(attempt - 1))]; the exponent stops growing at 16."""
    return rng.uniform(0, min(cap_s, base_s * 2 ** min(attempt - 1, 16)))
