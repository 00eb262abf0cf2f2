"""The memory bound of a solve, measured: N task vectors plus at most SOLVE_EXTRA_TENSORS
tensors of the (out, in) size, for every method, on a square, a tall and a wide shape.

Each case runs `benchmarks/solvers.py child` in a fresh process: the peak resident memory
of one adapter merge (mergekit's merge_tensors) above the memory held before it, with
glibc and MKL returning freed blocks at once (benchmarks/solvers.py, measure_memory).
The selected cases' children run two at a time (`measured`): each one's figure is its own
process's, whatever runs beside it. Under `pytest -n` the file stays on one worker
(`--dist loadfile`, pyproject.toml), so the fixture starts each case once.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from registry import METHODS

from mergekit_wudi.solvers import SOLVE_EXTRA_TENSORS

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "solvers.py"
COUNT = 4


# wide: in = 2.7 out, as the down_proj of Llama 2 and SmolLM2 (the (in, in) Gram of wudi
# and wudi_cfs grows as in/out; at in = 4 out wudi_cfs goes past the bound: CHANGELOG).
# Below about 4 MiB a tensor, fixed buffers (MKL's, LAPACK's) take a tensor or more.
# spread: per-model weights 1, 0.25, 4, 1, which switch ace's refinement on.
# calibrate: input_space after the solve (float64 Grams of each task vector's smaller side).
CASES = [((1024, 1024), False, False), ((2048, 512), False, False), ((768, 2048), False, False),
         ((1024, 1024), True, False), ((1024, 1024), False, True), ((768, 2048), False, True)]


def peak_tensors(method: str, count: int, shape, *options: str) -> float:
    """The child's peak extra memory, in tensors of `shape` (float32)."""
    # as benchmarks/solvers.py's MEMORY_ENVIRONMENT: freed tensors and MKL's work buffers go back at once
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 16), MKL_DISABLE_FAST_MM="1", OMP_WAIT_POLICY="PASSIVE")
    command = [sys.executable, str(BENCHMARK), "child", method, str(count), *map(str, shape), "cpu", *options]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    extra = json.loads(completed.stdout.strip().splitlines()[-1])["extra"]
    tensors = extra / (shape[0] * shape[1] * 4)
    assert tensors >= count  # the measurement sees the task vectors at least
    return tensors


OUT_SPACE_SHAPE = (1024, 4096)  # in = 4 out: wudi's out-space route


def measured_shape(method: str, shape):
    """doge is measured at twice each side: its LAPACK and MKL work buffers (eigh's, per
    task) take about 10 MiB whatever the tensor on some machines (an AMD EPYC: 41.3 MiB
    at 1024x1024 with N = 4, 10.3 tensors; 135.3 MiB at 2048x2048, 8.5; so 7.8 tensors a
    tensor and 10 MiB fixed), which at 4 MiB a tensor would pass the bound by themselves."""
    return (2 * shape[0], 2 * shape[1]) if method == "doge" else shape


def case_of(item):
    """(method, count, shape, options) of a selected test of this module, or None."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if item.originalname == "test_peak_memory_is_within_the_bound":
        options = (("--spread",) if params["spread"] else ()) + (("--calibrate",) if params["calibrate"] else ())
        return params["method"], COUNT, measured_shape(params["method"], params["shape"]), options
    if item.originalname == "test_the_trim_is_within_the_bound":
        return params["method"], COUNT, (1024, 1024), ("--density", "0.3")
    if item.originalname == "test_a_merge_by_kind_is_within_the_bound":
        return params["method"], COUNT, (1024, 1024), ("--by-kind",)
    if item.originalname == "test_wudi_out_space_chunks_are_within_the_bound":
        return "wudi", params["count"], OUT_SPACE_SHAPE, ()
    return None


@pytest.fixture(scope="module")
def measured(request):
    """Every selected case's child, started two at a time: case -> future of peak_tensors."""
    cases = [case for item in request.session.items if item.module is sys.modules[__name__]
             for case in [case_of(item)] if case is not None]
    pool = ThreadPoolExecutor(2)
    try:
        yield {case: pool.submit(peak_tensors, case[0], case[1], case[2], *case[3]) for case in dict.fromkeys(cases)}
    finally:  # a run stopped early (-x) does not wait for the children not yet started
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("shape, spread, calibrate", CASES,
                         ids=["square", "tall", "wide", "square-spread", "square-calibrated", "wide-calibrated"])
@pytest.mark.parametrize("method", METHODS)
def test_peak_memory_is_within_the_bound(measured, request, method, shape, spread, calibrate):
    tensors = measured[case_of(request.node)].result()
    assert tensors <= COUNT + SOLVE_EXTRA_TENSORS, f"{method} {measured_shape(method, shape)}: {tensors:.2f} tensors"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_a_merge_by_kind_is_within_the_bound(measured, request, method):
    # two parts solved in turn (guard.kind_parts on a mixed set): the stack reordered in place
    # through one row buffer, the first part's merge held while the second is solved.
    tensors = measured[case_of(request.node)].result()
    assert tensors <= COUNT + SOLVE_EXTRA_TENSORS, f"{method} by kind: {tensors:.2f} tensors"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wudi_cfs", "tsv"])
def test_the_trim_is_within_the_bound(measured, request, method):
    # density 0.3 for every fine-tune: the trim (one |t| buffer and its mask) runs in place before the solve.
    tensors = measured[case_of(request.node)].result()
    assert tensors <= COUNT + SOLVE_EXTRA_TENSORS, f"{method} trimmed: {tensors:.2f} tensors"


@pytest.mark.slow
@pytest.mark.parametrize("count", [3, 4, 8])
def test_wudi_out_space_chunks_are_within_the_bound(measured, request, count):
    # in = 4 out takes wudi's out-space route; up to N out = in its row chunks are halves
    # of the tensor (k_proj and v_proj of Llama 3), beyond that quarters.
    tensors = measured[case_of(request.node)].result()
    assert tensors <= count + SOLVE_EXTRA_TENSORS, f"wudi N = {count}: {tensors:.2f} tensors"
