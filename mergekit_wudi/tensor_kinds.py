"""What a tensor is to us, and whether a merge method is ours: each rule written once.

`will_solve` is the one answer to "is this tensor solved?", used by the adapter (which
path a tensor takes), the progress bar (how many solves a run plans) and the report
(which tensors to measure). Pure torch: nothing here imports mergekit.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

# 2-D `.weight` tensors that are lookup tables, not linear maps (besides anything with
# "embed" in its name and anything mergekit marks with a vocabulary axis).
_TABLE_MODULES = frozenset(
    {"wte", "wpe", "position_embeddings", "token_type_embeddings", "word_embeddings", "relative_attention_bias"}
)
# GPT-2 style Conv1D modules store their weight as (in, out).
_INPUT_MAJOR_MODULES = frozenset({"c_attn", "c_fc", "c_proj", "q_attn"})
# Stands in for a tensor not read yet (planning): a 2-D float tensor, so the name decides.
_UNREAD_MATRIX = torch.empty((1, 1), device="meta")
# A class attribute set on our merge-method class (a name, so that the methods of a
# reloaded adapter module still count as ours).
OURS_MARKER = "_mergekit_wudi_method"


def _module_name(tensor_name: str) -> str:
    parts = tensor_name.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def is_linear_weight(name: Optional[str], tensor: torch.Tensor, vocabulary_axis: Optional[int] = None) -> bool:
    """Whether a tensor is a linear map: a 2-D floating `*.weight`.

    Not linear: anything that is not 2-D, not named `*.weight`, marked by mergekit as
    having a vocabulary axis (token embeddings, lm_head), named like an embedding table
    (`embed` anywhere in the name, BERT's position/token-type embeddings, GPT-2's
    wte/wpe, T5's relative_attention_bias). An unnamed 2-D tensor (direct API use) is
    treated as linear.
    """
    if tensor.ndim != 2 or not tensor.is_floating_point() or vocabulary_axis is not None:
        return False
    if name is None:
        return True
    if not name.endswith(".weight"):
        return False
    return "embed" not in name.lower() and _module_name(name) not in _TABLE_MODULES


def is_input_major(name: Optional[str]) -> bool:
    """Detects GPT-2 style Conv1D weights (c_attn, c_fc, c_proj, q_attn), stored (in, out)."""
    return name is not None and _module_name(name) in _INPUT_MAJOR_MODULES


def fallback_reason(
    name: Optional[str],
    tensor: Optional[torch.Tensor],
    vocabulary_axis: Optional[int] = None,
    *,
    solve: bool = True,
    fine_tunes: int = 1,
) -> Optional[str]:
    """Why a tensor goes to the fallback method, or None when it is solved.

    tensor: the base model's tensor; None before it is read (planning), then only the
    name decides (a name with "norm" is a 1-D tensor in every architecture). solve: the
    resolved `solve` parameter. fine_tunes: how many models besides the base hold it.
    """
    if not fine_tunes:
        return "only the base model has it"
    if not solve:
        return "solve: false"
    if tensor is None and name is not None and "norm" in name.lower():
        return "not a linear weight"
    if not is_linear_weight(name, _UNREAD_MATRIX if tensor is None else tensor, vocabulary_axis):
        return "not a linear weight"
    return None


def will_solve(name: Optional[str], tensor: Optional[torch.Tensor], *args: Any, **kwargs: Any) -> bool:
    """Whether our merge methods solve this tensor; the arguments of `fallback_reason`."""
    return fallback_reason(name, tensor, *args, **kwargs) is None


def is_ours(method: Any) -> bool:
    """Whether a mergekit merge method is one of mergekit-wudi's solver methods."""
    return getattr(type(method), OURS_MARKER, False) is True
