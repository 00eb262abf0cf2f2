"""The paired test interval of one probe record against another, from two results.json files
(probe.py's, when the baseline was scored in another --out folder):

    python benchmarks/research/pair.py A/results.json SET METHOD 'JSON' B/results.json METHOD2 'JSON2'
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import stats  # noqa: E402


def find(path: str, set_name: str, method: str, parameters: dict) -> dict:
    report = json.loads(Path(path).read_text())
    records = report.get("evaluations", report)
    for record in records.values() if isinstance(records, dict) else records:
        if (isinstance(record, dict) and record.get("set") == set_name and record.get("method") == method
                and record.get("parameters") == parameters and "test" in record.get("correct", {})):
            return record
    raise SystemExit(f"no test record of {set_name} {method} {parameters} in {path}")


def main() -> None:
    path_a, set_name, method_a, params_a, path_b, method_b, params_b = sys.argv[1:8]
    a = find(path_a, set_name, method_a, json.loads(params_a))["correct"]["test"]
    b = find(path_b, set_name, method_b, json.loads(params_b))["correct"]["test"]
    diff, low, high = stats.paired_bootstrap(a, b)
    print(f"{set_name} {method_a} {params_a} test {100 * stats.mean_accuracy(a):.1f} vs {method_b} {params_b} "
          f"{100 * stats.mean_accuracy(b):.1f}: {100 * diff:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")


if __name__ == "__main__":
    main()
