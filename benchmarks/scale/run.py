"""A 1B-class merge end to end through `mergekit-yaml`, every method, in one run (issue 25).

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/scale/run.py ROOT [--layers 16] [--kind full]
        [--methods ...] [--subset ...] [--json FILE] [--clean]

Generates the family under ROOT/<kind>-<layers> once (benchmarks/scale/family.py: Llama-3.2-1B
shapes, bf16, 1 GB shards, base + 4 fine-tunes, about 12.4 GB at 16 layers), then merges it with
`mergekit-yaml --lazy-unpickle --out-shard-size 1B` once per method, in a fresh process each, and
prints wall time and peak RSS (bench.mergekit_run: mergekit's own ru_maxrss, its tensors and the
safetensors pages it mapped) with their ratios to ties and to task_arithmetic, all measured in this run.

Reading/writing against solving: task_arithmetic's wall time is the cost of reading N + 1
checkpoints and writing one (its arithmetic is one add per element); a method's solve time is
its wall time minus that, every row reading a page cache warmed by an untimed first
merge. `wudi` and `doge` (Adam, 300 / 400 steps: hours at 1B on 2 cores), and any
method named in --subset, solve only layer 0's seven linear tensors (`solve` filter; the rest
goes to their task_arithmetic fallback), and their whole-model time is projected as
io + layers x (their wall - io).
Disk: the family stays for a rerun (it is generated once) unless --clean; each merge's output is
deleted as soon as it is measured.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bench.mergekit_run import run_mergekit  # noqa: E402
from family import LLAMA_1B, generate  # noqa: E402

BUILTINS = {"task_arithmetic": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5},
            "della": {"density": 0.5, "epsilon": 0.1}, "karcher": {}}
OURS = ("wudi_cfs", "tsv", "iso_c", "iso_cts", "ace")
SUBSET = ("wudi", "doge")  # layer 0 only, projected
SUBSET_FILTER = "layers.0."


def recipe(method: str, base: Path, models: list, subset: bool = False) -> dict:
    parameters = dict(BUILTINS.get(method, {}))
    if subset:
        parameters["solve"] = [{"filter": SUBSET_FILTER, "value": True}, {"value": False}]
    config = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
              "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}
    if method == "karcher":  # no base model: the Karcher mean of the fine-tunes
        config.pop("base_model")
    if parameters:
        config["parameters"] = parameters
    return config


def merge(config: dict, work: Path) -> tuple:
    """(wall s, peak RSS bytes) of one mergekit-yaml process (bench.mergekit_run); its output is removed."""
    path, out = work / "config.yml", work / "out"
    path.write_text(json.dumps(config))
    try:
        measured = run_mergekit(path, out, work, "--lazy-unpickle", "--out-shard-size", "1B")
        if not list(out.glob("*.safetensors")):
            raise RuntimeError(f"mergekit-yaml wrote no shard for {config['merge_method']}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return measured["wall_s"], measured["peak_rss_mib"] * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--layers", type=int, default=LLAMA_1B["layers"])
    parser.add_argument("--kind", choices=("full", "lora", "mixed"), default="full")
    parser.add_argument("--methods", nargs="+", default=[*BUILTINS, *OURS, *SUBSET])
    parser.add_argument("--subset", nargs="*", default=list(SUBSET),
                        help=f"methods that solve layer 0 only, projected to every layer (default: {' '.join(SUBSET)})")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--clean", action="store_true", help="delete the family afterwards")
    args = parser.parse_args()
    if {"task_arithmetic", "ties"} & set(args.subset):
        parser.error("--subset: task_arithmetic and ties are the reference rows, measured whole")
    family = args.root / f"{args.kind}-{args.layers}"
    base, *models = generate(family, args.layers, args.kind, 4)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; family: Llama-3.2-1B shapes, {args.layers} layers, {args.kind} fine-tunes, "
          f"bf16, {size / 1e9:.2f} GB a model, base + {len(models)}", flush=True)
    methods = ["task_arithmetic", "ties"] + [m for m in args.methods if m not in ("task_arithmetic", "ties")]
    rows = []

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps({"layers": args.layers, "kind": args.kind, "model_bytes": size, "rows": rows}, indent=1))

    work = args.root / "work"
    work.mkdir(parents=True, exist_ok=True)
    # untimed: every timed row then reads the checkpoints from a warm page cache (a cold first
    # task_arithmetic took 40 s against 19 s warm, and io enters every projection 16 times)
    merge(recipe("task_arithmetic", base, models), work)
    for method in methods:
        subset = method in args.subset
        seconds, rss = merge(recipe(method, base, models, subset), work)
        rows.append({"method": method, "wall_s": seconds, "peak_rss": rss, "subset": subset})
        print(f"  {method}: {seconds:.1f} s, {rss / 2**30:.2f} GiB", flush=True)
        save()  # after every row: an interrupted run keeps what it measured
    io = rows[0]["wall_s"]
    ties = rows[1]["wall_s"]
    print("\n| method | wall | / ties | / task_arithmetic | solve (wall - io) | peak RSS | / task_arithmetic |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        wall = row["wall_s"]
        note = ""
        if row["subset"]:
            measured = wall
            wall = io + args.layers * max(0.0, measured - io)
            note = f" (projected from layer 0: {measured:.0f} s)"
        row["projected_wall_s"] = wall
        print(f"| {row['method']} | {wall:.0f} s{note} | {wall / ties:.2f}x | {wall / io:.2f}x | {max(0.0, wall - io):.0f} s "
              f"| {row['peak_rss'] / 2**30:.2f} GiB | {row['peak_rss'] / rows[0]['peak_rss']:.2f}x |", flush=True)
    save()  # with the projected walls
    if args.clean:
        shutil.rmtree(family)


if __name__ == "__main__":
    main()
