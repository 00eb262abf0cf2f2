"""Shared pieces of the solvers: task-vector preparation, config checks, the Adam update.

Pure torch: nothing here imports mergekit, click or logging configuration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, List, Sequence, Tuple

import torch

# Row chunks hold at most this many elements of the (out, in) solution, so the
# per-chunk state (iterate, two Adam moments, gradient) stays small.
_CHUNK_ELEMENTS = 1 << 22

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


def row_chunks(rows: int, cols: int, chunk_elements: int) -> Iterator[slice]:
    """Consecutive row slices holding at most chunk_elements elements (at least one row)."""
    step = max(1, chunk_elements // max(1, cols))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def adam_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    denom: torch.Tensor,
    step: int,
    lr: float,
) -> None:
    """One Adam step in place, with the arithmetic of torch.optim.Adam (single-tensor path).

    Kingma & Ba, "Adam", ICLR 2015 (arXiv:1412.6980), as torch.optim.Adam implements it
    with betas (0.9, 0.999), eps 1e-8, no weight decay, no amsgrad:
        m <- lerp(m, g, 1 - beta1);  v <- beta2 v + (1 - beta2) g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    The same operations in the same order as torch, so results match it bit for bit;
    `denom` is a caller-owned buffer of param's shape, reused across steps.
    """
    # torch.optim.Adam keeps the step count in a float tensor and raises the betas
    # to its Python float value; an int exponent can round differently.
    step_value = float(step)
    exp_avg.lerp_(grad, 1 - ADAM_BETA1)
    exp_avg_sq.mul_(ADAM_BETA2).addcmul_(grad, grad, value=1 - ADAM_BETA2)
    bias_correction1 = 1 - ADAM_BETA1**step_value
    bias_correction2 = 1 - ADAM_BETA2**step_value
    step_size = lr / bias_correction1
    torch.sqrt(exp_avg_sq, out=denom)
    denom.div_(bias_correction2**0.5).add_(ADAM_EPS)
    param.addcdiv_(exp_avg, denom, value=-step_size)


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
