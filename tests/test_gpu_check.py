"""benchmarks/gpu_check.py, the accelerator check, run here with the CPU standing in for the device."""

import os
import re
import subprocess
import sys
from pathlib import Path

from registry import METHODS

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_every_method_and_compares_with_the_cpu():
    environment = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--steps", "3"],
                            capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = re.findall(r"^\| (\w+) \| 96x64 \| (on|off) \| (\S+) \| (True|False) \|", result.stdout, re.M)
    assert sorted({(method, tf32) for method, tf32, _, _ in rows}) == sorted((m, t) for m in METHODS for t in ("on", "off"))
    # The same solver on the same device and inputs gives the same bits: a difference of 0.
    assert all(float(difference) == 0.0 and finite == "True" for _, _, difference, finite in rows)
    assert result.stdout.strip().endswith("0 failed")
