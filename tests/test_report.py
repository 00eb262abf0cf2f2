"""`mergekit-wudi report` and mergekit_wudi.report: numbers checked against float64
computations done here from the saved checkpoints (tests/reference.py)."""

import csv
import math
import sys
from pathlib import Path

import pytest
import torch
from models import (
    LLAMA_CONFIG,
    is_llama_linear,
    load_model,
    make_family,
    make_mixed_family,
    make_one_seed_family,
    make_seed_each_family,
    write_config,
)
from reference import SCALES, calibrated, doge, trimmed, usable, wudi_adam, wudi_closed_form, wudi_loss
from reference_2025 import EPS32, iso_c, iso_cts, tsv_merge
from runner import mergekit_wudi_cli

LAYERS = LLAMA_CONFIG["num_hidden_layers"]


def model_weights(layer: int):
    t = layer / (LAYERS - 1) if LAYERS > 1 else 1.0
    return [1.0, 0.5, 1.0 + (0.2 - 1.0) * t]


def read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def run_report(config: Path, out: Path, *flags: str):
    """`mergekit-wudi report CONFIG --out OUT --quiet FLAGS`, asserted to succeed; the CSV's rows."""
    result = mergekit_wudi_cli("report", config, "--out", out, "--quiet", *flags)
    assert result.exit_code == 0, result.output
    return read_csv(out / "report.csv")


def task_vectors(family, name: str, weights) -> torch.Tensor:
    base, *models = [load_model(p)[name].double() for p in family]
    return torch.stack([w * (m - base) for w, m in zip(weights, models)])  # (N, out, in)


def effective_rank64(matrix: torch.Tensor) -> float:
    s = torch.linalg.svdvals(matrix.double())
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-float((p * p.log()).sum()))


