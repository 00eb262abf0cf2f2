"""solvers/_lapack.py: scipy's LAPACK without the GIL, bit for bit scipy.linalg.lapack's."""

import os
import threading
import time

import numpy as np
import pytest
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from mergekit_wudi.solvers import _lapack


def symmetric(size, seed):
    a = np.random.default_rng(seed).standard_normal((size, size + 3))
    return a @ a.T


@pytest.mark.parametrize("size", [2, 7, 300])
def test_same_bits_as_scipy_wrappers(size):
    matrix = symmetric(size, size)
    count = max(1, size // 3)

    reduced = np.asfortranarray(matrix)
    diagonal, off, tau, info = _lapack.dsytrd(reduced)
    (work, _) = lapack.dsytrd_lwork(size, lower=1)
    expected = lapack.dsytrd(np.asfortranarray(matrix), lower=1, lwork=int(work))
    assert info == 0
    for mine, theirs in zip((reduced, diagonal, off, tau), expected):
        assert np.array_equal(mine, theirs)

    values, blocks, splits, info = _lapack.dstebz_top(diagonal, off, count)
    found, their_values, their_blocks, their_splits, _ = lapack.dstebz(diagonal, off, 3, 0.0, 0.0, size - count + 1, size, 0.0, b"B")
    assert info == 0 and found == count and np.array_equal(values, their_values[:found])
    assert np.array_equal(blocks[:found], their_blocks[:found]) and np.array_equal(splits, their_splits)

    vectors, info = _lapack.dstein(diagonal, off, values, blocks, splits)
    assert info == 0 and np.array_equal(vectors, lapack.dstein(diagonal, off, values, blocks, splits)[0])

    values, vectors, info = _lapack.dsyevr_top(np.asfortranarray(matrix), count)
    their_values, their_vectors, *_ = lapack.dsyevr(np.asfortranarray(matrix), range="I", il=size - count + 1, iu=size)
    assert info == 0 and np.array_equal(values, their_values[:count]) and np.array_equal(vectors, their_vectors)
    # and they are eigenpairs, ascending
    np.testing.assert_allclose(matrix @ vectors, vectors * values, atol=1e-9 * values[-1])
    assert np.all(np.diff(values) >= 0)


def test_rejects_a_row_major_matrix():
    with pytest.raises(ValueError, match="column-major float64"):
        _lapack.dsytrd(np.ascontiguousarray(symmetric(5, 0)[:, :4]))


def overlap_of_two_calls(reduce):
    """How much of the shorter of two calls, in two threads, ran while the other did."""
    matrices = [np.asfortranarray(symmetric(1200, seed)) for seed in (1, 2)]
    spans = []

    def job(matrix):
        start = time.perf_counter()
        reduce(matrix)
        spans.append((start, time.perf_counter()))

    with threadpool_limits(limits=1, user_api="blas"):
        workers = [threading.Thread(target=job, args=(matrix,)) for matrix in matrices]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    (a, b), (c, d) = spans
    return (min(b, d) - max(a, c)) / min(b - a, d - c)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to run 2 threads")
def test_the_gil_is_released_so_that_two_calls_run_side_by_side():
    # Through scipy.linalg.lapack's wrapper, which holds the GIL, the second call waits for
    # the first (overlap about 0, once the first call of the process is past); through
    # _lapack they run together on a machine with two cores.
    assert overlap_of_two_calls(_lapack.dsytrd) > 0.5
