"""Llama-3.2-1B-shaped families whose task vectors look like real ones (issue 25).

    python benchmarks/scale/family.py profile     # once, from the SmolLM2 benchmark's cached experts
    python benchmarks/scale/family.py generate ROOT [--layers 16] [--kind full|lora|mixed] [--fine-tunes 4]

How the task vectors are made. `profile` reads the SmolLM2-135M experts that benchmarks/llm
trains (cached in ~/.cache/mergekit-wudi-bench/llm: the `full` set, four full fine-tunes, and
the `lora` set, four rank-8 adapters) and writes profile.json beside this file: per module
(q, k, v, o, gate, up, down) and depth (5 bins over the 30 layers), the task vector's norm
relative to the base weight's, ||t|| / ||W0||, averaged over the four tasks, and its
normalised singular values s_j / s_1 (the mean of log10 over tasks): the first 16 by index,
then 32 points of the relative index (j + 0.5) / min(out, in); the base weights' RMS per module; and the embedding's
relative change. `generate` then writes, for each 1B tensor, the base W0 (Gaussian with that
module's RMS) and per fine-tune W0 + t with

    full:  t = U diag(s) V^T + E,  s_j from the profile (j < 16 by index, then at the relative
           index (j + 0.5) / min(out, in), made non-increasing), j < 256,
           E Gaussian holding the spectrum's energy beyond j = 256 (a flat tail);
    lora:  t = U diag(s) V^T of rank 16, s from the LoRA profile (8 values, interpolated);

both scaled to ||t|| = relnorm * ||W0||, with U, V orthonormal (one QR per shape, then a random
row permutation and signs per tensor and fine-tune, so tasks get independent subspaces as
distinct fine-tunes do). `mixed` makes fine-tunes 1, 3, ... full and 2, 4, ... LoRA. Norms and
embeddings change by the profile's relative amount for full fine-tunes, not at all for LoRA
ones. Everything is stored as bfloat16 in 1 GB shards with a safetensors index, deterministic
from the tensor's name. Shapes: hidden 2048, intermediate 8192, 16 layers, 32 heads / 8 KV
heads (k and v are 512 x 2048), vocabulary 128256, tied embeddings: 1.24 B parameters, 2.5 GB a
model, about 12.4 GB for base + 4 (the disk this benchmark needs; `run.py --clean` removes it).
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch

HERE = Path(__file__).resolve().parent
PROFILE = HERE / "profile.json"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GRID = 32  # spectrum points over the relative index
HEAD = 16  # the largest singular values, kept by index (a task's few top directions do not scale with the width)
DEPTH_BINS = 5
MAIN_RANK = 256  # singular directions made exactly; the rest of a full spectrum is a Gaussian tail
LORA_RANK = 16
SHARD_BYTES = 10**9
LLAMA_1B = {"hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8, "vocab": 128256}


def midpoints(count: int) -> torch.Tensor:
    """The relative index (j + 0.5) / count of count points, float64."""
    return (torch.arange(count, dtype=torch.float64) + 0.5) / count


def grid() -> torch.Tensor:
    return midpoints(GRID)


# --- profile: from the SmolLM2 experts ---------------------------------------------------------


def profile() -> dict:
    """profile.json's content from the cached SmolLM2 full and LoRA experts (see the docstring)."""
    from safetensors.torch import load_file

    root = Path.home() / ".cache" / "mergekit-wudi-bench" / "llm"
    base = load_file(str(root / "base" / "model.safetensors"))
    layers = 1 + max(int(name.split(".")[2]) for name in base if name.startswith("model.layers."))
    full_dirs = sorted(next(root.glob("full-*")).iterdir())
    lora_dirs = sorted(next(root.glob("lora-*")).iterdir())
    full = [load_file(str(d / "model.safetensors")) for d in full_dirs if d.is_dir()]
    loras = [_lora_vectors(d) for d in lora_dirs if d.is_dir()]
    result: Dict[str, dict] = {"source": "SmolLM2-135M benchmark experts (benchmarks/llm), 4 tasks", "grid": GRID,
                               "base_rms": {}, "full": {}, "lora": {}}
    for module in MODULES:
        names = [f"model.layers.{i}.{'mlp' if module in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{module}.weight"
                 for i in range(layers)]
        result["base_rms"][module] = float(torch.stack([base[n].float().pow(2).mean() for n in names]).mean().sqrt())
        for kind, vectors in (("full", [lambda n, s=s: s[n].float() - base[n].float() for s in full]),
                              ("lora", [lambda n, v=v: v[n] for v in loras])):
            bins = [[] for _ in range(DEPTH_BINS)]
            for i, name in enumerate(names):
                bins[i * DEPTH_BINS // layers].extend((f(name), base[name].float()) for f in vectors)
            result[kind][module] = [_summary(pairs, kind) for pairs in bins]
    embed = "model.embed_tokens.weight"
    result["embed_relnorm"] = float(torch.tensor([float((s[embed].float() - base[embed].float()).norm() / base[embed].float().norm())
                                                  for s in full]).mean())
    result["embed_rms"] = float(base[embed].float().pow(2).mean().sqrt())
    result["norm_relnorm"] = float(torch.tensor([float((s[n].float() - base[n].float()).norm() / base[n].float().norm())
                                                 for s in full for n in base if n.endswith("norm.weight")]).mean())
    return result


def _lora_vectors(folder: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(str(folder / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    out = {}
    for key, a in state.items():
        if ".lora_A." in key:
            name = key.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight"
            out[name] = scale * state[key.replace("lora_A", "lora_B")].float() @ a.float()
    return out


def _summary(pairs, kind: str) -> dict:
    """Mean relative norm, and the mean log10(s_j / s_1) at the grid (full) or per index (lora)."""
    relnorms, logs = [], []
    for t, w0 in pairs:
        values = torch.linalg.svdvals(t.double())
        relnorms.append(float(t.norm() / w0.norm()))
        if kind == "lora":
            values = values[:8]
            logs.append(torch.log10(values / values[0]))
        else:  # the first HEAD values by index, then the relative grid
            relative = torch.log10(values / values[0])
            logs.append(torch.cat([relative[:HEAD], _interp(grid(), midpoints(values.numel()), relative)]))
    return {"relnorm": sum(relnorms) / len(relnorms), "log_spectrum": [round(float(x), 4) for x in torch.stack(logs).mean(0)]}


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp on float64 tensors (torch has no 1-D linear interpolation)."""
    import numpy as np

    return torch.from_numpy(np.interp(x.numpy(), xp.numpy(), fp.numpy()))


# --- generate: the 1B family --------------------------------------------------------------------


def shapes(layers: int, dims: dict = LLAMA_1B) -> Iterator[Tuple[str, tuple]]:
    hidden, inter, kv = dims["hidden"], dims["intermediate"], dims["kv_heads"] * dims["hidden"] // dims["heads"]
    yield "model.embed_tokens.weight", (dims["vocab"], hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        for module, shape in (("q_proj", (hidden, hidden)), ("k_proj", (kv, hidden)), ("v_proj", (kv, hidden)),
                              ("o_proj", (hidden, hidden))):
            yield p + f"self_attn.{module}.weight", shape
        yield p + "post_attention_layernorm.weight", (hidden,)
        for module, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
            yield p + f"mlp.{module}.weight", shape
    yield "model.norm.weight", (hidden,)


def config(layers: int, dims: dict = LLAMA_1B) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dims["hidden"],
            "intermediate_size": dims["intermediate"], "num_hidden_layers": layers,
            "num_attention_heads": dims["heads"], "num_key_value_heads": dims["kv_heads"], "head_dim": dims["hidden"] // dims["heads"],
            "vocab_size": dims["vocab"], "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16", "hidden_act": "silu"}


class Family:
    """Tensors of one family, each a pure function of (name, model index)."""

    def __init__(self, layers: int, kind: str, prof: dict):
        self.layers, self.kind, self.prof = layers, kind, prof
        self._bases: Dict[tuple, torch.Tensor] = {}

    def kind_of(self, model: int) -> str:
        return self.kind if self.kind != "mixed" else ("full" if model % 2 == 1 else "lora")

    def tensor(self, name: str, shape: tuple, model: int) -> torch.Tensor:
        base = self._base(name, shape)
        if model == 0:
            return base.to(torch.bfloat16)
        kind = self.kind_of(model)
        generator = torch.Generator().manual_seed(zlib.crc32(f"{name}/{model}".encode()))
        module = name.split(".")[-2]
        if module in MODULES:
            delta = self._task_vector(module, int(name.split(".")[2]), shape, kind, base.norm(), generator)
        elif kind == "lora":
            return base.to(torch.bfloat16)
        else:
            relnorm = self.prof["embed_relnorm" if "embed" in name else "norm_relnorm"]
            delta = torch.randn(shape, generator=generator) * (relnorm * float(base.norm()) / base.numel() ** 0.5)
        return (base + delta).to(torch.bfloat16)

    def _base(self, name: str, shape: tuple) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        module = name.split(".")[-2]
        if module in MODULES:
            return torch.randn(shape, generator=generator) * self.prof["base_rms"][module]
        if "embed" in name:
            return torch.randn(shape, generator=generator) * self.prof["embed_rms"]
        return 1.0 + 0.05 * torch.randn(shape, generator=generator)

    def _task_vector(self, module: str, layer: int, shape: tuple, kind: str, base_norm, generator) -> torch.Tensor:
        entry = self.prof[kind][module][layer * DEPTH_BINS // self.layers]
        small = min(shape)
        logs = torch.tensor(entry["log_spectrum"], dtype=torch.float64)
        if kind == "lora":
            values = 10 ** _interp(midpoints(LORA_RANK), midpoints(logs.numel()), logs)
            rank, tail = LORA_RANK, 0.0
        else:
            every = _interp(midpoints(small), grid(), logs[HEAD:])
            every[:HEAD] = logs[:HEAD]
            every = 10 ** torch.cummin(every, 0).values  # non-increasing
            rank = min(small, MAIN_RANK)
            values, tail = every[:rank], float(every[rank:].pow(2).sum())
        total = float(values.pow(2).sum()) + tail
        scale = entry["relnorm"] * float(base_norm) / total ** 0.5
        left = self._orthonormal(shape[0], rank, generator)
        right = self._orthonormal(shape[1], rank, generator)
        t = (left * (values * scale).float()) @ right.mT
        if tail:
            t += torch.randn(shape, generator=generator) * (scale * (tail / t.numel()) ** 0.5)
        return t

    def _orthonormal(self, rows: int, rank: int, generator) -> torch.Tensor:
        key = (rows, rank)
        if key not in self._bases:  # one QR per shape; tensors and fine-tunes permute its rows and flip signs
            q, _ = torch.linalg.qr(torch.randn(rows, rank, generator=torch.Generator().manual_seed(rows * 7919 + rank)))
            self._bases[key] = q
        signs = torch.randint(0, 2, (rows, 1), generator=generator).float() * 2 - 1
        return self._bases[key][torch.randperm(rows, generator=generator)] * signs


def generate(root: Path, layers: int, kind: str, fine_tunes: int, dims: dict = LLAMA_1B) -> list:
    """Write base and fine-tunes under root (skips a model whose index exists); their folders."""
    from safetensors.torch import save_file

    family = Family(layers, kind, json.loads(PROFILE.read_text()))
    folders = []
    for model in range(fine_tunes + 1):
        folder = root / ("base" if model == 0 else f"ft{model}-{family.kind_of(model)}")
        folders.append(folder)
        if (folder / "model.safetensors.index.json").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config(layers, dims)))
        weight_map, shard, size, count, total = {}, {}, 0, 0, 0
        items = list(shapes(layers, dims))

        def flush():
            nonlocal shard, size, count
            count += 1
            file = f"model-{count:05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
            shard, size = {}, 0

        for name, shape in items:
            tensor = family.tensor(name, shape, model)
            if size and size + tensor.numel() * 2 > SHARD_BYTES:
                flush()
            shard[name] = tensor
            size += tensor.numel() * 2
            total += tensor.numel() * 2
        flush()
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        print(f"{folder.name}: {count} shards, {total / 1e9:.2f} GB", flush=True)
    return folders


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("profile")
    gen = commands.add_parser("generate")
    gen.add_argument("root", type=Path)
    gen.add_argument("--layers", type=int, default=LLAMA_1B["layers"])
    gen.add_argument("--kind", choices=("full", "lora", "mixed"), default="full")
    gen.add_argument("--fine-tunes", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.command == "profile":
        PROFILE.write_text(json.dumps(profile(), separators=(",", ":")) + "\n")  # as committed
        print(f"wrote {PROFILE}")
    else:
        generate(args.root, args.layers, args.kind, args.fine_tunes)


if __name__ == "__main__":
    sys.exit(main())
