"""Runs the real `mergekit-yaml` (mergekit.scripts.run_yaml) in a subprocess, as a user would."""

import os
import subprocess
import sys
from pathlib import Path


def mergekit_yaml(config: Path, out: Path, *flags: str, check: bool = True, **env) -> subprocess.CompletedProcess:
    """`mergekit-yaml CONFIG OUT --no-copy-tokenizer FLAGS`; raises with its stderr unless check=False."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    environment.pop("MERGEKIT_WUDI_NO_AUTOLOAD", None)
    environment.update(env)
    command = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(config), str(out), "--no-copy-tokenizer", *flags]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"mergekit-yaml failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result
