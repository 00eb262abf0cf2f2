"""The runner and the report on a fake benchmark (no model, no mergekit): choices made on
validation only, provenance recorded per row, results.md rendered from results.json only."""

import json
from pathlib import Path

import pytest
import yaml
from bench import plan, report, runner, stats

TASKS = ("a", "b")


def accuracy_at(lam: float, split: str) -> float:
    """Validation peaks at lambda 0.5, test at lambda 1.0: a choice made on test would differ."""
    peak = 0.5 if split == "validation" else 1.0
    return max(0.0, 0.9 - abs(lam - peak) * 0.5)


class FakeBench:
    name = "fake"
    title = "Fake benchmark"
    model = "none"
    data_packages = ("afinn", "faker")
    task_names = TASKS
    recipes = {"full": {"lr": 1.0}}

    def __init__(self, root: Path):
        self.root = root
        self.limit = None

    def tasks_info(self):
        return {t: {"train": 10, "validation": 100, "test": 100, "balanced": True, "majority": "x", "floor": 0.5, "example": ["q", "x"]} for t in TASKS}

    def base(self):
        return self.root / "base"

    def ensure_set(self, name):
        return {t: ("full" if i == 0 else "lora", self.root / name / t, 12.5) for i, t in enumerate(TASKS)}

    def score(self, path, splits):
        marker = Path(path) / "lambda.json"
        lam = json.loads(marker.read_text()) if marker.exists() else 9.0  # the base: 0 on every task
        correct = {s: {t: stats.bits(i < 100 * accuracy_at(lam, s) for i in range(100)) for t in TASKS} for s in splits}
        return correct, {s: {"finite": True, "format": {t: 1.0 for t in TASKS}} for s in splits}

    def score_expert(self, kind, path, task, splits):
        return {s: "1" * 95 + "0" * 5 for s in splits}


def fake_mergekit(config, out, work):
    parameters = yaml.safe_load(Path(config).read_text()).get("parameters", {})
    Path(out).mkdir(parents=True)
    (Path(out) / "lambda.json").write_text(json.dumps(parameters.get("lambda", 1.0)))
    return {"wall_s": 1.25, "peak_rss_mib": 64.0}


