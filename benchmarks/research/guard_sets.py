"""Issue 23: what the adapter guard (mergekit_wudi/guard.py) decides on each benchmark expert set,
through the path a merge takes (mergekit ModelReferences, `base+adapter` for LoRA members, mergekit's
LoaderCache and LoRA merge).

    python benchmarks/research/guard_sets.py llm|minilm SET... [mixed] [--bf16]

SET: a folder name under the benchmark's expert cache (~/.cache/mergekit-wudi-bench/BENCH/);
`mixed` is full experts on even-indexed tasks and conventional LoRA on odd ones
(benchmarks/bench/plan.mixed_members). Prints, per set, the sampled tensors' count, each
fine-tune's median input and output overlap and kind ("a seed each": the guard's trained-adapter
test passed), the median number of directions compared (k), and the lambda a default merge gets
from the methods that sum disjoint updates (wudi, wudi_cfs, tsv, ace) and from iso_c and iso_cts.
--bf16: the base and every fine-tune (LoRA members after mergekit's merge) saved in bfloat16
first, as most shared checkpoints are.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, os.path.dirname(__file__))

from expert_kind import ROOT, mixed_folders  # noqa: E402


def members(bench: str, set_name: str, task_names) -> list:
    """[(kind, path)] of a cache folder, or of `mixed`."""
    root = ROOT / bench
    if set_name != "mixed":
        kind = "full" if set_name.startswith("full") else "lora"
        return [(kind, root / set_name / task) for task in task_names]
    from bench.plan import mixed_members

    folders = mixed_folders(root, task_names)
    return [(kind, root / folders[kind] / task) for task, kind in mixed_members(task_names).items()]


def in_bf16(reference, lora_cache: str, folder: Path):
    """reference's weights (after mergekit's LoRA merge) saved in bfloat16 under folder."""
    import torch
    from mergekit.common import ModelReference
    from safetensors.torch import load_file, save_file

    source = Path(reference.merged(cache_dir=lora_cache).model.path)
    folder.mkdir(parents=True)
    shutil.copy(source / "config.json", folder / "config.json")
    state = {}
    for file in sorted(source.glob("*.safetensors")):
        state.update(load_file(str(file)))
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"))
    return ModelReference.parse(str(folder))


def main() -> None:
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions

    from mergekit_wudi.guard import capped_lambda, expert_kinds

    bf16 = "--bf16" in sys.argv
    bench, sets = sys.argv[1], [a for a in sys.argv[2:] if a != "--bf16"]
    if bench == "llm":
        from llm.tasks import TASK_NAMES
    else:
        from real_model.tasks import TASK_NAMES
    base = ROOT / bench / "base"
    with tempfile.TemporaryDirectory() as lora_cache:
        LoaderCache().setup(MergeOptions(lora_merge_cache=lora_cache))
        for set_name in sets:
            started = time.perf_counter()
            refs = [ModelReference.parse(str(path) if kind == "full" else f"{base}+{path}")
                    for kind, path in members(bench, set_name, TASK_NAMES)]
            base_ref = ModelReference.parse(str(base))
            if bf16:
                folder = Path(lora_cache) / "bf16" / set_name
                base_ref = in_bf16(base_ref, lora_cache, folder / "base")
                refs = [in_bf16(ref, lora_cache, folder / task) for ref, task in zip(refs, TASK_NAMES)]
            kinds = expert_kinds(base_ref, refs)
            seconds = time.perf_counter() - started
            summing, flattening = (capped_lambda(base_ref, refs, 1.0, sums_disjoint=s)[0] for s in (True, False))
            print(f"{bench} {set_name}{' (bf16)' if bf16 else ''}: {len(kinds.tensors)} tensors ({kinds.tensors[0]} .. {kinds.tensors[-1]}), "
                  f"k {kinds.rank:g}, default lambda {summing:.3g} (wudi, wudi_cfs, tsv, ace), {flattening:.3g} (iso_c, iso_cts), "
                  f"{seconds:.0f} s with the LoRA merges")
            for index, (task, inputs, outputs, kind) in enumerate(zip(TASK_NAMES, kinds.inputs, kinds.outputs, kinds.kinds)):
                label = f"{kind}{', a seed each' if index in kinds.seed_each else ''}"
                print(f"  {task:12s} input {inputs:6.1f}  output {outputs:5.1f}  ratio {inputs / outputs:5.2f}  {label}")


if __name__ == "__main__":
    main()
