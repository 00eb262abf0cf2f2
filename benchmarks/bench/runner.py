"""Run one benchmark's plan: experts, base, every merge through the real `mergekit-yaml`, choices
on validation, test reported; results.json written after every merge, results.md and
accuracy.png rendered from it.

A benchmark (benchmarks/llm/run.py, benchmarks/real_model/run.py) hands over an object with:

    name, title, model, data_packages, task_names, recipes (dict of dicts)
    tasks_info() -> {task: {"train", "validation", "test", "balanced", "floor", "majority", "example"}}
    base() -> Path                                  the base checkpoint
    ensure_set(name) -> {task: (kind, path, training s)}   kind: "full" | "lora"
    score(path, splits) -> ({split: {task: bits}}, checks)  a merged checkpoint on every task
    score_expert(kind, path, task, splits) -> {split: bits} an expert on its own task
    limit: Optional[int]                            --quick: the first `limit` items of each split

The plan (bench.plan), for every expert set and method: the defaults row (validation and
test); for built-ins with a density, every (density, normalize) pair at lambda 1; then the
lambda grid at the best of those on validation. The method's "tuned" row is its best
configuration on validation, scored on test. "Best built-in": the built-in whose tuned row is
best on validation. The replicate set (full_seed1) reruns every method's defaults and the
configuration tuned on the primary set (full), for the spread over expert seeds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Optional

from bench import plan, stats
from bench.mergekit_run import config_text, run_mergekit
from bench.provenance import stamp
from bench.report import write_report

SPLITS = ("validation", "test")


def _validation(record: dict) -> float:
    """The validation average, or -1 for a failed merge (never chosen over one that ran)."""
    return stats.mean_accuracy(record["correct"]["validation"]) if "validation" in record["correct"] else -1.0


def _reusable(record: dict, data_packages) -> bool:
    """--resume reuses a record only if what produced it is unchanged: mergekit_wudi's sources
    for our methods, the package versions (code and data) for every row."""
    here = stamp(data_packages)
    made = record.get("provenance", {})
    if made.get("versions") != here["versions"]:
        return False
    return record["method"] in plan.BUILTINS or made.get("package_code") == here["package_code"]


class Runner:
    def __init__(self, bench, out: Path, quick: bool = False, resume: bool = False, sets=None, methods=None):
        self.bench, self.out, self.quick = bench, out, quick
        self.only_sets, self.only_methods = sets, methods  # a partial plan (None: the whole plan)
        for asked, known, what in ((sets, [*plan.EXPERT_SETS, *plan.REPLICATES], "expert set"), (methods, plan.methods(), "method")):
            unknown = sorted(set(asked or ()) - set(known))
            if unknown:
                raise ValueError(f"unknown {what} {', '.join(unknown)}: the plan has {', '.join(known)}")
        self.work = out / "merges"
        self.started = time.perf_counter()
        previous = out / "results.json"
        self.previous = {}
        if resume and previous.exists():
            self.previous = {(e["set"], e["yaml"]): e for e in json.loads(previous.read_text())["evaluations"] if _reusable(e, bench.data_packages)}
        self.report = {
            "benchmark": bench.name,
            "title": bench.title,
            "model": bench.model,
            "quick": quick,
            "command": f"python benchmarks/run_all.py{' --quick' if quick else ''}",
            "provenance": stamp(bench.data_packages),
            "tasks": bench.tasks_info(),
            "recipes": bench.recipes,
            "partial": {"sets": sets, "methods": methods} if sets or methods else None,
            "plan": {"lambdas": list(plan.QUICK_LAMBDAS if quick else plan.LAMBDAS), "builtins": {m: list(d) for m, d in plan.BUILTINS.items()}, "normalize": list(plan.NORMALIZE)},
            "expert_sets": {},
            "base": {},
            "evaluations": [],
            "rows": [],
            "best_builtin": {},
            "wall_s": 0.0,
        }

    # -- the pieces ---------------------------------------------------------------------------
    def save(self, figure: bool = False) -> None:
        self.report["wall_s"] = time.perf_counter() - self.started
        write_report(self.out, self.report, figure)

    def experts(self, sets) -> None:
        for name in sets:
            started = time.perf_counter()
            members = self.bench.ensure_set(name)
            self.members[name] = members
            record = {"members": {t: {"kind": k, "path": str(p), "train_s": s} for t, (k, p, s) in members.items()}, "ensure_s": time.perf_counter() - started}
            record["correct"] = {split: {} for split in SPLITS}
            for task, (kind, path, _) in members.items():
                for split, bits in self.bench.score_expert(kind, path, task, SPLITS).items():
                    record["correct"][split][task] = bits
            self.report["expert_sets"][name] = record
            self.save()

    def evaluate(self, set_name: str, method: str, parameters: dict, splits=SPLITS, keep: bool = False, stage: str = "") -> tuple:
        """Merge (or reuse an identical merge of this run or a resumed one), score on `splits`; (record, merged dir or None)."""
        members = [(kind, path) for kind, path, _ in self.members[set_name].values()]
        text = config_text(method, parameters, members, self.bench.base())
        record = next((e for e in self.report["evaluations"] if e["set"] == set_name and e["yaml"] == text), None)
        if record is None and (set_name, text) in self.previous and all(s in self.previous[(set_name, text)]["correct"] for s in splits):
            record = {**self.previous[(set_name, text)], "resumed": True}
            self.report["evaluations"].append(record)
        if record is not None and all(s in record["correct"] for s in splits) and (not keep or record.get("resumed")):
            return record, None  # a resumed one is not merged again to be kept: tune merges its best for test
        digest = hashlib.sha256(f"{set_name}\n{text}".encode()).hexdigest()[:10]
        self.work.mkdir(parents=True, exist_ok=True)
        config, merged = self.work / f"{digest}.yml", self.work / digest
        config.write_text(text)
        shutil.rmtree(merged, ignore_errors=True)
        shutil.rmtree(self.work / "lora-cache", ignore_errors=True)  # every LoRA merge pays for applying its adapters
        try:
            cost = run_mergekit(config, merged, self.work)
        except RuntimeError as error:  # one failed configuration must not stop a day-long run: record it
            failed = {"id": len(self.report["evaluations"]), "set": set_name, "method": method, "parameters": parameters, "stage": stage,
                      "yaml": text, "correct": {}, "checks": {}, "error": str(error)[-2000:], "wall_s": float("nan"), "peak_rss_mib": float("nan"),
                      "provenance": stamp(self.bench.data_packages)}
            self.report["evaluations"].append(failed)
            print(f"[{self.bench.name}] {set_name} {method} {parameters}: mergekit-yaml failed", flush=True)
            self.save()
            return failed, None
        started = time.perf_counter()
        correct, checks = self.bench.score(merged, splits)
        if record is None:
            record = {"id": len(self.report["evaluations"]), "set": set_name, "method": method, "parameters": parameters, "stage": stage, "yaml": text, "correct": {}, "checks": {}}
            self.report["evaluations"].append(record)
        record.update({**cost, "score_s": time.perf_counter() - started, "provenance": stamp(self.bench.data_packages)})
        record["correct"].update(correct)
        record["checks"].update(checks)
        print(f"[{self.bench.name}] {set_name} {method} {parameters}: validation {_validation(record):.4f}"
              f" ({cost['wall_s']:.0f} s merge, {record['score_s']:.0f} s scoring)", flush=True)
        self.save()
        if keep:
            return record, merged
        shutil.rmtree(merged, ignore_errors=True)
        return record, None

    def tune(self, set_name: str, method: str) -> dict:
        """Defaults (validation + test), stage one, the lambda grid; the tuned row scored on test. Returns the tuned record."""
        defaults, _ = self.evaluate(set_name, method, {}, stage="defaults")
        self.report["rows"].append({"set": set_name, "method": method, "kind": "defaults", "evaluation": defaults["id"]})
        best, best_dir = defaults, None
        score = _validation(defaults)

        def consider(parameters: dict, stage: str) -> None:
            nonlocal best, best_dir, score
            record, merged = self.evaluate(set_name, method, parameters, splits=("validation",), keep=True, stage=stage)
            value = _validation(record)
            if plan.better(value, score) and record is not best:
                if best_dir is not None:
                    shutil.rmtree(best_dir, ignore_errors=True)
                best, best_dir, score = record, merged, value
            elif merged is not None and merged != best_dir:
                shutil.rmtree(merged, ignore_errors=True)

        for parameters in plan.stage_one(method, self.quick)[1:]:
            consider(parameters, "density")
        for parameters in plan.stage_two(best["parameters"], self.quick):
            consider(parameters, "lambda")
        if "test" not in best["correct"] and best_dir is not None:
            correct, checks = self.bench.score(best_dir, ("test",))
            best["correct"].update(correct)
            best["checks"].update(checks)
        elif "test" not in best["correct"]:  # chosen among resumed rows: merge it again for test
            self.evaluate(set_name, method, best["parameters"], splits=("test",), stage=best["stage"])
        if best_dir is not None:
            shutil.rmtree(best_dir, ignore_errors=True)
        self.report["rows"].append({"set": set_name, "method": method, "kind": "tuned", "evaluation": best["id"]})
        self.save()
        return best

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> dict:
        sets = ["full"] if self.quick else [s for s in plan.EXPERT_SETS if not self.only_sets or s in self.only_sets]
        replicates = {} if self.quick else {r: p for r, p in plan.REPLICATES.items() if p in sets and (not self.only_sets or r in self.only_sets)}
        chosen = [m for m in plan.methods(self.quick) if not self.only_methods or m in self.only_methods]
        self.members = {}
        self.experts([*sets, *replicates])
        base_correct, base_checks = self.bench.score(self.bench.base(), SPLITS)
        self.report["base"] = {"correct": base_correct, "checks": base_checks}
        self.save()
        tuned = {}
        for set_name in sets:
            best_value: Optional[float] = None
            for method in chosen:
                tuned[(set_name, method)] = record = self.tune(set_name, method)
                value = _validation(record)
                if method in plan.BUILTINS and plan.better(value, best_value):
                    best_value = value
                    self.report["best_builtin"][set_name] = {"method": method, "evaluation": record["id"]}
            self.save()
        for replicate, primary in replicates.items():
            for method in chosen:
                defaults, _ = self.evaluate(replicate, method, {}, stage="defaults")
                self.report["rows"].append({"set": replicate, "method": method, "kind": "defaults", "evaluation": defaults["id"]})
                chosen, _ = self.evaluate(replicate, method, tuned[(primary, method)]["parameters"], stage="tuned on " + primary)
                self.report["rows"].append({"set": replicate, "method": method, "kind": "tuned", "evaluation": chosen["id"]})
            best = self.report["best_builtin"].get(primary)
            if best is None:  # a partial plan without built-ins
                continue
            rows = [r for r in self.report["rows"] if r["set"] == replicate and r["kind"] == "tuned" and r["method"] == best["method"]]
            self.report["best_builtin"][replicate] = {"method": best["method"], "evaluation": rows[0]["evaluation"], "chosen_on": primary}
            self.save()
        self.save(figure=True)
        return self.report
