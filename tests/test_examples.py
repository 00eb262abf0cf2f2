"""Every recipe in examples/ loads with mergekit's own config model and resolves with our specs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mergekit.config import ConfigReader, MergeConfiguration
from mergekit.merge_methods import registry
from mergekit.parameter_resolver import resolve_parameters
from registry import METHODS

from mergekit_wudi.config_check import check_config_keys
from mergekit_wudi.config_error import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TENSORS = ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "h.0.attn.c_proj.weight"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yml")), ids=lambda p: p.name)
def test_recipe_is_valid(path):
    config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    check_config_keys(config)  # every key is a parameter of the method, in a block where mergekit reads it
    method = registry.get(config.merge_method)
    reader = ConfigReader(config=config, t=0.5)
    for tensor in TENSORS:
        shared, per_model = resolve_parameters(
            method.spec,
            tensor_name=tensor,
            inputs={m.model: tensor for m in config.models},
            sources=reader.parameter_sources,
            base_model=config.base_model,
            t=0.5,
        )
        assert shared["fallback"] in ("task_arithmetic", "ties", "base")
        if any(m.model.lora is not None for m in config.models):  # adapters: lambda left to adapter_guard
            assert shared["lambda"] == 1.0 and shared["adapter_guard"] is True
        if path.name == "wudi_filters.yml":
            assert shared["solve"] is ("down_proj" not in tensor)
            assert shared["lambda"] == pytest.approx(1.0)  # the middle of the gradient
        if config.merge_method != "doge":
            # a density set for every tensor would trim the solved ones too, not only reach the
            # fallback (wudi_filters.yml scopes its density by filter: test_e2e checks it merged)
            for block, parameters in [("parameters", config.parameters)] + [(m.model, m.parameters) for m in config.models]:
                density = (parameters or {}).get("density")
                assert density is None or isinstance(density, list), (path.name, block)


def test_recipes_cover_the_documented_cases():
    configs = {p.name: MergeConfiguration.model_validate(yaml.safe_load(p.read_text())) for p in EXAMPLES.glob("*.yml")}
    methods = {c.merge_method for c in configs.values()}
    assert methods == set(METHODS)  # a recipe per method
    families = {"llama": False, "mistral": False, "qwen": False}
    for config in configs.values():
        for family in families:
            families[family] |= family in str(config.base_model).lower()
    assert all(families.values()), families
    assert {len(c.models) for c in configs.values() if c.merge_method == "wudi"} >= {2, 3, 4}
    lora = [m.model for c in configs.values() for m in c.models if m.model.lora is not None]
    assert lora and all(str(m).count("+") == 1 for m in lora)


@pytest.mark.parametrize(
    "block, key, message",
    [
        ("global", "step", "unknown parameter 'step' in parameters for merge_method wudi: did you mean 'steps'?"),
        ("model", "learning_rate", "unknown parameter 'learning_rate' in models[0]"),
        ("model", "steps", "parameter 'steps' in models[0] (org/llama-3.1-8b-math) parameters is shared"),
        ("global", "colour", "the parameters are: "),
    ],
)
def test_key_check_rejects_what_mergekit_would_ignore(block, key, message):
    raw = yaml.safe_load((EXAMPLES / "wudi.yml").read_text())
    target = raw["parameters"] if block == "global" else raw["models"][0].setdefault("parameters", {})
    target[key] = 3
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config_keys(MergeConfiguration.model_validate(raw))


def test_demo_writes_configs_that_mergekit_accepts(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "demo.py"), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for method in METHODS:
        config = MergeConfiguration.model_validate(yaml.safe_load((tmp_path / f"{method}.yml").read_text()))
        assert config.merge_method == method and len(config.models) == 3
