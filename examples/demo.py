"""Build a tiny Llama family (base + 3 fine-tunes) and write a ready YAML per method.

    python examples/demo.py /tmp/wudi-demo
    mergekit-yaml /tmp/wudi-demo/wudi.yml /tmp/wudi-demo/out-wudi --no-copy-tokenizer

Offline and CPU-only: the models are random, with low-rank deltas on the linear weights
(like fine-tunes) and small dense deltas elsewhere.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from models import make_family, write_config  # noqa: E402

from mergekit_wudi.solvers import SOLVERS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    root = parser.parse_args().root.resolve()
    base, *models = make_family(root / "models")
    for solver in SOLVERS:  # every method at its defaults
        method = solver.name
        config = write_config(root / f"{method}.yml", method, base, models)
        print(f"mergekit-yaml {config} {root / ('out-' + method)} --no-copy-tokenizer")


if __name__ == "__main__":
    main()
