"""BERT (`BertModel`, the sentence-transformers layout) through the real `mergekit-yaml`.

mergekit 0.1.5's bundled bert.json cannot be planned (an optional weight with aliases);
mergekit_wudi.architectures registers a repaired copy. A tiny BertModel family built here
is merged with wudi: linear tensors against the float64 reference, every other tensor
(embeddings, LayerNorms, biases, the int64 position_ids buffer) against a plain
task_arithmetic run of the same YAML.
"""

import json
from pathlib import Path

import pytest
import torch
from models import load_model, write_config
from reference import wudi_adam
from runner import mergekit_yaml
from safetensors.torch import save_file

pytestmark = pytest.mark.e2e

BERT_CONFIG = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 96,
    "max_position_embeddings": 40,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}
WEIGHTS = [1.0, 0.8]
LAMBDA = 0.9


def is_bert_linear(name: str) -> bool:
    return name.endswith(".weight") and any(
        part in name for part in ("attention.self.", "attention.output.dense", "intermediate.dense", "output.dense", "pooler.dense")
    )


def bert_state(generator: torch.Generator) -> dict:
    """A random BertModel state dict with transformers' names, plus the position_ids buffer real checkpoints carry."""
    c = BERT_CONFIG
    hidden, inter = c["hidden_size"], c["intermediate_size"]

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=generator) * scale

    state = {
        "embeddings.word_embeddings.weight": rand(c["vocab_size"], hidden),
        "embeddings.position_embeddings.weight": rand(c["max_position_embeddings"], hidden),
        "embeddings.token_type_embeddings.weight": rand(c["type_vocab_size"], hidden),
        "embeddings.LayerNorm.weight": 1 + rand(hidden, scale=0.01),
        "embeddings.LayerNorm.bias": rand(hidden, scale=0.01),
        "embeddings.position_ids": torch.arange(c["max_position_embeddings"]).unsqueeze(0),
        "pooler.dense.weight": rand(hidden, hidden),
        "pooler.dense.bias": rand(hidden, scale=0.01),
    }
    for layer in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        for name, shape in (
            ("attention.self.query", (hidden, hidden)),
            ("attention.self.key", (hidden, hidden)),
            ("attention.self.value", (hidden, hidden)),
            ("attention.output.dense", (hidden, hidden)),
            ("intermediate.dense", (inter, hidden)),
            ("output.dense", (hidden, inter)),
        ):
            state[p + name + ".weight"] = rand(*shape)
            state[p + name + ".bias"] = rand(shape[0], scale=0.01)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            state[p + norm + ".weight"] = 1 + rand(hidden, scale=0.01)
            state[p + norm + ".bias"] = rand(hidden, scale=0.01)
    return state


def fine_tune(base: dict, generator: torch.Generator) -> dict:
    """Rank-2 deltas on linear weights, small dense deltas elsewhere, position_ids untouched."""
    tuned = {}
    for name, tensor in base.items():
        if tensor.dtype == torch.int64:
            tuned[name] = tensor.clone()
        elif is_bert_linear(name):
            out_features, in_features = tensor.shape
            left = torch.randn(out_features, 2, generator=generator)
            right = torch.randn(2, in_features, generator=generator)
            tuned[name] = tensor + 0.01 * left @ right
        else:
            tuned[name] = tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
    return tuned


def save_bert(path: Path, state: dict) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(BERT_CONFIG, indent=1))
    return path.resolve()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    generator = torch.Generator().manual_seed(0)
    base = bert_state(generator)
    paths = [save_bert(root / "base", base)]
    paths += [save_bert(root / f"ft{i}", fine_tune(base, generator)) for i in (1, 2)]
    return paths


def merge(family, root: Path, method: str) -> Path:
    base, *models = family
    config = write_config(root / f"{method}.yml", method, base, models, {"lambda": LAMBDA}, [{"weight": w} for w in WEIGHTS])
    mergekit_yaml(config, root / "out")
    return root / "out"


