"""The merge YAML and the real `mergekit-yaml` in a child process, with its wall time and peak RSS."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Sequence, Tuple

import yaml

# Runs the command and writes its child's peak RSS (KiB) to argv[1]. The launcher is small, so
# the child's ru_maxrss is mergekit's own: Linux carries the RSS a process had at fork time
# across exec, which would otherwise charge the (large) benchmark process to every merge.
_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def model_entry(kind: str, path: Path, base: Path) -> str:
    """A full expert is its folder; a LoRA expert is mergekit's `base+adapter` (peft applies it first)."""
    return str(path) if kind == "full" else f"{base}+{path}"


def config_text(method: str, parameters: dict, members: Sequence[Tuple[str, Path]], base: Path) -> str:
    """The YAML of one merge: every expert at weight 1, float32, `parameters` at the top level."""
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": model_entry(kind, path, base), "parameters": {"weight": 1.0}} for kind, path in members],
        "dtype": "float32",
    }
    if parameters:
        config["parameters"] = dict(parameters)
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def run_mergekit(config: Path, out: Path, work: Path, *options: str) -> Dict[str, float]:
    """`mergekit-yaml config out [options]`: {"wall_s", "peak_rss_mib"} of that process; RuntimeError with its log if it fails."""
    command = [
        shutil.which("mergekit-yaml") or "mergekit-yaml",
        str(config),
        str(out),
        "--no-copy-tokenizer",
        "--random-seed", "0",  # dare_ties and della draw their masks from torch's global generator
        "--lora-merge-cache", str(work / "lora-cache"),
        *options,
    ]
    log, rss = out.with_suffix(".log"), out.with_suffix(".maxrss")
    with open(log, "w") as stream:
        started = time.perf_counter()
        returncode = subprocess.call([sys.executable, "-c", _LAUNCHER, str(rss), *command], stdout=stream, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
    if returncode != 0:
        raise RuntimeError(f"mergekit-yaml {config} failed ({returncode}), see {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": int(rss.read_text()) / 1024}
