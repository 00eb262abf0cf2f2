"""The paired statistics against hand-computed cases."""

import math

import pytest
from bench import stats


def test_mcnemar_on_a_hand_computed_table():
    # 10 examples: A right / B wrong on 3, A wrong / B right on 1, the same on 6.
    # difference (3 - 1) / 10 = 0.2; s.e. = sqrt(3 + 1 - 2^2 / 10) / 10 = sqrt(3.6) / 10 = 0.189737;
    # interval 0.2 ± 1.959964 * 0.1897367 = 0.2 ± 0.371877 = [-0.171877, 0.571877];
    # exact p: 2 * P(X <= 1 | 4, 1/2) = 2 * (1 + 4) / 16 = 0.625.
    d, low, high, p = stats.mcnemar(3, 1, 10)
    assert d == pytest.approx(0.2)
    assert low == pytest.approx(-0.171877, abs=1e-6) and high == pytest.approx(0.571877, abs=1e-6)
    assert p == pytest.approx(0.625)
    assert stats.mcnemar(0, 0, 5) == (0.0, 0.0, 0.0, 1.0)
    assert stats.mcnemar(6, 0, 6)[3] == pytest.approx(2 / 64)


def test_discordant_counts_pool_the_tasks():
    a = {"x": "1101", "y": "10"}
    b = {"x": "1011", "y": "01"}
    assert stats.discordant(a, b) == (2, 2, 6)  # x: (pos 1) A only, (pos 2) B only; y: A only, B only


def test_paired_bootstrap_hand_cases():
    # A is right exactly where B is wrong on task x (acc 0.75 vs 0.25) and equal on y: the
    # difference is (0.5 + 0) / 2 = 0.25.
    a = {"x": "1110", "y": "1010"}
    b = {"x": "0001", "y": "1010"}
    d, low, high = stats.paired_bootstrap(a, b, draws=4000, seed=0)
    assert d == pytest.approx(0.25)
    assert low < d < high and -0.25 <= low and high <= 0.5 + 1e-12
    # every example shifts the same way: no resample can change the difference
    assert stats.paired_bootstrap({"x": "1111"}, {"x": "0000"}) == (1.0, 1.0, 1.0)
    # the same rows: 0 exactly; deterministic for a fixed seed
    assert stats.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    assert stats.paired_bootstrap(a, b, seed=3) == stats.paired_bootstrap(a, b, seed=3)


def test_paired_bootstrap_agrees_with_mcnemar_on_a_large_sample():
    a = {"t": "1" * 300 + "0" * 100 + "1" * 600}
    b = {"t": "0" * 300 + "1" * 100 + "1" * 600}
    d, low, high = stats.paired_bootstrap(a, b, draws=4000, seed=1)
    md, mlow, mhigh, _ = stats.mcnemar(300, 100, 1000)
    assert d == md == pytest.approx(0.2)
    assert low == pytest.approx(mlow, abs=0.01) and high == pytest.approx(mhigh, abs=0.01)


def test_bits_round_trip_and_accuracy():
    assert stats.bits([True, False, True]) == "101"
    assert list(stats.unbits("101")) == [True, False, True]
    assert stats.accuracy({"a": "1100", "b": "1"}) == {"a": 0.5, "b": 1.0}
    assert stats.mean_accuracy({"a": "1100", "b": "1"}) == 0.75
    with pytest.raises(ValueError):
        stats.paired_bootstrap({"a": "1"}, {"b": "1"})
    assert not math.isnan(stats.mean_accuracy({"a": "0"}))
