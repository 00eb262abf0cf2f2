"""What every results row records about where it came from."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mergekit", "mergekit-wudi", "torch", "transformers", "peft", "safetensors")


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions(packages: Iterable[str]) -> Dict[str, str]:
    return {p: version(p) for p in packages}


@lru_cache(maxsize=1)
def commit() -> str:
    """HEAD of the project, with "+dirty" when tracked files differ from it ("unknown" outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@lru_cache(maxsize=1)
def package_code() -> str:
    """sha256 (16 hex) of mergekit_wudi's Python sources as imported: what a merge of ours ran, even
    on an uncommitted tree, so --resume never reuses one of our rows made by other code."""
    import mergekit_wudi

    hasher = hashlib.sha256()
    root = Path(mergekit_wudi.__file__).parent
    for path in sorted(root.rglob("*.py")):
        hasher.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return hasher.hexdigest()[:16]


def stamp(data_packages: Iterable[str] = ()) -> dict:
    """The provenance of a row: commit, mergekit_wudi's source hash, package versions (code and
    data), Python and machine."""
    return {
        "commit": commit(),
        "package_code": package_code(),
        "versions": versions([*PACKAGES, *data_packages]),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
