"""SmolLM2-135M-Instruct experts, one per task and expert set, by fixed recipes, cached outside git.

Full experts: every weight trained except the token embeddings (tied to lm_head, so both stay
the base's), AdamW, loss on the answer tokens (and eos) only. LoRA experts: peft adapters on
every linear layer of the decoder, the base frozen, same data, same loss. Expert sets
(bench.plan.EXPERT_SETS):

- `full`, `full_seed1`: lr 1e-4, 150 steps of batch 16, 10 warmup steps; seeds 0 and 1.
- `lora` (conventional): rank 8, alpha = r = 8, lr 1e-3, 150 steps, a distinct seed per adapter
  (seed 100 + task index, set before `get_peft_model`, so the A matrices differ).
  `lora_seed1` to `lora_seed3`: the same with seed 1, 2, 3 (adapter seeds seed + 100 + task
  index), replicates.
- `lora_aggressive` (the recipe before issue 21): rank 8, alpha 16 (= 2r), lr 2e-3, 60 steps,
  one seed (0) for every adapter, so all of them start from the same A matrices.
  `lora_aggressive_seed1` to `lora_aggressive_seed3`: the same with seed 1, 2, 3 for every
  adapter, replicates.
- `mixed`: no training of its own: full experts (seed 0) on the even-indexed tasks, `lora`
  experts on the odd-indexed ones; `mixed_seed1` the same of `full_seed1` and `lora_seed1`.

Cache (bench.cache): <cache>/llm/base/ (the converted checkpoint), <set>-<key>/<task>/.

    OMP_WAIT_POLICY=PASSIVE BENCH_THREADS=1 nice -n 15 python benchmarks/llm/experts.py [SET...]
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.env  # noqa: E402, F401  (before torch loads)
import torch  # noqa: E402
from bench import cache  # noqa: E402
from bench.experts import BaseRecipe, ExpertSets, lora_seed, recipe_sets  # noqa: E402

from llm import convert  # noqa: E402
from llm.tasks import DATA_PACKAGES, TASK_NAMES, load_task, target  # noqa: E402

logger = logging.getLogger(__name__)

BENCH = "llm"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe(BaseRecipe):
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-4
    warmup: int = 10


RECIPES = recipe_sets(Recipe, lora={"lr": 1e-3}, aggressive={"lr": 2e-3, "lora_alpha": 16, "steps": 60})


def base_checkpoint() -> Path:
    """The converted base (float32 safetensors + tokenizer), made on first use."""
    path = cache.root(BENCH) / "base"
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
def generate(model, tokenizer, prompts, max_new_tokens: int = 4, batch_size: int = 64) -> tuple:
    """(greedy completions of `prompts`, decoded without special tokens; every logit finite)."""
    completions, finite = [], True
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, output_scores=True, return_dict_in_generate=True,
        )
        finite = finite and all(bool(torch.isfinite(s).all()) for s in out.scores)
        completions += tokenizer.batch_decode(out.sequences[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return completions, finite


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


def train(model, tokenizer, task, recipe: Recipe) -> list:
    """AdamW on the trainable parameters, linear warmup then constant lr; returns the losses."""
    torch.manual_seed(recipe.seed)
    order_generator = torch.Generator().manual_seed(recipe.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / recipe.warmup))
    model.train()
    order, losses = [], []
    for step in range(recipe.steps):
        if len(order) < recipe.batch_size:
            order += torch.randperm(len(task.train), generator=order_generator).tolist()
        index, order = order[: recipe.batch_size], order[recipe.batch_size :]
        loss = model(**encode_batch(tokenizer, [task.train[i] for i in index])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == recipe.steps - 1:
            logger.info("%s step %d loss %.4f", task.name, step, losses[-1])
    model.eval()
    return losses


def train_expert(recipe: Recipe, name: str, index: int, path: Path) -> None:
    """One expert: all weights but the (tied) embeddings, or LoRA adapters on every linear layer."""
    base = base_checkpoint()
    model = load_model(base)
    if recipe.kind == "full":
        model.get_input_embeddings().weight.requires_grad_(False)  # and lm_head, which is the same tensor
    else:
        import peft

        torch.manual_seed(lora_seed(recipe, index))
        config = peft.LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
        model = peft.get_peft_model(model, config)
    train(model, load_tokenizer(base), load_task(name), recipe)
    model.save_pretrained(path)


SETS = ExpertSets(BENCH, TASK_NAMES, lambda name: load_task(name).splits, DATA_PACKAGES, RECIPES, train_expert)


if __name__ == "__main__":
    SETS.main()
