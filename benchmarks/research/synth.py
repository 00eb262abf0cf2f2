"""Synthetic task vectors with the SmolLM2 benchmark's statistics (benchmarks/llm/results.md).

LoRA: t_i = (alpha/r) B_i A_i, r = 8, alpha = 16, A ~ peft's kaiming_uniform(a=sqrt(5)) =
U(-1/sqrt(in), 1/sqrt(in)); B_i Gaussian columns with a decaying scale and a shared part
(mean |cos(t_i, t_j)| ~ 0.1 as measured), rescaled to entry RMS 2.48e-3 x a per-task factor.
A_mode: 'shared' (same A for all), 'distinct' (independent A_i), 'drift' (A_i = A0 + dA_i,
||dA_i|| = ||A0||).
Full: t_i = U_i diag(s) V_i^T with a power-law spectrum s_k ~ k^-0.7, plus a shared part,
entry RMS 6.32e-4 x factor.
W0 entry RMS 0.19 (2.48e-3 / 1.31e-2 = 6.32e-4 / 3.33e-3 = 0.19).
"""
import math

import torch

LORA_RMS = 2.48e-3
FULL_RMS = 6.32e-4
W0_RMS = 0.19
FACTORS = (1.0, 0.8, 1.25, 0.9)


def rms(x):
    return float(x.pow(2).mean().sqrt())


def lora(out=576, inp=1536, n=4, rank=8, A_mode="shared", shared=0.32, seed=0, factors=FACTORS):
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(inp)
    A0 = (torch.rand(rank, inp, generator=g) * 2 - 1) * bound
    decay = torch.tensor([0.8 ** k for k in range(rank)])
    B0 = torch.randn(out, rank, generator=g)
    tvs = []
    for i in range(n):
        B = math.sqrt(1 - shared ** 2) * torch.randn(out, rank, generator=g) + shared * B0
        B = B * decay
        if A_mode == "shared":
            A = A0
        elif A_mode == "distinct":
            A = (torch.rand(rank, inp, generator=g) * 2 - 1) * bound
        elif A_mode == "drift":
            A = A0 + (torch.rand(rank, inp, generator=g) * 2 - 1) * bound
        else:
            raise ValueError(A_mode)
        t = 2.0 * B @ A
        t *= LORA_RMS * factors[i % len(factors)] / rms(t)
        tvs.append(t)
    return torch.stack(tvs)


def full(out=576, inp=1536, n=4, power=0.7, shared=0.32, seed=0, factors=FACTORS):
    g = torch.Generator().manual_seed(seed)
    r = min(out, inp)
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -power

    def one():
        U, _ = torch.linalg.qr(torch.randn(out, r, generator=g))
        V, _ = torch.linalg.qr(torch.randn(inp, r, generator=g))
        return (U * s) @ V.T

    R0 = one()
    tvs = []
    for i in range(n):
        t = math.sqrt(1 - shared ** 2) * one() + shared * R0
        t *= FULL_RMS * factors[i % len(factors)] / rms(t)
        tvs.append(t)
    return torch.stack(tvs)


def top_subspaces(t, energy=0.9, cap=None):
    """Left (out, k) and right (in, k) top singular vectors holding `energy` of ||t||^2."""
    U, S, Vh = torch.linalg.svd(t, full_matrices=False)
    e = (S ** 2).cumsum(0) / (S ** 2).sum()
    k = int((e < energy).sum()) + 1
    if cap:
        k = min(k, cap)
    return U[:, :k], Vh[:k].T, k


def report(name, merged, tvs, energy=0.9):
    """Norms of `merged` and, per task, its projection on the task's top column/row space
    vs the task's own energy there, and the gain <M, t_i>/||t_i||^2."""
    fro = float(merged.norm())
    spec = float(torch.linalg.matrix_norm(merged, ord=2))
    rows = []
    for t in tvs:
        U, V, k = top_subspaces(t, energy)
        own_row = float((t @ V).norm())
        own_col = float((U.T @ t).norm())
        rows.append(dict(
            k=k,
            gain=float((merged * t).sum() / t.pow(2).sum()),
            row=float((merged @ V).norm()) / own_row,
            col=float((U.T @ merged).norm()) / own_col,
        ))
    tn = [float(t.norm()) for t in tvs]
    ts = [float(torch.linalg.matrix_norm(t, ord=2)) for t in tvs]
    return dict(name=name, fro=fro, spec=spec, fro_over_mean_ti=fro / (sum(tn) / len(tn)),
                spec_over_mean_ti=spec / (sum(ts) / len(ts)), rms=rms(merged), per_task=rows)


def fmt(rep):
    g = " ".join(f"{r['gain']:.3f}" for r in rep["per_task"])
    ro = " ".join(f"{r['row']:.2f}" for r in rep["per_task"])
    co = " ".join(f"{r['col']:.2f}" for r in rep["per_task"])
    return (f"{rep['name']:<34} |M|F={rep['fro']:.3g} ({rep['fro_over_mean_ti']:.2f}x mean|t_i|) "
            f"|M|2={rep['spec']:.3g} ({rep['spec_over_mean_ti']:.2f}x) rms={rep['rms']:.3g}\n"
            f"{'':<34} gain<M,t_i>/|t_i|^2: {g} | row-proj/own: {ro} | col-proj/own: {co}")
