"""tensor_kinds.py: what is a linear weight, what is solved, which methods are ours."""

import pytest
import torch
from mergekit.merge_methods import registry

from mergekit_wudi.tensor_kinds import fallback_reason, is_input_major, is_linear_weight, is_ours, will_solve


@pytest.mark.parametrize(
    "name, shape, vocab, expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", (8, 8), None, True),
        ("h.0.attn.c_attn.weight", (8, 24), None, True),
        ("model.layers.0.self_attn.q_proj.bias", (8, 8), None, False),
        ("model.norm.weight", (8,), None, False),
        ("model.embed_tokens.weight", (32, 8), 0, False),
        ("lm_head.weight", (32, 8), 0, False),
        ("embeddings.position_embeddings.weight", (32, 8), None, False),
        ("embeddings.token_type_embeddings.weight", (2, 8), None, False),
        ("transformer.wpe.weight", (32, 8), None, False),
        ("encoder.embed_positions.weight", (32, 8), None, False),
        ("conv.weight", (4, 4, 3, 3), None, False),
    ],
)
def test_linear_weight_predicate(name, shape, vocab, expected):
    assert is_linear_weight(name, torch.zeros(shape), vocab) is expected


def test_input_major_detection():
    assert is_input_major("transformer.h.0.attn.c_attn.weight")
    assert is_input_major("transformer.h.3.mlp.c_proj.weight")
    assert not is_input_major("model.layers.0.mlp.down_proj.weight")


MATRIX = torch.zeros(8, 8)


@pytest.mark.parametrize(
    "name, tensor, vocab, conditions, reason",
    [
        ("model.layers.0.mlp.up_proj.weight", MATRIX, None, {}, None),
        ("model.layers.0.mlp.up_proj.weight", MATRIX, None, {"fine_tunes": 0}, "only the base model has it"),
        ("model.layers.0.mlp.up_proj.weight", MATRIX, None, {"solve": False}, "solve: false"),
        ("model.norm.weight", torch.zeros(8), None, {}, "not a linear weight"),
        ("model.embed_tokens.weight", MATRIX, 0, {}, "not a linear weight"),
        # before the tensor is read, the name decides
        ("model.layers.0.mlp.up_proj.weight", None, None, {}, None),
        ("model.layers.0.mlp.up_proj.bias", None, None, {}, "not a linear weight"),
        ("wpe.weight", None, None, {}, "not a linear weight"),
        ("model.embed_tokens.weight", None, 0, {}, "not a linear weight"),
    ],
)
def test_fallback_reason_and_will_solve_agree(name, tensor, vocab, conditions, reason):
    assert fallback_reason(name, tensor, vocab, **conditions) == reason
    assert will_solve(name, tensor, vocab, **conditions) is (reason is None)


def test_is_ours():
    assert all(is_ours(registry.get(name)) for name in ("wudi", "wudi_cfs", "doge"))
    assert not any(is_ours(registry.get(name)) for name in ("task_arithmetic", "ties", "linear"))
    assert not is_ours(object())
