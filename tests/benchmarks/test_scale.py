"""benchmarks/scale: the generated task vectors follow the profile, generation is deterministic,
a tiny family merges through the real mergekit-yaml, and the cost model's fit recovers a known law."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from scale import cost, family, run

PROFILE = json.loads(family.PROFILE.read_text())
TINY = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 96}


def test_lora_task_vector_has_rank_16_and_the_profiled_norm():
    fam = family.Family(16, "lora", PROFILE)
    base_norm = torch.tensor(3.0)
    t = fam._task_vector("q_proj", 5, (256, 512), "lora", base_norm, torch.Generator().manual_seed(1))
    entry = PROFILE["lora"]["q_proj"][5 * family.DEPTH_BINS // 16]
    assert torch.linalg.matrix_rank(t) == family.LORA_RANK  # at float32 rounding, as generated
    assert float(t.norm()) == pytest.approx(entry["relnorm"] * 3.0, rel=1e-5)
    values = torch.linalg.svdvals(t.double())[: family.LORA_RANK]
    assert float(values[0] / values[-1]) > 5  # a decaying spectrum, not white noise


def test_full_task_vector_follows_the_profiled_spectrum_head():
    fam = family.Family(16, "full", PROFILE)
    t = fam._task_vector("down_proj", 0, (512, 1024), "full", torch.tensor(2.0), torch.Generator().manual_seed(2))
    entry = PROFILE["full"]["down_proj"][0]
    assert float(t.norm()) == pytest.approx(entry["relnorm"] * 2.0, rel=0.05)  # the tail is a random draw
    values = torch.linalg.svdvals(t.double())
    expected = 10 ** torch.tensor(entry["log_spectrum"][:4], dtype=torch.float64)
    assert torch.allclose(values[:4] / values[0], expected, rtol=0.05)
    assert torch.linalg.matrix_rank(t) == 512  # full rank: the tail fills the rest


def test_tensors_are_deterministic_and_differ_between_fine_tunes():
    fam = family.Family(2, "mixed", PROFILE)
    name, shape = "model.layers.1.mlp.up_proj.weight", (128, 64)
    first, again = fam.tensor(name, shape, 1), family.Family(2, "mixed", PROFILE).tensor(name, shape, 1)
    assert first.dtype == torch.bfloat16 and torch.equal(first, again)
    assert not torch.equal(first, fam.tensor(name, shape, 2))
    assert fam.kind_of(1) == "full" and fam.kind_of(2) == "lora"
    embed = "model.embed_tokens.weight"
    assert torch.equal(fam.tensor(embed, (96, 64), 2), fam.tensor(embed, (96, 64), 0))  # LoRA leaves it alone


def test_a_tiny_family_merges_through_mergekit_yaml(tmp_path: Path):
    base, *models = family.generate(tmp_path / "fam", 2, "mixed", 2, TINY)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 1 + 2 * 9 + 1  # embeddings, 9 per layer, final norm
    with safe_open(str(models[1] / index["weight_map"]["model.layers.0.self_attn.k_proj.weight"]), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").shape == (32, 64)
    for method in ("task_arithmetic", "wudi_cfs"):
        seconds, rss = run.merge(run.recipe(method, base, models), tmp_path)
        assert seconds > 0 and rss > 0
    assert run.recipe("wudi", base, models, subset=True)["parameters"]["solve"][0] == {"filter": "layers.0.", "value": True}
    assert "parameters" not in run.recipe("tsv", base, models)  # the whole model, at its defaults


def test_cost_fit_recovers_a_known_law():
    a, b = 3e-12, 5e-10
    shapes = [(512, 2048), (2048, 2048), (8192, 2048), (2048, 8192)]
    solves = [{"method": "tsv", "shape": list(s), "seconds": a * cost.features(s, "tsv")[0] + b * cost.features(s, "tsv")[1]}
              for s in shapes]
    fitted = cost.fit(solves, "tsv", set(shapes))
    assert fitted == pytest.approx((a, b), rel=1e-6)
    assert cost.features((2048, 8192), "wudi_cfs") == (4 * 2048 * 8192 * 8192, 8192**3)  # the input space
    assert cost.features((2048, 8192), "tsv") == (4 * 2048 * 8192 * 2048, 2048**3)
    assert cost.parameters("Llama-3.2-1B") == pytest.approx(1.236e9, rel=0.01)


def test_cost_rounds_follow_the_memory_bound():
    # tsv at 8192x2048, N = 4, k = 512: the stacks leave 5 * 2^24 - 2048 * 10240 = 62,914,560
    # elements; a task's triplets need 18,355,200 (3 fit). Two threads: the 4 triplets in 2
    # rounds, then the two polar factors in turn.
    assert [cost.rounds("tsv", (8192, 2048), threads) for threads in (1, 2, 16)] == [6, 4, 4]
    # square: the float64 Gram alone is 2 tensors, so nothing runs side by side; iso_cts's
    # residuals go through the complement Q, of order 2048 - 1640 = 408 (k = 1640 at the
    # default fraction 0.8), each (408 / 2048)^3 of a full decomposition
    assert [cost.rounds(method, (2048, 2048), 16) for method in ("tsv", "iso_c")] == [6, 5]
    assert cost.rounds("iso_cts", (2048, 2048), 16) == pytest.approx(4 + 1 + 4 * (408 / 2048) ** 3 + 2)
    assert cost.rounds("iso_cts", (8192, 2048), 2) == 2 + 1 + 4 + 2  # out > in: residuals of order 2048
    # calibration at 8192x2048 needs 14,680,064 a task: 4 fit in 4 tensors, then iso_c's own polar
    assert [cost.rounds("iso_c", (8192, 2048), threads) for threads in (2, 16)] == [3, 2]


def test_floor_lies_below_the_measured_merges(capsys):
    # The floor counts only the one-thread tridiagonal reductions a spectral merge runs in a
    # row: a measured merge through mergekit below it would mean the count (rounds) is wrong.
    totals = cost.floor(quick=True)
    for method in cost.SPECTRAL:
        assert 0 < totals[f"{method} floor"] <= totals[method], method
    assert totals["ties"] > 0
    assert "| iso_cts |" in capsys.readouterr().out
