"""Float64 transcription of ACE-Merging (Xu et al., CVPR 2026, arXiv:2603.02945), test-only.

Official code read: unravel-xu/ACE-Merging, src/merge/strategy.py, MergeStrategy.ace_merging
(eps=1e-2, k_frac=0.3; identical in both stored commits d267001 and 22d9dfe), called with
its defaults by src/steps/step3.py (run_step3) and applied by utils/common.py
(apply_to_model). The math and every quirk are in docs/ace.md.

Scaling, as the official pipeline does it (this is NOT part of the functions below):
  - Task vectors are the raw differences W_i - W0 (utils/task_vector.py, TaskVector.compute):
    no per-model weights exist there. Here each input is already `weight_i * (W_i - W0)`;
    with every weight 1 that is the official input.
  - The merged update is added with a scaling coefficient:
    `sd[layer] += merged_task_vector[layer] * scaling_coefficient` (apply_to_model), with
    `config.merge["scaling_coefficient"] = 1.0` (control/config.py, README). That is the
    package's `lambda`, default 1.0: W = W0 + lambda * t_m. No grid search in the code.
  - Tensors that are not 2-D, and 2-D tensors whose name contains "text_projection", are
    AVERAGED: mean_i t_i (not summed). Every other 2-D parameter (embeddings, positional
    embeddings, GPT-2 Conv1D weights in their stored (in, out) orientation) goes through
    ace_merging. Excluded by name before that, so kept at the base: GPT-2 `.*score.*`;
    BERT/RoBERTa classifier, biases, LayerNorm, embeddings; LLaMA embed_tokens, lm_head
    (src/steps/step1.py).

Three functions:
  - ace_reference: the official ace_merging for one weight, literally, with two
    non-default switches for the corrections proposed in docs/ace.md (prior="mean",
    centre_update=False) and `deviations=True` for the proposed handling of the inputs on
    which the code fails (zero or non-finite task vectors, a task with no centred part,
    k = int(r * k_frac) = 0).
  - ace_heterogeneity: the code's switch, gamma and gamma > 0.3, for tests to pick inputs.
  - nothing for "the paper's math": the paper's method section could not be read here
    (only its abstract); see docs/ace.md, "Sources".
No chunking, no Gram tricks, no Sherman-Morrison: the matrices as the code builds them.
Checked once against the official function body run on float64 inputs (a scratch copy
outside the repository, 16 cases): bit-identical with the switch off, within 4e-10 with it
on (the code forms its traces as a float32 tensor).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch

Vectors = Union[torch.Tensor, Sequence[torch.Tensor]]


def ace_heterogeneity(task_vectors: Vectors) -> Tuple[float, bool]:
    """gamma = var(log(tau_i + 1e-12)) / (mean(log(tau_i + 1e-12))^2 + 1e-12), tau_i = ||t_i||_F^2.

    As in ace_merging: traces of the UNcentred task vectors, torch.var (unbiased, N - 1).
    N = 1: the code's var is NaN and `NaN > 0.3` is False; here gamma = NaN, flag False.
    (The code forms the traces as a float32 tensor; here float64: the switch can differ
    only where gamma is within float32 rounding of 0.3.)
    """
    traces = torch.stack([torch.trace(t.T @ t) for t in task_vectors]).to(torch.float64)
    log_traces = torch.log(traces + 1e-12)
    if len(log_traces) < 2:
        return math.nan, False
    gamma = (torch.var(log_traces) / (torch.mean(log_traces).pow(2) + 1e-12)).item()
    return gamma, gamma > 0.3


def ace_reference(
    task_vectors: Vectors,
    eps: float = 1e-2,
    k_frac: float = 0.3,
    *,
    prior: str = "row",
    centre_update: bool = True,
    residual_ridge: bool = True,
    deviations: bool = False,
) -> torch.Tensor:
    """MergeStrategy.ace_merging for one (out, in) weight; returns the merged task vector t_m.

    Defaults = the official code. prior="mean", centre_update=False and residual_ridge=False
    are the corrections offered as options (docs/ace.md, "Is the code wrong?");
    deviations=True applies the proposed handling of the inputs where the code fails
    (docs/ace.md, "Deviations"): a task vector takes no part where it is not finite, or
    where its centred part has ||c_i||_F <= max(out, in) * eps64 * ||t_i||_F (zero vectors
    included); none left gives 0; k = 0 gives W_0 (no refinement).
    """
    tasks = [torch.as_tensor(t, dtype=torch.float64) for t in task_vectors]
    shape = tasks[0].shape
    if deviations:
        # Non-finite task vectors, and those whose centred part is zero (to rounding), take no part.
        def has_centred_part(t):
            centred_norm = torch.linalg.norm(t - t.mean(dim=0, keepdim=True))
            return centred_norm > max(shape) * torch.finfo(torch.float64).eps * torch.linalg.norm(t)

        tasks = [t for t in tasks if torch.isfinite(t).all() and has_centred_part(t)]
        if not tasks:
            return torch.zeros(shape, dtype=torch.float64)
    count = len(tasks)  # the code's T
    in_dim = shape[1]
    eye = torch.eye(in_dim, dtype=torch.float64)

    # traces / log_traces / gamma / flag / avg_trace: uncentred ||t_i||_F^2.
    traces = torch.stack([torch.trace(t.T @ t) for t in tasks])
    _, flag = ace_heterogeneity(tasks)
    avg_trace = traces.mean().item()

    sigmas = []  # the code's Sigmas: unregularised (normalised when flag)
    w_sigma_sum = torch.zeros(shape, dtype=torch.float64)  # WSigma_sum (out, in)
    sigma_sum = torch.zeros(in_dim, in_dim, dtype=torch.float64)  # Sigma_sum (in, in)
    for t in tasks:
        centred = t - t.mean(dim=0, keepdim=True)  # the code's `W_t = W_t - W_t.mean(dim=0, keepdim=True)`
        sigma_raw = centred.T @ centred  # (in, in)
        tr = torch.trace(sigma_raw) + 1e-12
        if flag:
            sigma_t, eps_t = sigma_raw / tr, eps / tr
        else:
            sigma_t, eps_t = sigma_raw, eps
        sigmas.append(sigma_t)
        sigma_t = sigma_t + eps_t * eye
        w_sigma_sum += (centred if centre_update else t) @ sigma_t  # code: the centred W_t
        sigma_sum += sigma_t

    if prior == "row":
        c_agg = torch.mean(sum(sigmas), dim=0, keepdim=True)  # (1, in): column means, broadcast over rows
    elif prior == "mean":
        c_agg = torch.stack(sigmas).mean(dim=0)  # (in, in): the mean covariance (proposed)
    else:
        raise ValueError(f"prior must be 'row' or 'mean', not {prior!r}")
    if flag:
        c_agg = c_agg / (avg_trace + 1e-12)
    a = sigma_sum + c_agg
    b = w_sigma_sum
    try:
        a_inv = torch.linalg.inv(a)
    except RuntimeError:
        a_inv = torch.linalg.pinv(a)
    w_0 = b @ a_inv
    merging_vector = w_0.clone()
    if flag:
        # Sigma_sum / T includes the ridges eps_t I; residual_ridge=False: the mean of the Sigmas.
        sigma_mean = sigma_sum / count if residual_ridge else sum(sigmas) / count
        delta_res = torch.zeros(shape, dtype=torch.float64)
        for t, s_t in zip(tasks, sigmas):
            delta_res += t @ (s_t - sigma_mean)  # the UNcentred task vectors
        delta_fused = delta_res + w_0
        u, s, vh = torch.linalg.svd(delta_fused, full_matrices=False)
        k = int(s.numel() * k_frac)
        if deviations and k == 0:
            return merging_vector  # the code: mean of an empty slice = NaN everywhere
        sigma_iso = s[:k].mean()
        merging_vector += sigma_iso * (u[:, :k] @ vh[:k, :])
    return merging_vector
