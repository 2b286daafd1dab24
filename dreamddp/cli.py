"""``dreamddp <command>``: one entry point for the project's tools.

Each command is a module with its own ``main(argv)``; this file only dispatches, so
``dreamddp train ...`` and ``python -m dreamddp.train ...`` (both ``dreamddp.tools.train``) behave the same.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("dreamddp.tools.train", "train a model (run under torchrun for several workers)"),
    "profile": ("dreamddp.tools.profile", "measure per-unit compute and fit the comm model (under torchrun)"),
    "plan": ("dreamddp.planning.cli", "plan a schedule from a profile and predict every method's time"),
    "checkpoint": ("dreamddp.tools.checkpoint", "verify a checkpoint directory against its checksums"),
    "demo": ("dreamddp.tools.demo", "S-SGD vs Local SGD vs DreamDDP over a simulated slow link"),
    "cluster": ("dreamddp.emulation.cluster", "emulated geo-distributed cluster: network namespaces + tc (root)"),
    "bench": ("dreamddp.tools.bench.run", "every algorithm over the same throttled links; results + report"),
    "report": ("dreamddp.tools.bench.report", "markdown table and plots from `dreamddp bench` results"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dreamddp <command> [args]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:10} {help_text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dreamddp: error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
