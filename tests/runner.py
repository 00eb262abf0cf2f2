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


def mergekit_yaml_in_process(config: Path, out: Path, *flags: str, check: bool = True):
    """The same `mergekit-yaml` click command, run in this process (click's CliRunner).

    Parses the same options and runs the same planner, executor and writer, without the
    ~5 s of interpreter start-up and imports of a subprocess. Exceptions come back in
    `.exception`. Do not pass `-j` here: it sets torch's thread count for the whole
    test process.
    """
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main

    result = CliRunner().invoke(main, [str(config), str(out), "--no-copy-tokenizer", *flags])
    if check and result.exit_code != 0:
        raise AssertionError(f"mergekit-yaml failed ({result.exit_code}): {result.exception!r}\n{result.output[-4000:]}")
    return result


def mergekit_wudi_cli(*args):
    """`mergekit-wudi ARGS` through click's CliRunner, in this process (exceptions propagate)."""
    from click.testing import CliRunner

    from mergekit_wudi.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
