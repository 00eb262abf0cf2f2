"""Measure, on the benchmark's real LoRA adapters, the quantities the notes turn on:
row-space overlap of the experts (shared A or not), the own-row-space scale c_row of the
plain sum (fair-share subspace), SVC (alpha = 1) on the sum, and doge's shared-subspace
energy share. CPU, one module at a time (at most 576 x 1536).

    OMP_WAIT_POLICY=PASSIVE python /work/notes/measure_real_lora.py ADAPTER_DIR_1 ... ADAPTER_DIR_N

Each ADAPTER_DIR holds peft's adapter_model.safetensors and adapter_config.json
(benchmarks/llm experts cache: recipe-<hash>/lora/<task>/ or the set folder of the newer runner).
"""
import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from safetensors.torch import load_file

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
from svc_eval import svc  # noqa: E402


def rtol(shape):
    return max(shape) * torch.finfo(torch.float32).eps


def load(dirname):
    cfg = json.load(open(os.path.join(dirname, "adapter_config.json")))
    scale = cfg["lora_alpha"] / cfg["r"]
    sd = load_file(os.path.join(dirname, "adapter_model.safetensors"))
    mods = {}
    for k, v in sd.items():
        if ".lora_A." in k:
            mods.setdefault(k.split(".lora_A.")[0], {})["A"] = v.float()
        elif ".lora_B." in k:
            mods.setdefault(k.split(".lora_B.")[0], {})["B"] = v.float()
    return {m: scale * d["B"] @ d["A"] for m, d in mods.items()}, {m: d["A"] for m, d in mods.items()}


def fair_scale(M, tvs, side):
    n, rhos = len(tvs), []
    for t in tvs:
        U, S, Vh = torch.linalg.svd(t, full_matrices=False)
        k = max(1, int((S > rtol(t.shape) * S[0]).sum()) // n)
        P = Vh[:k].T if side == "row" else U[:, :k]
        rhos.append(float(((M @ P) if side == "row" else (P.T @ M)).norm() / ((t @ P) if side == "row" else (P.T @ t)).norm()))
    return 1 / max(rhos)


def main(dirs):
    loaded = [load(d) for d in dirs]
    rows = []
    for m in sorted(loaded[0][0]):
        tvs = torch.stack([l[0][m] for l in loaded])
        As = [l[1][m] for l in loaded]
        Q = [torch.linalg.qr(A.T)[0] for A in As]  # orthonormal row-space bases (in, r)
        overlap = [float(torch.linalg.svdvals(Q[i].T @ Q[j]).pow(2).mean()) for i in range(len(Q)) for j in range(i + 1, len(Q))]
        drift = [float((As[i] - As[j]).norm() / As[i].norm()) for i in range(len(As)) for j in range(i + 1, len(As))]
        S = tvs.sum(0)
        out, info = svc(S, tvs, 1.0)
        g = [float((out * t).sum() / t.pow(2).sum()) for t in tvs]
        rows.append((m, sum(overlap) / len(overlap), sum(drift) / len(drift), fair_scale(S, tvs, "row"),
                     fair_scale(S, tvs, "col"), sum(g) / len(g)))
        print(f"{m}: row-space overlap (mean cos^2 of principal angles) {rows[-1][1]:.3f}, ||A_i-A_j||/||A_i|| {rows[-1][2]:.3f}, "
              f"c_row(sum) {rows[-1][3]:.3f}, c_col(sum) {rows[-1][4]:.3f}, SVC(a=1) gain on sum {rows[-1][5]:.3f}", flush=True)
    med = lambda i: sorted(r[i] for r in rows)[len(rows) // 2]
    print(f"\nmedian over {len(rows)} modules: overlap {med(1):.3f}, A drift {med(2):.3f}, c_row {med(3):.3f}, c_col {med(4):.3f}, SVC gain {med(5):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
