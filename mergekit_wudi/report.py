"""Interference report: how much a solved merge lowers the WUDI objective, tensor by tensor.

For each linear weight that a config of one of our methods (adapter.MERGE_METHODS)
would solve, the report gives its shape, the number N of task vectors, ||t_i||_F and
the effective rank of each t_i, and the WUDI interference loss (WUDI-Merging,
arXiv:2503.08099, Eq. 21 of the ICML text)

    L(t) = sum_i ||(t - t_i) t_i^T||_F^2 / ||t_i||_F^2

at the two vectors that would be added to W0: task arithmetic's lambda * sum_i t_i (what
`merge_method: task_arithmetic` gives with the same weights and lambda) and the solved
lambda * t_m. With lambda = 1 the first is the solvers' starting point. For `doge` the
solver minimises DOGE's own loss, and t_m carries its eta / ||t_i|| scale; tsv, iso_c
and iso_cts minimise no loss; L is still the WUDI loss.

Everything that decides what a merge computes comes from mergekit and the adapter
themselves: mergekit's planner enumerates the output tensors and resolves every
parameter (per-model `weight`, gradients, `filter`s, slices), mergekit's lazy loaders
read one tensor of each model at a time, and the adapter builds the task vectors
t_i = weight_i (W_i - W0) and calls the solver. The report only wraps the solver class
to keep its input and output. So at any moment one tensor group is in memory (plus the
loaders' currently open shard), never a whole model.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"\.layers?\.(\d+)\.|\.h\.(\d+)\.|\.blocks?\.(\d+)\.")


@dataclass(frozen=True)
class TensorReport:
    """One solved tensor: its name, shape, task-vector statistics and objectives."""

    name: str
    shape: Tuple[int, int]
    models: Tuple[str, ...]
    norms: Tuple[float, ...]
    effective_ranks: Tuple[float, ...]
    scale: float  # the lambda the merge uses for this tensor: the config's, capped by adapter_guard where it acts
    objective_task_arithmetic: float
    objective_solved: float
    calibration: float = 1.0  # the calibrate rule's scale c (1 with calibrate: none; nan for a merge by kind, whose
    # parts' c are in binding); the merge adds lambda * c * t_m
    binding: str = ""  # what bound c: the task (t_j) under input_space, "norm", "gain", "sum"; by kind, each part's
    input_overlap: Tuple[float, ...] = ()  # per task, solvers.overlap.subspace_overlap (nan: not computed)
    output_overlap: Tuple[float, ...] = ()
    equalized: Tuple[float, ...] = ()  # per task, the factor `equalize` multiplied it by before the solve; (): none

    @property
    def count(self) -> int:
        return len(self.models)

    @property
    def factors(self) -> Tuple[float, ...]:
        """Each task's equalize factor, 1 where none was applied."""
        return self.equalized or (1.0,) * self.count

    @property
    def ratio(self) -> float:
        """L(lambda t_m) / L(lambda sum_i t_i); nan when task arithmetic has no interference."""
        if self.objective_task_arithmetic == 0.0:
            return math.nan
        return self.objective_solved / self.objective_task_arithmetic

    @property
    def layer(self) -> Optional[int]:
        return layer_index(self.name)


def layer_index(name: str) -> Optional[int]:
    """The block index in a tensor name (`model.layers.3.mlp...` -> 3), or None."""
    match = _LAYER_RE.search(f".{name}")
    if match is None:
        return None
    return int(next(group for group in match.groups() if group is not None))


