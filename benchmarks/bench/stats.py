"""Paired statistics on per-example correctness (two merges scored on the same examples).

Correctness is stored as a string of "0"/"1" per task (one character per example, in the
split's order). The difference of two rows is the difference of their task-averaged
accuracies, mean_t (acc_t(A) - acc_t(B)).

- `paired_bootstrap`: a 95% percentile interval of that difference, resampling examples
  within every task (the same draws for A and B), with a fixed seed.
- `pooled_bootstrap`: the same for the mean difference of several pairs scored on the same
  examples (for instance one pair per expert seed), resampling each example once for all
  pairs. Its interval covers the examples' sampling only, not the spread between the pairs.
- `mcnemar`: for one pooled 2x2 table (b = A right and B wrong, c = A wrong and B right, of n
  examples): the difference (b - c) / n, its normal-approximation 95% interval
  (b - c)/n ± z * sqrt(b + c - (b - c)^2 / n) / n, and the exact two-sided McNemar p-value
  (binomial test of b out of b + c at 1/2).
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import numpy as np

Z95 = 1.959963984540054


def bits(correct: Sequence[bool]) -> str:
    return "".join("1" if c else "0" for c in correct)


def unbits(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")


def accuracy(correct: Dict[str, str]) -> Dict[str, float]:
    return {task: float(unbits(c).mean()) for task, c in correct.items()}


def mean_accuracy(correct: Dict[str, str]) -> float:
    values = list(accuracy(correct).values())
    return sum(values) / len(values)


def paired_bootstrap(a: Dict[str, str], b: Dict[str, str], draws: int = 2000, seed: int = 0, level: float = 0.95) -> Tuple[float, float, float]:
    """(difference, low, high) of mean_t acc_t(a) - acc_t(b), percentile interval over `draws` resamples."""
    return pooled_bootstrap([(a, b)], draws=draws, seed=seed, level=level)


def pooled_bootstrap(pairs: Sequence[Tuple[Dict[str, str], Dict[str, str]]], draws: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Tuple[float, float, float]:
    """(difference, low, high) of the mean over `pairs` of mean_t acc_t(a) - acc_t(b), every pair
    scored on the same examples: each draw resamples a task's examples once for all pairs."""
    if not pairs:
        raise ValueError("no pairs")
    tasks = pairs[0][0].keys()
    for a, b in pairs:
        if a.keys() != tasks or b.keys() != tasks:
            raise ValueError(f"different tasks: {sorted(tasks)}, {sorted(a)} and {sorted(b)}")
    rng = np.random.default_rng(seed)
    total = np.zeros(draws)
    point = 0.0
    for task in sorted(tasks):
        lengths = {len(c[task]) for pair in pairs for c in pair}
        if len(lengths) != 1:
            raise ValueError(f"task {task}: {sorted(lengths)} examples")
        delta = np.mean([unbits(a[task]).astype(np.float64) - unbits(b[task]).astype(np.float64) for a, b in pairs], axis=0)
        point += delta.mean()
        index = rng.integers(0, len(delta), size=(draws, len(delta)))
        total += delta[index].mean(axis=1)
    total /= len(tasks)
    tail = (1 - level) / 2
    low, high = np.quantile(total, [tail, 1 - tail])
    return point / len(tasks), float(low), float(high)


def mcnemar(b: int, c: int, n: int) -> Tuple[float, float, float, float]:
    """(difference, low, high, exact two-sided p) for the paired 2x2 table with discordant counts b, c of n."""
    difference = (b - c) / n
    half = Z95 * math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    m = b + c
    p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m)
    return difference, difference - half, difference + half, p


def discordant(a: Dict[str, str], b: Dict[str, str]) -> Tuple[int, int, int]:
    """(b, c, n) pooled over tasks: a right and b wrong, a wrong and b right, examples."""
    right_wrong = wrong_right = n = 0
    for task in a:
        x, y = unbits(a[task]), unbits(b[task])
        right_wrong += int((x & ~y).sum())
        wrong_right += int((~x & y).sum())
        n += len(x)
    return right_wrong, wrong_right, n
