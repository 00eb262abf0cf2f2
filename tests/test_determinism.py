"""Determinism on CPU: the same config gives the same bits, whatever the threads and shards."""

import os
import threading
from unittest import mock

import models
import pytest
import torch
from models import load_model, write_config
from registry import METHODS, quick_parameters
from runner import mergekit_yaml, mergekit_yaml_in_process
from tensors import full_rank_task_vectors

from mergekit_wudi.solvers import DogeConfig, DogeSolver, WudiCfsConfig, WudiCfsSolver, WudiConfig, WudiSolver


def assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def run(family, tmp_path, method):
    base, *models = family
    return write_config(tmp_path / "cfg.yml", method, base, models, {"lambda": 0.9, **quick_parameters(method)},
                        [{"weight": w} for w in (1.0, 0.8, 1.2)])


@pytest.mark.e2e
@pytest.mark.parametrize("method", METHODS)
def test_same_bits_across_runs_and_shard_sizes(family, tmp_path, method):
    config = run(family, tmp_path, method)
    mergekit_yaml_in_process(config, tmp_path / "a")
    mergekit_yaml_in_process(config, tmp_path / "b", "--out-shard-size", "30K")
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 3
    assert_same_bits(load_model(tmp_path / "b"), load_model(tmp_path / "a"))


@pytest.mark.e2e
@pytest.mark.parametrize("method", METHODS)
def test_same_bits_across_thread_counts(family, tmp_path, method):
    config = run(family, tmp_path, method)
    mergekit_yaml_in_process(config, tmp_path / "default")  # torch's default: one thread a core
    mergekit_yaml(config, tmp_path / "three", "-j", "3", "--out-shard-size", "30K")
    assert torch.get_num_threads() != 3
    assert_same_bits(load_model(tmp_path / "three"), load_model(tmp_path / "default"))


@pytest.mark.e2e
def test_the_adapter_guard_decides_alike_across_threads_and_shards(tmp_path):
    # Its sample is fixed by the tensor names, not by the order tensors are merged in: with
    # -j 3 and 30K shards the merge is capped alike (test_workflows checks the cap's value).
    base, *fine_tunes = models.make_one_seed_family(tmp_path / "one_seed")
    config = write_config(tmp_path / "cfg.yml", "wudi_cfs", base, fine_tunes)
    mergekit_yaml_in_process(config, tmp_path / "default")
    result = mergekit_yaml(config, tmp_path / "three", "-j", "3", "--out-shard-size", "30K")
    assert "lambda is capped at 1/(N+1) = 0.25" in result.stderr
    assert len(list((tmp_path / "three").glob("*.safetensors"))) > 3
    assert_same_bits(load_model(tmp_path / "three"), load_model(tmp_path / "default"))


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """The tiny family with intermediate_size 1024 and rank-4 fine-tunes: doge's projection
    products on gate_proj/up_proj, (21, 1024) @ (1024, 128), are where MKL's GEMM splits
    its sum across threads (one of the products solvers.one_cpu_thread covers)."""
    root = tmp_path_factory.mktemp("wide")
    with mock.patch.dict(models.LLAMA_CONFIG, intermediate_size=1024):
        return models.make_family(root, rank=4)


@pytest.mark.e2e
def test_doge_same_bits_at_one_and_two_threads_without_mkl_cbwr(wide_family, tmp_path):
    # Fails without the one-thread projection and subspace (measured: 2e-6 relative on
    # gate_proj/up_proj). No MKL_CBWR: plain mergekit-yaml, as a user runs it.
    config = run(wide_family, tmp_path, "doge")
    mergekit_yaml(config, tmp_path / "one", "-j", "1", MKL_CBWR="")
    mergekit_yaml(config, tmp_path / "two", "-j", "2", "--out-shard-size", "300K", MKL_CBWR="")
    assert_same_bits(load_model(tmp_path / "two"), load_model(tmp_path / "one"))


