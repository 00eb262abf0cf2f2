"""The methods inside mergekit's other workflows, unchanged: the model card, the Python
API (`run_merge`), multi-stage merges (`mergekit-multi`), LoRA adapters (`model+lora`)
and `mergekit-evolve`'s genome."""

import json
import os
import subprocess
import sys

import pydantic
import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import merge_tensors
from mergekit.options import MergeOptions
from models import (
    is_llama_linear,
    load_model,
    make_mixed_family,
    make_one_seed_family,
    make_seed_each_family,
    write_config,
)
from reference import SCALES, doge, mean_cap_scale, trimmed, wudi_closed_form
from reference import equalized as equalized_by_hand
from reference_2025 import EPS32, iso_c, iso_cts
from runner import mergekit_yaml, mergekit_yaml_in_process

from mergekit_wudi.config_check import check_config_keys

pytestmark = pytest.mark.e2e

ARXIV_WUDI = "https://arxiv.org/abs/2503.08099"
ARXIV_DOGE = "https://arxiv.org/abs/2501.01230"
ARXIV_TSV = "https://arxiv.org/abs/2412.00081"
ARXIV_ISO = "https://arxiv.org/abs/2502.04959"
METHODS = {
    "wudi": ({"steps": 20}, f"[WUDI-Merging]({ARXIV_WUDI})"),
    "wudi_cfs": ({"omega": 0.1}, f"[WUDI-Merging (closed form)]({ARXIV_WUDI})"),
    "doge": ({"steps": 20}, f"[DOGE-TA]({ARXIV_DOGE})"),
    "tsv": ({}, f"[TSV-Merge]({ARXIV_TSV})"),
    "iso_c": ({}, f"[Iso-C]({ARXIV_ISO})"),
    "iso_cts": ({"common_space_fraction": 0.5}, f"[Iso-CTS]({ARXIV_ISO})"),
}
API_OPTIONS = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False)


@pytest.fixture(scope="module")
def cli_runs(family, tmp_path_factory):
    """One real mergekit-yaml run per method (model card on, as by default)."""
    base, *models = family
    runs = {}
    for method, (parameters, _) in METHODS.items():
        root = tmp_path_factory.mktemp(method)
        config = write_config(root / f"{method}.yml", method, base, models, parameters, [{"weight": 0.9}, {}, {}])
        mergekit_yaml(config, root / "out")
        runs[method] = (config, root / "out")
    return runs


