"""Solver configuration checks: one check per config field, run from Python and from YAML.

Each config field carries its check in its metadata; the config's __post_init__ and the
mergekit parameter spec both run it, so a bad value fails with the same sentence
whether it comes from Python or from a YAML file. Pure Python.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _number(name: str, value: Any, accepted: Callable[[Any], bool], requirement: str) -> float:
    """value as a float where it is a number (not a bool) that `accepted` takes, else the one-line error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not accepted(value):
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    return _number(name, value, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def check_non_negative(name: str, value: Any) -> float:
    return _number(name, value, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def check_fraction(name: str, value: Any) -> float:
    return _number(name, value, lambda v: 0 < v <= 1, "in (0, 1]")


def check_unit_interval(name: str, value: Any) -> float:
    return _number(name, value, lambda v: 0 <= v <= 1, "in [0, 1]")


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_choice(*choices: str):
    """A check that accepts one of `choices`."""

    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    return check


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


def per_model_values(config: Any, per_model: Mapping[str, Any], count: int) -> Dict[str, Tuple[Any, ...]]:
    """One checked value per task vector for each per-model field of `config`.

    per_model: the `solve(task_vectors, **per_model)` keywords; a field left out or None
    takes the config's value for every task vector. An unknown keyword is a TypeError.
    """
    fields = {field.name: field for field in dataclasses.fields(config) if field.metadata.get("per_model")}
    unknown = sorted(set(per_model) - set(fields))
    if unknown:
        raise TypeError(f"{type(config).__name__} has no per-model parameter {', '.join(map(repr, unknown))}")
    values: Dict[str, Tuple[Any, ...]] = {}
    for name, field in fields.items():
        given = per_model.get(name)
        if given is None:
            given = [getattr(config, name)] * count
        values[name] = per_task_values(name, given, count)
        for value in values[name]:
            field.metadata["check"](name, value)
    return values