# At 384x512 MKL splits work across threads: torch.mm and triangular solves stay
# bit-identical across thread counts, but Cholesky, eigh and SVD (MKL LAPACK) do not, so
# the solvers run those on one thread (solvers.one_cpu_thread).


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
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_panel_products_use_every_thread_and_keep_the_bits(threads, monkeypatch, method):
    # From 2048 x 2048 the Gram and block products of the one-thread solvers are split into
    # fixed column panels run side by side on the caller's threads (numerics.for_each_panel);
    # here from 1024 x 1024, to keep the test short.
    from mergekit_wudi.solvers import SOLVERS, numerics

    assert len(numerics.panels(2048, 2048 * 2048)) == numerics.PANELS
    assert len(numerics.panels(1024, 1024 * 1024)) == 1
    monkeypatch.setattr(numerics, "PANEL_MIN_ELEMENTS", 1024 * 1024)
    solver = next(cls for cls in SOLVERS if cls.name == method)()
    task_vectors = full_rank_task_vectors(torch.Generator().manual_seed(0), 3, 1024, 1024, scale=1e-2, dtype=torch.float32)
    results = []
    for number in (1, 3):
        threads(number)
        numerics._POOLS.clear()
        results.append(solver.solve(task_vectors))
        assert [workers for _, workers in numerics._POOLS] == ([] if number == 1 else [3])  # 3 panels at a time, or none
    assert torch.equal(*results)


@needs_cores
@pytest.mark.parametrize("method, shape", [("wudi_cfs", (256, 1024)), ("wudi_cfs", (1024, 1024)), ("ace", (1024, 1024))],
                         ids=["wudi_cfs-stacked", "wudi_cfs-square", "ace"])
def test_panelled_grams_and_blocked_cholesky_keep_the_bits(threads, monkeypatch, method, shape):
    # The symmetric products (numerics.symmetric_product_) and, from CHOLESKY_BLOCKED_SIZE,
    # the factorisation (numerics.cholesky_) run as one-thread pieces side by side; here
    # with both thresholds lowered. (256, 1024) with N = 3 takes wudi_cfs's stacked route.
    from mergekit_wudi.solvers import SOLVERS, numerics, wudi_cfs

    monkeypatch.setattr(numerics, "PANEL_MIN_ELEMENTS", 256 * 1024)
    monkeypatch.setattr(numerics, "CHOLESKY_BLOCKED_SIZE", 512)
    monkeypatch.setattr(numerics, "CHOLESKY_BLOCK", 128)
    assert wudi_cfs.output_space(3, *shape) == (shape[0] < shape[1])
    solver = next(cls for cls in SOLVERS if cls.name == method)()
    task_vectors = full_rank_task_vectors(torch.Generator().manual_seed(0), 3, *shape, scale=1e-2, dtype=torch.float32)
    results = []
    for number in (1, 3):
        threads(number)
        numerics._POOLS.clear()
        results.append(solver.solve(task_vectors))
        assert [workers for _, workers in numerics._POOLS] == ([] if number == 1 else [3])
    assert torch.equal(*results)


@needs_cores
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_decompositions_side_by_side_keep_the_bits(threads, monkeypatch, method):
    # Each task vector's decomposition (tsv's triplets, the calibration of iso_c and
    # iso_cts) runs side by side, one LAPACK thread each, where the memory bound allows
    # (numerics.side_by_side); here from 2^18 elements a job.
    from mergekit_wudi.solvers import SOLVERS, _lapack, numerics

    monkeypatch.setattr(numerics, "PANEL_MIN_ELEMENTS", 1 << 18)
    callers = []
    call = _lapack._call
    monkeypatch.setattr(_lapack, "_call", lambda *args: (callers.append(threading.get_ident()), call(*args))[1])
    solver = next(cls for cls in SOLVERS if cls.name == method)(calibration="input_space" if method != "tsv" else "none")
    task_vectors = full_rank_task_vectors(torch.Generator().manual_seed(0), 3, 2048, 512, scale=1e-2, dtype=torch.float32)
    results, seen = [], []
    for number in (1, 3):
        threads(number)
        numerics._POOLS.clear()
        callers.clear()
        results.append(solver.solve(task_vectors))
        seen.append(set(callers))
    assert seen[0] == {threading.get_ident()} and len(seen[1] - seen[0]) >= 2  # in the pool's threads
    assert torch.equal(*results)