def assert_same_tensors(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


@pytest.mark.parametrize("method", METHODS)
def test_model_card_links_the_paper(cli_runs, method):
    config, out = cli_runs[method]
    card = (out / "README.md").read_text()
    assert METHODS[method][1] in card, card[:1500]
    assert (out / "mergekit_config.yml").read_text() == config.read_text()


@pytest.mark.parametrize("method", METHODS)
def test_python_api_equals_mergekit_yaml(cli_runs, method, tmp_path):
    config, out = cli_runs[method]
    merge_config = MergeConfiguration.model_validate(yaml.safe_load(config.read_text()))
    run_merge(merge_config, str(tmp_path / "api"), options=API_OPTIONS)
    assert_same_tensors(load_model(tmp_path / "api"), load_model(out))


def test_multi_stage_merge(family, tmp_path):
    base, ft1, ft2, ft3 = family
    stage1 = {"name": "stage1", "merge_method": "wudi_cfs", "base_model": str(base),
              "models": [{"model": str(ft1)}, {"model": str(ft2)}]}
    final = {"merge_method": "task_arithmetic", "base_model": str(base),
             "models": [{"model": "stage1", "parameters": {"weight": 1.0}},
                        {"model": str(ft3), "parameters": {"weight": 0.5}}]}
    config = tmp_path / "multi.yml"
    config.write_text(yaml.safe_dump_all([stage1, final]))
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    command = [sys.executable, "-m", "mergekit.scripts.multimerge", str(config), "--intermediate-dir",
               str(tmp_path / "stages"), "--out-path", str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet"]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    # Stage 1 is the same wudi_cfs merge as a direct run of its own YAML...
    direct = {k: v for k, v in stage1.items() if k != "name"}
    run_merge(MergeConfiguration.model_validate(direct), str(tmp_path / "direct"), options=API_OPTIONS)
    staged = load_model(tmp_path / "stages" / "stage1")
    assert_same_tensors(staged, load_model(tmp_path / "direct"))
    # ...which solved the linear weights (Eq. 20 in float64, not the plain sum)...
    tensors = [load_model(p) for p in (base, ft1, ft2, ft3)]
    name = "model.layers.1.self_attn.o_proj.weight"
    task_vectors = torch.stack([t[name].double() - tensors[0][name].double() for t in tensors[1:3]])
    expected = tensors[0][name].double() + wudi_closed_form(task_vectors, 0.1)
    change = (expected - tensors[0][name].double()).norm()
    assert (staged[name].double() - expected).norm() < 1e-4 * change
    # ...and stage 2 is task arithmetic on stage 1's output: W0 + (S - W0) + 0.5 (W3 - W0).
    merged = load_model(tmp_path / "out")
    for key, tensor in merged.items():
        w0 = tensors[0][key].double()
        expected = w0 + (staged[key].double() - w0) + 0.5 * (tensors[3][key].double() - w0)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-7)


def test_lora_adapter_through_model_plus_lora(family, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, ft1 = family[0], family[1]
    rank, alpha, targets = 2, 8, ["q_proj", "v_proj", "down_proj"]
    lora_delta = []  # per adapter: the independent expectation, each adapted weight moves by B A * alpha / r
    for seed in (7, 8):
        generator = torch.Generator().manual_seed(seed)
        peft_model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False),
        )
        with torch.no_grad():
            for parameter_name, parameter in peft_model.named_parameters():
                if "lora_" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        peft_model.save_pretrained(str(tmp_path / f"adapter{seed}"))
        del peft_model
        adapter = load_file(str(tmp_path / f"adapter{seed}" / "adapter_model.safetensors"))
        prefix = "base_model.model."
        lora_delta.append({
            key[len(prefix):].replace(".lora_A.weight", ".weight"): adapter[key.replace("lora_A", "lora_B")].double()
            @ adapter[key].double() * (alpha / rank)
            for key in adapter
            if ".lora_A." in key
        })
        assert len(lora_delta[-1]) == 2 * len(targets)
    adapters = [f"{base}+{tmp_path / f'adapter{seed}'}" for seed in (7, 8)]

    config = write_config(tmp_path / "lora.yml", "wudi_cfs", base, [ft1, *adapters])
    check_config_keys(MergeConfiguration.model_validate(json.loads(config.read_text())))
    result = mergekit_yaml(config, tmp_path / "out", "--lora-merge-cache", str(tmp_path / "lora-cache"))
    # Named as adapters, they are known to be ones; their rank 2 is too low for adapter_guard to
    # tell them from random deltas, so lambda stays 1: warned once, with 1/sqrt(K) and 1/(N+1) to start from.
    assert result.stderr.count("wudi_cfs: 2 of the 3 fine-tunes are LoRA adapters") == 1
    assert "lambda 0.71 (1/sqrt(K)), or 0.25 (1/(N+1)) for adapters trained from one seed, is the safer" in result.stderr

    # The weights mergekit sees for `base+adapter` (peft's merge, cached on disk)...
    base_tensors, ft1_tensors = load_model(base), load_model(ft1)
    seen = [load_model(p) for p in (tmp_path / "lora-cache").iterdir() if p.is_dir()]
    assert len(seen) == 2
    for deltas in lora_delta:
        (match,) = [s for s in seen if all(torch.allclose(s[n].double(), base_tensors[n].double() + d, rtol=0, atol=1e-6)
                                            for n, d in deltas.items())]
        for name, tensor in base_tensors.items():
            torch.testing.assert_close(match[name].double(), tensor.double() + deltas.get(name, 0), rtol=0, atol=1e-6)
    # ...and the merge: an adapter's task vector is B A alpha / r, zero (left out of the solve)
    # where it adapts nothing. (Rank 2: the guard cannot tell these adapters, so nothing is trimmed.)
    merged = load_model(tmp_path / "out")
    solved_with_lora = 0
    for name, tensor in merged.items():
        if not is_llama_linear(name):
            continue
        w0 = base_tensors[name].double()
        vectors = [ft1_tensors[name].double() - w0]
        for deltas in lora_delta:
            if name in deltas:
                vectors.append(deltas[name])
                solved_with_lora += 1
        expected = w0 + wudi_closed_form(torch.stack(vectors), 0.1)
        error = (tensor.double() - expected).norm() / (expected - w0).norm()
        assert error < 1e-4, f"{name}: relative error {error:.1e}"
    assert solved_with_lora == 12

    # A lambda the user lowered is not warned about.
    lowered = write_config(tmp_path / "lowered.yml", "wudi_cfs", base, [ft1, *adapters], {"lambda": 0.5})
    result = mergekit_yaml(lowered, tmp_path / "out2", "--lora-merge-cache", str(tmp_path / "lora-cache"))
    assert "LoRA adapters" not in result.stderr
    # Nor one adapter among full fine-tunes (no other adapter to add on its inputs: K = 1).
    single = write_config(tmp_path / "single.yml", "wudi_cfs", base, [ft1, adapters[0]])
    result = mergekit_yaml(single, tmp_path / "out4", "--lora-merge-cache", str(tmp_path / "lora-cache"))
    assert "LoRA adapters" not in result.stderr
    # Nor a method whose own normalisation sets its strength (Solver.sums_disjoint False).
    flattened = write_config(tmp_path / "iso.yml", "iso_c", base, [ft1, *adapters])
    result = mergekit_yaml(flattened, tmp_path / "out3", "--lora-merge-cache", str(tmp_path / "lora-cache"))
    assert "LoRA adapters" not in result.stderr