def effective_rank(matrix: torch.Tensor) -> float:
    """exp of the Shannon entropy of the normalised singular values (Roy & Vetterli, EUSIPCO 2007).

        p_k = s_k / sum_j s_j,   erank = exp(-sum_k p_k log p_k)

    Between 1 (rank one) and min(out, in) (all singular values equal); 0.0 for a zero matrix.
    Computed in float64 for float64 input, else float32.
    """
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    singular_values = torch.linalg.svdvals(matrix.to(dtype))
    total = singular_values.sum()
    if not bool(total > 0):
        return 0.0
    p = singular_values / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def plan_reports(
    config,
    *,
    options=None,
    name_filter: Optional[str] = None,
    max_tensors: Optional[int] = None,
    device: str = "cpu",
    ranks: bool = True,
    progress: Optional[Callable[[], None]] = None,
) -> Tuple[int, Iterator[TensorReport]]:
    """Check and plan at once; return (number of candidate tensors, lazy iterator of reports).

    config: a mergekit MergeConfiguration with merge_method one of ours
    (ConfigError otherwise). The iterator yields one TensorReport per solved tensor,
    in mergekit's order, reading the tensors only as it goes.
    name_filter: a regular expression searched in tensor names (a plain substring works).
    max_tensors: stop after this many reports. device: where tensors are solved.
    progress: called once per candidate tensor examined (a progress bar's update).
    options: mergekit MergeOptions (trust_remote_code, caches, lora_merge_dtype...).
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache, SaveTensor
    from mergekit.merge import _model_out_config
    from mergekit.merge_methods import registry
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    from mergekit_wudi.adapter import MERGE_METHODS
    from mergekit_wudi.config_error import ConfigError
    from mergekit_wudi.registration import register
    from mergekit_wudi.tensor_kinds import will_solve

    register()

    ours = {method.method_name: method for method in MERGE_METHODS}
    if config.merge_method not in ours:
        raise ConfigError(
            f"merge_method {config.merge_method!r} is not a mergekit-wudi method; "
            f"the report needs one of: {', '.join(ours)}"
        )
    method = ours[config.merge_method]
    if registry.get(method.method_name) is not method:
        raise ConfigError(f"merge method {method.method_name!r} is registered by another package")
    options = options or MergeOptions(quiet=True)
    pattern = re.compile(name_filter) if name_filter else None

    config = config.model_copy(deep=True)  # the planner normalises it in place
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    # plan_to_disk builds the tasks mergekit-yaml runs; only their ExecuteMergeMethodTasks are used and
    # nothing is written (plan_in_memory fails in mergekit 0.1.5: ReturnTensor rejects a Task field).
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    candidates = []
    for save in planner.plan_to_disk(out_path=os.devnull):
        if not isinstance(save, SaveTensor):
            continue
        task = save.tensor_task
        weight = task.output_weight
        if pattern is not None and not pattern.search(weight.name):
            continue
        if will_solve(weight.name, None, weight.vocabulary_axis, solve=task.parameters.get("solve", True)):
            candidates.append(task)
    count = len(candidates) if max_tensors is None else min(max_tensors, len(candidates))
    return count, _iter_reports(
        method, candidates, max_tensors=max_tensors, device=device, ranks=ranks, progress=progress or (lambda: None)
    )


def _iter_reports(method, candidates, *, max_tensors, device, ranks, progress) -> Iterator[TensorReport]:
    # The method with its solver wrapped to keep each solve's input and output, once per run.
    records: List[Tuple[torch.Tensor, torch.Tensor]] = []
    recording_method = dataclasses.replace(method, solver_cls=_recording_solver(method.solver_cls, records))
    for task in candidates:
        records.clear()
        report = _report_one(recording_method, records, task, device=device, ranks=ranks)
        progress()
        if report is None:
            continue
        yield report
        max_tensors = None if max_tensors is None else max_tensors - 1
        if max_tensors == 0:
            return


def _report_one(recording_method, records: list, task, *, device: str, ranks: bool) -> Optional[TensorReport]:
    """Load one tensor group, solve it through the adapter, and measure; None: not solved."""
    from mergekit.io.tasks import LoaderCache

    from mergekit_wudi.guard import capped_lambda
    from mergekit_wudi.solvers import wudi_objective
    from mergekit_wudi.solvers.overlap import subspace_overlap
    from mergekit_wudi.tensor_kinds import will_solve

    name = task.output_weight.name
    loads = _load_tasks(task)
    if loads is None or task.base_model not in loads:
        return None
    base_model = task.base_model
    base_tensor = loads[base_model]()
    if base_tensor is None or not will_solve(name, base_tensor, task.output_weight.vocabulary_axis):
        return None
    tensors = {base_model: base_tensor.to(device)}
    for model, load in loads.items():
        if model != base_model:
            tensor = load()
            tensors[model] = None if tensor is None else tensor.to(device)
    # Close the shards just read: mergekit's loaders keep the current safetensors file
    # mapped, and its touched pages would otherwise stay resident until the next shard.
    for model in loads:
        LoaderCache().get(model).flush()
    _merge_one_group(recording_method, task, tensors)
    del tensors, base_tensor
    if not records:  # the adapter sent it to the fallback after all
        return None
    task_vectors, merged, calibration, equalization = records.pop()
    non_base = [model for model in task.model_order if model != base_model]
    scale = float(task.parameters["lambda"])
    if task.parameters.get("adapter_guard"):  # the lambda the merge uses (guard.py)
        solver_cls = recording_method.solver_cls
        scale, _ = capped_lambda(base_model, non_base, scale, device, solver_cls.sums_disjoint, solver_cls.task_sized)
    inputs, outputs = subspace_overlap(task_vectors) if ranks else ((math.nan,) * len(task_vectors),) * 2
    return TensorReport(
        name=name,
        shape=tuple(task_vectors.shape[1:]),
        models=tuple(str(model) for model in non_base),
        norms=tuple(float(torch.linalg.vector_norm(t)) for t in task_vectors),
        effective_ranks=tuple(effective_rank(t) if ranks else math.nan for t in task_vectors),
        scale=scale,
        calibration=math.nan if calibration is not None and calibration.parts else
        1.0 if calibration is None else calibration.scale,
        binding=_bound_by(calibration),
        input_overlap=inputs,
        output_overlap=outputs,
        equalized=equalization or (),
        objective_task_arithmetic=wudi_objective(task_vectors, scale * task_vectors.sum(dim=0)),
        objective_solved=wudi_objective(task_vectors, scale * merged),
    )


def _bound_by(calibration) -> str:
    """What bound c: the task (t_j), "norm", "gain", "sum"; "" for none; for a merge by kind
    (binding "parts"), each part's label, c and binding, e.g. "full 1.83 gain; adapters 1.02 norm"."""
    if calibration is None or calibration.binding == "none":
        return ""
    if calibration.parts:
        return "; ".join(f"{label} " + ("1 none" if part is None else f"{part.scale:.4g} {_bound_by(part) or 'none'}")
                         for label, part in calibration.parts)
    return f"t_{calibration.task + 1}" if calibration.binding == "task" else calibration.binding


