"""Bit-identity of merges across a change: sha256 of every output tensor of several merges per method.

    python benchmarks/merge_bits.py before.json      # on the old commit
    python benchmarks/merge_bits.py after.json       # on the new one, then compare the two files

Per method of the registry, seven merges through the real `mergekit-yaml` on tiny Llama families
(tests/models.py): defaults in float32; lambda 0.7 with per-model weights (one a layer gradient)
and `steps` where the method has it; defaults in bfloat16; `fallback: base` with two fine-tunes;
and, for adapter_guard's three verdicts, defaults (with `steps`) on LoRA adapters with a seed each,
on full fine-tunes beside such adapters, and on adapters trained from one seed.
"""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from models import (  # noqa: E402
    load_model,
    make_family,
    make_mixed_family,
    make_one_seed_family,
    make_seed_each_family,
    write_config,
)

from mergekit_wudi.solvers import SOLVERS  # noqa: E402


def digest(path: Path) -> str:
    tensors = load_model(path)
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        hasher.update(name.encode())
        hasher.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def main() -> None:
    root = Path(tempfile.mkdtemp())
    families = {"f32": make_family(root / "f32", 3, seed=0), "bf16": make_family(root / "bf16", 3, seed=1, dtype=torch.bfloat16),
                "two": make_family(root / "two", 2, seed=2), "seed_each": make_seed_each_family(root / "seed_each"),
                "mixed": make_mixed_family(root / "mixed"), "one_seed": make_one_seed_family(root / "one_seed")}
    weights = [{"weight": 1.0}, {"weight": 0.5}, {"weight": [1.0, 0.2]}]
    results = {}
    for solver in SOLVERS:
        fields = {field.name for field in dataclasses.fields(solver.config_cls)}
        extra = {"steps": 40} if "steps" in fields else {}
        cases = {"defaults-f32": ("f32", {}, None), "lambda0.7-weights-f32": ("f32", {"lambda": 0.7, **extra}, weights),
                 "defaults-bf16": ("bf16", {}, None), "fallback-base-n2": ("two", {"fallback": "base", **extra}, None),
                 **{f"defaults-{kind}": (kind, extra, None) for kind in ("seed_each", "mixed", "one_seed")}}
        for label, (family, parameters, model_parameters) in cases.items():
            base, *models = families[family]
            work = root / f"{solver.name}-{label}"
            work.mkdir()
            config = write_config(work / "merge.yml", solver.name, base, models, parameters or None, model_parameters)
            environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
            command = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(config), str(work / "out"),
                       "--no-copy-tokenizer", "--no-write-model-card"]
            done = subprocess.run(command, env=environment, capture_output=True, text=True)
            results[f"{solver.name}/{label}"] = digest(work / "out") if done.returncode == 0 else "failed: " + done.stderr[-300:]
            print(f"{solver.name}/{label} {results[f'{solver.name}/{label}'][:16]}", flush=True)
    Path(sys.argv[1]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
