"""names.py: which declared name a key most likely meant."""

import pytest

from mergekit_wudi.names import SYNONYMS, spelling_variants, suggest


@pytest.mark.parametrize("key, meant", sorted(SYNONYMS.items()))
def test_closeness_rule_agrees_with_the_synonym_table(key, meant):
    names = ["weight", "lambda", "fallback", "solve", "input_major", "steps", "lr", "omega", "eta", "density", "subspace",
             "common_space_fraction", "equalize"]
    assert suggest(key, names) == meant


@pytest.mark.parametrize("typo, meant", [("stpes", "steps"), ("Steps", "steps"), ("lambda_", "lambda"), ("fallbak", "fallback"), ("subspaces", "subspace"), ("colour", None)])
def test_closeness_rule_on_typos(typo, meant):
    names = ["weight", "lambda", "fallback", "solve", "input_major", "steps", "lr", "eta", "density", "subspace"]
    assert suggest(typo, names) == meant


def test_spelling_variants_are_what_people_type():
    assert set(spelling_variants("steps")) == {"steps", "steps_", "Steps", "STEPS", "step"}
    assert "input-major" in spelling_variants("input_major") and "input_majors" in spelling_variants("input_major")
