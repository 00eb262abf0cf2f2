"""Numerics shared by the solvers: task-vector preparation, row chunks, single-threaded
LAPACK, the Adam update and the Gram terms C and D of the WUDI loss.

Pure torch: nothing here imports mergekit, click or logging configuration.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from mergekit_wudi.solvers import _lapack

# Peak memory of one solve, in tensors of the (out, in) size in the compute dtype: the N
# task vectors plus at most this many (the memory bound; tests/test_memory.py measures it).
SOLVE_EXTRA_TENSORS = 6

# Row chunks hold at most this many elements of the (out, in) solution, so the
# per-chunk state (gradient, two Adam moments) stays small...
CHUNK_ELEMENTS = 1 << 22
# ...and at most 1/CHUNK_DIVISOR of the tensor, so that state stays under 3/4 of the
# tensor's size (the memory bound of a solve is N + SOLVE_EXTRA_TENSORS tensors; wudi passes its
# own divisor where its other buffers leave more or less room), except for tensors
# under MIN_CHUNK_ELEMENTS, kept whole (one chunk is faster, and small anyway).
CHUNK_DIVISOR = 4
MIN_CHUNK_ELEMENTS = 1 << 18

ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is solved in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class TaskVectors:
    """The task vectors that take part in a solve.

    vectors: (n, out, in) in the compute dtype, only the usable task vectors.
    sq_norms: ||t_i||_F^2 of each, as Python floats (float64).
    indices: positions of the usable vectors in the caller's stack.
    """

    vectors: torch.Tensor
    sq_norms: Tuple[float, ...]
    indices: Tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.indices)


def prepare_task_vectors(task_vectors: torch.Tensor) -> TaskVectors:
    """Cast to the compute dtype and drop zero or non-finite task vectors.

    A task vector whose Frobenius norm is 0, or is not finite (it holds a NaN or an
    Inf), takes no part in the solve.
    """
    if not isinstance(task_vectors, torch.Tensor):
        raise TypeError(f"task_vectors must be a torch.Tensor, got {type(task_vectors).__name__}")
    if task_vectors.ndim != 3:
        raise ValueError(
            f"task_vectors must have shape (N, out, in); got {tuple(task_vectors.shape)}"
        )
    if not task_vectors.is_floating_point():
        raise TypeError(f"task_vectors must be floating point, got {task_vectors.dtype}")
    vectors = task_vectors.to(dtype=compute_dtype(task_vectors.dtype))
    sq_norms: List[float] = []
    indices: List[int] = []
    for index in range(vectors.shape[0]):
        norm = float(torch.linalg.vector_norm(vectors[index]))
        if math.isfinite(norm) and norm > 0.0:
            sq_norms.append(norm * norm)
            indices.append(index)
    if len(indices) != vectors.shape[0]:
        vectors = vectors[list(indices)]  # (n, out, in)
    return TaskVectors(vectors=vectors, sq_norms=tuple(sq_norms), indices=tuple(indices))


_THREADS_LOCK = threading.RLock()  # re-entrant: the contexts nest
THREADED_LAPACK_ENV = "MERGEKIT_WUDI_THREADED_LAPACK"


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the enclosed operations on one CPU thread, so their bits do not depend on `-j`.

    For the LAPACK factorisations (Cholesky, eigh, SVD), doge's projection products
    (keep, out) @ (out, in) with keep small next to out, and whole solves of small
    tensors: with MKL these round differently with another thread count, while square
    and wide products, triangular solves, bmm and element-wise ops do not; mergekit's
    `-j/--num-threads` sets torch's thread count. The rest of a solve stays
    multi-threaded. No effect off the CPU, nor with MERGEKIT_WUDI_THREADED_LAPACK=1
    (faster on many cores; bits then depend on the thread count). Measurements:
    docs/reliability.md, benchmarks/results/lapack_threads.md.
    """
    if (torch.device(device).type != "cpu" or os.environ.get(THREADED_LAPACK_ENV, "") not in ("", "0")
            or getattr(_LOCAL, "pooled", False)):  # a for_each_panel thread is on one thread already
        yield
        return
    with _THREADS_LOCK:
        saved = torch.get_num_threads()
        outer = getattr(_LOCAL, "workers", None)
        _LOCAL.workers = outer or saved  # the caller's thread count, for for_each_panel (the outermost one)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(saved)
            _LOCAL.workers = outer


