"""The opt-in solve cache (MERGEKIT_WUDI_CACHE): resume after a kill, reuse, and misses."""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mergekit.merge_methods import merge_tensors
from models import is_llama_linear, load_model, make_family, write_config
from runner import mergekit_yaml, mergekit_yaml_in_process
from tensors import low_rank_task_vectors

from mergekit_wudi.cache import CACHE_ENV

LINEAR_TENSORS = 14  # in the tiny Llama family


def entries(cache_dir):
    """Finished cache entries (temporary files start with a dot)."""
    return sorted(p for p in cache_dir.rglob("*.safetensors") if not p.name.startswith("."))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"), fine_tunes=2)


@pytest.mark.e2e
def test_killed_merge_resumes_from_the_cache_with_the_same_bits(family, tmp_path):
    base, *models = family
    # ~0.5 s a tensor: slow enough to kill between two solves.
    config = write_config(tmp_path / "wudi.yml", "wudi", base, models, {"steps": 5000, "lambda": 0.9},
                          [{"weight": 0.7}, {"weight": 1.2}])
    mergekit_yaml_in_process(config, tmp_path / "reference")  # no cache
    reference = load_model(tmp_path / "reference")

    cache = tmp_path / "cache"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", **{CACHE_ENV: str(cache)})
    command = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(config), str(tmp_path / "killed"),
               "--no-copy-tokenizer"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(entries(cache)) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the merge ended before it could be killed"
    done = len(entries(cache))
    assert 3 <= done < LINEAR_TENSORS
    assert not list((tmp_path / "killed").glob("*.safetensors"))

    result = mergekit_yaml(config, tmp_path / "resumed", "-v", **{CACHE_ENV: str(cache)})
    assert result.stderr.count("from the solve cache") == done
    assert result.stderr.count("solved; cached") == LINEAR_TENSORS - done  # fewer solves
    assert len(entries(cache)) == LINEAR_TENSORS
    resumed = load_model(tmp_path / "resumed")
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


@pytest.mark.e2e
def test_changing_only_the_fallback_solves_nothing_again(family, tmp_path, monkeypatch, caplog):
    base, *models = family
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    first = write_config(tmp_path / "a.yml", "wudi_cfs", base, models, {"lambda": 0.9})
    mergekit_yaml_in_process(first, tmp_path / "a")
    second = write_config(tmp_path / "b.yml", "wudi_cfs", base, models, {"lambda": 0.9, "fallback": "base"})
    with caplog.at_level(logging.INFO, logger="mergekit_wudi.cache"):
        mergekit_yaml_in_process(second, tmp_path / "b")
    assert caplog.text.count("from the solve cache") == LINEAR_TENSORS
    assert "solved; cached" not in caplog.text
    a, b, base_tensors = load_model(tmp_path / "a"), load_model(tmp_path / "b"), load_model(base)
    for name, tensor in b.items():
        expected = a[name] if is_llama_linear(name) else base_tensors[name]  # fallback: base
        assert torch.equal(tensor, expected), name
    assert any(not torch.equal(a[n], b[n]) for n in a if not is_llama_linear(n))


# --- the cache key, on in-memory tensors through mergekit's merge_tensors --------------

NAME = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def tensors(generator, count=3):
    base = torch.randn(12, 10, generator=generator) * 0.05
    return [base] + [base + d.float() for d in low_rank_task_vectors(generator, count, 12, 10, scale=1e-2)]


def merge(method, inputs, name=NAME, **parameters):
    return merge_tensors(inputs, method, base_index=0, name=name, parameters=parameters)


