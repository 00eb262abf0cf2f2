"""SVD pieces shared by the TSV and Iso solvers: singular triplets, polar factors, stacks.

Float32 matrices never go through gesdd, whose copy, U, Vh and 4 min(out, in)^2
workspace alone pass the memory bound (SOLVE_EXTRA_TENSORS): the triplets come from the eigendecomposition of
the Gram matrix of the smaller side, A^T A = V diag(s^2) V^T and U = A V diag(1/s), with
A^T A accumulated and A V formed in float64 over row blocks, and LAPACK dsyevr/dsyev
(numerics.symmetric_eigh, lean). Singular values are then within n eps64 s_1^2 / s of
the float64 SVD's, under 1e-8 s_1 above the float32 cutoff (docs/methods-2025.md, "How
the SVDs are computed"). Float64 inputs keep gesdd. Values at or below the rank cutoff
are dropped with their vectors.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from mergekit_wudi.solvers.numerics import (
    SOLVE_EXTRA_TENSORS,
    gram64,
    kept,
    one_cpu_thread,
    panel_matmul,
    rank_cutoff,
    row_blocks,
    side_by_side,
    symmetric_eigh,
)

# What a solve may hold beside its N task vectors, in tensors of the (out, in) size
# in the compute dtype: the bound's SOLVE_EXTRA_TENSORS less one for fixed buffers (MKL's, LAPACK's) and
# the float64 row blocks.
SOLVE_TENSORS = SOLVE_EXTRA_TENSORS - 1


def cutoff(matrix: torch.Tensor, scale: float) -> float:
    """rank_cutoff of an (out, in) matrix: max(out, in) * eps(dtype) * scale."""
    return rank_cutoff(max(matrix.shape), matrix.dtype, scale)


def svd(matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (LAPACK gesdd), matrix = U diag(S) Vh, S descending: U (out, r), S (r,), Vh (r, in)."""
    with one_cpu_thread(matrix.device):
        return torch.linalg.svd(matrix, full_matrices=False)


