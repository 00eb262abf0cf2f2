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
