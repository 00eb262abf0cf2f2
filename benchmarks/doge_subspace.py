"""doge's shared subspace: the Gram + Rayleigh-Ritz route against a full SVD (gesdd).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/doge_subspace.py

From GRAM_MIN_ELEMENTS elements on, `DogeSolver.shared_basis` takes each task vector's
top singular subspace from an eigendecomposition of its smaller Gram matrix, refined by
a Rayleigh-Ritz step (see `mergekit_wudi.solvers.doge.top_left_singular_vectors`),
instead of `torch.linalg.svd`. Per shape this prints, for both routes on the same task
vectors (float32, N = 3, rank-16 structure above full-rank noise, whose cut at
k = r / 3 lies inside a dense spectrum):
- the time of `shared_basis` (best of 3, interleaved) and the ratio;
- the peak extra memory of one `top_left_singular_vectors` call, in units of the
  matrix's float32 size, in a fresh process per case (VmHWM);
- the distance of the projector P = U_k U_k^T from the float64 SVD's, relative;
- the same for the merged tensor of a whole DOGE solve (defaults, 400 steps), against
  the solver in float64 on the SVD route (which tests/solvers/test_doge.py checks
  against the autograd transcription of methods.md to ~1e-13).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from solvers import MEMORY_ENVIRONMENT, reset_peak_rss, status_bytes  # noqa: E402  (benchmarks/solvers.py)

from mergekit_wudi.solvers import DogeSolver, doge  # noqa: E402

SHAPES = [(1024, 1024), (2048, 2048), (2816, 1024), (1024, 2816)]
COUNT = 3
ROUNDS = 3
ROUTES = {"svd": 1 << 62, "gram": 0}  # GRAM_MIN_ELEMENTS that selects each route


def task_vectors(out_features: int, in_features: int, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(COUNT, out_features, in_features, generator=generator, dtype=torch.float64)
    left = torch.randn(COUNT, out_features, 16, generator=generator, dtype=torch.float64)
    right = torch.randn(COUNT, 16, in_features, generator=generator, dtype=torch.float64)
    return ((noise + left @ right) * 1e-3).to(dtype)


def reference_projector(vectors: torch.Tensor) -> torch.Tensor:
    """P from float64 SVDs, as methods.md writes it."""
    count, out_features, in_features = vectors.shape
    rank = min(out_features, in_features)
    per_task, keep = rank // count, rank // DogeSolver().config.subspace
    stacked = torch.zeros(out_features, rank, dtype=torch.float64)
    for index, task in enumerate(vectors):
        stacked[:, index * per_task : (index + 1) * per_task] = torch.linalg.svd(task, full_matrices=False).U[:, :per_task]
    basis = torch.linalg.svd(stacked, full_matrices=False).U[:, :keep]
    return basis @ basis.T


def memory_child(route: str, out_features: int, in_features: int) -> float:
    """In the child: peak extra memory of one top_left_singular_vectors call, in tensors."""
    doge.GRAM_MIN_ELEMENTS = ROUTES[route]
    doge.top_left_singular_vectors(torch.randn(600, 500), 100)  # load the kernels first
    matrix = task_vectors(out_features, in_features)[0].clone()

    before = reset_peak_rss()
    doge.top_left_singular_vectors(matrix, min(out_features, in_features) // COUNT)
    return (status_bytes("VmHWM") - before) / (out_features * in_features * 4)


def measure_memory(route: str, out_features: int, in_features: int) -> float:
    environment = dict(os.environ, **MEMORY_ENVIRONMENT)  # frees go back at once
    command = [sys.executable, __file__, "child", route, str(out_features), str(in_features)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N = {COUNT}, float32\n")
    print(
        "| shape | shared_basis time: svd / gram | peak extra memory of one call (x tensor): svd / gram "
        "| P vs float64 SVD: svd / gram | merged tensor vs float64 SVD: svd / gram |"
    )
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        vectors = task_vectors(*shape)
        best = {route: float("inf") for route in ROUTES}
        bases = {}
        for _ in range(ROUNDS):
            for route, threshold in ROUTES.items():
                doge.GRAM_MIN_ELEMENTS = threshold
                start = time.perf_counter()
                bases[route] = DogeSolver().shared_basis(vectors)
                best[route] = min(best[route], time.perf_counter() - start)
        expected = reference_projector(vectors.double())
        error = {
            route: float((basis.double() @ basis.double().T - expected).norm() / expected.norm())
            for route, basis in bases.items()
        }
        merged = {}
        for route, threshold in ROUTES.items():
            doge.GRAM_MIN_ELEMENTS = threshold
            merged[route] = DogeSolver().solve(vectors).double()
        doge.GRAM_MIN_ELEMENTS = ROUTES["svd"]
        expected_merge = DogeSolver().solve(vectors.double())
        merge_error = {
            route: float((tensor - expected_merge).norm() / expected_merge.norm()) for route, tensor in merged.items()
        }
        memory = {route: measure_memory(route, *shape) for route in ROUTES}
        print(
            f"| {shape[0]}x{shape[1]} | {best['svd']:.2f} s / {best['gram']:.2f} s = {best['svd'] / best['gram']:.1f}x "
            f"| {memory['svd']:.2f} / {memory['gram']:.2f} | {error['svd']:.1e} / {error['gram']:.1e} "
            f"| {merge_error['svd']:.1e} / {merge_error['gram']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        print(json.dumps(memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        main()