def _recording_solver(solver_cls: type, records: list) -> type:
    """solver_cls, but each solve keeps (task_vectors, merged) in records."""

    class RecordingSolver(solver_cls):
        def solve(self, task_vectors: torch.Tensor, *, overwrite: bool = False, **per_model: Any) -> torch.Tensor:
            merged = super().solve(task_vectors, **per_model)  # never in place: the report reads them after
            # A copy: the adapter writes W0 + lambda * t_m into the solver's output in place.
            records.append((task_vectors, merged.clone(), self.last_calibration, self.last_equalization))
            return merged

    RecordingSolver.__qualname__ = f"Recording{solver_cls.__qualname__}"
    return RecordingSolver


def _load_tasks(task) -> Optional[Dict[Any, Callable[[], Optional[torch.Tensor]]]]:
    """model -> a function that reads that model's tensor, through mergekit's LoadTensor tasks."""
    from mergekit.io.tasks import GatherTensors

    gather = task.gather_tensors
    if not isinstance(gather, GatherTensors):
        return None  # vocabulary permutation or truncation: not a linear weight
    loads = {}
    for model, info in gather.weight_info.items():
        load = gather.arguments()[f"{model}:{info.name}"]
        loads[model] = load.execute
    return loads


def _merge_one_group(method, task, tensors: Dict[Any, torch.Tensor]) -> torch.Tensor:
    """Run method on one tensor group with the parameters mergekit resolved for it."""
    from mergekit.common import dtype_from_name
    from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata

    entries = tuple(
        TensorEntry(id=model, tensor=tensors[model], is_base=model == task.base_model)
        for model in task.model_order
        if tensors.get(model) is not None
    )
    group = TensorGroup(entries=entries, metadata=TensorMetadata.from_weight_info(task.output_weight))
    parameters = dict(task.parameters.items())
    for parameter in method.spec.input_parameters:
        parameters[parameter.name] = {
            entry.id: task.input_parameters[entry.id][parameter.name]
            for entry in entries
            if parameter.name in task.input_parameters[entry.id]
        }
    (result,) = method((group,), parameters=parameters, dtype=dtype_from_name(task.dtype))
    return result


# --- output --------------------------------------------------------------------------

CSV_COLUMNS = (
    "name",
    "layer",
    "shape",
    "n",
    "model",
    "norm",
    "equalize_factor",
    "effective_rank",
    "lambda",
    "calibration",
    "calibration_binding",
    "input_overlap",
    "output_overlap",
    "objective_task_arithmetic",
    "objective_solved",
    "ratio",
)