# Products of at least this many elements (rows x n of the larger operand) are split into
# PANELS column panels, each a one-thread GEMM, run side by side on the caller's threads;
# smaller ones are one GEMM, as before. The split depends on the shape only, so the bits do
# not depend on the thread count, while every core works (issue 25). Below 2^22 elements
# (2048 x 2048) the extra threads' own MKL buffers, a few MB each, would be a visible share
# of the tensor: at 1024 x 1024 they took doge 0.06-0.16 tensors past its memory bound.
PANEL_MIN_ELEMENTS = 1 << 22
PANELS = 16
_LOCAL = threading.local()
_POOLS: dict = {}


def panels(columns: int, elements: int) -> List[slice]:
    """The fixed column panels of a product whose larger operand has `elements` elements."""
    if elements < PANEL_MIN_ELEMENTS or columns < PANELS:
        return [slice(0, columns)]
    return list(row_chunks(columns, 1, -(-columns // PANELS)))


def for_each_panel(slices: Sequence[slice], job) -> None:
    """job(s) for every slice: in turn, or, inside one_cpu_thread on the CPU, side by side on
    as many threads as the caller had (each job then runs on one thread). The jobs must
    write disjoint outputs; the result does not depend on how many run at once."""
    workers = getattr(_LOCAL, "workers", None) or 1
    if workers <= 1 or len(slices) <= 1:
        for columns in slices:
            job(columns)
        return
    for _ in _pool(workers).map(job, slices):
        pass


def _pool(workers: int) -> ThreadPoolExecutor:
    key = (os.getpid(), workers)  # a forked child has none of its parent's pool threads
    pool = _POOLS.get(key)
    if pool is None:  # its threads run torch on one thread each (torch's count is per thread for OpenMP)
        pool = _POOLS[key] = ThreadPoolExecutor(workers, initializer=_pool_thread)
    return pool


def _pool_thread() -> None:
    torch.set_num_threads(1)
    _LOCAL.pooled = True


def side_by_side_workers(count: int, per_job: int, spare: int, threads: int) -> int:
    """How many of side_by_side's jobs run at once on `threads` threads (1: in turn)."""
    if per_job < PANEL_MIN_ELEMENTS:
        return 1
    return max(1, min(threads, count, spare // per_job))


def side_by_side(count: int, job: Callable[[int], Any], per_job: int, spare: int) -> Iterator[Any]:
    """job(i) for i in range(count), yielded in that order, with as many running at once as
    the caller's threads (inside one_cpu_thread, as for_each_panel) and `spare` elements of
    memory allow, each needing `per_job`: the independent decompositions of the task
    vectors, whose one-thread LAPACK calls (scipy's OpenBLAS, held at one thread here for
    all of them) release the GIL (_lapack). One at a time under PANEL_MIN_ELEMENTS
    elements per job, where the extra threads' own buffers would show. Consume it to the
    end: while it is open, at most the running jobs and one yielded result are held."""
    workers = side_by_side_workers(count, per_job, spare, getattr(_LOCAL, "workers", None) or 1)
    if workers <= 1:
        for index in range(count):
            yield job(index)
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        pool, pending = _pool(workers), collections.deque()
        for index in range(count):
            pending.append(pool.submit(job, index))
            if len(pending) == workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# Tensors under this many elements are solved on one thread from start to end
# (solve_threads); 255x256 is, 256x256 and 384x384 are not.
ONE_THREAD_ELEMENTS = 1 << 16


def solve_threads(task_vectors: Any, whole: bool = False):
    """The thread policy of a whole solve, as a context: one_cpu_thread where `whole`, or
    where each task vector has fewer than ONE_THREAD_ELEMENTS elements; otherwise none.

    At such sizes MKL's small GEMMs with accumulation (addmm) also round differently with
    the thread count, while a second thread gains little there (docs/reliability.md).
    Larger tensors keep every thread for their products. Anything but an (N, out, in)
    tensor gets no context (prepare_task_vectors then says what is wrong).
    """
    if not isinstance(task_vectors, torch.Tensor) or task_vectors.ndim != 3:
        return contextlib.nullcontext()
    small = task_vectors.shape[1] * task_vectors.shape[2] < ONE_THREAD_ELEMENTS
    return one_cpu_thread(task_vectors.device) if whole or small else contextlib.nullcontext()


def rank_cutoff(size: int, dtype: torch.dtype, scale):
    """size * eps(dtype) * scale: a singular value (or eigenvalue) at or below it is rounding
    and counts as zero, the rule of torch.linalg.matrix_rank and pinv; scale is the largest."""
    return size * torch.finfo(dtype).eps * scale


def kept(values: torch.Tensor, limit: int, threshold: float) -> int:
    """How many of the first `limit` (descending) singular values exceed `threshold`: the
    rank cut of doge's subspaces and of the tsv / iso solvers."""
    return int(torch.count_nonzero(values[:limit] > threshold))


def row_chunks(rows: int, cols: int, chunk_elements: int) -> Iterator[slice]:
    """Consecutive row slices holding at most chunk_elements elements (at least one row)."""
    step = max(1, chunk_elements // max(1, cols))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def permute_rows_(stack: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """stack[i] := stack[order[i]] for a permutation `order` of stack's first axis, in place,
    one cycle at a time through one row-sized buffer; returns stack."""
    if sorted(order) != list(range(stack.shape[0])):
        raise ValueError(f"order {list(order)} is not a permutation of {stack.shape[0]} rows")
    buffer, done = None, [False] * len(order)
    for start, source in enumerate(order):
        if done[start] or source == start:
            continue
        buffer = torch.empty_like(stack[0]) if buffer is None else buffer
        buffer.copy_(stack[start])
        row = start
        while order[row] != start:  # follow the cycle: each row takes its source's, the last the buffer's
            stack[row].copy_(stack[order[row]])
            done[row] = True
            row = order[row]
        stack[row].copy_(buffer)
        done[row] = True
    return stack


def row_blocks(count: int, blocks: int = 16) -> Iterator[slice]:
    """`blocks` consecutive slices over `count` rows (fewer for small counts)."""
    return row_chunks(count, 1, -(-count // blocks))


def gram64(rows: torch.Tensor) -> torch.Tensor:
    """A^T A (n, n) in float64, for A (rows, n), accumulated over row blocks of A; each
    block's product by fixed row panels of the Gram matrix (for_each_panel), each panel
    from its diagonal block on where there are several (then mirrored): about half the
    multiply-adds."""
    size = rows.shape[1]
    gram = rows.new_zeros(size, size, dtype=torch.float64)
    slices = panels(size, rows.numel())  # the whole A's, for every block
    for block in row_blocks(rows.shape[0]):
        symmetric_product_(gram, rows[block].double(), accumulate=True, mirror=False, slices=slices)
    _mirror_upper_(gram, slices)
    return gram


def panel_matmul(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = left @ right, by fixed column panels of `right` (for_each_panel)."""
    slices = panels(right.shape[1], max(left.numel(), right.numel(), out.numel()))
    if len(slices) == 1:
        return torch.mm(left, right, out=out)

    def job(columns: slice) -> None:
        out[:, columns] = left @ right[:, columns]

    for_each_panel(slices, job)
    return out


def numerical_rank(values: torch.Tensor, size: int) -> int:
    """How many singular values (descending) exceed rank_cutoff(size, float32, the largest):
    float32's eps whatever the compute dtype, so a float64 solve counts what a float32 one does."""
    return kept(values, values.numel(), rank_cutoff(size, torch.float32, values[0])) if values.numel() else 0


def gram_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Every singular value of `matrix`, descending, from the eigenvalues of its smaller Gram
    matrix accumulated in float64 (the float32 Gram's rounding, eps32 sigma_1^2, is above the
    rank cutoff's square): one Gram of the smaller side, overwritten by dsyevr."""
    out_features, in_features = matrix.shape
    gram = gram64(matrix.mT if out_features <= in_features else matrix)  # (smaller, smaller)
    return symmetric_eigvals_(gram).flip(0).clamp_(min=0).sqrt_()


def symmetric_eigh(
    matrix: torch.Tensor, top: Optional[int] = None, *, in_place: bool = False, lean: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The `top` largest eigenvalues (all by default), ascending, and their eigenvectors
    (n, top) of a symmetric matrix, on one CPU thread.

    lean (a float64 matrix on the CPU): LAPACK through scipy, dsyevr (a new (n, top)
    array, O(n) workspace) or, with in_place, dsyev (all eigenvectors written over the
    matrix, about 5 times slower), for memory bounds that leave no room for the 2 n^2
    workspace of torch's syevd. Otherwise torch.linalg.eigh, writing the eigenvectors
    over the matrix where in_place (its transpose is LAPACK's column-major layout).
    """
    size = matrix.shape[0]
    top = size if top is None else top
    if lean and matrix.device.type == "cpu" and matrix.dtype == torch.float64:
        return _scipy_eigh(matrix, top, in_place)
    with one_cpu_thread(matrix.device):
        if in_place:
            eigenvectors = matrix.mT
            eigenvalues = matrix.new_empty(size)
            try:
                torch.linalg.eigh(eigenvectors, out=(eigenvalues, eigenvectors))
            except RuntimeError as error:  # a torch that refuses the aliased out=
                if isinstance(error, torch.linalg.LinAlgError):
                    raise
                eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
        else:
            eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return eigenvalues[size - top :], eigenvectors[:, size - top :].contiguous()


def symmetric_eigvals_(matrix: torch.Tensor) -> torch.Tensor:
    """Every eigenvalue, ascending, of a symmetric matrix, which may be overwritten: for a
    float64 CPU matrix LAPACK dsyevr without eigenvectors in place (O(n) workspace) on one
    OpenBLAS thread, as in symmetric_eigh's lean route; otherwise torch.linalg.eigvalsh."""
    if matrix.device.type == "cpu" and matrix.dtype == torch.float64:
        from scipy.linalg import lapack
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            values, _, _, _, info = lapack.dsyevr(matrix.numpy().T, compute_v=0, range="A", overwrite_a=1)
        if info != 0:
            raise torch.linalg.LinAlgError(f"LAPACK symmetric eigensolver failed (info={info}) on a {matrix.shape[0]}x{matrix.shape[0]} matrix")
        return torch.from_numpy(values)
    with one_cpu_thread(matrix.device):
        return torch.linalg.eigvalsh(matrix)


def _scipy_eigh(matrix: torch.Tensor, top: int, in_place: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """On one OpenBLAS thread: scipy's LAPACK otherwise takes every core, its bits then
    depend on the machine's core count, and on a loaded machine it runs 10-40x slower."""
    from scipy.linalg import lapack  # a dependency of mergekit; imported on first use
    from threadpoolctl import threadpool_limits

    # scipy's OpenBLAS must be loaded before the limit is set: threadpoolctl limits only the
    # libraries loaded when it is entered (imported inside, the first call ran on every core).
    with threadpool_limits(limits=1, user_api="blas"):
        return _scipy_eigh_unlimited(lapack, matrix, top, in_place)


def _scipy_eigh_unlimited(lapack, matrix: torch.Tensor, top: int, in_place: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    size = matrix.shape[0]
    array = matrix.numpy().T  # the same symmetric matrix, in LAPACK's column-major order
    if in_place:
        (work, _) = lapack.dsyev_lwork(size)
        values, vectors, info = lapack.dsyev(array, compute_v=1, lwork=int(work), overwrite_a=1)
    else:  # without the GIL: independent ones may run side by side (_lapack)
        values, vectors, info = _lapack.dsyevr_top(array, top)
    if info != 0:
        raise torch.linalg.LinAlgError(f"LAPACK symmetric eigensolver failed (info={info}) on a {size}x{size} matrix")
    if in_place:  # dsyev: all n pairs, ascending; the top are the last
        return torch.from_numpy(values[size - top :]), torch.from_numpy(vectors[:, size - top :])
    return torch.from_numpy(values[:top]), torch.from_numpy(vectors)  # dsyevr: the `top` asked for, first


def _compact_reflectors(reduced):
    """dsytrd's (lower) Householder vectors as geqrf stores them for an (n-1, n-1) matrix,
    column-major with leading dimension n - 1, moved within the reduced matrix's storage:
    the block below its first row, which torch.ormqr would otherwise copy whole."""
    size = reduced.shape[0]
    flat = reduced.reshape(-1, order="F")  # a view: the array is column-major
    for column in range(size - 1):  # each column moves to an earlier place: front to back is safe
        flat[column * (size - 1) : (column + 1) * (size - 1)] = reduced[1:, column].copy()
    return flat[: (size - 1) ** 2].reshape(size - 1, size - 1, order="F")


class SymmetricSpectrum:
    """Every eigenvalue of a symmetric matrix, then the eigenvectors of its largest ones, from
    one tridiagonal reduction, so that the caller can choose how many from the values: for
    a float64 CPU matrix, LAPACK's own partial-spectrum path of dsyevr split in two (dsytrd
    over the matrix, which is overwritten; dsterf; then dstebz and dstein for the top ones
    and the reflectors applied by ormqr), on one thread. Elsewhere one torch.linalg.eigh.
    Memory beside the matrix: O(n), then the (n, top) eigenvectors."""

    def __init__(self, matrix: torch.Tensor):
        self.size = matrix.shape[0]
        self._reduced = None
        if matrix.device.type == "cpu" and matrix.dtype == torch.float64 and self.size > 1:
            from scipy.linalg import lapack
            from threadpoolctl import threadpool_limits

            reflectors = matrix.numpy().T  # column-major, reduced in place
            with threadpool_limits(limits=1, user_api="blas"):
                diagonal, off, tau, info = _lapack.dsytrd(reflectors)  # without the GIL, as dstebz and dstein
                if info == 0:
                    values, info = lapack.dsterf(diagonal.copy(), off.copy())
            self._check(info)
            self._reduced = (_compact_reflectors(reflectors), diagonal, off, tau)
            self.values = torch.from_numpy(values)  # ascending
        else:
            with one_cpu_thread(matrix.device):
                self.values, self._vectors = torch.linalg.eigh(matrix)

    def top(self, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The `count` largest eigenvalues (count,) and their eigenvectors (n, count), in no
        particular order."""
        if self._reduced is None:
            return self.values[self.size - count :], self._vectors[:, self.size - count :]
        if count == 0:
            return self.values.new_empty(0), self.values.new_empty(self.size, 0)
        from threadpoolctl import threadpool_limits

        reflectors, diagonal, off, tau = self._reduced
        with threadpool_limits(limits=1, user_api="blas"):
            values, blocks, splits, info = _lapack.dstebz_top(diagonal, off, count)
            if info == 0:
                vectors, info = _lapack.dstein(diagonal, off, values, blocks, splits)
        self._check(info)
        vectors = torch.from_numpy(vectors)  # (n, count), of the tridiagonal matrix
        householder, scales = torch.from_numpy(reflectors), torch.from_numpy(tau)
        with one_cpu_thread(vectors.device):  # Q = H(1) ... H(n-1) acts on rows 2..n
            for columns in row_chunks(count, 1, 64):
                vectors[1:, columns] = torch.ormqr(householder, scales, vectors[1:, columns])
        return torch.from_numpy(values), vectors

    def _check(self, info: int) -> None:
        if info != 0:
            raise torch.linalg.LinAlgError(
                f"LAPACK symmetric eigensolver failed (info={info}) on a {self.size}x{self.size} matrix"
            )


def solver_row_chunks(rows: int, cols: int, chunk_elements: int, divisor: int = CHUNK_DIVISOR) -> Iterator[slice]:
    """row_chunks with at most chunk_elements and, past MIN_CHUNK_ELEMENTS, at most
    1/divisor of the tensor's elements per chunk (at least one row)."""
    limit = max(MIN_CHUNK_ELEMENTS, -(-rows * cols // divisor))
    return row_chunks(rows, cols, min(chunk_elements, limit))


def adam_optimizer(param: torch.Tensor, lr: float) -> torch.optim.Adam:
    """torch.optim.Adam on `param` alone, fed by a caller-owned gradient buffer `param.grad`.

    Kingma & Ba, "Adam", ICLR 2015 (arXiv:1412.6980), as torch.optim.Adam implements it
    with betas (0.9, 0.999), eps 1e-8, no weight decay, no amsgrad:
        m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    The fused implementation (`fused=True`: one pass over memory instead of about ten)
    where the device supports it, else the default one; the two differ in the last bit.

    The caller writes each step's gradient into `param.grad` (allocated here, reused
    across steps) and calls `step()`; `param` must not require grad.
    """
    param.grad = torch.empty_like(param)
    options = {"lr": lr, "betas": (ADAM_BETA1, ADAM_BETA2), "eps": ADAM_EPS, "weight_decay": 0.0}
    try:
        return torch.optim.Adam([param], fused=True, **options)
    except RuntimeError:  # a device or dtype without a fused kernel
        return torch.optim.Adam([param], **options)


def release(optimizer: torch.optim.Optimizer) -> None:
    """Free the Adam moments and the gradient buffer now, not when the optimizer is collected."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
    optimizer.state.clear()


def gram_terms(
    vectors: torch.Tensor, weights: Sequence[float], *, ridge: float = 0.0, with_d: bool = True
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """C = sum_i w_i t_i^T t_i (in, in) and D = sum_i w_i t_i (t_i^T t_i + r I) (out, in).

    vectors: (n, out, in); weights: w_i, one per task vector; ridge: r (0 for the plain
    WUDI D); with_d=False returns (C, None). D's Gram term w_i t_i (t_i^T t_i) is
    evaluated through each task's (in, in) Gram where in <= out, else as
    w_i (t_i t_i^T) t_i, with an (out, out) intermediate: fewer flops where in > 2 out,
    and no (in, in) temporary beside C where in > out. The symmetric products are
    computed on and above the diagonal only, then mirrored (symmetric_product_).
    """
    count, out_features, in_features = vectors.shape
    gram = vectors.new_zeros(in_features, in_features)  # (in, in)
    d_term = vectors.new_zeros(out_features, in_features) if with_d else None  # (out, in)
    if in_features <= out_features:
        task_gram = torch.empty_like(gram)
        for task, weight in zip(vectors, weights):
            symmetric_product_(task_gram, task)  # (in, in)
            gram.add_(task_gram, alpha=weight)
            if with_d:
                d_term.addmm_(task, task_gram, alpha=weight)
                if ridge > 0:
                    d_term.add_(task, alpha=weight * ridge)
        del task_gram
    else:
        overlap = vectors.new_empty(out_features, out_features) if with_d else None
        for task, weight in zip(vectors, weights):
            symmetric_product_(gram, task, alpha=weight, accumulate=True, mirror=False)
            if with_d:
                symmetric_product_(overlap, task.mT)  # (out, out)
                d_term.addmm_(overlap, task, alpha=weight)
                if ridge > 0:
                    d_term.add_(task, alpha=weight * ridge)
        del overlap
        _mirror_upper_(gram, panels(in_features, out_features * in_features))
    return gram, d_term


def symmetric_product_(
    target: torch.Tensor,
    rows: torch.Tensor,
    *,
    alpha: float = 1.0,
    accumulate: bool = False,
    mirror: bool = True,
    slices: Optional[Sequence[slice]] = None,
) -> torch.Tensor:
    """target (n, n) = alpha A^T A (+ target where accumulate), A = rows (m, n).

    Below PANEL_MIN_ELEMENTS one GEMM. Above, only the panels' blocks on and above the
    diagonal, each a one-thread GEMM side by side (for_each_panel: bits independent of the
    thread count), about half the multiply-adds; the rest is then mirrored unless not
    `mirror` (the caller mirrors once, after accumulating). `slices`: the row panels,
    where the caller fixes them (by default panels(n, A's elements))."""
    size = rows.shape[1]
    slices = panels(size, rows.numel()) if slices is None else slices
    beta = 1.0 if accumulate else 0.0
    if len(slices) == 1:
        return target.addmm_(rows.mT, rows, beta=beta, alpha=alpha)

    def job(panel: slice) -> None:
        target[panel, panel.start :].addmm_(rows[:, panel].mT, rows[:, panel.start :], beta=beta, alpha=alpha)

    with one_cpu_thread(rows.device):
        for_each_panel(slices, job)
    if mirror:
        _mirror_upper_(target, slices)
    return target


def _mirror_upper_(target: torch.Tensor, slices: Sequence[slice]) -> None:
    """Copy the blocks right of each panel's diagonal block into their transposed places."""
    if len(slices) > 1:
        for panel in slices:
            target[panel.stop :, panel] = target[panel, panel.stop :].mT


# Symmetric matrices of at least this order are factored by blocks (cholesky_): every
# core works, with the same bits at any thread count. Smaller ones: LAPACK on one thread.
CHOLESKY_BLOCKED_SIZE = 4096
CHOLESKY_BLOCK = 512


def cholesky_(matrix: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Factor a symmetric positive definite `matrix` = L L^T in place, reading only its
    upper triangle; returns (L, info): L = matrix.mT, lower triangular in its lower
    triangle (its row-major storage is LAPACK's column-major one), info 0 on success, else
    LAPACK's: the order of the first leading minor found not positive definite.

    Below CHOLESKY_BLOCKED_SIZE, LAPACK's potrf on one thread. From it, by blocks of
    CHOLESKY_BLOCK rows of U = L^T (right-looking): the diagonal block by potrf on one
    thread, the blocks right of it by triangular solves over column panels, and the trailing
    upper triangle's update U12^T U12 by row panels from their diagonal on (as in
    symmetric_product_): one-thread operations of fixed shapes side by side
    (for_each_panel), so the bits depend on the shape only."""
    factor = matrix.mT
    size = matrix.shape[0]
    if size < CHOLESKY_BLOCKED_SIZE or matrix.device.type != "cpu":
        with one_cpu_thread(matrix.device):
            _, info = torch.linalg.cholesky_ex(factor, out=(factor, torch.empty((), dtype=torch.int32)))
        return factor, int(info)
    with one_cpu_thread(matrix.device):
        for start in range(0, size, CHOLESKY_BLOCK):
            stop = min(size, start + CHOLESKY_BLOCK)
            block = matrix[start:stop, start:stop].mT.contiguous()  # its lower triangle: U11^T's
            _, info = torch.linalg.cholesky_ex(block, out=(block, torch.empty((), dtype=torch.int32)))
            if int(info) != 0:
                return factor, start + int(info)
            matrix[start:stop, start:stop] = block.mT  # U11, upper
            if stop < size:
                _cholesky_update(matrix, block, start, stop)
    return factor, 0


def _cholesky_update(matrix: torch.Tensor, lower: torch.Tensor, start: int, stop: int) -> None:
    """One block step of cholesky_: U12 = U11^-T A12 over column panels, then the trailing
    upper triangle A22 -= U12^T U12, each row panel from its diagonal on."""
    right = matrix[start:stop, stop:]  # A12 -> U12
    slices = list(row_chunks(matrix.shape[0] - stop, 1, CHOLESKY_BLOCK))

    def solve(columns: slice) -> None:
        right[:, columns] = torch.linalg.solve_triangular(lower, right[:, columns], upper=False)

    for_each_panel(slices, solve)
    symmetric_product_(matrix[stop:, stop:], right, alpha=-1.0, accumulate=True, mirror=False, slices=slices)
