"""The model side of a benchmark, as bench.runner calls it; a benchmark subclasses it with its
tasks, its experts module and its `_score`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional


class ModelBenchmark:
    title = model = ""
    experts = None  # the benchmark's experts module: load_tokenizer, load_model, load_lora, base_checkpoint, SETS
    tasks_module = None  # the benchmark's tasks module: TASK_NAMES, DATA_PACKAGES, load_task

    def __init__(self, limit: Optional[int] = None):
        self.limit = limit
        self.name = self.experts.BENCH
        self.default_out = Path(self.experts.__file__).parent  # results.json/md beside run.py
        self.task_names = self.tasks_module.TASK_NAMES
        self.data_packages = self.tasks_module.DATA_PACKAGES
        self.recipes = {name: asdict(recipe) for name, recipe in self.experts.SETS.recipes.items()}
        self.tasks = {name: self.tasks_module.load_task(name) for name in self.task_names}
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.experts.load_tokenizer()
        return self._tokenizer

    def base(self) -> Path:
        return self.experts.base_checkpoint()

    def ensure_set(self, name: str) -> dict:
        return self.experts.SETS.ensure(name)

    def _score(self, model, tasks, splits) -> tuple:  # ({split: {task: bits}}, {split: checks})
        raise NotImplementedError

    def score(self, path: Path, splits) -> tuple:
        import torch

        with torch.no_grad():
            return self._score(self.experts.load_model(path), self.task_names, splits)

    def score_expert(self, kind: str, path: Path, task: str, splits) -> dict:
        import torch

        with torch.no_grad():
            model = self.experts.load_model(path) if kind == "full" else self.experts.load_lora(self.base(), path)
            return {split: bits[task] for split, bits in self._score(model, [task], splits)[0].items()}
