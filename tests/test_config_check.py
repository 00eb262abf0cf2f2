"""config_check.py: whole-configuration checks before mergekit runs."""

import json

import pytest
from mergekit.config import MergeConfiguration
from models import write_config

from mergekit_wudi.config_check import check_config_keys, check_merge_method, load_config
from mergekit_wudi.config_error import ConfigError


def configuration(family, tmp_path, method="wudi", parameters=None, model_parameters=None):
    base, *models = family
    path = write_config(tmp_path / "c.yml", method, base, models, parameters, model_parameters)
    return MergeConfiguration.model_validate(json.loads(path.read_text()))


def test_declared_keys_pass(family, tmp_path):
    check_config_keys(configuration(family, tmp_path, "doge", {"eta": 0.1, "fallback": "ties"}, [{"density": 0.5}] * 3))


@pytest.mark.parametrize(
    "parameters, model_parameters, message",
    [
        ({"stepz": 5}, None, "unknown parameter 'stepz' in parameters for merge_method wudi: did you mean 'steps'?"),
        ({"colour": 1}, None, "unknown parameter 'colour' in parameters for merge_method wudi: the parameters are: "),
        (None, [{"steps": 5}, {}, {}], "parameter 'steps' in models[0] "),
    ],
)
def test_ignored_keys_are_one_config_error(family, tmp_path, parameters, model_parameters, message):
    with pytest.raises(ConfigError) as error:
        check_config_keys(configuration(family, tmp_path, "wudi", parameters, model_parameters))
    assert str(error.value).startswith(message)


def test_other_methods_are_left_alone(family, tmp_path):
    check_config_keys(configuration(family, tmp_path, "task_arithmetic", {"colour": 1}))


def test_load_config_failures_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "missing.yml"))
    (tmp_path / "bad.yml").write_text("models: [")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(tmp_path / "bad.yml"))
    (tmp_path / "wrong.yml").write_text("merge_method: wudi\nmodels: 3\n")
    with pytest.raises(ConfigError, match="is not a valid mergekit config"):
        load_config(str(tmp_path / "wrong.yml"))


def test_check_merge_method(family, tmp_path):
    check_merge_method(configuration(family, tmp_path, "wudi_cfs"), "c.yml")
    with pytest.raises(ConfigError, match="config 'c.yml': unknown merge_method 'wudy'; registered: "):
        check_merge_method(configuration(family, tmp_path, "wudy"), "c.yml")