@pytest.mark.parametrize(
    "method, parameters, changed",
    [
        ("wudi", {"steps": 20}, {"steps": 21}),
        ("wudi", {"steps": 20}, {"steps": 20, "lr": 2e-5}),
        ("wudi", {"steps": 20}, {"steps": 20, "weight": [1.0, 0.5, 1.0]}),
        ("wudi", {"steps": 20}, {"steps": 20, "lambda": 0.5}),
        ("wudi_cfs", {}, {"omega": 0.2}),
        ("doge", {"steps": 5}, {"steps": 5, "density": [0.3, 0.3, 0.5]}),
        ("doge", {"steps": 5}, {"steps": 5, "eta": 0.1}),
        ("tsv", {}, {"weight": [1.0, 0.5, 1.0]}),
        ("iso_c", {}, {"lambda": 0.5}),
        ("iso_cts", {}, {"common_space_fraction": 0.3}),
    ],
)
def test_a_changed_solve_parameter_misses_and_the_fallback_hits(generator, cache_dir, method, parameters, changed):
    inputs = tensors(generator)
    first = merge(method, inputs, **parameters)
    assert len(entries(cache_dir)) == 1
    again = merge(method, inputs, **parameters, fallback="base")  # fallback is not in the key
    assert torch.equal(again, first) and len(entries(cache_dir)) == 1
    other = merge(method, inputs, **changed)
    assert len(entries(cache_dir)) == 2
    assert not torch.equal(other, first)


@pytest.mark.parametrize(
    "method, unset, explicit",
    [
        ("doge", {"steps": 5}, {"steps": 5, "density": 0.3, "eta": 0.07}),  # density: also a ties parameter
        ("wudi", {"steps": 20}, {"steps": 20, "lr": 1e-5}),
        ("iso_cts", {}, {"common_space_fraction": 0.8}),
    ],
)
def test_a_parameter_at_its_default_hits_the_entry_of_the_unset_one(generator, cache_dir, method, unset, explicit):
    # The key holds the values the solver runs with, not how the YAML spelled them.
    inputs = tensors(generator)
    first = merge(method, inputs, **unset)
    again = merge(method, inputs, **explicit)
    assert torch.equal(again, first) and len(entries(cache_dir)) == 1


def test_changed_inputs_order_or_name_miss(generator, cache_dir):
    inputs = tensors(generator)
    merge("wudi_cfs", inputs)
    changed = [t.clone() for t in inputs]
    changed[2][3, 4] += 1e-6  # one element of one model
    merge("wudi_cfs", changed)
    merge("wudi_cfs", [inputs[0], inputs[2], inputs[1], inputs[3]])  # model order
    merge("wudi_cfs", inputs, name="model.layers.1.mlp.up_proj.weight")
    assert len(entries(cache_dir)) == 4


def test_hit_equals_an_uncached_solve_bit_for_bit(generator, cache_dir, monkeypatch):
    inputs = [t.to(torch.bfloat16) for t in tensors(generator)]
    solved = merge("wudi", inputs, steps=30)
    cached = merge("wudi", inputs, steps=30)
    monkeypatch.delenv(CACHE_ENV)
    plain = merge("wudi", inputs, steps=30)
    assert cached.dtype == torch.bfloat16
    assert torch.equal(solved, plain) and torch.equal(cached, plain)


def test_corrupt_or_foreign_entry_is_solved_again(generator, cache_dir, caplog):
    inputs = tensors(generator)
    expected = merge("wudi_cfs", inputs)
    (entry,) = entries(cache_dir)
    entry.write_bytes(b"not a safetensors file")  # e.g. a disk error
    with caplog.at_level(logging.WARNING, logger="mergekit_wudi.cache"):
        assert torch.equal(merge("wudi_cfs", inputs), expected)
    assert "ignoring entry" in caplog.text
    assert torch.equal(merge("wudi_cfs", inputs), expected)  # rewritten, readable again
    other = merge("wudi_cfs", tensors(generator))  # an entry of another solve, under this key's name
    (entry, foreign) = sorted(entries(cache_dir), key=lambda p: p.stat().st_mtime)
    os.replace(foreign, entry)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergekit_wudi.cache"):
        assert torch.equal(merge("wudi_cfs", inputs), expected)
    assert "key does not match" in caplog.text
    assert not torch.equal(other, expected)


def test_unwritable_cache_only_warns(generator, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    inputs = tensors(generator)
    with caplog.at_level(logging.WARNING, logger="mergekit_wudi.cache"):
        result = merge("wudi_cfs", inputs)
    monkeypatch.delenv(CACHE_ENV)
    assert torch.equal(result, merge("wudi_cfs", inputs))
    assert "could not write" in caplog.text
