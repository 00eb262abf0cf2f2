"""Determinism on CPU: the same config gives the same bits, whatever the threads and shards."""

import os

import pytest
import torch
from models import load_model, write_config
from runner import mergekit_yaml, mergekit_yaml_in_process
from tensors import full_rank_task_vectors

from mergekit_wudi.solvers import DogeConfig, DogeSolver, WudiCfsConfig, WudiCfsSolver, WudiConfig, WudiSolver

PARAMETERS = {"wudi": {"steps": 50}, "wudi_cfs": {}, "doge": {"steps": 50}}


def assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def run(family, tmp_path, method):
    base, *models = family
    return write_config(tmp_path / "cfg.yml", method, base, models, {"lambda": 0.9, **PARAMETERS[method]},
                        [{"weight": w} for w in (1.0, 0.8, 1.2)])


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["wudi", "wudi_cfs", "doge"])
def test_same_bits_across_runs_and_shard_sizes(family, tmp_path, method):
    config = run(family, tmp_path, method)
    mergekit_yaml_in_process(config, tmp_path / "a")
    mergekit_yaml_in_process(config, tmp_path / "b", "--out-shard-size", "30K")
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 3
    assert_same_bits(load_model(tmp_path / "b"), load_model(tmp_path / "a"))


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["wudi", "wudi_cfs"])
def test_same_bits_across_thread_counts(family, tmp_path, method):
    # doge is left out: its SVDs depend on the thread count (see below), and on these
    # rank-2 task vectors its shared subspace is set by rounding (README, DOGE section).
    config = run(family, tmp_path, method)
    mergekit_yaml_in_process(config, tmp_path / "default")  # torch's default: one thread a core
    mergekit_yaml(config, tmp_path / "three", "-j", "3", "--out-shard-size", "30K")
    assert torch.get_num_threads() != 3
    assert_same_bits(load_model(tmp_path / "three"), load_model(tmp_path / "default"))


@pytest.mark.e2e
def test_doge_same_bits_across_thread_counts_with_strict_mkl(family, tmp_path):
    # At this tiny family's sizes ((10, 64) @ (64, 96) projections) MKL's own GEMM
    # depends on the thread count (1 vs 2 threads here); MKL_CBWR=AUTO,STRICT (README,
    # Reliability) removes that. On these rank-2 task vectors doge's subspace is set by
    # rounding (README, DOGE section), so any thread dependence left in its SVDs shows.
    config = run(family, tmp_path, "doge")
    strict = os.environ.get("TEST_MKL_CBWR", "AUTO,STRICT")  # set it empty to see the test fail
    mergekit_yaml(config, tmp_path / "one", "-j", "1", MKL_CBWR=strict)
    mergekit_yaml(config, tmp_path / "two", "-j", "2", "--out-shard-size", "30K", MKL_CBWR=strict)
    assert_same_bits(load_model(tmp_path / "two"), load_model(tmp_path / "one"))


# At 384x512 MKL splits work across threads: torch.mm and triangular solves stay
# bit-identical across thread counts, but Cholesky, eigh and SVD (MKL LAPACK) do not, so
# the solvers run those on one thread (solvers.numerics.single_thread_lapack).


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def solve_with_threads(set_threads, solver, count, shape=(384, 512)):
    task_vectors = full_rank_task_vectors(torch.Generator().manual_seed(0), 3, *shape, scale=1e-2, dtype=torch.float32)
    results = []
    for number in (1, count):
        set_threads(number)
        results.append(solver.solve(task_vectors))
    return results


needs_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to run 2 threads")


@needs_cores
def test_wudi_is_bit_identical_across_thread_counts(threads):
    one, two = solve_with_threads(threads, WudiSolver(WudiConfig(steps=20)), 2)
    assert torch.equal(one, two)


SOLVERS = [WudiCfsSolver(), WudiCfsSolver(WudiCfsConfig(omega=0.0)), DogeSolver(DogeConfig(steps=20))]


@needs_cores
@pytest.mark.parametrize("solver", SOLVERS, ids=["wudi_cfs", "wudi_cfs-eigh", "doge"])
def test_lapack_solvers_are_bit_identical_across_thread_counts(threads, solver):
    one, two = solve_with_threads(threads, solver, 2)
    assert torch.equal(one, two)
    assert torch.get_num_threads() == 2  # the solver gave the thread count back


@needs_cores
@pytest.mark.parametrize("shape", [(384, 512), (512, 384)], ids=["wide", "tall"])
def test_doge_gram_route_is_bit_identical_across_thread_counts(threads, monkeypatch, shape):
    # At 384x512 doge takes gesdd (under GRAM_MIN_ELEMENTS); forced here onto the route
    # of larger tensors: Gram products, eigh, the Rayleigh-Ritz products and SVD.
    from mergekit_wudi.solvers import doge

    monkeypatch.setattr(doge, "GRAM_MIN_ELEMENTS", 0)
    one, two = solve_with_threads(threads, DogeSolver(DogeConfig(steps=20)), 2, shape)
    assert torch.equal(one, two)


@needs_cores
def test_threaded_lapack_opt_out_runs_the_factorisations_on_every_thread(threads, monkeypatch):
    from mergekit_wudi.solvers import THREADED_LAPACK_ENV, single_thread_lapack

    threads(2)
    seen = []
    for value in ("", "1"):
        monkeypatch.setenv(THREADED_LAPACK_ENV, value)
        with single_thread_lapack(torch.device("cpu")):
            seen.append(torch.get_num_threads())
    assert seen == [1, 2] and torch.get_num_threads() == 2
