"""Peak memory of `mergekit-wudi report` against model size: it reads one tensor group at a time.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/report_memory.py [--root DIR] [--layers 2 16] [--keep]

Builds bf16 Llama-shaped families (base + 3 fine-tunes, single safetensors file each)
whose tensors have the same shapes and differ only in depth, runs
`mergekit-wudi report CONFIG --no-plots --no-ranks --quiet` (wudi_cfs) on each in a
subprocess, and samples /proc/PID/status every 20 ms. Prints the checkpoint sizes and
the peak resident memory, split into anonymous memory (tensors, Python, torch) and
file-backed pages (mmapped safetensors shards, shared libraries). If the report reads
lazily, the anonymous peak does not grow with depth.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 1024, 2816, 16, 4, 32000


def _config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def _shapes(layers: int) -> dict:
    kv = KV_HEADS * HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN),
              "model.norm.weight": (HIDDEN,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
                       p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE), p + "input_layernorm.weight": (HIDDEN,),
                       p + "post_attention_layernorm.weight": (HIDDEN,)})
    return shapes


def build_family(root: Path, layers: int, fine_tunes: int = 3) -> list:
    generator = torch.Generator().manual_seed(layers)
    shapes = _shapes(layers)
    paths = []
    for index in range(fine_tunes + 1):
        state = {}
        for name, shape in shapes.items():
            # Base weights repeat across models (same seed per tensor); fine-tunes add a rank-4 delta.
            tensor = torch.randn(shape, generator=torch.Generator().manual_seed(hash(name) % 2**31)) * 0.02
            if index and len(shape) == 2:
                tensor += (torch.randn(shape[0], 4, generator=generator) @ torch.randn(4, shape[1], generator=generator)) * 1e-3
            state[name] = tensor.to(torch.bfloat16)
        path = root / ("base" if index == 0 else f"ft{index}")
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(_config(layers)))
        save_file(state, str(path / "model.safetensors"))
        del state
        paths.append(path)
    return paths


def _status(pid: int) -> dict:
    values = {}
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def measure(config: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "mergekit_wudi.cli", "report", str(config), "--out", str(out),
               "--no-plots", "--no-ranks", "--quiet"]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    while process.poll() is None:
        try:
            for key, value in _status(process.pid).items():
                peaks[key] = max(peaks[key], value)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    if process.wait() != 0:
        raise SystemExit(f"report failed on {config}")
    peaks["seconds"] = time.perf_counter() - start
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="report-memory-"))
    mib = 2**20
    group = 4 * INTERMEDIATE * HIDDEN * 2  # the largest linear group: 4 models of a (2816, 1024) bf16 tensor
    print(f"largest linear tensor group read at once: {group / mib:.1f} MiB (bf16, 4 models)")
    print("| layers | checkpoints (4 models) | peak RSS | peak anon | peak file-backed | seconds |")
    print("|---|---|---|---|---|---|")
    try:
        for layers in args.layers:
            family_root = root / f"layers{layers}"
            base, *models = build_family(family_root, layers)
            size = sum(p.stat().st_size for p in family_root.rglob("*.safetensors"))
            config = family_root / "wudi_cfs.yml"
            config.write_text(json.dumps({"merge_method": "wudi_cfs", "base_model": str(base),
                                          "models": [{"model": str(m)} for m in models]}))
            peaks = measure(config, family_root / "report")
            print(f"| {layers} | {size / mib:.0f} MiB | {peaks['VmHWM'] / mib:.0f} MiB | {peaks['RssAnon'] / mib:.0f} MiB "
                  f"| {peaks['RssFile'] / mib:.0f} MiB | {peaks['seconds']:.0f} |", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
