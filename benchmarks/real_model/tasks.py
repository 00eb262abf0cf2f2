"""Five short-text classification tasks built from word and name lists that ship in PyPI packages.

Data sources (no download at run time): `afinn` (the AFINN-165 English sentiment lexicon)
and `faker` (per-locale word lists, first and last names, colours, jobs, countries and
currencies). Every task is balanced (the same number of examples per class, capped),
texts that occur in two classes are dropped, and each class is split 60/40 into train and
test with a fixed seed, so the splits are the same on every machine.
"""

import importlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

SEED = 0
TRAIN_FRACTION = 0.6


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple
    train_texts: tuple
    train_labels: tuple
    test_texts: tuple
    test_labels: tuple


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


# name -> (builder, examples kept per class)
_BUILDERS = {
    "sentiment": (_sentiment, 600),
    "language": (_language, 400),
    "gender": (_gender, 600),
    "surname": (_surname, 380),
    "entity": (_entity, 140),
}
TASK_NAMES = tuple(_BUILDERS)


def load_task(name: str) -> Task:
    """The task's fixed, balanced train/test split."""
    builder, per_class = _BUILDERS[name]
    by_class = {label: sorted(set(texts)) for label, texts in builder().items()}
    seen: dict = {}
    for texts in by_class.values():
        for text in texts:
            seen[text] = seen.get(text, 0) + 1
    by_class = {label: [t for t in texts if seen[t] == 1] for label, texts in by_class.items()}
    keep = min(per_class, *(len(texts) for texts in by_class.values()))
    rng = random.Random(f"{SEED}-{name}")
    train, test = [], []
    for index, texts in enumerate(by_class.values()):
        chosen = rng.sample(texts, keep)
        cut = round(keep * TRAIN_FRACTION)
        train += [(text, index) for text in chosen[:cut]]
        test += [(text, index) for text in chosen[cut:]]
    rng.shuffle(train)
    return Task(
        name=name,
        classes=tuple(by_class),
        train_texts=tuple(t for t, _ in train),
        train_labels=tuple(y for _, y in train),
        test_texts=tuple(t for t, _ in test),
        test_labels=tuple(y for _, y in test),
    )


if __name__ == "__main__":
    for task_name in TASK_NAMES:
        task = load_task(task_name)
        print(f"{task_name}: {len(task.classes)} classes, {len(task.train_texts)} train, {len(task.test_texts)} test, e.g. {task.test_texts[:3]}")
