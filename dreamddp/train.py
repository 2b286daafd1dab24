"""The trainer's torchrun entry point: ``torchrun --nproc-per-node N -m dreamddp.train --config C.toml``.

A stable module path for launch scripts and job templates; the command line is
``dreamddp.tools.train`` and the trainer itself ``dreamddp.training.trainer``.
"""

import sys

from dreamddp.tools.train import main

if __name__ == "__main__":
    sys.exit(main())
