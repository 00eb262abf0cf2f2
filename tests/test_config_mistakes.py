"""Mistakes a user can make in the YAML: each fails before any tensor is written, with
one line that names the parameter and says what to change."""

import json

import pytest
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from models import make_family
from runner import mergekit_yaml

from mergekit_wudi.config_error import ConfigError

OPTIONS = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("family"), fine_tunes=2)


def config_for(family, method="wudi", parameters=None, model_parameters=None, models=None):
    base, *fine_tunes = family
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m)} for m in (fine_tunes if models is None else models)],
    }
    if parameters:
        config["parameters"] = parameters
    if model_parameters:
        config["models"][0]["parameters"] = model_parameters
    return config


CASES = [
    # (method, global parameters, first model's parameters, the one line)
    ("wudi", {"lr": -1.0}, None, "invalid value for parameter 'lr' of merge_method wudi: lr must be a finite number > 0, got -1.0"),
    ("wudi", {"steps": "many"}, None, "invalid value for parameter 'steps' of merge_method wudi: Input should be a valid integer, unable to parse string as an integer, got 'many'"),
    ("wudi_cfs", {"lambda": "big"}, None, "invalid value for parameter 'lambda' of merge_method wudi_cfs: Input should be a valid number, unable to parse string as a number, got 'big'"),
    ("doge", {"density": 1.5}, None, "invalid value for parameter 'density' of merge_method doge: density must be in (0, 1], got 1.5"),
    ("iso_cts", {"common_space_fraction": 1.5}, None, "invalid value for parameter 'common_space_fraction' of merge_method iso_cts: common_space_fraction must be in (0, 1], got 1.5"),
    ("iso_cts", {"common_fraction": 0.5}, None, "unknown parameter 'common_fraction' for merge_method iso_cts: did you mean 'common_space_fraction'?"),
    ("iso_c", {"common_space_fraction": 0.5}, None, "parameter 'common_space_fraction' belongs to merge_method iso_cts, not iso_c: remove it, or set merge_method: iso_cts"),
    ("tsv", {"lamda": 0.5}, None, "unknown parameter 'lamda' for merge_method tsv: did you mean 'lambda'?"),
    ("ace", {"k_frac": 1.5}, None, "invalid value for parameter 'k_frac' of merge_method ace: k_frac must be in [0, 1], got 1.5"),
    ("ace", {"eps": 0}, None, "invalid value for parameter 'eps' of merge_method ace: eps must be a finite number > 0, got 0"),
    ("ace", {"prior": "rows"}, None, "invalid value for parameter 'prior' of merge_method ace: prior must be one of row, mean, got 'rows'"),
    ("ace", {"k-frac": 0.5}, None, "unknown parameter 'k-frac' for merge_method ace: did you mean 'k_frac'?"),
    ("wudi", {"fallback": "tiez"}, None, "invalid value for parameter 'fallback' of merge_method wudi: fallback 'tiez' is not a registered merge method; did you mean 'ties'? use 'base' or one of: "),
    ("wudi", {"step": 50}, None, "unknown parameter 'step' for merge_method wudi: did you mean 'steps'?"),
    ("wudi", {"iterations": 50}, None, "unknown parameter 'iterations' for merge_method wudi: did you mean 'steps'?"),
    ("doge", {"lamda": 0.5}, None, "unknown parameter 'lamda' for merge_method doge: did you mean 'lambda'?"),
    ("wudi_cfs", {"omega_": 0.5}, None, "unknown parameter 'omega_' for merge_method wudi_cfs: did you mean 'omega'?"),
    ("wudi_cfs", {"fall_back": "ties"}, None, "unknown parameter 'fall_back' for merge_method wudi_cfs: did you mean 'fallback'?"),
    ("doge", None, {"densities": 0.5}, "unknown parameter 'densities' for merge_method doge: did you mean 'density'?"),
    ("wudi", {"omega": 0.5}, None, "parameter 'omega' belongs to merge_method wudi_cfs, not wudi: remove it, or set merge_method: wudi_cfs"),
    ("wudi_cfs", None, {"equalize": "yes please"}, "invalid value for parameter 'equalize' of merge_method wudi_cfs: Input should be a valid boolean, unable to interpret input, got 'yes please'"),
    ("tsv", {"equalise": True}, None, "unknown parameter 'equalise' for merge_method tsv: did you mean 'equalize'?"),
    # a per-model filter list, as in the YAML `- filter: q_proj` form
    ("wudi", None, {"learning_rate": [{"filter": "q_proj", "value": 1e-4}, {"value": 1e-5}]},
     "unknown parameter 'learning_rate' for merge_method wudi: did you mean 'lr'?"),
    # a gradient
    ("wudi", {"lr_rate": [1e-5, 2e-5]}, None, "unknown parameter 'lr_rate' for merge_method wudi: did you mean 'lr'?"),
]


