"""Shared pieces of the solvers: task-vector preparation, config checks, the Adam update.

Pure torch: nothing here imports mergekit, click or logging configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator, List, Sequence, Tuple

import torch

# Row chunks hold at most this many elements of the (out, in) solution, so the
# per-chunk state (gradient, two Adam moments) stays small...
_CHUNK_ELEMENTS = 1 << 22
# ...and at most 1/_CHUNK_DIVISOR of the tensor, so that state stays under 3/4 of the
# tensor's size (the memory bound of a solve is N + 6 times the tensor; wudi passes its
# own divisor where its other buffers leave more or less room), except for tensors
# under _MIN_CHUNK_ELEMENTS, kept whole (one chunk is faster, and small anyway).
_CHUNK_DIVISOR = 4
_MIN_CHUNK_ELEMENTS = 1 << 18

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
def thread_independent(device: torch.device) -> Iterator[None]:
    """Run the enclosed operations on one CPU thread, so their bits do not depend on `-j`.

    Used for LAPACK factorisations and for doge's projection products. MKL's Cholesky,
    eigh and SVD round differently with another thread count (measured: 1 vs 2 threads,
    600x600, and 96x64 for the SVD), and so does a product (keep, out) @ (out, in) with
    keep = r/6 small next to out (1024x128, 1536x384, 1024x1024: MKL splits the sum over
    `out` across threads); square and wide products, triangular solves, bmm and the
    element-wise ops do not. mergekit's `-j/--num-threads` sets torch's thread count,
    so without this a `wudi_cfs` or `doge` merge would depend on `-j` and on the
    machine's cores. The enclosed work is a small part of a solve (the Gram products and
    the rest of the Adam steps stay multi-threaded). No effect off the CPU, nor with
    MERGEKIT_WUDI_THREADED_LAPACK=1 (faster on many cores, at the price of that
    dependence).
    """
    if torch.device(device).type != "cpu" or os.environ.get(THREADED_LAPACK_ENV, "") not in ("", "0"):
        yield
        return
    with _THREADS_LOCK:
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(saved)


# Tensors under this many elements are solved on one thread from start to end
# (one_thread_if_small); 255x256 is, 256x256 and 384x384 are not.
ONE_THREAD_ELEMENTS = 1 << 16


def one_thread_if_small(solve):
    """Decorates a solver's solve(task_vectors, ...): under ONE_THREAD_ELEMENTS elements
    per task vector, the whole solve runs in thread_independent.

    At such sizes MKL's small GEMMs with accumulation (addmm: (64, 96) @ (96, 64) on the
    tiny test family) also round differently with the thread count, while a second
    thread gains little there (measured on 2 cores, loaded: one thread as fast or faster
    at 64x96 and 256x256). Larger tensors keep every thread for their products.
    """

    @functools.wraps(solve)
    def wrapper(self, task_vectors, *args, **kwargs):
        small = (
            isinstance(task_vectors, torch.Tensor)
            and task_vectors.ndim == 3
            and task_vectors.shape[1] * task_vectors.shape[2] < ONE_THREAD_ELEMENTS
        )
        with thread_independent(task_vectors.device) if small else contextlib.nullcontext():
            return solve(self, task_vectors, *args, **kwargs)

    return wrapper


def row_chunks(rows: int, cols: int, chunk_elements: int) -> Iterator[slice]:
    """Consecutive row slices holding at most chunk_elements elements (at least one row)."""
    step = max(1, chunk_elements // max(1, cols))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def solver_row_chunks(rows: int, cols: int, chunk_elements: int, divisor: int = _CHUNK_DIVISOR) -> Iterator[slice]:
    """row_chunks with at most chunk_elements and, past _MIN_CHUNK_ELEMENTS, at most
    1/divisor of the tensor's elements per chunk (at least one row)."""
    limit = max(_MIN_CHUNK_ELEMENTS, -(-rows * cols // divisor))
    return row_chunks(rows, cols, min(chunk_elements, limit))


def adam_optimizer(param: torch.Tensor, lr: float) -> torch.optim.Adam:
    """torch.optim.Adam on `param` alone, fed by a caller-owned gradient buffer `param.grad`.

    Kingma & Ba, "Adam", ICLR 2015 (arXiv:1412.6980), as torch.optim.Adam implements it
    with betas (0.9, 0.999), eps 1e-8, no weight decay, no amsgrad:
        m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    The fused implementation (`fused=True`, one pass over memory instead of about ten;
    measured 3x faster than the for-loop one on a 1024x1024 float32 tensor) where the
    device supports it, else the default one. The two round differently in the last
    bit (measured after 50 steps: 2e-8 relative in float32, 2e-17 in float64).

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


# --- configuration checks -------------------------------------------------------------
# Each config field carries a check in its metadata; the config's __post_init__ and the
# mergekit parameter spec both run it, so a bad value fails with the same sentence
# whether it comes from Python or from a YAML file.


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def config_field(default: Any, check, help: str, per_model: bool = False) -> Any:
    """A config dataclass field with its check and help text in the metadata."""
    return dataclasses.field(
        default=default, metadata={"check": check, "help": help, "per_model": per_model}
    )


def check_config(config: Any) -> None:
    """Run every field's check; used by the configs' __post_init__."""
    for field in dataclasses.fields(config):
        check = field.metadata.get("check")
        if check is not None:
            check(field.name, getattr(config, field.name))


def per_task_values(name: str, values: Sequence[float], count: int) -> Tuple[float, ...]:
    """Validate a per-task sequence of parameter values against the task count."""
    values = tuple(values)
    if len(values) != count:
        raise ValueError(f"{name} needs one value per task vector ({count}), got {len(values)}")
    return values
