"""Both real-model benchmarks in one run: MiniLM (benchmarks/real_model), then SmolLM2 (benchmarks/llm).

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 BENCH_THREADS=1 nice -n 15 python benchmarks/run_all.py   # --quick, --resume, --sets A,B, --methods X,Y, --out DIR

Trains every missing expert (cached outside git), runs every merge of bench.plan through the
real `mergekit-yaml`, and writes results.json, results.md and accuracy.png into
benchmarks/real_model/ and benchmarks/llm/ (with --out DIR: DIR/minilm and DIR/llm).

Time on 2 shared CPU cores (scoring on 1 torch thread), estimated from measured per-merge
times (merge + validation scoring, from this pipeline's --quick runs: SmolLM2 task_arithmetic
8 s, ties 12-55 s, wudi_cfs 20-26 s per merge, 9 s per 200 greedy prompts; MiniLM 12-34 s per
merge, 3-8 s scoring; the other methods from the previous tables' merge times, which ran about
2x slower); bench/estimate.py redoes it from any results.json. Per expert set 8 merges per
method of ours (its other `calibrate` rule as well), 7 for task_arithmetic, 13 per density
built-in (115 with 7 methods of ours), 4 expert sets and 2 replicate merges per method
(full_seed1); the figures below are for the 108-merge plan before the `calibrate` rows,
which add about 6%:

- MiniLM: about 4.6 h (wudi 1.3 h, doge 0.6 h), plus 20 experts in about 25 min;
- SmolLM2: about 15 h with merge times as measured now, 24 h with the previous tables'
  (doge 3.5-7 h, wudi 2.2-4.1 h), plus 16 experts in about 1.5 h (a full expert: 150 steps,
  400-510 s on 1 thread) and 13 min scoring them;

about 22-31 h in all. `--quick` (full experts; task_arithmetic, ties and wudi_cfs on a
2-point grid; 100 items per split) takes about 4 min for MiniLM and 8 min for SmolLM2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench.env  # noqa: E402, F401  (before torch loads)
from bench.cli import parser, run  # noqa: E402


def main() -> None:
    from llm.run import Benchmark as LLM
    from real_model.run import Benchmark as MiniLM

    args = parser(__doc__.splitlines()[0]).parse_args()
    out = args.out
    started = time.perf_counter()
    for benchmark in (MiniLM, LLM):
        args.out = out / benchmark.experts.BENCH if out else None
        run(benchmark, args)
    print(f"both benchmarks in {(time.perf_counter() - started) / 3600:.2f} h", flush=True)


if __name__ == "__main__":
    main()