def test_the_first_eigensolve_of_a_process_runs_on_one_thread_like_the_others():
    # threadpoolctl limits only libraries already loaded: scipy's OpenBLAS, imported inside
    # the limit, ran the first eigensolve of every merge on every core (other bits).
    import subprocess
    import sys

    script = (
        "import hashlib, torch\n"
        "from mergekit_wudi.solvers.numerics import symmetric_eigh\n"
        "a = torch.randn(768, 768, generator=torch.Generator().manual_seed(0), dtype=torch.float64)\n"
        "for _ in range(2):\n"
        "    w, v = symmetric_eigh(a @ a.T, lean=True)\n"
        "    print(hashlib.sha256(v.numpy().tobytes()).hexdigest())\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "", "OMP_NUM_THREADS": ""}
    first, second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert first == second


@needs_cores
def test_threaded_lapack_opt_out_runs_the_factorisations_on_every_thread(threads, monkeypatch):
    from mergekit_wudi.solvers import THREADED_LAPACK_ENV, one_cpu_thread

    threads(2)
    seen = []
    for value in ("", "1"):
        monkeypatch.setenv(THREADED_LAPACK_ENV, value)
        with one_cpu_thread(torch.device("cpu")):
            seen.append(torch.get_num_threads())
    assert seen == [1, 2] and torch.get_num_threads() == 2


# Everything that depends on the device sits in one function each in solvers/numerics.py
# (docs/reliability.md); these check each on the CPU. No GPU has run them yet.


def test_one_cpu_thread_changes_nothing_off_the_cpu(threads):
    from mergekit_wudi.solvers import one_cpu_thread

    threads(2)
    with one_cpu_thread(torch.device("meta")):
        assert torch.get_num_threads() == 2
    with one_cpu_thread(torch.device("cpu")), one_cpu_thread(torch.device("cpu")):
        assert torch.get_num_threads() == 1  # nested (re-entrant)
    assert torch.get_num_threads() == 2


def test_small_solves_run_on_one_thread_and_large_ones_on_all(threads):
    from mergekit_wudi.solvers.numerics import solve_threads

    def threads_in_solve(task_vectors, whole=False):
        with solve_threads(task_vectors, whole=whole):
            return torch.get_num_threads()

    threads(2)
    assert threads_in_solve(torch.zeros(3, 255, 256)) == 1  # 65,280 elements < 2^16
    assert threads_in_solve(torch.zeros(3, 256, 256)) == 2
    assert threads_in_solve(torch.zeros(3, 256, 256), whole=True) == 1  # tsv, iso_c, iso_cts
    assert threads_in_solve(torch.zeros(3, 2, 2, device="meta")) == 2


@pytest.mark.parametrize("dtype, expected", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_compute_dtype(dtype, expected):
    from mergekit_wudi.solvers import compute_dtype

    assert compute_dtype(dtype) == expected


def test_adam_without_a_fused_kernel_takes_the_default_one(monkeypatch):
    # A device or dtype without the fused kernel (torch raises RuntimeError) gets the
    # for-loop Adam: same arithmetic, last-bit rounding apart (adam_optimizer's docstring).
    from mergekit_wudi.solvers import numerics

    def run(param):
        optimizer = numerics.adam_optimizer(param, 1e-3)
        for step in range(50):
            param.grad.copy_(torch.sin(torch.arange(12.0) * (step + 1)))
            optimizer.step()
        return optimizer, param

    fused, fused_param = run(torch.zeros(12))
    assert fused.defaults["fused"]
    adam = torch.optim.Adam

    def without_fused(params, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return adam(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", without_fused)
    plain, plain_param = run(torch.zeros(12))
    assert not plain.defaults.get("fused")
    torch.testing.assert_close(plain_param, fused_param, rtol=1e-6, atol=1e-9)
