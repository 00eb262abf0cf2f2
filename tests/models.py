"""Tiny model families for end-to-end tests: a base and fine-tunes with known deltas.

Linear weights get low-rank deltas (what fine-tuning produces); every other tensor
(norms, embeddings, lm_head) gets a small dense delta, so both paths are exercised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def llama_state_dict(generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """A random Llama state dict with the names and shapes transformers uses."""
    c = LLAMA_CONFIG
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = hidden // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=generator) * scale

    state = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        state[p + "self_attn.q_proj.weight"] = rand(hidden, hidden)
        state[p + "self_attn.k_proj.weight"] = rand(kv, hidden)
        state[p + "self_attn.v_proj.weight"] = rand(kv, hidden)
        state[p + "self_attn.o_proj.weight"] = rand(hidden, hidden)
        state[p + "mlp.gate_proj.weight"] = rand(inter, hidden)
        state[p + "mlp.up_proj.weight"] = rand(inter, hidden)
        state[p + "mlp.down_proj.weight"] = rand(hidden, inter)
        state[p + "input_layernorm.weight"] = 1 + rand(hidden, scale=0.01)
        state[p + "post_attention_layernorm.weight"] = 1 + rand(hidden, scale=0.01)
    state["model.norm.weight"] = 1 + rand(hidden, scale=0.01)
    return state


def is_llama_linear(name: str) -> bool:
    return name.endswith("_proj.weight")


def fine_tune(
    base: Dict[str, torch.Tensor], generator: torch.Generator, rank: int = 2, scale: float = 0.02
) -> Dict[str, torch.Tensor]:
    """Low-rank deltas on linear weights, small dense deltas elsewhere."""
    tuned = {}
    for name, tensor in base.items():
        if is_llama_linear(name):
            out_features, in_features = tensor.shape
            left = torch.randn(out_features, rank, generator=generator)
            right = torch.randn(rank, in_features, generator=generator)
            delta = left @ right * (scale / rank)
        else:
            delta = torch.randn(tensor.shape, generator=generator) * (scale / 4)
        tuned[name] = tensor + delta
    return tuned


def save_model(path: Path, state: Dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = dict(LLAMA_CONFIG, torch_dtype=str(dtype).replace("torch.", ""))
    (path / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def make_family(root: Path, fine_tunes: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32,
                rank: int = 2) -> List[Path]:
    """Save base + fine-tunes under root; return [base, ft1, ...] as absolute paths."""
    generator = torch.Generator().manual_seed(seed)
    base = llama_state_dict(generator)
    paths = [save_model(root / "base", base, dtype)]
    for index in range(fine_tunes):
        paths.append(save_model(root / f"ft{index + 1}", fine_tune(base, generator, rank=rank), dtype))
    return [p.resolve() for p in paths]


def make_one_seed_family(root: Path, fine_tunes: int = 3, seed: int = 5, modules: Tuple[str, ...] = ()) -> List[Path]:
    """Like make_family, but every fine-tune's linear delta is B_i A with one rank-2 A per tensor
    (orthonormal rows), shared by all fine-tunes: LoRA adapters trained from one seed, merged in.
    modules: only the linear weights whose name holds one of these (all where empty)."""
    generator = torch.Generator().manual_seed(seed)
    base = llama_state_dict(generator)
    shared = {name: torch.linalg.qr(torch.randn(t.shape[1], 2, generator=generator))[0].T
              for name, t in base.items() if is_llama_linear(name) and (not modules or any(m in name for m in modules))}
    paths = [save_model(root / "base", base)]
    for index in range(fine_tunes):
        tuned = {name: t + 0.02 * torch.randn(t.shape[0], 2, generator=generator) @ shared[name] if name in shared else t
                 for name, t in base.items()}
        paths.append(save_model(root / f"ft{index + 1}", tuned))
    return [p.resolve() for p in paths]


def make_seed_each_family(root: Path, fine_tunes: int = 3, seed: int = 6, rank: int = 8) -> List[Path]:
    """Like make_family, but every fine-tune's linear delta is B_i A_i of rank `rank` with its own
    random A_i (orthonormal rows) and B_i = Q C_i writing into one output space Q of that rank per
    tensor: LoRA adapters trained with a seed each, whose B's learned shared output directions,
    merged in."""
    generator = torch.Generator().manual_seed(seed)
    base = llama_state_dict(generator)
    outputs = {name: torch.linalg.qr(torch.randn(t.shape[0], rank, generator=generator))[0]
               for name, t in base.items() if is_llama_linear(name)}
    paths = [save_model(root / "base", base)]
    for index in range(fine_tunes):
        tuned = {}
        for name, t in base.items():
            if name in outputs:
                inputs = torch.linalg.qr(torch.randn(t.shape[1], rank, generator=generator))[0].T
                t = t + 0.02 * outputs[name] @ torch.randn(rank, rank, generator=generator) @ inputs
            tuned[name] = t
        paths.append(save_model(root / f"ft{index + 1}", tuned))
    return [p.resolve() for p in paths]


def make_mixed_family(root: Path, seed: int = 9, rank: int = 8) -> List[Path]:
    """Base, two full-fine-tune lookalikes and two adapters with a seed each (make_seed_each_family's
    kind). The full ones' deltas read one shared random input space and write one shared output
    space (of the adapters' rank), plus small dense changes: input overlap far above chance, not far above
    their output overlap, as full fine-tunes measure on the benchmarks (guard.py)."""
    generator = torch.Generator().manual_seed(seed)
    base = llama_state_dict(generator)
    linear = [name for name, t in base.items() if is_llama_linear(name)]
    spaces = {name: [torch.linalg.qr(torch.randn(size, rank, generator=generator))[0] for size in base[name].shape]
              for name in linear}  # (output space, input space) of the full ones
    adapter_outputs = {name: torch.linalg.qr(torch.randn(base[name].shape[0], rank, generator=generator))[0] for name in linear}
    paths = [save_model(root / "base", base)]
    for index in range(2):
        tuned = dict(base)
        for name in linear:
            out_space, in_space = spaces[name]
            core = torch.randn(rank, rank, generator=generator)
            dense = torch.randn(base[name].shape, generator=generator) * 2e-5
            tuned[name] = base[name] + 0.02 * out_space @ core @ in_space.T / rank + dense
        paths.append(save_model(root / f"full{index + 1}", tuned))
    for index in range(2):
        tuned = dict(base)
        for name in linear:
            inputs = torch.linalg.qr(torch.randn(base[name].shape[1], rank, generator=generator))[0].T
            tuned[name] = base[name] + 0.02 * adapter_outputs[name] @ torch.randn(rank, rank, generator=generator) @ inputs
        paths.append(save_model(root / f"lora{index + 1}", tuned))
    return [p.resolve() for p in paths]


def load_model(path: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint."""
    tensors: Dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def write_config(path: Path, method: str, base: Path, models: List[Path], parameters: Optional[dict] = None,
                 model_parameters: Optional[List[dict]] = None, dtype: Optional[str] = None) -> Path:
    """A mergekit YAML (JSON is valid YAML) with absolute local paths."""
    config: dict = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(m), **({"parameters": p} if p else {})}
            for m, p in zip(models, model_parameters or [None] * len(models))
        ],
    }
    if parameters:
        config["parameters"] = parameters
    if dtype:
        config["dtype"] = dtype
    path.write_text(json.dumps(config, indent=1))
    return path
