"""Train / validation / test splits by group, so that no near-duplicate crosses a split.

Every item carries a group key; all items of a group go to one split. The keys:

- `word_key` (words, names, short phrases): the first three letters after lowercasing and
  stripping accents, e and y read as i (cry, cried; lie, lying). Words of fewer than three
  letters are left out of the pools (MIN_LETTERS). Inflections and derivations of one lemma share them (abandon,
  abandoned, abandonment; happy, happily, happiness; love, loving; envy, envied), and so do
  near-identical names across languages (Rossi, Rossini; amor, amore). This over-groups
  (dislike and dismal share a group), which costs nothing but randomness.
- `pair_key` (addition): the unordered pair {a, b}, so that a + b and b + a stay together.

Validation and test are balanced (the same number of items per label) when `balanced`;
otherwise (many answers, as for the last letter of a word or a sum) the task reports its
majority-answer floor (`majority_floor`). Training takes what is left, capped per label.
"""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

SEED = 0  # the split seed of both benchmarks
N_VALIDATION = 200  # items per task, where the pool allows
N_TEST = 500
SPLIT_VERSION = 1  # bump when the algorithm below changes what lands where (it is in the cache keys)


@dataclass(frozen=True)
class Item:
    text: str  # the input (a word, a name, a question)
    label: str  # the answer
    key: Hashable = field(compare=False)  # the group: items with one key stay in one split


@dataclass(frozen=True)
class Splits:
    name: str
    train: Tuple[Item, ...]
    validation: Tuple[Item, ...]
    test: Tuple[Item, ...]
    balanced: bool

    def definition(self) -> dict:
        """What the expert cache key needs: sizes, balance and a digest of every split's contents."""
        digest = hashlib.sha256(json.dumps([[(i.text, i.label) for i in s] for s in (self.train, self.validation, self.test)]).encode())
        return {"version": SPLIT_VERSION, "sizes": [len(self.train), len(self.validation), len(self.test)], "balanced": self.balanced, "sha256": digest.hexdigest()[:16]}


def fold(text: str) -> str:
    """Lowercase letters only, accents stripped (Müller -> muller)."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if c.isalpha() and not unicodedata.combining(c))


def word_key(text: str, letters: int = 3) -> str:
    """The group of a word or short phrase: its first `letters` letters (accents and case folded),
    with e and y read as i, so that cry / cried, lie / lying and sue / suing share a key."""
    return fold(text)[:letters].translate(_AS_I) or text


_AS_I = str.maketrans("ey", "ii")
MIN_LETTERS = 3  # shorter words (a, ab, ok) are dropped: their inflections would need a key of their own


def pair_key(a: int, b: int) -> frozenset:
    return frozenset((a, b))


def split_by_group(
    name: str,
    items: Sequence[Item],
    n_test: int,
    n_validation: int,
    n_train: Optional[int] = None,
    *,
    balanced: bool,
    seed: int = 0,
    max_fraction: Tuple[float, float] = (0.4, 0.15),
    slack: int = 4,
) -> Splits:
    """Split `items` by group key into train / validation / test.

    Groups are shuffled with a seed derived from `seed` and `name`, then dealt: a group goes to
    test while it fits test's quota (per label when `balanced`: ceil(n_test / labels), so at
    least n_test in all), else to validation while it
    fits there, else to train. A group fits when one of its labels is under quota and none would
    go more than `slack` items over (a group that mixes labels could otherwise never fit once the
    larger label is full). Quotas: `n_test` and `n_validation` items, but at most
    `max_fraction` of the pool (of the smallest label's pool when balanced), so a small pool
    still trains. Validation and test are then trimmed to their quota (per label when balanced,
    so that balanced splits hold the same count per label); the trimmed items are dropped (not moved: their groups sit in that split). Training is capped at
    `n_train` items (per label: n_train / labels when balanced), kept in shuffled order.
    """
    if len({i.text for i in items}) != len(items):
        raise ValueError(f"task {name!r}: an input occurs twice")
    rng = random.Random(f"{seed}-{name}")
    groups: Dict[Hashable, List[Item]] = defaultdict(list)
    for item in sorted(items, key=lambda i: (i.text, i.label)):
        groups[item.key].append(item)
    order = sorted(groups, key=repr)
    rng.shuffle(order)
    labels = sorted({i.label for i in items})
    by_label = Counter(i.label for i in items)

    def quotas(n: int, fraction: float) -> Dict[str, int]:
        if balanced:
            each = min(-(-n // len(labels)), int(fraction * min(by_label.values())))  # at least n in all, pool allowing
            return {label: each for label in labels}
        return {None: min(n, int(fraction * len(items)))}

    targets = [quotas(n_test, max_fraction[0]), quotas(n_validation, max_fraction[1])]
    dealt: List[List[Item]] = [[], [], []]  # test, validation, train
    counts = [Counter(), Counter()]
    for key in order:
        group = groups[key]
        need = Counter(i.label if balanced else None for i in group)
        for index in (0, 1):
            limit = targets[index]
            helps = any(counts[index][label] < limit.get(label, 0) for label in need)
            if helps and all(counts[index][label] + n <= limit.get(label, 0) + slack for label, n in need.items()):
                counts[index].update(need)
                dealt[index] += group
                break
        else:
            dealt[2] += group
    test, validation, train = (_shuffled(part, rng) for part in dealt)
    test, validation = _trim(test, balanced, targets[0]), _trim(validation, balanced, targets[1])
    train = _cap(train, n_train, labels if balanced else None)
    if not test or not validation or not train:
        raise ValueError(f"task {name!r}: pool of {len(items)} too small for three splits")
    return Splits(name, tuple(train), tuple(validation), tuple(test), balanced)


def _shuffled(items: List[Item], rng: random.Random) -> List[Item]:
    items = list(items)
    rng.shuffle(items)
    return items


def _trim(items: List[Item], balanced: bool, quota: Dict) -> List[Item]:
    """The first items (order kept) up to the quota: the same count per label when balanced."""
    if balanced:
        keep = min(min(Counter(i.label for i in items).values()), *quota.values())
        limit = lambda item: item.label  # noqa: E731
    else:
        keep, limit = quota[None], (lambda item: None)
    seen: Counter = Counter()
    out = []
    for item in items:
        if seen[limit(item)] < keep:
            seen[limit(item)] += 1
            out.append(item)
    return out


def _cap(items: List[Item], n: Optional[int], labels: Optional[List[str]]) -> List[Item]:
    if n is None:
        return items
    if labels is None:
        return items[:n]
    each, seen, out = n // len(labels), Counter(), []
    for item in items:
        if seen[item.label] < each:
            seen[item.label] += 1
            out.append(item)
    return out


def majority_floor(train: Sequence[Item], test: Sequence[Item]) -> Tuple[str, float]:
    """The training split's most common answer and the test accuracy of always giving it
    (in the task's format): what a merge that forgot the task but kept the format can score."""
    answer = Counter(i.label for i in train).most_common(1)[0][0]
    return answer, sum(i.label == answer for i in test) / len(test)


def cross_split_pairs(splits: Splits, related: Callable[[str], Sequence[str]]) -> List[Tuple[str, str]]:
    """(x, y) with x in one split and y in another where y is in related(x): for checks."""
    where = {}
    for part, items in (("train", splits.train), ("validation", splits.validation), ("test", splits.test)):
        for item in items:
            where[item.text] = part
    return [(x, y) for x, part in where.items() for y in related(x) if y in where and where[y] != part]
