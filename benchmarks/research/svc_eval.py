"""Task B: SVC (arXiv 2602.05536, lyymuwu/SVC merge_func.py Align/coef_cal_multi_ranks)
and the own-subspace cap, after sum / wudi_cfs / iso_c / tsv, on synthetic task vectors.

OMP_WAIT_POLICY=PASSIVE python /work/notes/svc_eval.py
"""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
import synth

from mergekit_wudi.solvers import IsoCSolver, TsvSolver, WudiCfsSolver


def svc(M, tvs, alpha=1.0, weighting="mean", drop_zero=False):
    """Authors' SVC (column space, target=-1), float64.
    M = U diag(sig) V^T; a_m,r = u_r^T M; a_i,r = u_r^T t_i;
    s_ri = <a_m,r, a_i,r> / max(||a_i,r||^2, 1e-12);
    eta_r = mean_i max(s_ri, alpha)  ('mean', authors and FusionBench)
          = sum_i max(<a_m,a_i>, alpha ||a_i||^2) / sum_i ||a_i||^2  ('energy', a variant)
    sig_r <- sig_r / eta_r."""
    M64, T = M.double(), tvs.double()
    if drop_zero:
        T = T[[i for i in range(T.shape[0]) if float(T[i].norm()) > 0]]
    U, sig, Vh = torch.linalg.svd(M64, full_matrices=False)
    am = U.T @ M64                                   # (r, n) = diag(sig) Vh
    ai = torch.einsum("mr,kmn->rkn", U, T)           # (r, K, n)
    e = (ai * ai).sum(-1)                            # ||a_ri||^2
    dots = torch.einsum("rn,rkn->rk", am, ai)
    s = dots / e.clamp_min(1e-12)
    if weighting == "mean":
        eta = torch.maximum(s, torch.tensor(alpha, dtype=s.dtype)).mean(1)
    else:
        eta = torch.maximum(dots, alpha * e).sum(1) / e.sum(1).clamp_min(1e-300)
    out = (U * (sig / eta)) @ Vh
    return out.to(M.dtype), dict(s=s, eta=eta, sig=sig)


def subspaces(tvs, energy=0.9):
    return [synth.top_subspaces(t, energy) for t in tvs]


def rho(M, tvs, subs):
    """per task: ||M V_i|| / ||t_i V_i|| (row) and ||U_i^T M|| / ||U_i^T t_i|| (col)."""
    row = [float((M @ V).norm() / (t @ V).norm()) for t, (U, V, k) in zip(tvs, subs)]
    col = [float((U.T @ M).norm() / (U.T @ t).norm()) for t, (U, V, k) in zip(tvs, subs)]
    return row, col


def own_cap(M, tvs, subs, side="row"):
    row, col = rho(M, tvs, subs)
    r = {"row": max(row), "col": max(col), "both": max(max(row), max(col))}[side]
    c = min(1.0, 1.0 / r)
    return M * c, c


def gains(M, tvs):
    return [float((M * t).sum() / t.pow(2).sum()) for t in tvs]


def line(name, M, tvs, subs, extra=""):
    g = gains(M, tvs)
    row, col = rho(M, tvs, subs)
    tn = sum(float(t.norm()) for t in tvs) / len(tvs)
    return (f"  {name:<30} gain mean {sum(g)/len(g):.3f} [{min(g):.2f},{max(g):.2f}]  rho_row max {max(row):.2f} "
            f"rho_col max {max(col):.2f}  |M|F/mean|t| {float(M.norm())/tn:.2f}  |M|2/mean|t|2 "
            f"{float(torch.linalg.matrix_norm(M, ord=2))/ (sum(float(torch.linalg.matrix_norm(t, ord=2)) for t in tvs)/len(tvs)):.2f} {extra}")


