"""Two methods compared over the same seeds: is one's error lower, and by more than seed noise?

Each seed gives one error per method from runs that share everything but the method, so the
comparison is paired: the statistics are those of the per-seed differences d = a - b (positive
where b is lower). Reported: both means and standard deviations, the mean difference with its
standard error and paired t, how many seeds b wins, the exact one-sided sign-test p, and the
one-sided sign-flip (randomization) p of the mean difference, exact up to 2^16 sign patterns and
Monte Carlo (fixed seed) beyond. No distributional assumption is needed for either p.
"""

from __future__ import annotations

import math

import torch

EXACT_SIGN_FLIP_MAX_N = 16


def sign_test_p(wins: int, n: int) -> float:
    """P(X >= wins) for X ~ Binomial(n, 1/2): one-sided, ties counted as losses."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def sign_flip_p(diffs: list[float], draws: int = 200_000, seed: int = 0, exact: bool | None = None) -> float:
    """P(mean of randomly sign-flipped diffs >= observed mean), the observed pattern included."""
    d = torch.tensor(diffs, dtype=torch.float64)
    n = len(d)
    if exact is None:
        exact = n <= EXACT_SIGN_FLIP_MAX_N
    if exact:
        patterns = torch.arange(2**n).unsqueeze(1).bitwise_right_shift(torch.arange(n)).bitwise_and(1)
    else:
        patterns = torch.randint(0, 2, (draws, n), generator=torch.Generator().manual_seed(seed))
    sums = ((1 - 2 * patterns).to(torch.float64) * d).sum(1)
    observed = float(d.sum())
    # The tolerance keeps patterns whose sum equals the observed one up to rounding on the ">=" side.
    hits = int((sums >= observed - 1e-12 * max(1.0, abs(observed))).sum())
    return hits / len(patterns) if exact else (hits + 1) / (len(patterns) + 1)


def _mean_sd(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
    return m, sd


def paired_comparison(a: list[float], b: list[float]) -> dict:
    """`a`, `b`: one error per seed for each method, in the same seed order."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired comparison needs equal, non-empty lists (got {len(a)} and {len(b)})")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean_a, sd_a = _mean_sd(a)
    mean_b, sd_b = _mean_sd(b)
    mean_d, sd_d = _mean_sd(diffs)
    se = sd_d / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    wins = sum(d > 0 for d in diffs)
    return {
        "n": len(diffs),
        "mean_a": mean_a,
        "sd_a": sd_a,
        "mean_b": mean_b,
        "sd_b": sd_b,
        "mean_difference": mean_d,
        "standard_error": se,
        "t": mean_d / se if se > 0 else float("nan"),
        "b_lower": wins,
        "sign_test_p": sign_test_p(wins, len(diffs)),
        "sign_flip_p": sign_flip_p(diffs),
    }
