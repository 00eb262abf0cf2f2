import pytest
import torch
from reference import usable, wudi_adam, wudi_loss
from tensors import full_rank_task_vectors

from mergekit_wudi.solvers.objective import task_arithmetic_objective, wudi_objective


@pytest.mark.parametrize("chunk_elements", [1 << 22, 50])  # one chunk; many 1-row chunks
def test_objective_matches_the_autograd_reference_loss(generator, chunk_elements):
    tasks = full_rank_task_vectors(generator, 3, 24, 40)
    tasks[1].zero_()  # excluded, as in the solvers
    merged = torch.randn(24, 40, generator=generator, dtype=torch.float64) * 1e-3
    expected = float(wudi_loss(merged, usable(tasks)))
    assert wudi_objective(tasks, merged, chunk_elements=chunk_elements) == pytest.approx(expected, rel=1e-12)


def test_solving_lowers_the_objective_below_task_arithmetic(generator):
    tasks = full_rank_task_vectors(generator, 3, 16, 16)
    before = task_arithmetic_objective(tasks)
    assert before == pytest.approx(float(wudi_loss(tasks.sum(0), usable(tasks))), rel=1e-12)
    assert wudi_objective(tasks, wudi_adam(tasks, steps=50, lr=1e-4)) < 0.5 * before


def test_no_usable_task_vector_and_shape_mismatch():
    assert wudi_objective(torch.zeros(2, 3, 4), torch.ones(3, 4)) == 0.0
    with pytest.raises(ValueError, match="merged has shape"):
        wudi_objective(torch.ones(2, 3, 4), torch.ones(4, 3))
