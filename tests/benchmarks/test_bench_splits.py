"""The split builders of both benchmarks: disjoint, sized, no near-duplicate across splits,
balanced (or with a majority floor), deterministic. No model, no training."""

import re
from collections import Counter

import pytest
from bench import splits
from bench.splits import Item, split_by_group
from llm import tasks as llm_tasks
from real_model import tasks as minilm_tasks

PARTS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def llm():
    return {name: llm_tasks.load_splits(name) for name in llm_tasks.TASK_NAMES}


@pytest.fixture(scope="module")
def minilm():
    return {name: minilm_tasks.load_task(name).splits for name in minilm_tasks.TASK_NAMES}


def inflections(word: str) -> set:
    """Forms of one lemma by the common English rules (and their inverses): for the check only,
    written independently of the group key."""
    w = word.lower()
    forms = {w + s for s in ("s", "es", "ed", "d", "ing", "ly", "er", "ers", "est", "ness", "ment", "ful", "less", "able")}
    if w.endswith("e"):
        forms |= {w[:-1] + s for s in ("ing", "ed", "er", "ation", "able")}
    if w.endswith("y"):
        forms |= {w[:-1] + s for s in ("ies", "ied", "ily", "iness", "ier", "iest")}
    if len(w) > 2 and w[-1] not in "aeiouwy":
        forms |= {w + w[-1] + s for s in ("ed", "ing", "er")}
    return forms - {w}


def word_of(text: str) -> str:
    quoted = re.search(r"'([^']+)'", text)
    return quoted.group(1) if quoted else text


def test_every_split_is_disjoint_sized_and_deterministic(llm, minilm):
    for name, s in [*llm.items(), *minilm.items()]:
        sets = [{i.text for i in getattr(s, part)} for part in PARTS]
        assert all(len(x) == len(getattr(s, p)) for x, p in zip(sets, PARTS)), name  # no duplicate within a split
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]), name
        groups = [{i.key for i in getattr(s, part)} for part in PARTS]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2]), name
    for name, s in llm.items():
        assert (len(s.train), len(s.validation), len(s.test)) == (1024 if name != "surname" else 909, 200, 500), name
    for name, s in minilm.items():
        assert len(s.test) >= (500 if name != "entity" else 200) and len(s.validation) >= (200 if name != "entity" else 70), name  # entity: 140 colours
    assert llm_tasks.load_splits("addition") == llm["addition"]
    assert llm_tasks.load_splits("addition", seed=1).test != llm["addition"].test


def test_no_commuted_sum_crosses_a_split(llm):
    def commuted(text):
        a, b = map(int, re.findall(r"\d+", text))
        return [f"What is {b} plus {a}?"]

    s = llm["addition"]
    assert splits.cross_split_pairs(s, commuted) == []
    both = sum(1 for i in s.test if commuted(i.text)[0] in {j.text for j in s.test} and i.text != commuted(i.text)[0])
    assert both > 100  # the twins exist, and they sit in the same split


@pytest.mark.parametrize("name", ["sentiment", "last_letter"])
def test_no_inflection_of_one_lemma_crosses_a_split_llm(llm, name):
    s = llm[name]
    where = {word_of(i.text): part for part in PARTS for i in getattr(s, part)}
    crossing = [(w, f) for w, part in where.items() for f in inflections(w) if f in where and where[f] != part]
    assert crossing == []
    together = [(w, f) for w in where for f in inflections(w) if f in where]
    assert len(together) > 50  # the check has something to find


@pytest.mark.parametrize("name", ["sentiment", "language"])
def test_no_inflection_of_one_lemma_crosses_a_split_minilm(minilm, name):
    s = minilm[name]
    where = {i.text: part for part in PARTS for i in getattr(s, part)}
    assert [(w, f) for w, part in where.items() for f in inflections(w) if f in where and where[f] != part] == []


def test_known_families_share_a_group_key():
    for family in (["abandon", "abandoned", "abandons"], ["happy", "happily", "happiness"], ["love", "loved", "loving"],
                   ["cry", "cries", "cried"], ["lie", "lying"], ["sue", "suing"], ["envy", "envied"], ["amor", "amore"]):
        assert len({splits.word_key(w) for w in family}) == 1, family
    assert splits.word_key("Daniel", 4) == splits.word_key("Daniela", 4)
    assert splits.word_key("Müller", 4) == splits.word_key("muller", 4) == "mull"
    assert splits.pair_key(12, 30) == splits.pair_key(30, 12)


def test_balanced_tasks_are_balanced_and_the_others_report_a_floor(llm, minilm):
    for name, s in [*llm.items(), *minilm.items()]:
        if s.balanced:
            for part in ("validation", "test"):
                counts = Counter(i.label for i in getattr(s, part))
                assert len(set(counts.values())) == 1, (name, part, counts)
    assert not llm["addition"].balanced and not llm["last_letter"].balanced
    answer, floor = splits.majority_floor(llm["last_letter"].train, llm["last_letter"].test)
    assert floor == sum(i.label == answer for i in llm["last_letter"].test) / 500 and 0.05 < floor < 0.3
    assert splits.majority_floor(llm["sentiment"].train, llm["sentiment"].test)[1] == 0.5


def test_split_by_group_keeps_groups_whole_and_drops_rather_than_moves():
    items = [Item(f"w{i}", "ab"[i % 2], i // 3) for i in range(60)]  # groups of 3 mixing both labels
    s = split_by_group("toy", items, n_test=20, n_validation=10, balanced=True, max_fraction=(0.4, 0.2))
    where = {i.text: p for p in PARTS for i in getattr(s, p)}
    for group in range(20):
        assert len({where[f"w{i}"] for i in range(3 * group, 3 * group + 3) if f"w{i}" in where}) <= 1
    assert Counter(i.label for i in s.test)["a"] == Counter(i.label for i in s.test)["b"]
    with pytest.raises(ValueError, match="occurs twice"):
        split_by_group("dup", [Item("x", "a", 1), Item("x", "b", 2)], 1, 1, balanced=False)


def test_split_definition_changes_with_the_contents(llm):
    a = llm["sentiment"].definition()
    assert a == llm_tasks.load_splits("sentiment").definition()
    assert a["sha256"] != llm_tasks.load_splits("sentiment", seed=1).definition()["sha256"]
    assert a["sizes"] == [1024, 200, 500] and a["version"] == splits.SPLIT_VERSION
