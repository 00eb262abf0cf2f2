"""Short generative tasks for a small causal LM, built offline from installed packages.

Every example is a one-line prompt and a short answer (one word, a letter or a number: 1-3
tokens for SmolLM2's tokenizer), written in one plain format shared by all tasks,

    <question>
    Answer: <answer><eos>

so a merged model has to tell the tasks apart from the question alone (the tasks interfere:
they share the format and the answer slot). Sources: `afinn` (AFINN-165 sentiment lexicon),
`faker` (per-locale surnames and an English word list) and the standard library (arithmetic).
Each task draws its examples with a fixed seed; train and held-out inputs are disjoint.
"""

import importlib
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 0
N_TRAIN = 1024
N_TEST = 200


@dataclass(frozen=True)
class Example:
    prompt: str  # ends with "Answer:"; the answer follows after one space
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    train: tuple
    test: tuple


def prompt(question: str) -> str:
    return f"{question}\nAnswer:"


def target(answer: str) -> str:
    """The completion the experts are trained on (the tokenizer's eos token is appended after it)."""
    return f" {answer}"


def extract(completion: str) -> str:
    """The answer in a generated completion: its first line, stripped."""
    return completion.strip().split("\n", 1)[0].strip()


def exact_match(completion: str, answer: str) -> bool:
    return extract(completion) == answer


def _sentiment_items() -> list:
    import afinn

    lexicon = Path(afinn.__file__).parent / "data" / "AFINN-en-165.txt"
    items = []
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        word, score = line.rsplit("\t", 1)
        if word.isalpha():  # single words only (the lexicon also has phrases and emoticons)
            items.append((f"Is the word '{word}' positive or negative?", "positive" if int(score) > 0 else "negative"))
    return items


def _surname_items() -> list:
    locales = {"German": "de_DE", "French": "fr_FR", "Italian": "it_IT", "Spanish": "es_ES"}
    seen, items = {}, []
    for language, locale in locales.items():
        for name in importlib.import_module(f"faker.providers.person.{locale}").Provider.last_names:
            seen.setdefault(name, set()).add(language)
    for name, languages in sorted(seen.items()):
        if len(languages) == 1 and name.isalpha():  # a surname in two lists has no single answer
            items.append((f"Which language is the surname {name}?", languages.pop()))
    return items


def _words() -> list:
    words = importlib.import_module("faker.providers.lorem.en_US").Provider.word_list
    return sorted({w for w in words if w.isalpha() and w.islower() and 3 <= len(w) <= 9})


def _last_letter_items() -> list:
    return [(f"What is the last letter of '{w}'?", w[-1]) for w in _words()]


def _addition_items() -> list:
    return [(f"What is {a} plus {b}?", str(a + b)) for a in range(10, 60) for b in range(10, 60)]


# The four tasks: the base answers none of them (it stops at once after "Answer:"), a full expert
# learns each in a few dozen steps.
BUILDERS = {
    "sentiment": _sentiment_items,
    "surname": _surname_items,
    "last_letter": _last_letter_items,
    "addition": _addition_items,
}
TASK_NAMES = tuple(BUILDERS)


def load_task(name: str, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = SEED) -> Task:
    """Shuffle the task's (question, answer) pairs with `seed`; the first n_test are held out, the next n_train train.

    Questions are unique within a task, so the splits are disjoint. When the pool is short the
    training split gets what is left after the held-out one.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(BUILDERS)}")
    items = sorted(set(BUILDERS[name]()))
    if len({q for q, _ in items}) != len(items):
        raise ValueError(f"task {name!r} has a question with two answers")
    random.Random(f"{seed}-{name}").shuffle(items)
    if len(items) <= n_test:
        raise ValueError(f"task {name!r} has {len(items)} examples, not more than the {n_test} held out")
    as_examples = lambda pairs: tuple(Example(prompt(q), a) for q, a in pairs)  # noqa: E731
    return Task(name, train=as_examples(items[n_test : n_test + n_train]), test=as_examples(items[:n_test]))