def test_evolve_genome_with_wudi(family, tmp_path, monkeypatch):
    """What mergekit-evolve does with a genome, minus the evaluation (lm-eval, ray, cma).

    mergekit 0.1.5's genome only knows the methods in its METHOD_PARAM_MAPS (linear,
    task_arithmetic, ties, dare_ties, slerp) and rejects any other merge_method. Adding
    `wudi_cfs: [weight]` there is all it takes: the genome's per-layer, per-model
    weights are plain floats that the method takes as they are.
    """
    from mergekit.evo import genome as evo_genome

    base, *models = family
    with pytest.raises(pydantic.ValidationError, match="Invalid merge method"):
        evo_genome.ModelGenomeDefinition(models=[str(m) for m in models], base_model=str(base), merge_method="wudi_cfs")

    monkeypatch.setitem(evo_genome.METHOD_PARAM_MAPS, "wudi_cfs", ["weight"])
    definition = evo_genome.ModelGenomeDefinition(
        models=[str(m) for m in models], base_model=str(base), merge_method="wudi_cfs", layer_granularity=1
    )
    genome = evo_genome.ModelGenome(definition)
    genotype = genome.initial_genotype(random=True)  # (layer groups, models, param sets, params)
    assert genotype.shape == (2, 3, 1, 1)
    merge_config = genome.genotype_merge_config(genotype)
    check_config_keys(merge_config)  # normalize / int8_mask: the fallback's parameters
    run_merge(merge_config, str(tmp_path / "out"), options=API_OPTIONS)

    merged = load_model(tmp_path / "out")
    tensors = [load_model(p) for p in family]
    for layer in range(2):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        weights = genotype[layer, :, 0, 0].abs().double()
        w0 = tensors[0][name].double()
        task_vectors = torch.stack([w * (t[name].double() - w0) for w, t in zip(weights, tensors[1:])])
        expected = w0 + wudi_closed_form(task_vectors, 0.1)
        # The genome asks for bfloat16: compare at bf16 resolution.
        error = (merged[name].double() - expected).norm()
        rounding = (expected.to(torch.bfloat16).double() - expected).norm()
        assert merged[name].dtype == torch.bfloat16
        assert error <= 1.5 * rounding + 1e-3 * (expected - w0).norm(), name


def assert_wudi_cfs_merged_at(out, base, models, strength, rule=None, densities=None, equalized=(), weights=None):
    """Every linear weight in `out` is W0 + strength * c * the float64 WUDI closed form t_m of the
    models' task vectors (each first trimmed at its density, where given; then those at the
    positions `equalized` rescaled to the root mean square of their norms; each times its weight,
    where given), c the calibrate rule's scale from its definition (1 without a rule)."""
    base_tensors, tuned = load_model(base), [load_model(m) for m in models]
    scales = []
    for name, tensor in load_model(out).items():
        if is_llama_linear(name):
            w0 = base_tensors[name].double()
            task_vectors = torch.stack([t[name].double() - w0 for t in tuned])
            if densities is not None:
                task_vectors = torch.stack([trimmed(t.unsqueeze(0), d)[0] for t, d in zip(task_vectors, densities)])
            if equalized:
                task_vectors = equalized_by_hand(task_vectors, equalized)
            if weights is not None:
                task_vectors = task_vectors * torch.tensor(weights, dtype=torch.float64)[:, None, None]
            solved = wudi_closed_form(task_vectors, 0.1)
            scales.append(1.0 if rule is None else SCALES[rule](list(task_vectors), solved))
            expected = w0 + strength * scales[-1] * solved
            # float32 against float64: 1.03e-4 on one AMD EPYC for the one-seed family's down_proj
            # (rank-2 task vectors sharing one input factor, only the ridge conditioning the solve)
            assert (tensor.double() - expected).norm() / (expected - w0).norm() < 3e-4, (name, strength, rule)
    return scales


