"""What both benchmarks' expert code shares: the cache folder of a set, the training loop over
tasks, the `mixed` set, and the command line that trains sets."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Sequence

from bench import cache
from bench.plan import MIXED_SETS, mixed_members

logger = logging.getLogger(__name__)
MARKERS = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}


@dataclass(frozen=True)
class BaseRecipe:
    """What every expert recipe has; a benchmark's Recipe adds its schedule."""

    kind: str = "full"  # full | lora
    seed: int = 0
    distinct_seeds: bool = False  # LoRA: seed + 100 + task index before get_peft_model
    lora_rank: int = 8
    lora_alpha: int = 8


def recipe_sets(recipe: type, lora: dict, aggressive: dict) -> dict:
    """The ten trained sets: full (seed 0), full_seed1, lora (alpha = r, a seed per adapter,
    `lora` overrides), lora_seed1 to lora_seed3 (the same with seed 1, 2, 3: adapter seeds
    seed + 100 + task index), lora_aggressive (one seed for all, `aggressive` overrides) and
    lora_aggressive_seed1 to lora_aggressive_seed3 (the same with seed 1, 2, 3 for all)."""
    replicates = (1, 2, 3)
    return {
        "full": recipe(),
        "full_seed1": recipe(seed=1),
        "lora": recipe(kind="lora", distinct_seeds=True, **lora),
        **{f"lora_seed{seed}": recipe(kind="lora", distinct_seeds=True, seed=seed, **lora) for seed in replicates},
        "lora_aggressive": recipe(kind="lora", **aggressive),
        **{f"lora_aggressive_seed{seed}": recipe(kind="lora", seed=seed, **aggressive) for seed in replicates},
    }


def lora_seed(recipe, index: int) -> int:
    """The seed set before `get_peft_model`: one per adapter (seed + 100 + task index) or one for all."""
    return recipe.seed + 100 + index if recipe.distinct_seeds else recipe.seed


class ExpertSets:
    """The expert sets of one benchmark: `recipes` by set name (dataclasses with a `kind`), trained
    by `train(recipe, task_name, index, path)`, keyed in the cache by `extra_key` too."""

    def __init__(self, bench: str, task_names: Sequence[str], load_splits: Callable, data_packages: Sequence[str], recipes: dict, train: Callable, extra_key: dict = None):
        self.bench, self.task_names, self.load_splits = bench, tuple(task_names), load_splits
        self.data_packages, self.recipes, self.train, self.extra_key = tuple(data_packages), recipes, train, extra_key or {}

    def split_definitions(self) -> dict:
        return {name: self.load_splits(name).definition() for name in self.task_names}

    def set_dir(self, set_name: str) -> Path:
        recipe = {**asdict(self.recipes[set_name]), **self.extra_key}
        return cache.set_dir(self.bench, set_name, recipe, self.split_definitions(), self.data_packages)

    def ensure(self, set_name: str) -> Dict[str, tuple]:
        """Train what is missing of one set; {task: (kind, path, training s)}. `mixed` (and
        `mixed_seed1`, of the seed-1 sets) trains its members."""
        if set_name in MIXED_SETS:
            members = mixed_members(self.task_names, MIXED_SETS[set_name])
            return {task: self.ensure(member)[task] for task, member in members.items()}
        recipe, root = self.recipes[set_name], self.set_dir(set_name)
        out = {}
        for index, name in enumerate(self.task_names):
            seconds = cache.ensure(root / name, MARKERS[recipe.kind], lambda path, name=name, index=index: self.train(recipe, name, index, path))
            logger.info("%s expert %s: %.1f s", set_name, name, seconds)
            out[name] = (recipe.kind, root / name, seconds)
        return out

    def main(self, argv: Sequence[str] | None = None) -> None:
        """python .../experts.py [SET...]: train the named sets (default: all, then the mixed ones)."""
        names = [*self.recipes, *MIXED_SETS]
        parser = argparse.ArgumentParser(description=f"Train the {self.bench} benchmark's expert sets that are not cached yet.")
        parser.add_argument("sets", nargs="*", metavar="SET", help=f"one of {', '.join(names)} (default: all)")
        args = parser.parse_args(argv)
        unknown = [name for name in args.sets if name not in names]
        if unknown:  # not argparse's choices: with nargs="*" they refuse an empty list (Python < 3.12)
            parser.error(f"unknown set {', '.join(map(repr, unknown))}: choose from {', '.join(names)}")
        import torch

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
        for set_name in args.sets or names:
            print(set_name, self.ensure(set_name))