def write_csv(reports: Sequence[TensorReport], path: Path) -> None:
    """One row per (tensor, model); the objectives repeat on each row of a tensor."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for report in reports:
            for model, norm, factor, rank, inputs, outputs in zip(
                report.models, report.norms, report.factors, report.effective_ranks, report.input_overlap, report.output_overlap
            ):
                writer.writerow(
                    [
                        report.name,
                        "" if report.layer is None else report.layer,
                        "x".join(map(str, report.shape)),
                        report.count,
                        model,
                        repr(norm),
                        repr(factor),
                        repr(rank),
                        repr(report.scale),
                        repr(report.calibration),
                        report.binding,
                        repr(inputs),
                        repr(outputs),
                        repr(report.objective_task_arithmetic),
                        repr(report.objective_solved),
                        repr(report.ratio),
                    ]
                )


def write_markdown(reports: Sequence[TensorReport], path: Path, *, method: str, config_path: str) -> None:
    lines = [
        f"# Interference report: `{method}`",
        "",
        f"Config: `{config_path}`. Objective: the WUDI interference loss "
        "L(t) = sum_i ||(t - t_i) t_i^T||_F^2 / ||t_i||_F^2 (arXiv:2503.08099, Eq. 21), at the vectors added "
        "to W0: task arithmetic's t = lambda sum_i t_i and the solved t = lambda c t_m (c: the `calibrate` rule's scale, 1 without one; "
        "lambda: the one the merge uses, the config's capped where adapter_guard acts); t_i = weight_i (W_i - W0), untrimmed: "
        "where the method trims before its solve (`density` under 1: by default every method but doge trims full fine-tunes "
        "merged with LoRA adapters), L of the solved t "
        "also counts the entries the trim dropped, so it can exceed task arithmetic's. "
        "||t_i|| (x f): the norm, and where `equalize` rescaled t_i before the solve, its factor. "
        "Effective rank: exp of the entropy of the normalised singular values (Roy & Vetterli 2007).",
        "",
    ]
    if not reports:
        lines.append("No tensor was solved (check `--filter`, `solve` filters and the models).")
    else:
        total_ta = sum(r.objective_task_arithmetic for r in reports)
        total_solved = sum(r.objective_solved for r in reports)
        ratio = total_solved / total_ta if total_ta else math.nan
        lines += [
            f"{len(reports)} tensors; summed L: task arithmetic {total_ta:.6g}, solved {total_solved:.6g} "
            f"(ratio {ratio:.4g}).",
            "",
            "| tensor | shape | N | \\|\\|t_i\\|\\| | effective rank | calibrate c (bound by) | L task arithmetic | L solved | ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in reports:
            norms = ", ".join(f"{v:.4g}" + (f" (x{f:.3g})" if r.equalized else "") for v, f in zip(r.norms, r.factors))
            ranks = ", ".join(f"{v:.3g}" for v in r.effective_ranks)
            lines.append(
                f"| `{r.name}` | {r.shape[0]}x{r.shape[1]} | {r.count} | {norms} | {ranks} | "
                f"{_calibration_cell(r)} | "
                f"{r.objective_task_arithmetic:.6g} | {r.objective_solved:.6g} | {r.ratio:.4g} |"
            )
        lines += ["", "Models: " + "; ".join(f"t_{i + 1} = `{m}`" for i, m in enumerate(reports[0].models))]
        lines += expert_kinds_section(reports)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _calibration_cell(report: TensorReport) -> str:
    """c and what bound it; a merge by kind (c nan) shows each part's."""
    if math.isnan(report.calibration):
        return f"by kind: {report.binding}"
    return f"{report.calibration:.4g}{f' ({report.binding})' if report.binding else ''}"


