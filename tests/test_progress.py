"""progress.py: the solver's progress bar and its -v log lines (through the real mergekit-yaml,
and in process through merge_tensors)."""

import logging
import re

import pytest
import torch
from mergekit.merge_methods import merge_tensors
from models import is_llama_linear, load_model, write_config
from runner import mergekit_yaml

from mergekit_wudi.adapter import MERGE_METHODS

LINEAR = 14  # 7 projections x 2 layers in the tiny Llama
LAMBDA = 0.9


@pytest.fixture(scope="module")
def config(family, tmp_path_factory):
    base, *models = family
    return write_config(tmp_path_factory.mktemp("cfg") / "wudi_cfs.yml", "wudi_cfs", base, models, {"lambda": LAMBDA})


def bar_states(stderr: str):
    """(done, total) of every redraw of our bar."""
    return [(int(a), int(b)) for a, b in re.findall(r"wudi_cfs solve:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", stderr)]


def wudi_loss(merged, task_vectors):
    """sum_i ||(t_m - t_i) t_i^T||_F^2 / ||t_i||_F^2, written out."""
    return sum(float(((merged - t) @ t.T).square().sum() / t.square().sum()) for t in task_vectors)


@pytest.mark.e2e
def test_bar_counts_the_solved_tensors(config, tmp_path):
    result = mergekit_yaml(config, tmp_path / "out", TQDM_MININTERVAL="0")  # draw every update
    states = bar_states(result.stderr)
    assert states, result.stderr[-2000:]
    # The total starts from the plan and ends at the tensors really solved.
    assert states[-1] == (LINEAR, LINEAR)
    assert all(total >= LINEAR and done <= total for done, total in states)
    assert "Executing graph" in result.stderr  # next to mergekit's own bar


@pytest.mark.e2e
def test_quiet_hides_the_bar_and_verbose_logs_the_objective(config, family, tmp_path):
    result = mergekit_yaml(config, tmp_path / "out", "--quiet", "-v")
    assert "wudi_cfs solve" not in result.stderr and "Executing graph" not in result.stderr
    lines = re.findall(
        r"wudi_cfs: (\S+) interference (\S+) \(task arithmetic\) -> (\S+) \(solved\)", result.stderr
    )
    assert sorted(name for name, _, _ in lines) == sorted(n for n in load_model(family[0]) if is_llama_linear(n))
    # Independent check of the logged numbers: the loss written out in float64, at the
    # task vectors read back from disk and at the merged vector (W - W0) / lambda.
    base, *models = [load_model(p) for p in family]
    merged = load_model(tmp_path / "out")
    for name, before, after in lines:
        tv = torch.stack([m[name].double() - base[name].double() for m in models])
        t_m = (merged[name].double() - base[name].double()) / LAMBDA
        assert float(before) == pytest.approx(wudi_loss(tv.sum(0), tv), rel=1e-3)
        # after: t_m read back from a float32 W carries rounding of W, not of t_m.
        assert float(after) == pytest.approx(wudi_loss(t_m, tv), rel=2e-2, abs=1e-6 * wudi_loss(tv.sum(0), tv))
        assert float(after) < 0.1 * float(before)


def test_without_info_the_objective_is_not_computed(generator, monkeypatch, caplog, capsys):
    from mergekit_wudi import solvers

    def forbidden(*_args, **_kwargs):
        raise AssertionError("objective computed although INFO is off")

    monkeypatch.setattr(solvers, "wudi_objective", forbidden)
    monkeypatch.setattr(solvers, "task_arithmetic_objective", forbidden)
    tensors = [torch.randn(6, 5, generator=generator) for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="mergekit_wudi"):
        merge_tensors(tensors, "wudi_cfs", base_index=0, name="model.layers.0.mlp.up_proj.weight")
    with caplog.at_level(logging.INFO, logger="mergekit_wudi"), pytest.raises(AssertionError, match="INFO is off"):
        merge_tensors(tensors, "wudi_cfs", base_index=0, name="model.layers.0.mlp.up_proj.weight")  # the patch bites
    # merge_tensors runs no mergekit bar, so no bar of ours either.
    assert "solve" not in capsys.readouterr().err


@pytest.mark.parametrize("method", [m.method_name for m in MERGE_METHODS])
def test_info_logs_one_line_per_solved_tensor(generator, caplog, method):
    tensors = [torch.randn(6, 5, generator=generator) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="mergekit_wudi"):
        merge_tensors(tensors, method, base_index=0, name="model.layers.0.mlp.up_proj.weight")
        merge_tensors(tensors, method, base_index=0, name="model.norm.weight", parameters={"solve": False})
    messages = [r.getMessage() for r in caplog.records if "interference" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith(f"{method}: model.layers.0.mlp.up_proj.weight")


def test_verbose_merges_the_same_bits(family, tmp_path):
    # With -v the objective log reads the task vectors after the solve, so a trim (density 0.3)
    # goes into a copy instead of into them: the same merge, bit for bit.
    base_path, *model_paths = family
    config = write_config(tmp_path / "trim.yml", "wudi_cfs", base_path, model_paths, {"lambda": LAMBDA, "density": 0.3})
    mergekit_yaml(config, tmp_path / "quiet", "--quiet")
    mergekit_yaml(config, tmp_path / "verbose", "--quiet", "-v")
    quiet, verbose = load_model(tmp_path / "quiet"), load_model(tmp_path / "verbose")
    assert quiet.keys() == verbose.keys() and all(torch.equal(quiet[name], verbose[name]) for name in quiet)
