"""SmolLM2-135M-Instruct experts, one per task, by one deterministic recipe, cached outside git.

Full experts: every weight trained except the token embeddings (tied to lm_head, so both stay
the base's), AdamW, loss on the answer tokens (and eos) only. LoRA experts: peft adapters of rank
`lora_rank` on every linear layer of the decoder, the base frozen, same data, same loss.

Cache: $MERGEKIT_WUDI_BENCH_CACHE (default ~/.cache/mergekit-wudi-bench)/llm/
    base/ (the converted checkpoint)   recipe-<hash>/full/<task>/   recipe-<hash>/lora/<task>/
An expert is written only when its training finished, so a stopped run retrains only the
unfinished one.

    nice -n 10 python benchmarks/llm/experts.py     # train what is missing (logs per expert)
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

import convert  # noqa: E402
import tasks  # noqa: E402
from tasks import TASK_NAMES, load_task, target  # noqa: E402

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-4
    warmup: int = 10
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_lr: float = 2e-3
    lora_steps: int = 60


def cache_root() -> Path:
    return Path(os.environ.get("MERGEKIT_WUDI_BENCH_CACHE", Path.home() / ".cache" / "mergekit-wudi-bench")) / "llm"


def recipe_dir(recipe: Recipe) -> Path:
    """The cache folder of a recipe; its name hashes the recipe and the task definitions (names, split sizes, seed)."""
    data = {"recipe": asdict(recipe), "tasks": list(TASK_NAMES), "n_train": tasks.N_TRAIN, "n_test": tasks.N_TEST, "seed": tasks.SEED}
    key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / f"recipe-{key}"


def base_checkpoint() -> Path:
    """The converted base (float32 safetensors + tokenizer), made on first use."""
    path = cache_root() / "base"
    if not (path / "model.safetensors").exists():
        convert.convert(convert.gguf_path(), path)
    return path


def load_tokenizer(path=None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path or base_checkpoint())
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_lora(base_path, adapter_path) -> torch.nn.Module:
    import peft

    return peft.PeftModel.from_pretrained(load_model(base_path), adapter_path).merge_and_unload().eval()


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens: int = 4, batch_size: int = 64) -> list:
    """Greedy completions (decoded, special tokens dropped) of `prompts`, batched with left padding."""
    completions = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        completions += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return completions


def accuracy(model, tokenizer, examples) -> float:
    from tasks import exact_match

    completions = generate(model, tokenizer, [e.prompt for e in examples])
    return sum(exact_match(c, e.answer) for c, e in zip(completions, examples)) / len(examples)


def encode_batch(tokenizer, examples) -> dict:
    """input_ids, attention_mask and labels (-100 except on the answer tokens and eos), right-padded."""
    rows = []
    for e in examples:
        prompt_ids = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(target(e.answer), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
    }


def train(model, tokenizer, task, lr: float, steps: int, recipe: Recipe) -> list:
    """AdamW on the trainable parameters, linear warmup then constant lr; returns the losses."""
    torch.manual_seed(recipe.seed)
    order_generator = torch.Generator().manual_seed(recipe.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / recipe.warmup))
    model.train()
    order, losses = [], []
    for step in range(steps):
        if len(order) < recipe.batch_size:
            order += torch.randperm(len(task.train), generator=order_generator).tolist()
        index, order = order[: recipe.batch_size], order[recipe.batch_size :]
        loss = model(**encode_batch(tokenizer, [task.train[i] for i in index])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            logger.info("%s step %d loss %.4f", task.name, step, losses[-1])
    model.eval()
    return losses


def full_expert(base_path, tokenizer, task, recipe: Recipe):
    model = load_model(base_path)
    model.get_input_embeddings().weight.requires_grad_(False)  # and lm_head, which is the same tensor
    train(model, tokenizer, task, recipe.lr, recipe.steps, recipe)
    return model


def lora_expert(base_path, tokenizer, task, recipe: Recipe):
    import peft

    torch.manual_seed(recipe.seed)
    config = peft.LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    model = peft.get_peft_model(load_model(base_path), config)
    train(model, tokenizer, task, recipe.lora_lr, recipe.lora_steps, recipe)
    return model


def ensure_experts(recipe: Recipe = Recipe(), lora: bool = True) -> Path:
    """Train whatever is missing from the cache; return the recipe's cache folder."""
    root = recipe_dir(recipe)
    base_path = base_checkpoint()
    tokenizer = load_tokenizer(base_path)
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1))
    kinds = [("full", full_expert, "model.safetensors")] + ([("lora", lora_expert, "adapter_model.safetensors")] if lora else [])
    for kind, make, weights in kinds:
        for name in TASK_NAMES:
            path = root / kind / name
            if (path / weights).exists():
                continue
            started = time.perf_counter()
            model = make(base_path, tokenizer, load_task(name), recipe)
            partial = path.with_name(path.name + ".partial")
            model.save_pretrained(partial)
            partial.rename(path)  # only a finished expert gets the final name
            logger.info("%s expert %s: %.0f s", kind, name, time.perf_counter() - started)
    return root


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    print(ensure_experts())
