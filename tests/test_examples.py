"""Every recipe in examples/ loads with mergekit's own config model and resolves with our specs."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mergekit.config import ConfigReader, MergeConfiguration
from mergekit.merge_methods import registry
from mergekit.parameter_resolver import resolve_parameters

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TENSORS = ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "h.0.attn.c_proj.weight"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yml")), ids=lambda p: p.name)
def test_recipe_is_valid(path):
    config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
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
        assert shared["fallback"] in ("task_arithmetic", "ties")
        if path.name == "wudi_filters.yml":
            assert shared["solve"] is ("down_proj" not in tensor)
            assert shared["lambda"] == pytest.approx(1.0)  # the middle of the gradient


def test_demo_writes_configs_that_mergekit_accepts(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "demo.py"), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for method in ("wudi", "wudi_cfs", "doge"):
        config = MergeConfiguration.model_validate(yaml.safe_load((tmp_path / f"{method}.yml").read_text()))
        assert config.merge_method == method and len(config.models) == 3
