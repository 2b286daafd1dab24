"""Markdown report and plots from benchmark results: ``python benchmarks/report.py --results R.json --out DIR``.

A thin wrapper around ``dreamddp.tools.bench.report`` so the report runs from a checkout that is not
installed, like the other scripts here.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dreamddp.tools.bench.report import main

if __name__ == "__main__":
    sys.exit(main())