@pytest.fixture(scope="module")
def cfs_report(cfs_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    run_report(cfs_config, out)
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


@pytest.mark.parametrize("rule, bindings", [("input_space", ("t_1", "t_2", "t_3", "norm")), (None, ("gain", "sum"))],
                         ids=["input_space", "default"])  # iso_c's default: first_order
def test_report_shows_the_calibrated_scale_of_every_tensor(family, tmp_path, rule, bindings):
    base, *models = family
    weights = [{"weight": w} for w in (1.0, 0.5, 2.0)]
    config = write_config(tmp_path / "iso.yml", "iso_c", base, models, {"calibrate": rule} if rule else {}, weights)
    rows = run_report(config, tmp_path / "report")
    assert rows
    for name in dict.fromkeys(row["name"] for row in rows):
        row = next(r for r in rows if r["name"] == name)
        tv = task_vectors(family, name, [1.0, 0.5, 2.0])
        expected = SCALES[rule or "first_order"](list(tv), iso_c(tv, eps=EPS32))
        assert float(row["calibration"]) == pytest.approx(expected, rel=1e-5)
        assert row["calibration_binding"] in bindings
    assert "calibrate c (bound by)" in (tmp_path / "report" / "report.md").read_text()


def test_report_markdown_and_plots(cfs_report):
    markdown = (cfs_report / "report.md").read_text()
    assert markdown.startswith("# Interference report: `wudi_cfs`")
    assert "| `model.layers.1.mlp.down_proj.weight` | 64x96 | 3 |" in markdown
    plots = sorted(p.name for p in (cfs_report / "plots").iterdir())
    assert plots == [f"layer_{i:03d}.png" for i in range(LAYERS)]
    assert all((cfs_report / "plots" / p).read_bytes().startswith(b"\x89PNG") for p in plots)


def test_report_tells_one_seed_adapters_from_independent_ones(cfs_report, tmp_path):
    # Fine-tunes whose linear deltas share one rank-2 input factor A (LoRA adapters trained
    # from one seed, merged in): every input overlap is the most there is, in / 2 times
    # chance, and each model is called "lora, one seed". The conftest family's deltas have
    # independent random factors: input overlaps near chance, called "lora".
    paths = make_one_seed_family(tmp_path / "one_seed")
    shared = [name for name in load_model(paths[0]) if is_llama_linear(name)]
    config = write_config(tmp_path / "one_seed.yml", "wudi_cfs", paths[0], paths[1:])
    rows = run_report(config, tmp_path / "report", "--no-plots")
    assert len(rows) == 3 * len(shared)
    for row in rows:
        in_features = int(row["shape"].split("x")[1])
        assert float(row["input_overlap"]) == pytest.approx(in_features / 2, rel=1e-4)
        assert 0 < float(row["output_overlap"]) < float(row["input_overlap"])
        assert float(row["lambda"]) == 1 / 4  # what the merge uses: adapter_guard caps it at 1/(N+1)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert markdown.count(" | lora, one seed |") == 3 and "- lora, one seed: " in markdown
    independent = (cfs_report / "report.md").read_text()
    assert independent.count(" | lora |") == 3 and "lora, one seed" not in independent
    assert all(float(row["input_overlap"]) < 5 and float(row["lambda"]) == 0.9 for row in read_csv(cfs_report / "report.csv"))


def test_report_lambda_is_capped_at_one_over_sqrt_n_for_adapters_with_a_seed_each(tmp_path):
    # The seed-each family (guard.py): the CSV's lambda is what the merge uses, 1/sqrt(3) for
    # tsv (a method that sums disjoint updates) and the configured 1 for iso_c (not capped there).
    # equalize_factor: what `equalize` multiplied each task vector by, the root mean square of the
    # tensor's norms over its own norm for tsv (equalized by default there), 1 for iso_c.
    paths = make_seed_each_family(tmp_path / "seed_each")
    for method, strength in (("tsv", 3 ** -0.5), ("iso_c", 1.0)):
        config = write_config(tmp_path / f"{method}.yml", method, paths[0], paths[1:])
        rows = run_report(config, tmp_path / method, "--no-plots", "--filter", r"layers\.0\.self_attn")
        assert len(rows) == 4 * 3
        assert all(float(row["lambda"]) == pytest.approx(strength, rel=1e-12) for row in rows), method
        for name in {row["name"] for row in rows}:
            norms = [float(row["norm"]) for row in rows if row["name"] == name]
            target = math.sqrt(sum(n * n for n in norms) / len(norms))
            expected = [target / n for n in norms] if method == "tsv" else [1.0] * len(norms)
            factors = [float(row["equalize_factor"]) for row in rows if row["name"] == name]
            assert factors == pytest.approx(expected, rel=1e-5), (method, name)
            assert method == "iso_c" or max(factors) > 1.01  # the family's norms differ
    markdown = (tmp_path / "tsv" / "report.md").read_text()
    assert markdown.count(" | lora |") == 3 and "cap lambda at 1/sqrt(K)" in markdown
    rows_of = lambda text: [line for line in text.splitlines() if line.startswith("| `")]  # noqa: E731
    assert all(" (x" in row for row in rows_of(markdown))
    assert not any(" (x" in row for row in rows_of((tmp_path / "iso_c" / "report.md").read_text()))


def test_report_bf16_wudi(tmp_path):
    family = make_family(tmp_path / "bf16", fine_tunes=2, seed=3, dtype=torch.bfloat16)
    base, *models = family
    config = write_config(tmp_path / "wudi.yml", "wudi", base, models, {"steps": 25, "lr": 1e-3})
    rows = run_report(config, tmp_path / "out", "--filter", r"layers\.0\.(mlp|self_attn\.o)", "--no-plots")
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
    (row, *_) = run_report(config, tmp_path / "out", "--filter", "layers.0.self_attn.q_proj", "--no-plots")
    tv = task_vectors(family, row["name"], [1.0, 1.0, 1.0])
    tasks = usable(tv)
    # DOGE minimises its own loss; the report gives the WUDI loss of its result.
    solved = float(wudi_loss(doge(tv, densities, steps=0), tasks))
    assert abs(solved - float(wudi_loss(doge(tv, [0.3] * 3, steps=0), tasks))) > 1e-3 * solved  # density matters
    assert float(row["objective_solved"]) == pytest.approx(solved, rel=1e-5)
    assert float(row["objective_task_arithmetic"]) == pytest.approx(float(wudi_loss(tv.sum(0), tasks)), rel=1e-4)


@pytest.mark.parametrize("method, strength", [("wudi_cfs", 1 / 4), ("doge", 3 / 4)])
def test_report_shows_the_average_on_one_seed_adapters(method, strength, tmp_path):
    # One-seed adapters (guard.py): each tensor is merged as the average of the base and the
    # adapters, in place of the solve; the CSV's lambda is what the merge uses (1/(N+1), or N/(N+1)
    # for doge, whose merge is taken of the mean), c is 1 and bound by "average", and the solved
    # objective is the WUDI loss of the merged update, (1/4) sum_i t_i, computed here.
    paths = make_one_seed_family(tmp_path / "one_seed")
    config = write_config(tmp_path / f"{method}.yml", method, paths[0], paths[1:])
    rows = run_report(config, tmp_path / "out", "--filter", r"layers\.0\.", "--no-plots")
    names = list(dict.fromkeys(row["name"] for row in rows))
    assert len(names) == 7
    for name in names:
        row = next(r for r in rows if r["name"] == name)
        assert float(row["lambda"]) == strength and float(row["calibration"]) == 1.0, name
        assert row["calibration_binding"] == "average", name
        tv = task_vectors(paths, name, [1.0, 1.0, 1.0])
        expected = float(wudi_loss(tv.sum(dim=0) / 4, usable(tv)))
        assert float(row["objective_solved"]) == pytest.approx(expected, rel=1e-4), name
    assert "(average)" in (tmp_path / "out" / "report.md").read_text()


def test_report_shows_each_kinds_scale_where_iso_merges_by_kind(tmp_path):
    # iso_c on the mixed family (guard.kind_parts): per tensor the full part's c (first_order, on the
    # trimmed full task vectors) and the adapters' (sum_norm), each from its definition on the
    # float64 Iso-C of that part; the CSV's calibration is nan (no one c), the Markdown says "by kind".
    paths = make_mixed_family(tmp_path / "mixed")
    config = write_config(tmp_path / "iso.yml", "iso_c", paths[0], paths[1:])
    rows = run_report(config, tmp_path / "out", "--filter", r"layers\.0\.", "--no-plots")
    names = list(dict.fromkeys(row["name"] for row in rows))
    assert len(names) == 7
    for name in names:
        row = next(r for r in rows if r["name"] == name)
        tv = task_vectors(paths, name, [1.0] * 4)
        full = torch.stack([trimmed(t.unsqueeze(0), 0.3)[0] for t in tv[:2]])
        expected = [SCALES[rule](list(part), iso_c(part, EPS32)) for rule, part in (("first_order", full), ("sum_norm", tv[2:]))]
        assert math.isnan(float(row["calibration"])), name
        full_text, adapters_text = row["calibration_binding"].split("; ")
        label, scale, binding = full_text.split()
        assert label == "full" and binding in ("gain", "sum") and float(scale) == pytest.approx(expected[0], rel=1e-3), name
        label, scale, binding = adapters_text.split()
        assert (label, binding) == ("adapters", "norm") and float(scale) == pytest.approx(expected[1], rel=1e-3), name
    assert "| by kind: full " in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize(
    "method, reference",
    [("tsv", lambda tv: tsv_merge(tv, EPS32)), ("iso_c", calibrated(lambda tv: iso_c(tv, EPS32))),
     ("iso_cts", calibrated(lambda tv: iso_cts(tv, eps=EPS32)))],
    ids=["tsv", "iso_c", "iso_cts"],
)  # at their YAML defaults: iso_c and iso_cts calibrate
def test_report_spectral_methods(family, tmp_path, method, reference):
    # tsv, iso_c and iso_cts minimise no loss; the report gives the WUDI loss of their
    # result, here against their float64 references (with the float32 merge's cutoff).
    base, *models = family
    config = write_config(tmp_path / f"{method}.yml", method, base, models, None)
    (row, *_) = run_report(config, tmp_path / "out", "--filter", "layers.0.self_attn.q_proj", "--no-plots")
    assert row["name"] == "model.layers.0.self_attn.q_proj.weight"
    tv = task_vectors(family, row["name"], [1.0, 1.0, 1.0])
    tasks = usable(tv)
    solved = float(wudi_loss(reference(tv), tasks))
    assert float(row["objective_solved"]) == pytest.approx(solved, rel=1e-4)
    assert abs(solved - float(wudi_loss(tv.sum(0), tasks))) > 1e-2 * solved  # not task arithmetic's


def test_report_reads_one_tensor_group_at_a_time(cfs_config, tmp_path, monkeypatch):
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    reads = []
    original = LazyTensorLoader.get_tensor

    def spy(self, key, *args, **kwargs):
        reads.append(key)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", spy)
    (row, *_) = run_report(cfs_config, tmp_path, "--filter", "layers.1.mlp.up", "--no-plots", "--no-ranks")
    assert reads == ["model.layers.1.mlp.up_proj.weight"] * 4  # base + 3 models, nothing else
    assert row["effective_rank"] == "nan"


def test_report_max_tensors(cfs_config, tmp_path):
    result = mergekit_wudi_cli("report", cfs_config, "--out", tmp_path, "--max-tensors", "2", "--no-plots", "--no-ranks",
                    "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("2 tensors -> ")
    assert len({row["name"] for row in read_csv(tmp_path / "report.csv")}) == 2


def test_report_errors_are_one_line(family, tmp_path, monkeypatch):
    base, *models = family
    other = write_config(tmp_path / "ta.yml", "task_arithmetic", base, models)
    result = mergekit_wudi_cli("report", other, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "merge_method 'task_arithmetic' is not a mergekit-wudi method" in result.output
    assert len(result.output.strip().splitlines()) == 1

    missing = mergekit_wudi_cli("report", tmp_path / "nope.yml")
    assert missing.exit_code == 2 and "does not exist" in missing.output

    broken = tmp_path / "broken.yml"
    broken.write_text("merge_method: wudi\n")
    result = mergekit_wudi_cli("report", broken)
    assert result.exit_code == 1 and "is not a valid mergekit config" in result.output

    absent = write_config(tmp_path / "absent.yml", "wudi", tmp_path / "no-such-model", models)
    result = mergekit_wudi_cli("report", absent, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "cannot plan the merge" in result.output and "no-such-model" in result.output
    assert len(result.output.strip().splitlines()) == 1

    bad_regex = mergekit_wudi_cli("report", other, "--filter", "(")
    assert bad_regex.exit_code == 2 and "--filter" in bad_regex.output

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    config = write_config(tmp_path / "wudi.yml", "wudi", base, models)
    result = mergekit_wudi_cli("report", config, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "pip install 'mergekit-wudi[report]'" in result.output