KIND_ADVICE = {
    "full": "the methods' defaults were chosen on such sets (README, 'Which method when').",
    "lora": "where the output overlap is at least 2 (trained adapters' B's share output directions; independent "
            "random deltas stay near 1) and 4 or more directions are compared, wudi, wudi_cfs, tsv and ace cap lambda "
            "at 1/sqrt(K), K such adapters among the fine-tunes (adapter_guard, docs/methods.md): at lambda 1 they "
            "were 0.4-3.8 points below the best built-in on the benchmarks' two LoRA sets, at 1/sqrt(K) level with it.",
    "lora, one seed": "at lambda 1 wudi, wudi_cfs, tsv, ace and iso_c broke SmolLM2's such set (13-24 against 52 "
                      "for task_arithmetic at lambda 0.2; doge 42), and at 1/N each method's own merge scored under "
                      "the adapters' average on SmolLM2's such sets and level with it on MiniLM's, so where the first 12 linear "
                      "weights look like this every method merges each tensor as the average of the base and the "
                      "fine-tunes, lambda at most 1/(N+1) times their sum (doge: at most N/(N+1) times their mean), "
                      "where calibrate is the method's default (adapter_guard, docs/methods.md).",
}


def expert_kinds_section(reports: Sequence[TensorReport]) -> List[str]:
    """Each model's median input and output overlap over the reported tensors, and what kind of
    expert that looks like (solvers.overlap.expert_kind); nothing where none was computed."""
    from mergekit_wudi.solvers.overlap import model_kind

    models = reports[0].models
    rows, kinds = [], []
    for index in range(len(models)):
        pairs = [(r.input_overlap[index], r.output_overlap[index]) for r in reports
                 if r.models == models and index < len(r.input_overlap) and math.isfinite(r.input_overlap[index])]
        if not pairs:
            continue
        inputs, outputs, kind = model_kind(pairs)
        kinds += [kind] if kind and kind not in kinds else []
        rows.append(f"| t_{index + 1} | {inputs:.3g} | {outputs:.3g} | {inputs / outputs:.3g} | {kind or '-'} |")
    if not rows:
        return []
    return [
        "",
        "## What kind of experts these look like",
        "",
        f"Median over {len(reports)} tensors of how far each task vector's top-8 input (right singular) and "
        "output (left) subspaces coincide with another model's, as a multiple of chance (1: independent random "
        "subspaces). On the package's benchmarks full fine-tunes gave input 9-23 and input/output 0.8-2.5; LoRA "
        "adapters with a seed each input 1.4-2.9; adapters from one seed input 38-59 and input/output 7-18 "
        "(docs/research/lora-inputs.md). A heuristic from two model families, not a guarantee; few tensors "
        "(`--filter`, `--max-tensors`) make it noisy.",
        "",
        "| model | input overlap | output overlap | input / output | looks like |",
        "|---|---|---|---|---|",
        *rows,
        "",
        *(f"- {kind}: {KIND_ADVICE[kind]}" for kind in kinds),
    ]


def write_plots(reports: Sequence[TensorReport], directory: Path) -> List[Path]:
    """One PNG per layer (tensors without a layer index go to `other.png`): L before/after, norms."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "the report's plots need matplotlib: pip install 'mergekit-wudi[report]' (or pass --no-plots)"
        ) from None

    by_layer: Dict[Optional[int], List[TensorReport]] = {}
    for report in reports:
        by_layer.setdefault(report.layer, []).append(report)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for layer, group in by_layer.items():
        labels = [_short_name(r.name) for r in group]
        positions = range(len(group))
        figure, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(group) + 4), 4.5))
        width = 0.4
        left.bar([p - width / 2 for p in positions], [r.objective_task_arithmetic for r in group], width,
                 label="task arithmetic")
        left.bar([p + width / 2 for p in positions], [r.objective_solved for r in group], width, label="solved")
        left.set_yscale("log")
        left.set_ylabel("WUDI objective L")
        left.set_title("interference loss")
        left.legend()
        count = max(r.count for r in group)
        width = 0.8 / count
        for index in range(count):
            right.bar([p - 0.4 + width * (index + 0.5) for p in positions],
                      [r.norms[index] if index < r.count else 0.0 for r in group], width, label=f"t_{index + 1}")
        right.set_ylabel("||t_i||_F")
        right.set_title("task-vector norms")
        right.legend()
        for axis in (left, right):
            axis.set_xticks(list(positions))
            axis.set_xticklabels(labels, rotation=45, ha="right")
        figure.suptitle("other tensors" if layer is None else f"layer {layer}")
        figure.tight_layout()
        path = directory / ("other.png" if layer is None else f"layer_{layer:03d}.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def _short_name(name: str) -> str:
    match = _LAYER_RE.search(f".{name}")
    short = name[match.end() - 1:] if match else name
    return short.removesuffix(".weight")