def test_adapters_with_a_seed_each_get_lambda_capped(tmp_path):
    # Nothing in the YAML says these are adapters: their task vectors do (guard.py): rank-8
    # deltas with a random input factor each and shared output directions. At the defaults every
    # solved tensor is merged at the cap 1/sqrt(3), said once; a lambda under it is left alone;
    # adapter_guard: false keeps lambda 1 and warns. Independent fine-tunes are not touched:
    # test_guard.py, and every exact-merge test on `family`. They are also equalized first (each
    # task vector rescaled to the root mean square of their norms, said once), with the guard off
    # too; equalize: false keeps their sizes. (One-seed adapters: the next test.)
    cap, equalized = 3 ** -0.5, (0, 1, 2)
    base, *models = make_seed_each_family(tmp_path / "family")
    result = mergekit_yaml(write_config(tmp_path / "default.yml", "wudi_cfs", base, models), tmp_path / "out")
    assert result.stderr.count("wudi_cfs: 3 of the 3 fine-tunes look like LoRA adapters trained with a seed each") == 1
    assert "lambda is capped at 1/sqrt(3) = 0.577 for every solved tensor" in result.stderr
    assert result.stderr.count("so their task vectors are rescaled, per tensor, to one norm") == 1
    assert_wudi_cfs_merged_at(tmp_path / "out", base, models, cap, equalized=equalized)

    off = write_config(tmp_path / "off.yml", "wudi_cfs", base, models, {"adapter_guard": False})
    result = mergekit_yaml(off, tmp_path / "off")
    assert result.stderr.count("adapter_guard is off, so lambda stays 1") == 1
    assert_wudi_cfs_merged_at(tmp_path / "off", base, models, 1.0, equalized=equalized)

    below = write_config(tmp_path / "below.yml", "wudi_cfs", base, models, {"lambda": 0.5})
    assert mergekit_yaml_in_process(below, tmp_path / "below").exit_code == 0
    assert_wudi_cfs_merged_at(tmp_path / "below", base, models, 0.5, equalized=equalized)
    sizes = write_config(tmp_path / "sizes.yml", "wudi_cfs", base, models, {"equalize": False})
    result = mergekit_yaml(sizes, tmp_path / "sizes")
    assert "rescaled, per tensor, to one norm" not in result.stderr
    assert_wudi_cfs_merged_at(tmp_path / "sizes", base, models, cap)
    default, plain = load_model(tmp_path / "out"), load_model(tmp_path / "sizes")
    linear = [name for name in default if is_llama_linear(name)]
    assert linear and not any(torch.equal(default[name], plain[name]) for name in linear)
    # A weight scales its model's equalized task vector: the weights' ratios are kept.
    weighted = write_config(tmp_path / "weighted.yml", "wudi_cfs", base, models, None, [{"weight": 0.5}, {}, {}])
    assert mergekit_yaml_in_process(weighted, tmp_path / "weighted").exit_code == 0
    assert_wudi_cfs_merged_at(tmp_path / "weighted", base, models, cap, equalized=equalized, weights=[0.5, 1, 1])


def assert_average_merged_at(out, base, models, strength, weights=None):
    """Every linear weight in `out` is W0 + strength * sum_i weight_i (W_i - W0), computed here in float64."""
    base_tensors, tuned = load_model(base), [load_model(m) for m in models]
    weights = weights or [1.0] * len(models)
    linear = [(name, tensor) for name, tensor in load_model(out).items() if is_llama_linear(name)]
    assert linear
    for name, tensor in linear:
        w0 = base_tensors[name].double()
        expected = w0 + strength * sum(w * (t[name].double() - w0) for w, t in zip(weights, tuned))
        assert (tensor.double() - expected).norm() / (expected - w0).norm() < 1e-5, (name, strength)  # float32 out


