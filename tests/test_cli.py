"""The `mergekit-wudi` command: methods, run, --version and --help (report: test_report.py).

`run` is checked against the real `mergekit-yaml`, bit for bit.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from models import load_model, write_config
from registry import METHODS
from runner import mergekit_wudi_cli, mergekit_yaml

import mergekit_wudi
from mergekit_wudi.solvers import DogeConfig, WudiCfsConfig, WudiConfig

# --- --version, --help --------------------------------------------------------------------


def test_version():
    result = mergekit_wudi_cli("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"mergekit-wudi, version {mergekit_wudi.__version__}"


@pytest.mark.parametrize("command", [[], ["methods"], ["run"], ["report"]])
def test_help_shows_examples(command):
    result = mergekit_wudi_cli(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output
    assert "mergekit-wudi " + (command[0] if command else "") in result.output


def test_run_help_has_every_mergekit_yaml_option():
    from mergekit.scripts.run_yaml import main as mergekit_yaml_command

    output = mergekit_wudi_cli("run", "--help").output
    options = [opt for param in mergekit_yaml_command.params for opt in param.opts if opt.startswith("-")]
    assert len(options) > 20
    missing = [opt for opt in options if opt not in output]
    assert not missing


# --- methods -------------------------------------------------------------------------------


def test_methods_json_lists_own_parameters_with_defaults():
    described = {item["name"]: item for item in json.loads(mergekit_wudi_cli("methods", "--format", "json").output)}
    assert list(described) == list(METHODS)
    # density: unset (None) so that a ties fallback keeps its own; the method's default is in its description.
    common = {"weight": 1.0, "lambda": 1.0, "calibrate": "none", "adapter_guard": True, "density": None,
              "equalize": None, "fallback": "task_arithmetic", "solve": True, "input_major": None}
    # Defaults from methods.md and the solver configs, independent of the spec.
    expected = {
        "wudi": {**common, "steps": WudiConfig().steps, "lr": WudiConfig().lr},
        "wudi_cfs": {**common, "omega": WudiCfsConfig().omega},
        "doge": {**common, "eta": DogeConfig().eta, "lr": DogeConfig().lr, "steps": DogeConfig().steps,
                 "density": None, "subspace": DogeConfig().subspace},
        "tsv": common,
        "iso_c": {**common, "calibrate": "first_order"},  # issue 23: the default strength of both iso methods
        "iso_cts": {**common, "calibrate": "first_order", "common_space_fraction": 0.8},  # config/method/iso_cts.yaml of the official code
    }
    assert expected["wudi"]["steps"] == 300 and expected["wudi"]["lr"] == 1e-5 and expected["wudi_cfs"]["omega"] == 0.1
    for name, parameters in expected.items():
        item = described[name]
        assert {p["name"]: p["default"] for p in item["parameters"]} == parameters
        assert all(p["description"] for p in item["parameters"])
        assert item["reference_url"].startswith("https://arxiv.org/abs/")
        # Pass-through parameters of other methods are summarised, not listed as ours.
        assert "epsilon" in item["fallback_parameters"] and "epsilon" not in parameters
    trims = {name: next(p["description"] for p in described[name]["parameters"] if p["name"] == "density")
             for name in ("wudi", "wudi_cfs", "tsv", "iso_c")}
    # issue 23: the trim before the solve, by default only of full fine-tunes merged with LoRA adapters
    assert "(default 0.3 for fine-tunes that look like full fine-tunes beside LoRA adapters, else 1;" in trims["wudi_cfs"]
    assert "(default 0.3 for fine-tunes that look like full" in trims["wudi"]
    assert "(default 0.3 for fine-tunes that look like full" in trims["tsv"]
    assert "(default 0.3 for fine-tunes that look like full" in trims["iso_c"]
    # issue 23: equal norms for adapters with a seed each, by default only for the methods that sum disjoint updates
    equal = {name: next(p["description"] for p in item["parameters"] if p["name"] == "equalize")
             for name, item in described.items()}
    for name in METHODS:
        auto = name in ("wudi", "wudi_cfs", "tsv", "ace")
        assert ("(default true for LoRA adapters with a seed each" in equal[name]) == auto, name
        assert equal[name].endswith("else false)" if auto else "(default false)"), name
    scopes = {p["name"]: p["scope"] for p in described["doge"]["parameters"]}
    assert scopes["weight"] == "per-model" and scopes["density"] == "per-model" and scopes["eta"] == "shared"
    scopes = {p["name"]: p["scope"] for p in described["iso_cts"]["parameters"]}
    assert scopes["weight"] == "per-model" and scopes["common_space_fraction"] == "shared"
    pretty = {name: (item["pretty_name"], item["reference_url"]) for name, item in described.items()}
    assert pretty["tsv"] == ("TSV-Merge", "https://arxiv.org/abs/2412.00081")
    assert pretty["iso_c"] == ("Iso-C", "https://arxiv.org/abs/2502.04959")
    assert pretty["iso_cts"] == ("Iso-CTS", "https://arxiv.org/abs/2502.04959")
    types = {p["name"]: p["type"] for p in described["wudi"]["parameters"]}
    assert types == {"weight": "float", "lambda": "float", "calibrate": "str", "adapter_guard": "bool", "density": "float or null",
                     "equalize": "bool or null", "fallback": "str", "solve": "bool", "input_major": "bool or null", "steps": "int", "lr": "float"}


def test_methods_text_and_markdown():
    text = mergekit_wudi_cli("methods", "wudi_cfs").output
    assert text.startswith("wudi_cfs: WUDI-Merging (closed form)")
    assert "omega" in text and "0.1" in text and "scale-free ridge" in text
    assert "passed to the fallback method" in text and "\n  epsilon" not in text
    assert "doge" not in text
    markdown = mergekit_wudi_cli("methods", "doge", "--format", "markdown").output
    assert "| `eta` | shared | float | 0.07 |" in markdown
    assert "\\|\\|t_i\\|\\|" in markdown  # pipes in a description do not break the table


def test_methods_unknown_name():
    result = mergekit_wudi_cli("methods", "wudy")
    assert result.exit_code == 2
    assert "wudy" in result.output and ", ".join(METHODS) in result.output


# --- run -----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_run_without_autoload_matches_mergekit_yaml(cfs_config, tmp_path):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", MERGEKIT_WUDI_NO_AUTOLOAD="1")
    # With autoload off, plain mergekit-yaml does not know the method...
    refused = mergekit_yaml(cfs_config, tmp_path / "refused", check=False, MERGEKIT_WUDI_NO_AUTOLOAD="1")
    assert refused.returncode != 0 and "wudi_cfs" in refused.stderr
    # ...and `mergekit-wudi run` does, with mergekit-yaml's own options.
    command = [sys.executable, "-m", "mergekit_wudi.cli", "run", str(cfs_config), str(tmp_path / "run"),
               "--no-copy-tokenizer", "--out-shard-size", "100K", "--quiet"]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    mergekit_yaml(cfs_config, tmp_path / "yaml", "--out-shard-size", "100K", "--quiet")
    shards = sorted(p.name for p in (tmp_path / "run").glob("*.safetensors"))
    assert len(shards) > 1  # --out-shard-size reached mergekit
    assert shards == sorted(p.name for p in (tmp_path / "yaml").glob("*.safetensors"))
    ours, reference = load_model(tmp_path / "run"), load_model(tmp_path / "yaml")
    assert ours.keys() == reference.keys()
    for name in reference:
        assert torch.equal(ours[name], reference[name]), name


def test_run_errors_are_one_line(family, tmp_path):
    missing = mergekit_wudi_cli("run", tmp_path / "nope.yml", tmp_path / "out")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: wudy\nmodels:\n  - model: a\n")
    result = mergekit_wudi_cli("run", bad, tmp_path / "out")
    assert result.exit_code == 1
    assert result.output.startswith("Error: config") and "unknown merge_method 'wudy'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    # A value our spec rejects while mergekit plans: one line too, and nothing written.
    base, *models = family
    negative = write_config(tmp_path / "neg.yml", "wudi", base, models, {"lr": -1.0})
    result = mergekit_wudi_cli("run", negative, tmp_path / "out", "--no-copy-tokenizer")
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: invalid value for parameter 'lr' of merge_method wudi: lr must be a finite number > 0, got -1.0"
    )
    assert not list((tmp_path / "out").glob("*.safetensors"))
