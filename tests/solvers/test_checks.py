"""solvers/checks.py: config checks and per-model values, with the sentence a user reads."""

import pytest
import torch

from mergekit_wudi.solvers import DogeConfig, WudiCfsSolver, WudiConfig, WudiSolver, per_model_values
from mergekit_wudi.solvers.checks import check_fraction, check_non_negative, check_non_negative_int, check_positive


@pytest.mark.parametrize(
    "check, value, message",
    [
        (check_non_negative_int, -1, "x must be an integer >= 0, got -1"),
        (check_non_negative_int, True, "x must be an integer >= 0, got True"),
        (check_positive, 0.0, "x must be a finite number > 0, got 0.0"),
        (check_positive, float("inf"), "x must be a finite number > 0, got inf"),
        (check_non_negative, "a", "x must be a number, got 'a'"),
        (check_fraction, 0.0, "x must be in (0, 1], got 0.0"),
        (check_fraction, 1.5, "x must be in (0, 1], got 1.5"),
    ],
)
def test_bad_values_are_named(check, value, message):
    with pytest.raises(ValueError) as error:
        check("x", value)
    assert str(error.value) == message


def test_configs_run_their_checks():
    with pytest.raises(ValueError, match="steps must be an integer >= 0, got -3"):
        WudiConfig(steps=-3)
    assert WudiConfig(steps=0).steps == 0


def test_per_model_values_default_to_the_config_and_are_checked():
    config = DogeConfig(density=0.4)
    assert per_model_values(config, {}, 3) == {"density": (0.4, 0.4, 0.4)}
    assert per_model_values(config, {"density": None}, 2) == {"density": (0.4, 0.4)}
    assert per_model_values(config, {"density": [0.1, 1.0]}, 2) == {"density": (0.1, 1.0)}
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 1.5"):
        per_model_values(config, {"density": [0.1, 1.5]}, 2)
    with pytest.raises(ValueError, match=r"density needs one value per task vector \(3\), got 2"):
        per_model_values(config, {"density": [0.1, 0.2]}, 3)


@pytest.mark.parametrize("solver", [WudiSolver(), WudiCfsSolver()])
def test_a_per_model_keyword_a_solver_does_not_take_is_a_type_error(solver):
    with pytest.raises(TypeError, match="has no per-model parameter 'density'"):
        solver.solve(torch.zeros(2, 3, 4), density=[0.5, 0.5])