@pytest.mark.parametrize("method, parameters, model_parameters, line", CASES)
def test_one_clear_line_at_plan_time(family, tmp_path, method, parameters, model_parameters, line):
    config = MergeConfiguration.model_validate(config_for(family, method, parameters, model_parameters))
    with pytest.raises(ConfigError) as error:
        run_merge(config, str(tmp_path / "out"), options=OPTIONS)
    assert str(error.value).startswith(line) and "\n" not in str(error.value)
    assert not list(tmp_path.glob("out/*.safetensors"))


def test_structure_errors(family, tmp_path):
    base = family[0]
    only_base = MergeConfiguration.model_validate(config_for(family, models=[base]))
    with pytest.raises(ConfigError, match=r"^merge_method wudi needs at least one model besides the base model .*: list the fine-tunes under models$"):
        run_merge(only_base, str(tmp_path / "a"), options=OPTIONS)
    no_base = config_for(family)
    del no_base["base_model"]
    with pytest.raises(ConfigError, match=r"^merge_method wudi needs a base model: set base_model to the model"):
        run_merge(MergeConfiguration.model_validate(no_base), str(tmp_path / "b"), options=OPTIONS)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "method, parameters, model_parameters, models, line",
    [
        ("wudi", {"lr": 0}, None, None, "invalid value for parameter 'lr' of merge_method wudi: lr must be a finite number > 0, got 0"),
        ("wudi", None, {"learning_rate": [{"filter": "q_proj", "value": 1e-4}]}, None, "unknown parameter 'learning_rate' for merge_method wudi: did you mean 'lr'?"),
        ("wudi", None, None, "base", "merge_method wudi needs at least one model besides the base model"),
        ("iso_cts", {"common_space_fraction": 1.5}, None, None,
         "invalid value for parameter 'common_space_fraction' of merge_method iso_cts: common_space_fraction must be in (0, 1], got 1.5"),
    ],
)
def test_through_mergekit_yaml(family, tmp_path, method, parameters, model_parameters, models, line):
    config = config_for(family, method, parameters, model_parameters, [family[0]] if models == "base" else None)
    (tmp_path / "cfg.yml").write_text(json.dumps(config))
    result = mergekit_yaml(tmp_path / "cfg.yml", tmp_path / "out", check=False)
    assert result.returncode != 0
    # The whole of stderr after mergekit's own log lines: one line, no traceback.
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {line}"), result.stderr[-2000:]
    assert not list(tmp_path.glob("out/*.safetensors"))


def test_fallback_parameters_pass(family, tmp_path):
    # ties' density and int8_mask, dare's rescale: real parameters of fallbacks, no trap.
    config = config_for(family, "wudi_cfs", {"fallback": "ties", "density": 0.5, "int8_mask": True, "normalize": False})
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "out"), options=OPTIONS)
    assert list(tmp_path.glob("out/*.safetensors"))