@pytest.fixture
def result(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run_mergekit", fake_mergekit)
    out = tmp_path / "out"
    return runner.Runner(FakeBench(tmp_path), out, quick=True).run(), out


def test_every_choice_is_made_on_validation(result):
    data, _ = result
    evaluations = {e["id"]: e for e in data["evaluations"]}
    tuned = {r["method"]: evaluations[r["evaluation"]] for r in data["rows"] if r["kind"] == "tuned"}
    assert set(tuned) == set(plan.methods(quick=True))
    assert tuned["task_arithmetic"]["parameters"] == {"lambda": 0.5}  # the validation peak, not test's (1.0)
    assert "test" in tuned["task_arithmetic"]["correct"]
    grid = [e for e in data["evaluations"] if e["method"] == "task_arithmetic" and e["stage"] == "lambda"]
    assert grid and all(set(e["correct"]) == {"validation"} for e in grid if e is not tuned["task_arithmetic"])
    defaults = [evaluations[r["evaluation"]] for r in data["rows"] if r["kind"] == "defaults"]
    assert all(e["parameters"] == {} and {"validation", "test"} <= set(e["correct"]) for e in defaults)
    assert data["best_builtin"]["full"]["method"] in plan.BUILTINS


def test_every_row_records_its_provenance(result):
    data, _ = result
    for e in data["evaluations"]:
        p = e["provenance"]
        assert p["commit"] and {"mergekit", "torch", "transformers", "afinn", "faker"} <= set(p["versions"])
        assert yaml.safe_load(e["yaml"])["merge_method"] == e["method"]
        assert e["wall_s"] == 1.25 and e["peak_rss_mib"] == 64.0 and e["checks"]["validation"]["finite"]
    assert data["wall_s"] > 0 and data["expert_sets"]["full"]["members"]["a"]["train_s"] == 12.5
    assert data["command"] == "python benchmarks/run_all.py --quick"


def test_results_md_is_rendered_from_results_json_only(result):
    data, out = result
    written = (out / "results.md").read_text()
    assert written == report.render_markdown(json.loads((out / "results.json").read_text()))
    (out / "results.md").unlink()
    report.render_files(out / "results.json", figure=False)
    assert (out / "results.md").read_text() == written
    assert "--quick run" in written and "★" in written and "Provenance" in written
    assert (out / "accuracy.png").exists()


def test_lora_members_use_mergekit_adapter_syntax(tmp_path):
    from bench.mergekit_run import config_text

    text = config_text("wudi", {"lambda": 0.5}, [("full", tmp_path / "e1"), ("lora", tmp_path / "e2")], tmp_path / "base")
    config = yaml.safe_load(text)
    assert [m["model"] for m in config["models"]] == [str(tmp_path / "e1"), f"{tmp_path / 'base'}+{tmp_path / 'e2'}"]
    assert config["parameters"] == {"lambda": 0.5} and config["dtype"] == "float32"


def test_plan_covers_every_method_and_grid():
    from mergekit_wudi.adapter import MERGE_METHODS

    assert set(plan.methods()) == {*plan.BUILTINS, *(m.method_name for m in MERGE_METHODS)}
    assert plan.stage_one("ties") == [{}] + [{"density": d, "normalize": n} for d in (0.2, 0.5, 0.8) for n in (True, False)]
    assert plan.stage_one("wudi") == [{}, {"calibrate": "input_space"}, {"calibrate": "sum_norm"},
                                      {"calibrate": "sum_cap"}, {"calibrate": "first_order"},
                                      {"density": 0.3}]  # its defaults: none, auto
    assert plan.stage_one("iso_c") == [{}, {"calibrate": "none"}, {"calibrate": "input_space"},
                                       {"calibrate": "sum_norm"}, {"calibrate": "sum_cap"},
                                       {"density": 0.3}]  # its defaults: first_order, auto
    assert plan.stage_one("doge") == [{}, {"calibrate": "input_space"}, {"calibrate": "sum_norm"},
                                      {"calibrate": "sum_cap"}, {"calibrate": "first_order"}]  # its density is its own
    assert plan.stage_one("wudi", quick=True) == [{}]
    assert [c["lambda"] for c in plan.stage_two({})] == [0.1, 0.2, 0.3, 0.5, 0.7, 1.5]
    assert plan.mixed_members(["a", "b", "c", "d", "e"]) == {"a": "full", "b": "lora", "c": "full", "d": "lora", "e": "full"}
    assert plan.mixed_members(["a", "b"], plan.MIXED_SETS["mixed_seed1"]) == {"a": "full_seed1", "b": "lora_seed1"}
    assert not plan.better(0.5, 0.5) and plan.better(0.51, 0.5) and plan.better(0.0, None)


def test_the_full_plan_with_a_replicate_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run_mergekit", fake_mergekit)
    monkeypatch.setattr(plan, "EXPERT_SETS", ("full", "lora"))
    monkeypatch.setattr(plan, "LAMBDAS", (0.5, 1.0, 1.5))
    monkeypatch.setattr(plan, "methods", lambda quick=False: ("task_arithmetic", "ties", "wudi"))
    data = runner.Runner(FakeBench(tmp_path), tmp_path / "out").run()
    rows = {(r["set"], r["method"], r["kind"]) for r in data["rows"]}
    assert rows == {(s, m, k) for s in ("full", "lora", "full_seed1") for m in ("task_arithmetic", "ties", "wudi") for k in ("defaults", "tuned")}
    evaluations = {e["id"]: e for e in data["evaluations"]}
    for r in data["rows"]:
        if r["set"] == "full_seed1" and r["kind"] == "tuned":
            primary = next(p for p in data["rows"] if p["set"] == "full" and p["method"] == r["method"] and p["kind"] == "tuned")
            assert evaluations[r["evaluation"]]["parameters"] == evaluations[primary["evaluation"]]["parameters"]
            assert "test" in evaluations[r["evaluation"]]["correct"]
    ties = [e for e in data["evaluations"] if e["set"] == "full" and e["method"] == "ties" and e["stage"] == "density"]
    assert len(ties) == 6  # 3 densities x normalize true/false, at lambda 1
    assert data["best_builtin"]["full_seed1"]["chosen_on"] == "full"
    text = (tmp_path / "out" / "results.md").read_text()
    assert "Expert seeds" in text and "--quick" not in text


def test_a_failed_merge_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def failing(config, out, work):
        if "density: 0.5" in Path(config).read_text() or "merge_method: wudi_cfs" in Path(config).read_text():
            raise RuntimeError("mergekit-yaml c.yml failed (1), see c.log:\nValueError: no")
        return fake_mergekit(config, out, work)

    monkeypatch.setattr(runner, "run_mergekit", failing)
    data = runner.Runner(FakeBench(tmp_path), tmp_path / "out", quick=True).run()
    failed = [e for e in data["evaluations"] if "error" in e]
    assert {e["method"] for e in failed} == {"ties", "wudi_cfs"} and all(e["correct"] == {} for e in failed)
    assert data["best_builtin"]["full"]["method"] in plan.BUILTINS
    text = (tmp_path / "out" / "results.md").read_text()
    assert "mergekit-yaml failed: ValueError: no" in text and "d=0.5 norm=True failed" in text


def test_the_estimate_counts_the_full_plan(result):
    from bench import estimate

    assert estimate.merges_per_set("task_arithmetic") == 7 and estimate.merges_per_set("ties") == 13
    assert estimate.merges_per_set("wudi") == 12
    data, _ = result
    seconds = estimate.estimate(data, {"wudi": 100.0})
    assert set(seconds) == set(plan.methods())
    # wudi: 12 merges (defaults, four other calibrate rules, density 0.3, 6 more lambdas) x 4 sets + test scoring
    # of 2 rows x 4 sets + 2 replicate merges scored on both splits
    assert seconds["wudi"] == pytest.approx(12 * 100 * 4 + 2 * 100 * 1.0 * 4 + 2 * 100 * 2.0)


def test_the_estimate_rejects_a_results_file_without_merge_times(tmp_path, monkeypatch, capsys):
    from bench import estimate

    old = tmp_path / "results.json"
    old.write_text(json.dumps({"model": "m", "merges": []}))  # the 0.1.0 tables' layout
    monkeypatch.setattr("sys.argv", ["estimate.py", str(old)])
    with pytest.raises(SystemExit) as exit_info:
        estimate.main()
    assert exit_info.value.code == 2 and "no per-merge times" in capsys.readouterr().err


def test_resume_reuses_only_rows_made_by_the_same_code(tmp_path, monkeypatch):
    from bench import provenance

    calls = []

    def counting(config, out, work):
        calls.append(yaml.safe_load(Path(config).read_text())["merge_method"])
        return fake_mergekit(config, out, work)

    monkeypatch.setattr(runner, "run_mergekit", counting)
    out = tmp_path / "out"
    runner.Runner(FakeBench(tmp_path), out, quick=True).run()
    first = len(calls)
    calls.clear()
    runner.Runner(FakeBench(tmp_path), out, quick=True, resume=True).run()
    assert calls == []  # nothing changed: every merge reused
    monkeypatch.setattr(provenance, "package_code", lambda: "changed")  # our sources changed
    data = runner.Runner(FakeBench(tmp_path), out, quick=True, resume=True).run()
    assert set(calls) == {"wudi_cfs"} and 0 < len(calls) < first  # ours merged again, built-ins reused
    assert all(e["provenance"]["package_code"] == "changed" for e in data["evaluations"] if e["method"] == "wudi_cfs")
    assert "reused from an earlier run" in (out / "results.md").read_text()


def test_a_partial_plan_runs_only_the_sets_and_methods_asked_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run_mergekit", fake_mergekit)
    monkeypatch.setattr(plan, "EXPERT_SETS", ("full", "lora"))
    monkeypatch.setattr(plan, "LAMBDAS", (0.5, 1.0))
    data = runner.Runner(FakeBench(tmp_path), tmp_path / "out", sets=["lora"], methods=["task_arithmetic", "wudi_cfs"]).run()
    assert {(e["set"], e["method"]) for e in data["evaluations"]} == {("lora", "task_arithmetic"), ("lora", "wudi_cfs")}
    assert data["best_builtin"]["lora"]["method"] == "task_arithmetic"
    assert "**Partial plan** (expert sets lora; methods task_arithmetic, wudi_cfs)" in (tmp_path / "out" / "results.md").read_text()


def test_a_misspelt_set_or_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown expert set lroa: the plan has full"):
        runner.Runner(FakeBench(tmp_path), tmp_path / "out", sets=["lroa"])
    with pytest.raises(ValueError, match="unknown method wudi_cf"):
        runner.Runner(FakeBench(tmp_path), tmp_path / "out", methods=["wudi_cf"])


def test_the_experts_command_line_refuses_an_unknown_set_before_training(capsys, monkeypatch):
    import torch
    from bench.experts import BaseRecipe, ExpertSets

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # main() sets it for a training run, not for the test process
    trained = []
    sets = ExpertSets("fake", TASKS, None, (), {"full": BaseRecipe(), "lora": BaseRecipe(kind="lora")}, train=None)
    sets.ensure = trained.append
    with pytest.raises(SystemExit) as refused:
        sets.main(["lora", "lroa"])
    assert refused.value.code == 2 and trained == []
    assert "unknown set 'lroa': choose from full, lora, mixed, mixed_seed1" in capsys.readouterr().err
    sets.main([])
    assert trained == ["full", "lora", "mixed", "mixed_seed1"]
