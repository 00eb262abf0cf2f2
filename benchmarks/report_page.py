"""The results page and bar chart of the real-model benchmarks (benchmarks/real_model, benchmarks/llm)."""

from pathlib import Path
from typing import Dict, List, Optional, Sequence


def page(title: str, intro: Sequence[str], table: List[str], stats_title: str, stats: List[str], report: dict) -> str:
    """results.md: title, intro (one line per item), the merges table, the task-vector table,
    and the expert training time and thread count from `report`."""
    return "\n".join(
        [
            f"# {title}",
            "",
            *intro,
            "",
            *table,
            "",
            stats_title,
            "",
            *stats,
            "",
            f"Expert training (or cache load) took {report['expert_training_s']:.0f} s; torch threads: {report['torch_threads']}.",
            "",
        ]
    )


def grouped_bars(
    path: Path,
    labels: List[str],
    values: List[Dict[str, float]],
    task_names: Sequence[str],
    *,
    title: str,
    ylabel: str,
    ylim: tuple,
    errors: Optional[List[float]] = None,
    inches_per_group: float = 0.5,
    label_style: Optional[dict] = None,
) -> None:
    """accuracy.png: per row (a label and its {task: accuracy in [0, 1]}), one bar per task and
    a black bar for the average, with `errors` (in [0, 1]) as its error bars if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / (len(task_names) + 1)
    figure, axis = plt.subplots(figsize=(max(10, inches_per_group * len(labels)), 5.5))
    for k, name in enumerate([*task_names, "average"]):
        positions = [i + (k - len(task_names) / 2) * width for i in range(len(labels))]
        if name != "average":
            axis.bar(positions, [100 * v[name] for v in values], width, label=name)
            continue
        heights = [100 * sum(v.values()) / len(v) for v in values]
        if errors is None:
            axis.bar(positions, heights, width, label=name, color="black")
        else:
            axis.bar(positions, heights, width, yerr=[100 * e for e in errors], label="average (± s.e.)",
                     color="black", capsize=1.5, ecolor="grey")
    axis.set_xticks(range(len(labels)), labels, ha="right", **(label_style or {"rotation": 40, "fontsize": 8}))
    axis.set_ylabel(ylabel)
    axis.set_ylim(*ylim)
    axis.set_title(title)
    axis.legend(ncol=len(task_names) + 1, fontsize=8, loc="upper center")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
