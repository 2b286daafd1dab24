"""The package layout holds: every module imports on its own, and the profiler stays off the trainer.

An import cycle only breaks when one of its members is the *first* module imported, so each
module must be imported first, in an interpreter where nothing of this project is loaded yet.
Starting one interpreter per module would import torch ~70 times (minutes on a small shared
machine), so one helper interpreter imports the heavy third-party libraries only, checks that
no module of ``dreamddp`` or ``profiler`` is loaded, and then forks once per module: each
child starts from that state, exactly as a fresh interpreter would for our packages, and
imports just its module. Two children run at a time.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dreamddp", "profiler")
# Modules that need an optional extra; they are imported only where it is installed.
NEEDS_EXTRA = {"dreamddp.integrations.deepspeed": "deepspeed"}
# The profiler measures a model; the trainer and the command-line tools are built on it, not under it.
PROFILER_MUST_NOT_IMPORT = ("dreamddp.training", "dreamddp.tools")

# argv: module names. Prints {"module": "traceback" or ""} as JSON.
_FORK_PER_MODULE = r"""
import json, os, sys, traceback
# Third-party only, the expensive part, shared by every child.
import numpy, psutil, torch, torch.distributed, torch.distributed.optim, torch.nn, tqdm
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("dreamddp", "profiler"))
assert not ours, f"the helper loaded project modules before forking: {ours}"

def child(name, out):
    try:
        __import__(name)
        code, text = 0, ""
    except BaseException:
        code, text = 1, traceback.format_exc()[-8000:]  # well under a pipe's buffer
    os.write(out, text.encode())
    os._exit(code)

pending, running, failures = list(sys.argv[1:]), {}, {}
while pending or running:
    while pending and len(running) < 2:
        name = pending.pop(0)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            child(name, write)
        os.close(write)
        running[pid] = (name, read)
    pid, status = os.wait()
    name, read = running.pop(pid)
    text = os.read(read, 16384).decode(errors="replace")
    os.close(read)
    failures[name] = text or ("" if status == 0 else f"exited with status {status}")
print(json.dumps(failures))
"""

_PROFILER_IMPORTS = r"""
import importlib, json, pkgutil, sys
import profiler
for info in pkgutil.walk_packages(profiler.__path__, "profiler."):
    importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> list[str]:
    """Every module of the packages, from the files on disk (a module nobody imports counts too)."""
    names = [_module_name(p) for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    return [n for n in names if n not in NEEDS_EXTRA or importlib.util.find_spec(NEEDS_EXTRA[n]) is not None]


def _run(script: str, *args: str, timeout: float) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow  # kept out of the fast tier's 6 minutes; the import-direction test stays there
@pytest.mark.timeout(180)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one child per module")
def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    modules = project_modules()
    assert {"dreamddp", "dreamddp.ops.files", "profiler", "profiler.compute"} <= set(modules)
    results = json.loads(_run(_FORK_PER_MODULE, *modules, timeout=170))
    assert set(results) == set(modules)
    broken = {name: text for name, text in results.items() if text}
    assert not broken, "\n\n".join(f"import {name} first:\n{text}" for name, text in sorted(broken.items()))


def _imported_names(path: Path) -> set[str]:
    """Modules a file imports anywhere (top level or inside functions), absolute names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _forbidden(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in PROFILER_MUST_NOT_IMPORT))


@pytest.mark.timeout(120)
def test_profiler_never_imports_the_trainer_or_the_tools() -> None:
    # What importing the profiler really loads, in a fresh interpreter...
    loaded = set(json.loads(_run(_PROFILER_IMPORTS, timeout=110)))
    assert "profiler.compute" in loaded
    assert not _forbidden(loaded), f"importing profiler loads {_forbidden(loaded)}"
    # ...and what its files ask for, lazily inside functions included.
    for path in sorted((REPO / "profiler").rglob("*.py")):
        assert not _forbidden(_imported_names(path)), (
            f"{path.relative_to(REPO)} imports {_forbidden(_imported_names(path))}"
        )
