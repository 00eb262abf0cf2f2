"""The `mergekit-wudi` command: methods, run, report, --version and --help.

`report` numbers are checked against float64 computations done here from the saved
checkpoints (tests/reference.py), `run` against the real `mergekit-yaml`, bit for bit.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from models import LLAMA_CONFIG, is_llama_linear, load_model, make_family, write_config
from reference import doge, usable, wudi_adam, wudi_closed_form, wudi_loss
from runner import mergekit_yaml

import mergekit_wudi
from mergekit_wudi.cli import main
from mergekit_wudi.solvers import DogeConfig, WudiCfsConfig, WudiConfig

LAYERS = LLAMA_CONFIG["num_hidden_layers"]
# ft3's weight is a gradient over the layers: mergekit interpolates it (t = layer / (LAYERS - 1)).
MODEL_PARAMETERS = [{"weight": 1.0}, {"weight": 0.5}, {"weight": [1.0, 0.2]}]


def model_weights(layer: int):
    t = layer / (LAYERS - 1) if LAYERS > 1 else 1.0
    return [1.0, 0.5, 1.0 + (0.2 - 1.0) * t]


@pytest.fixture(scope="module")
def cfs_config(family, tmp_path_factory):
    base, *models = family
    root = tmp_path_factory.mktemp("cfs")
    return write_config(root / "cfs.yml", "wudi_cfs", base, models, {"omega": 0.2, "lambda": 0.9}, MODEL_PARAMETERS)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def task_vectors(family, name: str, weights) -> torch.Tensor:
    base, *models = [load_model(p)[name].double() for p in family]
    return torch.stack([w * (m - base) for w, m in zip(weights, models)])  # (N, out, in)


def effective_rank64(matrix: torch.Tensor) -> float:
    s = torch.linalg.svdvals(matrix.double())
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-float((p * p.log()).sum()))


# --- --version, --help --------------------------------------------------------------------


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"mergekit-wudi, version {mergekit_wudi.__version__}"


@pytest.mark.parametrize("command", [[], ["methods"], ["run"], ["report"]])
def test_help_shows_examples(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output
    assert "mergekit-wudi " + (command[0] if command else "") in result.output


def test_run_help_has_every_mergekit_yaml_option():
    from mergekit.scripts.run_yaml import main as mergekit_yaml_command

    output = invoke("run", "--help").output
    options = [opt for param in mergekit_yaml_command.params for opt in param.opts if opt.startswith("-")]
    assert len(options) > 20
    missing = [opt for opt in options if opt not in output]
    assert not missing


# --- methods -------------------------------------------------------------------------------


def test_methods_json_lists_own_parameters_with_defaults():
    described = {item["name"]: item for item in json.loads(invoke("methods", "--format", "json").output)}
    assert list(described) == ["wudi", "wudi_cfs", "doge"]
    common = {"weight": 1.0, "lambda": 1.0, "fallback": "task_arithmetic", "solve": True, "input_major": None}
    # Defaults from methods.md and the solver configs, independent of the spec.
    expected = {
        "wudi": {**common, "steps": WudiConfig().steps, "lr": WudiConfig().lr},
        "wudi_cfs": {**common, "omega": WudiCfsConfig().omega},
        "doge": {**common, "eta": DogeConfig().eta, "lr": DogeConfig().lr, "steps": DogeConfig().steps,
                 "density": None, "subspace": DogeConfig().subspace},
    }
    assert expected["wudi"]["steps"] == 300 and expected["wudi"]["lr"] == 1e-5 and expected["wudi_cfs"]["omega"] == 0.1
    for name, parameters in expected.items():
        item = described[name]
        assert {p["name"]: p["default"] for p in item["parameters"]} == parameters
        assert all(p["description"] for p in item["parameters"])
        assert item["reference_url"].startswith("https://arxiv.org/abs/")
        # Pass-through parameters of other methods are summarised, not listed as ours.
        assert "epsilon" in item["fallback_parameters"] and "epsilon" not in parameters
    scopes = {p["name"]: p["scope"] for p in described["doge"]["parameters"]}
    assert scopes["weight"] == "per-model" and scopes["density"] == "per-model" and scopes["eta"] == "shared"
    types = {p["name"]: p["type"] for p in described["wudi"]["parameters"]}
    assert types == {"weight": "float", "lambda": "float", "fallback": "str", "solve": "bool",
                     "input_major": "bool or null", "steps": "int", "lr": "float"}


def test_methods_text_and_markdown():
    text = invoke("methods", "wudi_cfs").output
    assert text.startswith("wudi_cfs: WUDI-Merging (closed form)")
    assert "omega" in text and "0.1" in text and "scale-free ridge" in text
    assert "passed to the fallback method" in text and "\n  epsilon" not in text
    assert "doge" not in text
    markdown = invoke("methods", "doge", "--format", "markdown").output
    assert "| `eta` | shared | float | 0.07 |" in markdown
    assert "\\|\\|t_i\\|\\|" in markdown  # pipes in a description do not break the table


def test_methods_unknown_name():
    result = invoke("methods", "wudy")
    assert result.exit_code == 2
    assert "wudy" in result.output and "wudi, wudi_cfs, doge" in result.output


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
    missing = invoke("run", tmp_path / "nope.yml", tmp_path / "out")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: wudy\nmodels:\n  - model: a\n")
    result = invoke("run", bad, tmp_path / "out")
    assert result.exit_code == 1
    assert result.output.startswith("Error: config") and "unknown merge_method 'wudy'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    # A value our spec rejects while mergekit plans: one line too, and nothing written.
    base, *models = family
    negative = write_config(tmp_path / "neg.yml", "wudi", base, models, {"lr": -1.0})
    result = invoke("run", negative, tmp_path / "out", "--no-copy-tokenizer")
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: invalid value for parameter 'lr' of merge_method wudi: lr must be a finite number > 0, got -1.0"
    )
    assert not list((tmp_path / "out").glob("*.safetensors"))


# --- report --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfs_report(cfs_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = invoke("report", cfs_config, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_report_matches_float64_reference(family, cfs_report):
    rows = read_csv(cfs_report / "report.csv")
    names = list(dict.fromkeys(row["name"] for row in rows))
    linear = [name for name in load_model(family[0]) if is_llama_linear(name)]
    assert sorted(names) == sorted(linear)  # every linear weight, nothing else
    for name in names:
        tensor_rows = [row for row in rows if row["name"] == name]
        layer = int(tensor_rows[0]["layer"])
        tv = task_vectors(family, name, model_weights(layer))
        tasks = usable(tv)
        ta = float(wudi_loss(0.9 * tv.sum(0), tasks))  # lambda 0.9 scales both merged vectors
        solved = float(wudi_loss(0.9 * wudi_closed_form(tv, 0.2), tasks))
        assert solved < 0.95 * ta  # 5% apart, beyond the 2% tolerance below: a report of ta would fail
        assert [row["model"] for row in tensor_rows] == [str(p) for p in family[1:]]
        for row, t in zip(tensor_rows, tv):
            assert row["shape"] == "x".join(map(str, t.shape)) and row["n"] == "3" and float(row["lambda"]) == 0.9
            assert float(row["norm"]) == pytest.approx(float(t.norm()), rel=1e-5)
            assert float(row["effective_rank"]) == pytest.approx(effective_rank64(t), rel=1e-3)
            # float32 relative to float64: the losses are differences of nearby quantities.
            assert float(row["objective_task_arithmetic"]) == pytest.approx(ta, rel=1e-4)
            assert float(row["objective_solved"]) == pytest.approx(solved, rel=2e-2, abs=1e-4 * ta)
            assert float(row["ratio"]) == pytest.approx(float(row["objective_solved"]) / ta, rel=1e-4)


def test_report_markdown_and_plots(cfs_report):
    markdown = (cfs_report / "report.md").read_text()
    assert markdown.startswith("# Interference report: `wudi_cfs`")
    assert "| `model.layers.1.mlp.down_proj.weight` | 64x96 | 3 |" in markdown
    plots = sorted(p.name for p in (cfs_report / "plots").iterdir())
    assert plots == [f"layer_{i:03d}.png" for i in range(LAYERS)]
    assert all((cfs_report / "plots" / p).read_bytes().startswith(b"\x89PNG") for p in plots)


def test_report_bf16_wudi(tmp_path):
    family = make_family(tmp_path / "bf16", fine_tunes=2, seed=3, dtype=torch.bfloat16)
    base, *models = family
    config = write_config(tmp_path / "wudi.yml", "wudi", base, models, {"steps": 25, "lr": 1e-3})
    result = invoke("report", config, "--out", tmp_path / "out", "--filter", r"layers\.0\.(mlp|self_attn\.o)",
                    "--no-plots", "--quiet")
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out" / "report.csv")
    names = sorted({row["name"] for row in rows})
    assert names == sorted(f"model.layers.0.{m}.weight" for m in ("mlp.up_proj", "mlp.gate_proj", "mlp.down_proj",
                                                                   "self_attn.o_proj"))
    for name in names:
        row = next(row for row in rows if row["name"] == name)
        tv = task_vectors(family, name, [1.0, 1.0])  # exact: bf16 -> float64
        tasks = usable(tv)
        ta = float(wudi_loss(tv.sum(0), tasks))
        solved = float(wudi_loss(wudi_adam(tv, steps=25, lr=1e-3), tasks))
        assert solved < 0.9 * ta
        assert float(row["objective_task_arithmetic"]) == pytest.approx(ta, rel=1e-4)
        assert float(row["objective_solved"]) == pytest.approx(solved, rel=1e-2)
    assert not (tmp_path / "out" / "plots").exists()


def test_report_doge_per_model_density(family, tmp_path):
    base, *models = family
    densities = [0.3, 0.5, 0.8]
    # steps: 0 (trim and eta scaling only): after Adam steps float32 and float64 DOGE part ways
    # (near-zero gradients, normalised steps), so a tight check needs no steps.
    config = write_config(tmp_path / "doge.yml", "doge", base, models, {"steps": 0},
                          [{"density": d} for d in densities])
    result = invoke("report", config, "--out", tmp_path / "out", "--filter", "layers.0.self_attn.q_proj",
                    "--no-plots", "--quiet")
    assert result.exit_code == 0, result.output
    (row, *_) = read_csv(tmp_path / "out" / "report.csv")
    tv = task_vectors(family, row["name"], [1.0, 1.0, 1.0])
    tasks = usable(tv)
    # DOGE minimises its own loss; the report gives the WUDI loss of its result.
    solved = float(wudi_loss(doge(tv, densities, steps=0), tasks))
    assert abs(solved - float(wudi_loss(doge(tv, [0.3] * 3, steps=0), tasks))) > 1e-3 * solved  # density matters
    assert float(row["objective_solved"]) == pytest.approx(solved, rel=1e-5)
    assert float(row["objective_task_arithmetic"]) == pytest.approx(float(wudi_loss(tv.sum(0), tasks)), rel=1e-4)


def test_report_reads_one_tensor_group_at_a_time(cfs_config, tmp_path, monkeypatch):
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    reads = []
    original = LazyTensorLoader.get_tensor

    def spy(self, key, *args, **kwargs):
        reads.append(key)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", spy)
    result = invoke("report", cfs_config, "--out", tmp_path, "--filter", "layers.1.mlp.up", "--no-plots",
                    "--no-ranks", "--quiet")
    assert result.exit_code == 0, result.output
    assert reads == ["model.layers.1.mlp.up_proj.weight"] * 4  # base + 3 models, nothing else
    row = read_csv(tmp_path / "report.csv")[0]
    assert row["effective_rank"] == "nan"


def test_report_max_tensors(cfs_config, tmp_path):
    result = invoke("report", cfs_config, "--out", tmp_path, "--max-tensors", "2", "--no-plots", "--no-ranks",
                    "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("2 tensors -> ")
    assert len({row["name"] for row in read_csv(tmp_path / "report.csv")}) == 2


def test_report_errors_are_one_line(family, tmp_path, monkeypatch):
    base, *models = family
    other = write_config(tmp_path / "ta.yml", "task_arithmetic", base, models)
    result = invoke("report", other, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "merge_method 'task_arithmetic' is not a mergekit-wudi method" in result.output
    assert len(result.output.strip().splitlines()) == 1

    missing = invoke("report", tmp_path / "nope.yml")
    assert missing.exit_code == 2 and "does not exist" in missing.output

    broken = tmp_path / "broken.yml"
    broken.write_text("merge_method: wudi\n")
    result = invoke("report", broken)
    assert result.exit_code == 1 and "is not a valid mergekit config" in result.output

    absent = write_config(tmp_path / "absent.yml", "wudi", tmp_path / "no-such-model", models)
    result = invoke("report", absent, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "cannot plan the merge" in result.output and "no-such-model" in result.output
    assert len(result.output.strip().splitlines()) == 1

    bad_regex = invoke("report", other, "--filter", "(")
    assert bad_regex.exit_code == 2 and "--filter" in bad_regex.output

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    config = write_config(tmp_path / "wudi.yml", "wudi", base, models)
    result = invoke("report", config, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "pip install 'mergekit-wudi[report]'" in result.output