@pytest.mark.parametrize("method, extra", [("wudi_cfs", {}), ("iso_c", {}), ("doge", {"steps": 50})])
def test_one_seed_adapters_are_merged_as_their_average(method, extra, tmp_path):
    # Rank-2 deltas sharing one input factor look like LoRA adapters trained from one seed
    # (guard.py): with calibrate at the method's default, every linear weight is the average of
    # the base and the three, W0 + (1/4) sum t_i, in place of the method's solve, said once (doge,
    # task-sized: lambda at most N/(N+1) = 3/4 times their mean, the same merge); a lambda under
    # 1/(N+1) averages at that lambda, and a weight scales its model's task vector in the sum.
    base, *models = make_one_seed_family(tmp_path / "family")
    result = mergekit_yaml(write_config(tmp_path / "default.yml", method, base, models, extra), tmp_path / "out")
    assert result.stderr.count(f"{method}: 3 of the 3 fine-tunes look like LoRA adapters trained from one seed") == 1
    limit = "N/(N+1) = 0.75" if method == "doge" else "1/(N+1) = 0.25"
    average = "mean" if method == "doge" else "sum"
    assert (f"lambda is capped at {limit} for every solved tensor, and each tensor is merged as the adapters' "
            f"{average} (the average of the base and the fine-tunes at that lambda) in place of {method}'s "
            "solve") in result.stderr
    assert_average_merged_at(tmp_path / "out", base, models, 1 / 4)
    below = write_config(tmp_path / "below.yml", method, base, models, {**extra, "lambda": 0.2}, [{"weight": 0.5}, {}, {}])
    assert mergekit_yaml_in_process(below, tmp_path / "below").exit_code == 0
    assert_average_merged_at(tmp_path / "below", base, models, 0.2 / (3 if method == "doge" else 1), [0.5, 1, 1])


def test_one_seed_adapters_keep_the_solve_where_the_yaml_names_a_rule_or_turns_the_guard_off(tmp_path):
    # A calibrate rule other than the default keeps wudi_cfs's solve, at the capped lambda 1/(N+1);
    # adapter_guard: false keeps lambda 1 and the solve, and says what the guard would do.
    base, *models = make_one_seed_family(tmp_path / "family")
    named = write_config(tmp_path / "named.yml", "wudi_cfs", base, models, {"calibrate": "input_space"})
    assert mergekit_yaml_in_process(named, tmp_path / "named").exit_code == 0
    assert_wudi_cfs_merged_at(tmp_path / "named", base, models, 1 / 4, "input_space")
    off = write_config(tmp_path / "off.yml", "wudi_cfs", base, models, {"adapter_guard": False})
    result = mergekit_yaml(off, tmp_path / "off")
    assert result.stderr.count("adapter_guard is off, so lambda stays 1") == 1
    assert "adapter_guard would merge them with the base as one average (lambda at most 1/(N+1) = 0.25)" in result.stderr
    assert_wudi_cfs_merged_at(tmp_path / "off", base, models, 1.0)


def doge_references(base, models, steps):
    """name -> (W0, the float64 DOGE-TA merge t_m of the models' task vectors, mean_cap's c for it
    from its definition), for every linear weight."""
    base_tensors, tuned = load_model(base), [load_model(m) for m in models]
    references = {}
    for name, w0 in base_tensors.items():
        if is_llama_linear(name):
            w0 = w0.double()
            task_vectors = torch.stack([t[name].double() - w0 for t in tuned])
            solved = doge(task_vectors, [0.3] * len(models), steps=steps)
            references[name] = w0, solved, mean_cap_scale(list(task_vectors), solved, len(models))
    return references


