"""benchmarks/llm: the task formats, the exact-match scorer, the GGUF
conversion core and a merge of a tied-embedding Llama that plain transformers loads and runs.

No training and no real model: tiny transformers models built here.
"""

import json
import re

import pytest
import torch
import yaml
from llm import convert, tasks
from runner import mergekit_yaml


@pytest.fixture(scope="module")
def loaded():
    return {name: tasks.load_task(name) for name in tasks.TASK_NAMES}


def test_answers_are_well_formed(loaded):
    for task in loaded.values():
        for example in task.train + task.validation + task.test:
            assert example.prompt.endswith("\nAnswer:") and "\n" not in example.prompt[: -len("\nAnswer:")]
            assert example.answer and example.answer == example.answer.strip() and "\n" not in example.answer
            assert re.fullmatch(tasks.ANSWER_FORMAT[task.name], example.answer), (task.name, example.answer)
    for e in loaded["sentiment"].test:
        assert e.answer in {"positive", "negative"}
    assert {e.answer for e in loaded["surname"].train} == {"German", "French", "Italian", "Spanish"}
    for e in loaded["last_letter"].test:
        word = re.search(r"'(\w+)'", e.prompt).group(1)
        assert e.answer == word[-1] and len(e.answer) == 1
    for e in loaded["addition"].test:
        a, b = map(int, re.findall(r"\d+", e.prompt))
        assert int(e.answer) == a + b


def test_sentiment_labels_follow_the_afinn_score():
    items = {(i.text, i.label) for i in tasks._sentiment_items()}
    assert ("Is the word 'good' positive or negative?", "positive") in items
    assert ("Is the word 'bad' positive or negative?", "negative") in items


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.load_task("nope")


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        (" positive", "positive", True),
        (" positive\nIs the word", "positive", True),
        ("positive ", "positive", True),
        (" Positive", "positive", False),
        (" positive.", "positive", False),
        (" 41", "41", True),
        (" 412", "41", False),
        ("", "41", False),
        ("\n41", "41", True),
    ],
)
def test_exact_match(completion, answer, expected):
    assert tasks.exact_match(completion, answer) is expected


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def test_plain_copy_drops_quantization_config_and_keeps_weights_and_tying(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves on the config
    convert.save_plain(model, None, tmp_path / "out")

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.tensor([[1, 5, 7, 9]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_plain_copy_refuses_a_state_dict_that_does_not_fit():
    model = tiny_llama()
    original = model.state_dict

    model.state_dict = lambda: {**original(), "model.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected \\['model.extra.weight'\\]"):
        convert.plain_copy(model)


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["wudi", "wudi_cfs", "doge"])
def test_merged_tied_llama_loads_with_transformers_and_generates(tmp_path, method):
    """A base and two fine-tunes that, like the benchmark's experts, keep the tied embedding table
    frozen: the merge keeps that table, writes no separate lm_head, and generates."""
    from transformers import AutoModelForCausalLM

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    generator = torch.Generator().manual_seed(1)
    for index in range(2):
        tuned = tiny_llama()
        with torch.no_grad():
            for name, parameter in tuned.named_parameters():
                if "embed" not in name:
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
        tuned.save_pretrained(tmp_path / f"ft{index}")
    config = {
        "merge_method": method,
        "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / f"ft{i}")} for i in range(2)],
        "parameters": {"steps": 5} if method != "wudi_cfs" else {},
        "dtype": "float32",
    }
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    mergekit_yaml(tmp_path / "c.yml", tmp_path / "out", "--random-seed", "0")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])  # the solve did move the linear weights
    out = merged.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert out.shape[1] > 3 and torch.isfinite(merged(out).logits).all()
