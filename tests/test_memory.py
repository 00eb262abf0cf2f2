"""The memory bound of a solve, measured: N task vectors plus at most SOLVE_EXTRA_TENSORS
tensors of the (out, in) size, for every method, on a square, a tall and a wide shape.

Each case runs `benchmarks/solvers.py child` in a fresh process: the peak resident memory
of one adapter merge (mergekit's merge_tensors) above the memory held before it, with
glibc returning freed blocks at once (benchmarks/solvers.py, measure_memory).
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


@pytest.mark.slow
@pytest.mark.parametrize("shape, spread, calibrate", CASES,
                         ids=["square", "tall", "wide", "square-spread", "square-calibrated", "wide-calibrated"])
@pytest.mark.parametrize("method", METHODS)
def test_peak_memory_is_within_the_bound(method, shape, spread, calibrate):
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 16), OMP_WAIT_POLICY="PASSIVE")
    command = [sys.executable, str(BENCHMARK), "child", method, str(COUNT), *map(str, shape), "cpu"]
    command += ["--spread"] if spread else []
    command += ["--calibrate"] if calibrate else []
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    extra = json.loads(completed.stdout.strip().splitlines()[-1])["extra"]
    tensors = extra / (shape[0] * shape[1] * 4)
    assert tensors <= COUNT + SOLVE_EXTRA_TENSORS, f"{method} {shape}: {tensors:.2f} tensors"
    assert tensors >= COUNT  # the measurement sees the task vectors at least
