"""The paired statistics against hand-computed cases."""

import json
import math
import subprocess
import sys
from pathlib import Path

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


def test_pooled_bootstrap_resamples_each_example_once_for_all_pairs():
    # pair 1: A right everywhere B is wrong (+1); pair 2: equal (0): the mean is 0.5 whatever the draw
    assert stats.pooled_bootstrap([({"x": "11"}, {"x": "00"}), ({"x": "10"}, {"x": "10"})]) == (0.5, 0.5, 0.5)
    # two pairs that cancel example by example: 0 with no width, which resampling the pairs
    # independently would not give
    a, b = {"x": "1100", "y": "10"}, {"x": "0011", "y": "01"}
    assert stats.pooled_bootstrap([(a, b), (b, a)], draws=500) == (0.0, 0.0, 0.0)
    assert stats.paired_bootstrap(a, b, draws=500)[1] < 0  # each pair alone does vary
    with pytest.raises(ValueError, match="examples"):
        stats.pooled_bootstrap([({"x": "11"}, {"x": "00"}), ({"x": "1"}, {"x": "0"})])
    with pytest.raises(ValueError):
        stats.pooled_bootstrap([])


def test_bits_round_trip_and_accuracy():
    assert stats.bits([True, False, True]) == "101"
    assert list(stats.unbits("101")) == [True, False, True]
    assert stats.accuracy({"a": "1100", "b": "1"}) == {"a": 0.5, "b": 1.0}
    assert stats.mean_accuracy({"a": "1100", "b": "1"}) == 0.75
    with pytest.raises(ValueError):
        stats.paired_bootstrap({"a": "1"}, {"b": "1"})
    assert not math.isnan(stats.mean_accuracy({"a": "0"}))


def test_pair_script_prints_each_pair_and_their_mean(tmp_path):
    # two expert seeds, each a method against its baseline on the same four items of one task:
    # seed 0 +0.5 (2 of 4 items better), seed 1 0.0: mean +0.25
    def record(set_name, method, correct):
        return {"set": set_name, "method": method, "parameters": {}, "correct": {"test": {"t": correct}}}

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"evaluations": [
        record("lora", "wudi_cfs", "1111"), record("lora", "ties", "1100"),
        record("lora_seed1", "wudi_cfs", "1010"), record("lora_seed1", "ties", "1010")]}))
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "research" / "pair.py"
    def group(set_name):
        return [str(results), set_name, "wudi_cfs", "{}", str(results), "ties", "{}"]

    argv = group("lora") + group("lora_seed1")
    lines = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines[0].startswith("lora wudi_cfs {} test 100.0 vs ties {} 50.0: +50.0 [")
    assert lines[1] == "lora_seed1 wudi_cfs {} test 50.0 vs ties {} 50.0: +0.0 [+0.0, +0.0]"
    assert lines[2].startswith("mean of 2: +25.0 [")
    other = tmp_path / "other.json"  # another split: refused, not pooled
    other.write_text(json.dumps({"tasks": {"t": {"test": 4, "example": ["q", "a"]}},
                                 "evaluations": json.loads(results.read_text())["evaluations"]}))
    refused = subprocess.run([sys.executable, str(script), *argv[:7], str(other), *argv[8:]], capture_output=True, text=True)
    assert refused.returncode != 0 and "not scored on the same items" in refused.stderr
    missing = subprocess.run([sys.executable, str(script), *argv[:6], '{"lambda": 1}'], capture_output=True, text=True)
    assert missing.returncode != 0 and "no test record of lora ties" in missing.stderr
