"""Every algorithm over the same throttled links, side by side (see ``dreamddp.tools.bench.run``).

python benchmarks/run.py --config configs/gpt-tiny.toml --out benchmarks/results/grid --report
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dreamddp.tools.bench.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
