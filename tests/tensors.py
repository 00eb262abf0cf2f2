"""Random task vectors for solver tests."""

import torch


def low_rank_task_vectors(generator, count, out_features, in_features, rank=3, scale=1e-3, dtype=torch.float64):
    """(count, out, in) task vectors of the given rank, entries of about `scale`."""
    left = torch.randn(count, out_features, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(count, rank, in_features, generator=generator, dtype=torch.float64)
    return (left @ right * (scale / rank**0.5)).to(dtype)


def full_rank_task_vectors(generator, count, out_features, in_features, scale=1e-3, dtype=torch.float64):
    return (torch.randn(count, out_features, in_features, generator=generator, dtype=torch.float64) * scale).to(dtype)


def solve_at_one_and_two_threads(solve, task_vectors):
    """`solve(task_vectors)` run with torch on 1, then 2 threads (restored after): the two results."""
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(solve(task_vectors))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(saved)
    return results
