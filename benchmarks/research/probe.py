"""A few configurations of one expert set through the benchmark runner: the validation split,
or with --test also the test split and a paired bootstrap 95% interval against the first one.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/research/probe.py llm lora \
        'task_arithmetic:{"lambda": 0.5}' 'wudi_cfs:' 'iso_c:{"calibrate": "none"}' [--test] [--out DIR]

Each argument is METHOD:JSON-PARAMETERS (empty: the defaults). Merges run through the real
`mergekit-yaml` (bench.runner.Runner.evaluate: the same YAML, scoring and per-example
records as benchmarks/run_all.py); DIR/results-SET-PID.json keeps this run's, and a rerun
reuses those in DIR/results.json (the last run's) made by the same code (--resume's rule). For development decisions between full runs (the
defaults of issue 23 were chosen with it, on validation); not a substitute for the plan.
Two probes at once need two --out folders (each merge clears its folder's LoRA cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.env  # noqa: E402, F401  (before torch loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", choices=("llm", "minilm"))
    parser.add_argument("set")
    parser.add_argument("configs", nargs="+", help="METHOD:JSON")
    parser.add_argument("--test", action="store_true", help="also score test; paired interval against the first")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch
    from bench import cache, stats
    from bench.runner import Runner, _validation

    torch.set_num_threads(1)
    if args.benchmark == "llm":
        from llm.run import Benchmark
    else:
        from real_model.run import Benchmark
    bench = Benchmark()
    runner = Runner(bench, args.out or cache.root(bench.name) / "probe", resume=True)
    runner.members = {args.set: bench.ensure_set(args.set)}
    splits = ("validation", "test") if args.test else ("validation",)
    records = []
    for config in args.configs:
        method, _, text = config.partition(":")
        record, _ = runner.evaluate(args.set, method, json.loads(text) if text else {}, splits=splits)
        records.append(record)
        shutil.copy(runner.out / "results.json", runner.out / f"results-{args.set}-{os.getpid()}.json")
        line = f"{args.benchmark} {args.set} {method} {record['parameters']} validation {100 * _validation(record):.1f}"
        if args.test:
            test = record["correct"]["test"]
            diff, low, high = stats.paired_bootstrap(test, records[0]["correct"]["test"])
            line += f" test {100 * stats.mean_accuracy(test):.1f} vs first {100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
        tasks = record["correct"]["test" if args.test else "validation"]
        print(line, {task: round(100 * bits.count("1") / len(bits), 1) for task, bits in tasks.items()}, flush=True)


if __name__ == "__main__":
    main()
