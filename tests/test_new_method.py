"""A new method is one Solver subclass and one registration: a toy method defined here gets
its spec, YAML checks, `mergekit-wudi methods` entry, merges, report, cache key and progress
bar with no other edit (CONTRIBUTING.md, "A new merge method")."""

import re
from dataclasses import dataclass

import pytest
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.registry import _METHODS
from models import is_llama_linear, load_model, write_config
from runner import mergekit_wudi_cli, mergekit_yaml_in_process

from mergekit_wudi.solvers.base import Solver
from mergekit_wudi.solvers.checks import check_config, check_positive, config_field


# --- the whole method ------------------------------------------------------------------
@dataclass(frozen=True)
class ToyConfig:
    mean_scale: float = config_field(0.5, check_positive, "multiplies the mean task vector")

    def __post_init__(self):
        check_config(self)


class ToySolver(Solver, name="toy_mean", pretty_name="Toy mean", paper="https://example.org/toy", config=ToyConfig):
    """t_m = mean_scale * mean_i t_i."""

    def _solve(self, prepared):
        return prepared.vectors.mean(dim=0).mul_(self.config.mean_scale)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    from mergekit_wudi import adapter, add_method

    method = add_method(ToySolver)  # the one place a method is registered
    yield method
    adapter.MERGE_METHODS.remove(method)
    _METHODS.pop(ToySolver.name, None)


def toy_config(family, path, **parameters):
    base, *models = family
    return write_config(path, "toy_mean", base, models, {"lambda": 0.8, **parameters}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}])


def test_spec_and_listing(toy):
    spec = registry.get("toy_mean").spec
    parameters = {p.name: p.default for p in spec.parameters if p.name in ("mean_scale", "lambda", "fallback", "weight")}
    assert parameters == {"mean_scale": 0.5, "lambda": 1.0, "fallback": "task_arithmetic", "weight": 1.0}
    assert spec.pretty_name == "Toy mean"
    listing = mergekit_wudi_cli("methods", "toy_mean").output
    assert listing.startswith("toy_mean: Toy mean") and "multiplies the mean task vector" in listing


@pytest.mark.e2e
def test_merge_cache_and_progress(toy, family, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_WUDI_CACHE", str(tmp_path / "cache"))
    result = mergekit_yaml_in_process(toy_config(family, tmp_path / "toy.yml", mean_scale=2.0), tmp_path / "out")
    assert re.search(r"toy_mean solve: 100%.*14/14", result.output + getattr(result, "stderr", ""))
    base, *models = [load_model(p) for p in family]
    merged = load_model(tmp_path / "out")
    weights = [1.0, 0.5, 2.0]
    for name in base:
        deltas = [w * (m[name].double() - base[name].double()) for w, m in zip(weights, models)]
        if is_llama_linear(name):  # by hand: W0 + 0.8 * 2.0 * mean_i t_i
            expected = base[name].double() + 0.8 * 2.0 * sum(deltas) / 3
        else:  # the fallback, task_arithmetic: W0 + 0.8 * sum_i t_i
            expected = base[name].double() + 0.8 * sum(deltas)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6)
    entries = sorted((tmp_path / "cache" / "toy_mean").glob("*.safetensors"))
    assert len(entries) == 14
    mergekit_yaml_in_process(toy_config(family, tmp_path / "toy3.yml", mean_scale=3.0), tmp_path / "out3")
    assert len(list((tmp_path / "cache" / "toy_mean").glob("*.safetensors"))) == 28  # mean_scale is in the key


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"mean_scale": -1}, "invalid value for parameter 'mean_scale' of merge_method toy_mean: mean_scale must be a finite number > 0"),
        ({"mean-scale": 2}, "unknown parameter 'mean-scale' for merge_method toy_mean: did you mean 'mean_scale'?"),
        ({"omega": 2}, "parameter 'omega' belongs to merge_method wudi_cfs, not toy_mean"),
    ],
)
def test_yaml_checks(toy, family, tmp_path, parameters, message):
    result = mergekit_yaml_in_process(toy_config(family, tmp_path / "bad.yml", **parameters), tmp_path / "out", check=False)
    assert message in str(result.exception)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_report(toy, family, tmp_path):
    result = mergekit_wudi_cli("report", toy_config(family, tmp_path / "toy.yml"), "--out", tmp_path / "rep", "--quiet", "--no-plots")
    assert result.exit_code == 0, result.output
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "toy_mean" in report and report.count("model.layers.") >= 14