def bases(tvs):
    return {
        "sum (TA l=1)": tvs.sum(0),
        "TA l=0.3": 0.3 * tvs.sum(0),
        "wudi_cfs": WudiCfsSolver().solve(tvs),
        "iso_c": IsoCSolver().solve(tvs),
        "tsv": TsvSolver().solve(tvs),
    }


def sanity():
    print("=== sanity cases (576x1536, float32)")
    g = torch.Generator().manual_seed(3)
    t = synth.full(n=1)[0]
    # identical tasks
    tvs = torch.stack([t] * 4)
    subs = subspaces(tvs)
    for a in (0.1, 0.25, 1.0):
        out, info = svc(tvs.sum(0), tvs, a)
        print(line(f"identical x4, SVC a={a}", out, tvs, subs))
    print(line("identical x4, own-cap row", own_cap(tvs.sum(0), tvs, subs)[0], tvs, subs))
    # orthogonal tasks: disjoint row AND column blocks (block-diagonal)
    blocks = torch.zeros(4, 576, 1536)
    for i in range(4):
        blocks[i, i*144:(i+1)*144, i*384:(i+1)*384] = torch.randn(144, 384, generator=g) * 1e-3
    subs = subspaces(blocks)
    for a in (0.1, 0.25, 1.0):
        out, info = svc(blocks.sum(0), blocks, a)
        print(line(f"disjoint x4, SVC a={a}", out, blocks, subs))
    print(line("disjoint x4, own-cap row", own_cap(blocks.sum(0), blocks, subs)[0], blocks, subs))
    # N = 1
    one = t.unsqueeze(0)
    for lam in (0.3, 1.0):
        out, _ = svc(lam * t, one, 1.0)
        out2, _ = svc(lam * t, one, 0.1)
        print(f"  N=1, M={lam} t: SVC a=1 -> rel err to t {float((out-t).norm()/t.norm()):.2e}; a=0.1 -> {float((out2-t).norm()/t.norm()):.2e}")
    # a zero task vector among 4 (a layer one expert did not train)
    tvs = synth.full()
    tvs[3] = 0
    subs = subspaces(tvs[:3])
    for dz in (False, True):
        out, _ = svc(tvs.sum(0), tvs, 0.1, drop_zero=dz)
        print(line(f"one zero task, SVC a=0.1 drop_zero={dz}", out, tvs[:3], subs))


def main(which):
    sets = {
        "lora-shared": synth.lora(A_mode="shared"),
        "lora-drift": synth.lora(A_mode="drift"),
        "lora-distinct": synth.lora(A_mode="distinct"),
        "full(shared 0.32)": synth.full(),
        "full(no shared)": synth.full(shared=0.0),
        "full(shared 0.6)": synth.full(shared=0.6),
        "mixed 2 full + 2 lora": torch.cat([synth.full(n=2, seed=1), synth.lora(n=2, A_mode="drift", seed=2)]),
    }
    for name in which or sets:
        tvs = sets[name]
        subs = subspaces(tvs)
        print(f"\n=== {name}: top-90%-energy ranks {[k for _,_,k in subs]}")
        for bname, M in bases(tvs).items():
            print(f" base {bname}")
            print(line("as is", M, tvs, subs))
            for a in (0.1, 0.25, 1.0):
                out, info = svc(M, tvs, a)
                nz = info["sig"] > 1e-6 * info["sig"][0]
                eta = info["eta"][nz]
                print(line(f"SVC a={a}", out, tvs, subs,
                           f"eta[min,med,max]=[{float(eta.min()):.2f},{float(eta.median()):.2f},{float(eta.max()):.2f}]"))
            out, info = svc(M, tvs, 1.0, weighting="energy")
            print(line("SVC energy-weighted a=1", out, tvs, subs))
            for side in ("row", "col", "both"):
                out, c = own_cap(M, tvs, subs, side)
                print(line(f"own-cap {side}", out, tvs, subs, f"c={c:.3f}"))


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["sanity"]:
        sanity()
    else:
        main(args)
