"""The trainer's torchrun entry point: ``torchrun --nproc-per-node N -m dreamddp.train --config C.toml``.

A stable module path for launch scripts and job templates; the trainer itself is
``dreamddp.training``.
"""

import sys

from dreamddp.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