@pytest.fixture(scope="module")
def wudi_out(family, tmp_path_factory):
    return merge(family, tmp_path_factory.mktemp("wudi"), "wudi")


def test_wudi_merges_bert(family, wudi_out, tmp_path):
    merged = load_model(wudi_out)
    plain = load_model(merge(family, tmp_path, "task_arithmetic"))
    base, *models = [load_model(p) for p in family]
    assert merged.keys() == base.keys() == plain.keys()

    linear = [name for name in merged if is_bert_linear(name)]
    assert len(linear) == 6 * BERT_CONFIG["num_hidden_layers"] + 1  # + pooler.dense
    for name in linear:
        w0 = base[name].double()
        task_vectors = torch.stack([w * (m[name].double() - w0) for w, m in zip(WEIGHTS, models)])  # (2, out, in)
        expected = w0 + LAMBDA * wudi_adam(task_vectors)
        change = (expected - w0).norm()
        # float32 solver against the float64 reference, relative to the size of the update
        assert (merged[name].double() - expected).norm() / change < 1e-4, name
        assert (merged[name].double() - plain[name].double()).norm() > 1e-2 * change, f"{name} is task arithmetic"

    for name in merged.keys() - set(linear):
        assert torch.equal(merged[name], plain[name]), name
    assert merged["embeddings.position_ids"].dtype == torch.int64
    assert torch.equal(merged["embeddings.position_ids"], base["embeddings.position_ids"])


def test_merged_bert_loads_in_transformers(wudi_out):
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel.from_pretrained(wudi_out)
    hidden = model(input_ids=torch.tensor([[1, 5, 7, 2]])).last_hidden_state
    assert hidden.shape == (1, 4, BERT_CONFIG["hidden_size"]) and torch.isfinite(hidden).all()


def test_bundled_bert_definition_fails_without_the_repair(family, tmp_path):
    """Why the repair exists: with the package's hook off, mergekit 0.1.5 cannot plan a BertModel merge."""
    base, *models = family
    config = write_config(tmp_path / "ta.yml", "task_arithmetic", base, models, model_parameters=[{"weight": 1.0}] * 2)
    result = mergekit_yaml(config, tmp_path / "out", check=False, MERGEKIT_WUDI_NO_AUTOLOAD="1")
    if result.returncode == 0:
        pytest.skip("this mergekit plans BertModel merges by itself; the repair is no longer needed")
    assert "can only concatenate list (not \"tuple\") to list" in result.stderr


@pytest.mark.parametrize("method", ["wudi", "wudi_cfs", "doge"])
def test_a_buffer_only_the_base_has_is_kept_like_task_arithmetic(family, tmp_path, method):
    """transformers 5 saves fine-tunes without `position_ids`, the packaged base has it: the
    tensor that only the base holds goes to the fallback (task_arithmetic keeps the base's)."""
    base, *models = family
    stripped = []
    for index, path in enumerate(models):
        state = {k: v for k, v in load_model(path).items() if k != "embeddings.position_ids"}
        stripped.append(save_bert(tmp_path / f"ft{index}", state))
    parameters = {"lambda": LAMBDA, **({"steps": 5} if method != "wudi_cfs" else {})}
    weights = [{"weight": w} for w in WEIGHTS]
    config = write_config(tmp_path / "m.yml", method, base, stripped, parameters, weights)
    mergekit_yaml(config, tmp_path / "out")
    plain = write_config(tmp_path / "ta.yml", "task_arithmetic", base, stripped, {"lambda": LAMBDA}, weights)
    mergekit_yaml(plain, tmp_path / "ta")
    merged, expected = load_model(tmp_path / "out"), load_model(tmp_path / "ta")
    assert torch.equal(merged["embeddings.position_ids"], load_model(base)["embeddings.position_ids"])
    for name in merged.keys() - {n for n in merged if is_bert_linear(n)}:
        assert torch.equal(merged[name], expected[name]), name
