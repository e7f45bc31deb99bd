"""Where the benchmark helpers find things: the repository root (put on sys.path, so that `python benchmarks/x.py`
imports this tree's qwenjax), the result directory and the model configs."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ on the path, not the repo root
    sys.path.insert(0, str(REPO))

RESULTS_DIR = REPO / "benchmarks" / "results"
CONFIG_DIR = REPO / "qwenjax" / "assets" / "configs"