def top_singular_triplets(
    matrix: torch.Tensor, limit: int, scale: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The singular triplets among the `limit` largest whose value exceeds
    cutoff(matrix, scale), scale the largest singular value unless given:
    U (out, j), S (j,), Vh (j, in), j <= limit, in the matrix's dtype.

    Float32: in no particular order (the callers only use them as sets), through the Gram
    route (module docstring); memory beside the matrix: the float64 Gram matrix
    (2 min(out, in)^2 float32 elements), the float64 eigenvectors (2 min(out, in) limit),
    then U and Vh. Float64: gesdd, descending.
    """
    if matrix.dtype == torch.float64:
        u, s, vh = svd(matrix)
        count = kept(s, limit, cutoff(matrix, float(s[0]) if scale is None else scale))
        return u[:, :count], s[:count], vh[:count]
    tall = matrix.shape[0] >= matrix.shape[1]
    rows = matrix if tall else matrix.mT  # A (rows, n), rows >= n
    limit = min(limit, rows.shape[1])
    if limit == 0:
        return matrix.new_empty(matrix.shape[0], 0), matrix.new_empty(0), matrix.new_empty(0, matrix.shape[1])
    _, vectors = symmetric_eigh(gram64(rows), top=limit, lean=True)  # V (n, limit), float64
    left, values, right, _ = _triplets(matrix, rows, vectors, scale)
    return (left, values, right) if tall else (right.mT, values, left.mT)


def triplet_elements(shape: Tuple[int, int], limit: int) -> int:
    """An upper bound on what top_singular_triplets holds for an (out, in) matrix, in float32
    elements, its results included: the float64 Gram matrix and eigenvectors, A V, V^T and
    the float64 row blocks."""
    rows, size = max(shape), min(shape)
    limit = min(limit, size)
    return 2 * size * size + 3 * size * limit + rows * limit + 2 * (rows // 16 + 1) * (size + limit)


def top_singular_triplets_and_complement(
    matrix: torch.Tensor, limit: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """top_singular_triplets(matrix, limit) for out <= in, and Q (out, out - j): orthonormal
    columns spanning the complement of U's columns in R^out, so that
    (I - U U^T) X = Q Q^T X for any X with `out` rows.

    Float32: U is the top eigenvectors of the float64 M M^T (dsyevr, all `out` of them),
    Q the others, those below the cutoff included; Vh = (M^T U diag(1/s))^T. Memory
    beside the matrix: the Gram matrix and all its eigenvectors (4 out^2 elements), then
    U, Vh and Q. Float64: gesdd.
    """
    out_features, in_features = matrix.shape
    if out_features > in_features:
        raise ValueError(f"needs out <= in, got a {out_features}x{in_features} matrix")
    if matrix.dtype == torch.float64:
        u, s, vh = svd(matrix)  # u: (out, out)
        count = kept(s, limit, cutoff(matrix, float(s[0])))
        return u[:, :count], s[:count], vh[:count], u[:, count:]
    rows = matrix.mT  # A = M^T (in, out): A^T A = M M^T, its eigenvectors are M's U
    limit = min(limit, out_features)
    _, vectors = symmetric_eigh(gram64(rows), lean=True)  # (out, out), ascending
    split = out_features - limit
    complement = vectors[:, :split].to(matrix.dtype)  # before U and Vh exist: the peak stays the eigendecomposition's
    left, values, right, keep = _triplets(matrix, rows, vectors[:, split:], None)
    if not bool(keep.all()):  # top directions dropped by the cutoff belong to the complement
        complement = torch.cat([complement, vectors[:, split:][:, ~keep].to(matrix.dtype)], dim=1)
    return right.mT, values, left.mT, complement


def _triplets(matrix, rows, vectors, scale):
    """From V (n, l) (float64 eigenvectors of A^T A, A = `rows`): (U, s, V^T, keep) with
    A V = U diag(s), only the columns whose s exceeds cutoff(matrix, scale or the largest);
    `keep` marks them among the l."""
    left = rows.new_empty(rows.shape[0], vectors.shape[1])  # A V, then U
    squares = vectors.new_zeros(vectors.shape[1])
    for block in row_blocks(rows.shape[0]):
        part = rows[block].double()
        product = panel_matmul(part, vectors, vectors.new_empty(part.shape[0], vectors.shape[1]))  # (b, l)
        del part
        squares += product.square().sum(dim=0)
        left[block] = product
    del product
    values = squares.sqrt_()  # s_j = ||A v_j||: a singular value to float64 rounding of A v_j
    keep = values > cutoff(matrix, float(values.max()) if scale is None else scale)
    if not bool(keep.all()):
        index = keep.nonzero().squeeze(1)
        left, vectors, values = left[:, index], vectors[:, index], values[index]
    values = values.to(matrix.dtype)
    left.div_(values)  # U = A V diag(1/s)
    return left, values, vectors.to(matrix.dtype).mT, keep


def polar_(matrix: torch.Tensor, spare: int) -> torch.Tensor:
    """Overwrite `matrix` with its orthogonal polar factor P Q^T (matrix = P D Q^T) on its
    range, and return the singular values D kept (in no particular order).

    The nearest matrix with orthonormal columns (rows, for a wide matrix) in the
    Frobenius norm (orthogonal Procrustes), equal to the whitening X (X^T X)^(-1/2).
    Where the matrix is rank-deficient, the factor on its range: singular values at or
    below cutoff(matrix, largest) are dropped with their vectors, X (X^T X)^(+1/2) with
    the pseudo-inverse square root; a zero matrix gives zero.

    Float32: with A the matrix or its transpose (rows >= n), A (A^T A)^(+1/2) =
    A Z diag(1/d) Z^T from the eigendecomposition of the float64 Gram matrix (module
    docstring), applied to A in place, one row block at a time and in float64. `spare`:
    float32 elements the caller's memory bound leaves: dsyevr where its 4 n^2 (Gram
    matrix and eigenvectors, in float64) fit, else dsyev, 2 n^2. Float64: gesdd.
    """
    if matrix.dtype == torch.float64:
        left, values, right = svd(matrix)
        count = kept(values, values.shape[0], cutoff(matrix, float(values[0]) if values.numel() else 0.0))
        torch.mm(left[:, :count], right[:count], out=matrix)
        return values[:count]
    rows = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.mT  # A (rows, n)
    size = rows.shape[1]
    squares, vectors = symmetric_eigh(gram64(rows), in_place=4 * size * size > spare, lean=True)  # ascending
    values = squares.clamp_(min=0).sqrt_()  # d
    keep = values > cutoff(matrix, float(values.max()))
    # Z diag(d^-1/2) on the kept columns, zero elsewhere, so that A Z' Z'^T = A Z diag(1/d) Z^T
    vectors.mul_(torch.where(keep, values, 1.0).rsqrt_().mul_(keep))
    for block in row_blocks(rows.shape[0]):  # in float64, block by block
        part = rows[block].double()
        rows[block] = panel_matmul(panel_matmul(part, vectors, torch.empty_like(part)), vectors.mT, part)
    return values[keep].to(matrix.dtype)


def stacks_spare(shape: Tuple[int, int], capacity: int) -> int:
    """The float32 elements SOLVE_TENSORS tensors of (out, in) leave beside stacks of `capacity` columns."""
    return SOLVE_TENSORS * shape[0] * shape[1] - capacity * (shape[0] + shape[1])


class SingularStacks:
    """The stacks of TSV and Iso-CTS: U_hat (out, capacity), V_hat^T (capacity, in) and the
    singular values, filled with triplets block by block (`add`), then whitened
    (`polar_factors`)."""

    def __init__(self, like: torch.Tensor, capacity: int):
        out_features, in_features = like.shape[-2:]
        self.left = like.new_empty(out_features, capacity)  # U_hat
        self.right = like.new_empty(capacity, in_features)  # V_hat^T
        self.values = like.new_empty(capacity)
        self.count = 0

    def side_by_side(self, count: int, job, limit: int):
        """job(i) for i in range(count), in order, several at once where the memory the
        stacks leave under SOLVE_TENSORS allows (numerics.side_by_side): each job a
        top_singular_triplets(task vector, limit)."""
        shape = (self.left.shape[0], self.right.shape[1])
        return side_by_side(count, job, triplet_elements(shape, limit), stacks_spare(shape, self.left.shape[1]))

    def add(self, left: torch.Tensor, values: torch.Tensor, right: torch.Tensor) -> None:
        """Append triplets U (out, j), s (j,), V^T (j, in)."""
        end = self.count + values.shape[0]
        self.left[:, self.count : end] = left
        self.right[self.count : end] = right
        self.values[self.count : end] = values
        self.count = end

    def polar_factors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_perp (out, m), V_perp^T (m, in), the m values), m = count: the stacks' polar
        factors written over them (polar_), within SOLVE_TENSORS tensors of (out, in)
        with the stacks."""
        left, right = self.left[:, : self.count], self.right[: self.count]
        spare = stacks_spare((left.shape[0], right.shape[1]), self.count)
        # in turn: side by side (each with half the spare) measured no faster at the 1B shapes,
        # as each one's float64 products then run on one thread
        polar_(left, spare)
        polar_(right, spare)
        return left, right, self.values[: self.count]
