"""Build the wheel, install it into a fresh venv, run mergekit-yaml from there.

This is how users get the package; an editable install can hide a packaging bug
(a missing .pth, a module left out of the wheel).
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from models import load_model, make_family, write_config

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]


def run(*command, **kwargs):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_wheel_in_a_fresh_venv(tmp_path):
    run(sys.executable, "-m", "build", "--wheel", "--outdir", tmp_path / "dist", ROOT)
    (wheel,) = (tmp_path / "dist").glob("mergekit_wudi-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mergekit_wudi.pth" in names and "mergekit_wudi/solvers/wudi.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[mergekit.merge_methods]" in entry_points

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    run(pip, "install", "--quiet", "torch==2.13.0")  # the local CPU wheel, never the CUDA build
    run(pip, "install", "--quiet", wheel)

    family = make_family(tmp_path / "family")
    config = write_config(tmp_path / "wudi.yml", "wudi", family[0], family[1:], {"steps": 20})
    env = {k: v for k, v in os.environ.items() if k not in ("MERGEKIT_WUDI_NO_AUTOLOAD", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    run(venv / "bin" / "mergekit-yaml", config, tmp_path / "out", "--no-copy-tokenizer", env=env, cwd=tmp_path)
    merged = load_model(tmp_path / "out")
    assert len(merged) == len(load_model(family[0]))
    assert "WUDI-Merging" in (tmp_path / "out" / "README.md").read_text()

    # The package came from the venv, not from this checkout.
    where = run(venv / "bin" / "python", "-c", "import mergekit_wudi, json; print(json.dumps(mergekit_wudi.__file__))",
                env=env, cwd=tmp_path)
    assert str(venv) in json.loads(where.stdout)
    run(venv / "bin" / "mergekit-wudi", "--version", env=env, cwd=tmp_path)