def test_doge_on_one_seed_adapters_keeps_a_named_mean_cap_and_lambda_at_most_n_over_n_plus_1(tmp_path):
    # doge's merge is about one task vector's size whatever N (each t_i weighted eta / ||t_i||,
    # delta fitted to each task's row dots), so the one-seed rule keeps its lambda at most N/(N+1)
    # = 3/4; with calibrate: mean_cap named, each merged tensor is 3/4 times doge's solve capped at
    # the adapters' mean, ||sum t_i|| / N, and lambda 1.5 gives the same merge; adapter_guard: false keeps lambda and the
    # plain merge, and says what the guard would do.
    base, *models = make_one_seed_family(tmp_path / "family")
    capped = {"steps": 50, "calibrate": "mean_cap"}
    result = mergekit_yaml(write_config(tmp_path / "capped.yml", "doge", base, models, capped), tmp_path / "out")
    assert "lambda is capped at N/(N+1) = 0.75 for every solved tensor (adapter_guard" in result.stderr
    above = write_config(tmp_path / "above.yml", "doge", base, models, {**capped, "lambda": 1.5})
    assert mergekit_yaml_in_process(above, tmp_path / "above").exit_code == 0
    off = write_config(tmp_path / "off.yml", "doge", base, models, {"steps": 50, "adapter_guard": False})
    result = mergekit_yaml(off, tmp_path / "off")
    assert result.stderr.count("adapter_guard is off, so lambda stays 1") == 1
    assert ("adapter_guard would merge them with the base as one average (lambda at most N/(N+1) = 0.75, times their "
            "mean)") in result.stderr

    default, higher, plain = (load_model(tmp_path / name) for name in ("out", "above", "off"))
    references = doge_references(base, models, 50)
    for name, (w0, solved, scale) in references.items():
        for merged, c in ((default, 0.75 * scale), (plain, 1.0)):
            expected = w0 + c * solved
            assert (merged[name].double() - expected).norm() / (expected - w0).norm() < 1e-4, (name, c)
        assert torch.equal(default[name], higher[name]), name
    assert min(scale for _, _, scale in references.values()) < 0.9  # the cap binds on this family


def test_iso_c_on_adapters_takes_the_sums_energy_and_no_cap(tmp_path):
    # Only the methods that return the sum of disjoint updates get the 1/sqrt(K) cap (guard.py).
    # iso_c's calibrate: first_order becomes sum_norm where fine-tunes look like adapters, said
    # once: bit for bit the merge that names sum_norm. With the guard off it stays first_order:
    # bit for bit merge_tensors (no models, so no guard) on each solved tensor.
    base, *models = make_seed_each_family(tmp_path / "seed_each")
    result = mergekit_yaml(write_config(tmp_path / "iso.yml", "iso_c", base, models), tmp_path / "iso")
    assert "trained with a seed each" not in result.stderr and "lambda is capped" not in result.stderr
    assert result.stderr.count("iso_c: 3 of the 3 fine-tunes look like LoRA adapters") == 1
    assert "calibrate: first_order becomes sum_norm" in result.stderr
    named = write_config(tmp_path / "named.yml", "iso_c", base, models, {"calibrate": "sum_norm"})
    assert mergekit_yaml_in_process(named, tmp_path / "named").exit_code == 0
    iso_off = write_config(tmp_path / "iso_off.yml", "iso_c", base, models, {"adapter_guard": False})
    assert mergekit_yaml_in_process(iso_off, tmp_path / "iso_off").exit_code == 0
    iso, named, iso_off = (load_model(tmp_path / name) for name in ("iso", "named", "iso_off"))
    assert iso.keys() == named.keys() and all(torch.equal(iso[name], named[name]) for name in iso)
    inputs = [load_model(path) for path in (base, *models)]
    solved = [name for name in iso if name.endswith("proj.weight") and not torch.equal(inputs[0][name], inputs[1][name])]
    assert solved
    for name in solved:
        api = merge_tensors([m[name] for m in inputs], "iso_c", base_index=0, name=name)
        assert torch.equal(iso_off[name], api.to(iso_off[name].dtype)), name
        assert not torch.equal(iso[name], iso_off[name]), name


