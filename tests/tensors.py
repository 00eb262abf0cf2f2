"""Random task vectors for solver tests."""

import torch


def low_rank_task_vectors(generator, count, out_features, in_features, rank=3, scale=1e-3, dtype=torch.float64):
    """(count, out, in) task vectors of the given rank, entries of about `scale`."""
    left = torch.randn(count, out_features, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(count, rank, in_features, generator=generator, dtype=torch.float64)
    return (left @ right * (scale / rank**0.5)).to(dtype)


def full_rank_task_vectors(generator, count, out_features, in_features, scale=1e-3, dtype=torch.float64):
    return (torch.randn(count, out_features, in_features, generator=generator, dtype=torch.float64) * scale).to(dtype)
