"""The paired test interval of one probe record against another, from two results.json files
(probe.py's, when the baseline was scored in another --out folder):

    python benchmarks/research/pair.py A/results.json SET METHOD 'JSON' B/results.json METHOD2 'JSON2' [...]

More than one such group of seven (for instance one per expert seed, scored on the same test
items) also prints the mean difference over the groups, its interval resampling each item once
for all of them (bench.stats.pooled_bootstrap: the items' sampling, not the seeds' spread).
"""

import functools
import json
import sys
from pathlib import Path
from typing import Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import stats  # noqa: E402


@functools.cache
def load(path: str) -> dict:
    """A results.json, read once however many groups name it."""
    return json.loads(Path(path).read_text())


def find(path: str, set_name: str, method: str, parameters: dict) -> Tuple[dict, object]:
    """The record and its file's `tasks` (split sizes and a first example per task: the items'
    fingerprint; None where the file has none)."""
    report = load(path)
    records = report.get("evaluations", report)
    for record in records.values() if isinstance(records, dict) else records:
        if (isinstance(record, dict) and record.get("set") == set_name and record.get("method") == method
                and record.get("parameters") == parameters and "test" in record.get("correct", {})):
            return record, report.get("tasks") if "evaluations" in report else None
    raise SystemExit(f"no test record of {set_name} {method} {parameters} in {path}")


def main() -> None:
    arguments = sys.argv[1:]
    if not arguments or len(arguments) % 7:
        raise SystemExit(__doc__)
    pairs = []
    for start in range(0, len(arguments), 7):
        path_a, set_name, method_a, params_a, path_b, method_b, params_b = arguments[start:start + 7]
        record_a, tasks_a = find(path_a, set_name, method_a, json.loads(params_a))
        record_b, tasks_b = find(path_b, set_name, method_b, json.loads(params_b))
        if start == 0:
            reference = tasks_a  # every file must hold the first file's items
        for path, tasks in ((path_a, tasks_a), (path_b, tasks_b)):
            if tasks != reference:
                raise SystemExit(f"{path}: its tasks (splits, examples) differ from {arguments[0]}'s: "
                                 "not scored on the same items")
        a, b = record_a["correct"]["test"], record_b["correct"]["test"]
        pairs.append((a, b))
        diff, low, high = stats.paired_bootstrap(a, b)
        print(f"{set_name} {method_a} {params_a} test {100 * stats.mean_accuracy(a):.1f} vs {method_b} {params_b} "
              f"{100 * stats.mean_accuracy(b):.1f}: {100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")
    if len(pairs) > 1:
        diff, low, high = stats.pooled_bootstrap(pairs)
        print(f"mean of {len(pairs)}: {100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")


if __name__ == "__main__":
    main()
