"""The command line shared by benchmarks/llm/run.py, benchmarks/real_model/run.py and benchmarks/run_all.py."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

QUICK_LIMIT = 100  # --quick: the first 100 items of every validation and test split


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="development: full experts only, task_arithmetic / ties / wudi_cfs, a 2-point grid, 100 items per split")
    p.add_argument("--resume", action="store_true", help="reuse identical merges already in OUT/results.json (development; the table says so)")
    p.add_argument("--sets", type=lambda v: v.split(","), help="a partial plan: only these expert sets (comma-separated); the table says so")
    p.add_argument("--methods", type=lambda v: v.split(","), help="a partial plan: only these methods (comma-separated); the table says so")
    p.add_argument("--out", type=Path, help="where results.json/md and accuracy.png go (default: beside run.py; --quick: the cache folder)")
    return p


def run(benchmark_class, args) -> dict:
    import torch

    from bench import cache
    from bench.runner import Runner

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    bench = benchmark_class(limit=QUICK_LIMIT if args.quick else None)
    out = args.out or (cache.root(bench.name) / "quick" if args.quick else bench.default_out)
    started = time.perf_counter()
    report = Runner(bench, out, quick=args.quick, resume=args.resume, sets=args.sets, methods=args.methods).run()
    print(f"[{bench.name}] wrote {out / 'results.md'} in {time.perf_counter() - started:.0f} s", flush=True)
    return report


def main(benchmark_class) -> None:
    run(benchmark_class, parser(benchmark_class.title).parse_args())
