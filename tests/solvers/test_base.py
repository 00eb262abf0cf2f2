"""solvers/base.py: the template every method follows."""

import pytest
import torch


def test_a_subclass_of_a_method_inherits_its_declaration():
    from mergekit_wudi.solvers import TsvSolver

    class Quieter(TsvSolver, pretty_name="TSV, renamed"):
        pass

    assert (Quieter.name, Quieter.pretty_name, Quieter.one_thread, Quieter.config_cls) == (
        "tsv", "TSV, renamed", True, TsvSolver.config_cls)


def test_the_template_drops_unusable_task_vectors_and_keeps_per_model_values_aligned():
    from mergekit_wudi.solvers import DogeConfig, DogeSolver

    seen = {}

    class Probe(DogeSolver):
        def _solve(self, prepared, density):
            seen.update(indices=prepared.indices, density=density, dtype=prepared.vectors.dtype)
            return prepared.vectors.sum(dim=0)

    vectors = torch.randn(4, 5, 3, dtype=torch.bfloat16)
    vectors[1] = 0
    vectors[2, 0, 0] = float("nan")
    Probe(DogeConfig()).solve(vectors, density=[0.1, 0.2, 0.3, 0.4])
    assert seen == {"indices": (0, 3), "density": (0.1, 0.4), "dtype": torch.float32}
    with pytest.raises(TypeError, match="no per-model parameter 'weight'"):
        Probe().solve(vectors, weight=[1.0] * 4)
    assert not Probe().solve(torch.zeros(2, 5, 3)).any()


def test_average_replaces_the_solve_with_the_sum_after_the_trim_and_the_mean_for_a_task_sized_method():
    # adapter_guard's one-seed rule (guard.py): the sum of the (trimmed) task vectors, whatever
    # the calibrate rule, the method's _solve never called; a task-sized method (doge) returns
    # the mean over all N given, a zero task vector counted.
    from reference import trimmed

    from mergekit_wudi.solvers import DogeSolver, WudiCfsSolver

    class Untouched(WudiCfsSolver):
        def _solve(self, prepared, **per_model):
            raise AssertionError("solved")

    torch.manual_seed(0)
    vectors = torch.randn(3, 6, 4, dtype=torch.float64)
    merged = Untouched(calibration="input_space", density=[1.0, 0.5, 1.0], average=True).solve(vectors.clone())
    kept = torch.stack([vectors[0], trimmed(vectors[1:2], 0.5)[0], vectors[2]])
    assert torch.allclose(merged, kept.sum(dim=0), rtol=0, atol=1e-15)
    assert not torch.allclose(merged, vectors.sum(dim=0))  # the trim took part

    vectors[1] = 0
    solver = DogeSolver(average=True)
    assert torch.allclose(solver.solve(vectors), vectors.sum(dim=0) / 3, rtol=0, atol=1e-15)
    assert solver.last_calibration.binding == "average" and solver.last_calibration.scale == 1.0