def test_mixed_full_and_adapters_cap_lambda_at_one_over_sqrt_k(tmp_path):
    # Two full-fine-tune lookalikes and two adapters with a seed each (models.make_mixed_family):
    # the guard counts the adapters, K = 2, so wudi_cfs merges at 1/sqrt(2), not 1/sqrt(4), and says
    # which fine-tunes set it; the two full ones are trimmed to density 0.3 first (density's
    # default beside adapters), the adapters kept whole. A density the YAML sets is kept.
    base, *models = make_mixed_family(tmp_path / "family")
    result = mergekit_yaml(write_config(tmp_path / "mixed.yml", "wudi_cfs", base, models), tmp_path / "out")
    assert result.stderr.count("wudi_cfs: 2 of the 4 fine-tunes look like LoRA adapters trained with a seed each") == 1
    assert "lambda is capped at 1/sqrt(2) = 0.707 for every solved tensor" in result.stderr
    assert result.stderr.count("look like full fine-tunes beside LoRA adapters") == 1
    assert f"{models[0]}, {models[1]} look like full fine-tunes" in result.stderr
    assert result.stderr.count(f"wudi_cfs: {models[2]}, {models[3]} look like LoRA adapters with a seed each") == 1
    assert_wudi_cfs_merged_at(tmp_path / "out", base, models, 2 ** -0.5, densities=[0.3, 0.3, 1.0, 1.0],
                              equalized=(2, 3))
    whole = write_config(tmp_path / "whole.yml", "wudi_cfs", base, models, {"density": 1.0})
    result = mergekit_yaml(whole, tmp_path / "whole")
    assert "beside LoRA adapters" not in result.stderr
    assert_wudi_cfs_merged_at(tmp_path / "whole", base, models, 2 ** -0.5, equalized=(2, 3))


ISO_REFERENCES = {"iso_c": lambda tasks: iso_c(tasks, eps=EPS32), "iso_cts": lambda tasks: iso_cts(tasks, 0.8, EPS32)}
ISO_TOLERANCES = {"iso_c": 1e-5, "iso_cts": 1e-4}  # test_e2e's, float32 merges against float64


def iso_by_kind(method, task_vectors, parts):
    """Float64 Iso-C or Iso-CTS of each (indices, rule, density) part, trimmed at density and scaled
    by the rule's c from its definition, added: guard.kind_parts' merge, from the definitions."""
    merged = 0
    for indices, rule, density in parts:
        tasks = torch.stack([trimmed(task_vectors[i].unsqueeze(0), density)[0] for i in indices])
        flat = ISO_REFERENCES[method](tasks)
        merged = merged + SCALES[rule](list(tasks), flat) * flat
    return merged


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_merges_each_kind_of_a_mixed_set_on_its_own(tmp_path, method):
    # Iso on the mixed family (two full fine-tune lookalikes, two adapters with a seed each): the
    # full ones trimmed at 0.3 and flattened with calibrate: first_order, the adapters whole with
    # sum_norm, the two merges added (guard.kind_parts), said once; lambda not capped. adapter_guard
    # false: one flat spectrum of all four (still trimmed: density's default reads the sample either
    # way), first_order kept.
    base, *models = make_mixed_family(tmp_path / "family")
    result = mergekit_yaml(write_config(tmp_path / "iso.yml", method, base, models), tmp_path / "iso")
    assert result.stderr.count(f"{method}: {models[0]}, {models[1]} look like full fine-tunes beside LoRA adapters") == 2
    assert result.stderr.count("each kind is merged on its own (the full fine-tunes with calibrate: first_order, "
                               "the adapters with sum_norm)") == 1
    assert "lambda is capped" not in result.stderr and "becomes sum_norm" not in result.stderr
    off = write_config(tmp_path / "off.yml", method, base, models, {"adapter_guard": False})
    result = mergekit_yaml(off, tmp_path / "off")
    assert "each kind is merged on its own" not in result.stderr
    w0s, tuned = load_model(base), [load_model(m) for m in models]
    by_kind, one = load_model(tmp_path / "iso"), load_model(tmp_path / "off")
    solved = [name for name in by_kind if is_llama_linear(name)]
    assert solved
    for name in solved:
        w0 = w0s[name].double()
        tv = torch.stack([t[name].double() - w0 for t in tuned])
        expected = iso_by_kind(method, tv, [((0, 1), "first_order", 0.3), ((2, 3), "sum_norm", 1.0)])
        assert (by_kind[name].double() - w0 - expected).norm() < ISO_TOLERANCES[method] * expected.norm(), name
        everyone = torch.stack([trimmed(tv[i].unsqueeze(0), d)[0] for i, d in enumerate([0.3, 0.3, 1.0, 1.0])])
        expected_one = iso_by_kind(method, everyone, [((0, 1, 2, 3), "first_order", 1.0)])
        assert (one[name].double() - w0 - expected_one).norm() < ISO_TOLERANCES[method] * expected_one.norm(), name
        assert (expected - expected_one).norm() > 0.1 * expected.norm(), name  # the two rules differ here
