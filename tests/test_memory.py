"""The memory bound of a solve, measured: N task vectors plus at most SOLVE_EXTRA_TENSORS
tensors of the (out, in) size, for every method, on a square, a tall and a wide shape.

Each case runs `benchmarks/solvers.py child` in a fresh process: the peak resident memory
of one adapter merge (mergekit's merge_tensors) above the memory held before it, with
glibc and MKL returning freed blocks at once (benchmarks/solvers.py, measure_memory).
"""

import json
import os
import subprocess
import sys
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


@pytest.mark.slow
@pytest.mark.parametrize("shape, spread, calibrate", CASES,
                         ids=["square", "tall", "wide", "square-spread", "square-calibrated", "wide-calibrated"])
@pytest.mark.parametrize("method", METHODS)
def test_peak_memory_is_within_the_bound(method, shape, spread, calibrate):
    options = (["--spread"] if spread else []) + (["--calibrate"] if calibrate else [])
    tensors = peak_tensors(method, COUNT, shape, *options)
    assert tensors <= COUNT + SOLVE_EXTRA_TENSORS, f"{method} {shape}: {tensors:.2f} tensors"


@pytest.mark.slow
@pytest.mark.parametrize("count", [3, 4, 8])
def test_wudi_out_space_chunks_are_within_the_bound(count):
    # in = 4 out takes wudi's out-space route; up to N out = in its row chunks are halves
    # of the tensor (k_proj and v_proj of Llama 3), beyond that quarters.
    tensors = peak_tensors("wudi", count, (1024, 4096))
    assert tensors <= count + SOLVE_EXTRA_TENSORS, f"wudi N = {count}: {tensors:.2f} tensors"
