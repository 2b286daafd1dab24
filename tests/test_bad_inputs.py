"""The bad-input catalogue (docs/bad-inputs.md), one test per row.

Every row is a mistake an operator can make — a config value, a schedule or profile file, a
flag, the environment, a checkpoint that belongs to another run — and the catalogue promises
what it gets: one line naming the value and what is allowed, and a non-zero exit, never a
stack trace. Command-line rows run the real programs as subprocesses (the trainer as a world
of one, which needs no torchrun); API rows call the library. The doc's table is parsed here,
so its ids, messages and exit statuses cannot drift from what the programs do.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
DOC = REPO / "docs" / "bad-inputs.md"

# The tiny GPT of tests/test_train.py on random tokens: builds in well under a second, so the
# rows that fail only once the job is up stay cheap.
TINY_TOML = """\
[model]
name = "gpt"
vocab_size = 256
block_size = 16
n_layer = 1
n_head = 2
d_model = 32

[data]
name = "synthetic"
batch_size = 4
seq_len = 16

[train]
algorithm = "dreamddp"
steps = 2
period = 2
timing_warmup = 0
progress = false
log = "train.jsonl"
"""
TINY_UNITS = [
    "wte",
    "wpe",
    "blocks.0.ln1",
    "blocks.0.attn.qkv",
    "blocks.0.attn.proj",
    "blocks.0.ln2",
    "blocks.0.mlp.fc",
    "blocks.0.mlp.proj",
    "ln_f",
]
PROGRAMS = {
    "train": ["-m", "dreamddp.train"],
    "plan": ["-m", "dreamddp.cli", "plan"],
    "cluster": ["-m", "dreamddp.cli", "cluster"],
    "bench": ["-m", "dreamddp.cli", "bench"],
}
# Variables that would make a subprocess join some other job or change its behaviour.
JOB_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "DREAMDDP_FAULT",
    "DREAMDDP_SOFTWARE_DELAY",
    "TORCHELASTIC_RESTART_COUNT",
)


# --------------------------------------------------------------------------- the doc's table
@dataclass(frozen=True)
class DocRow:
    id: str
    message: str  # the line, with "…" where it varies (paths, library detail)
    exit: str  # an exit status, or "raises `ErrorType`" for API rows


def doc_rows() -> dict[str, DocRow]:
    """The catalogue's rows by id: columns id | what is wrong | example | message | exit."""
    rows: dict[str, DocRow] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        assert len(cells) == 5, f"table row does not have 5 columns: {line}"
        row_id = cells[0].strip("`")
        assert row_id not in rows, f"id {row_id!r} appears twice in {DOC.name}"
        rows[row_id] = DocRow(row_id, _code_span(cells[3]), cells[4])
    return rows


def _code_span(cell: str) -> str:
    """The text of a markdown code span (`x` or ``x with `ticks` ``), pipes unescaped."""
    match = re.fullmatch(r"(`+)\s?(.*?)\s?\1", cell)
    assert match, f"message cell is not a code span: {cell}"
    return match.group(2).replace("\\|", "|")


def assert_matches_doc(row_id: str, actual: str) -> None:
    """The actual line starts with the doc's text and contains its other fragments in order."""
    first, *rest = doc_rows()[row_id].message.split("…")
    assert actual.startswith(first), f"{row_id}: doc says {first!r}...\nprogram says {actual!r}"
    at = len(first)
    for fragment in rest:
        found = actual.find(fragment, at)
        assert found >= 0, f"{row_id}: doc fragment {fragment!r} not in {actual[at:]!r}"
        at = found + len(fragment)
    if rest and rest[-1]:
        assert actual.endswith(rest[-1]), f"{row_id}: doc says the line ends {rest[-1]!r}: {actual!r}"
    elif not rest:
        assert actual == first, f"{row_id}: doc says {first!r}\nprogram says {actual!r}"


# --------------------------------------------------------------------------- command-line rows
@dataclass(frozen=True)
class CliCase:
    id: str
    program: str
    args: tuple[str, ...]
    must_contain: tuple[str, ...]  # the offending value, and what is allowed
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path, pytest.FixtureRequest], list[str]] | None = None  # returns extra args


def _tiny(cwd: Path, _request: pytest.FixtureRequest | None = None) -> list[str]:
    (cwd / "tiny.toml").write_text(TINY_TOML, encoding="utf-8")
    return []


def _bad_toml(cwd: Path, _request) -> list[str]:
    (cwd / "bad.toml").write_text("[train]\nsteps = \n", encoding="utf-8")
    return []


def _schedule_missing_unit(cwd: Path, _request) -> list[str]:
    from dreamddp import Schedule

    _tiny(cwd)
    Schedule(period=2, assignment={n: [i % 2] for i, n in enumerate(TINY_UNITS) if n != "ln_f"}).to_json(
        cwd / "partial.json"
    )
    return []


def _schedule_not_json(cwd: Path, _request) -> list[str]:
    _tiny(cwd)
    (cwd / "schedule.json").write_text("period: 2\nassignment: {}\n", encoding="utf-8")  # YAML, not JSON
    return []


def _schedule_for_two_ranks(cwd: Path, _request) -> list[str]:
    """A schedule planned by `dreamddp plan` from a profile measured on 2 ranks."""
    from dreamddp.core.schedule import Schedule
    from dreamddp.planning.cli import main as plan_main

    _tiny(cwd)
    _profile(cwd / "profile.json", world_size=2)
    assert (
        plan_main(
            [
                "--profile",
                str(cwd / "profile.json"),
                "--period",
                "2",
                "--method",
                "plsgd",
                "--out",
                str(cwd / "planned.json"),
            ]
        )
        == 0
    )
    assert Schedule.from_json(cwd / "planned.json").metadata["world_size"] == 2  # recorded by plan
    return []


def _profile(path: Path, world_size: int) -> None:
    from profiler import CommModel, Profile, UnitProfile

    units = [UnitProfile(n, 4096, 1e-4, 2e-4) for n in reversed(TINY_UNITS)]  # backward order
    profile = Profile(units, 1e-3, 2e-3, 1e-4, metadata={"world_size": world_size, "link": "100mbit,20ms"})
    profile.with_comm(CommModel(0.02, 1.6e-7)).to_json(path)


def _port_in_use(cwd: Path, request: pytest.FixtureRequest) -> list[str]:
    _tiny(cwd)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    request.addfinalizer(sock.close)
    return ["--metrics-port", str(sock.getsockname()[1])]


def _directory_in_the_way(cwd: Path, _request) -> list[str]:
    _tiny(cwd)
    for name in ("configs", "runs"):
        (cwd / name).mkdir()
    return []


def _file_in_the_way(cwd: Path, _request) -> list[str]:
    _tiny(cwd)
    (cwd / "runs").write_text("a file where a folder should be\n", encoding="utf-8")
    return []


def _checkpoint_copy(fixture: str) -> Callable[[Path, pytest.FixtureRequest], list[str]]:
    def setup(cwd: Path, request: pytest.FixtureRequest) -> list[str]:
        _tiny(cwd)
        shutil.copytree(request.getfixturevalue(fixture), cwd / "ckpt")
        return []

    return setup


def _truncated_checkpoint(cwd: Path, request: pytest.FixtureRequest) -> list[str]:
    _checkpoint_copy("one_rank_checkpoint")(cwd, request)
    rank_file = cwd / "ckpt" / "step-00000002" / "rank-00000.pt"
    data = rank_file.read_bytes()
    rank_file.write_bytes(data[: len(data) // 2])  # what a full disk or a killed copy leaves
    return []


def _bad_profile(cwd: Path, _request) -> list[str]:
    (cwd / "profile.json").write_text(
        '{"format": "dreamddp.profile/1", "units": [{"name": "wte", "forward_s": 0.001, "backward_s": 0.002}]}\n',
        encoding="utf-8",
    )
    return []


def _good_profile(cwd: Path, _request) -> list[str]:
    _profile(cwd / "profile.json", world_size=2)
    return _file_in_the_way(cwd, _request)


def _two_level_profile(cwd: Path, _request) -> list[str]:
    """A profile measured on 2 sites x 2 ranks (its two-level models in the metadata)."""
    import json

    _profile(cwd / "profile.json", world_size=4)
    raw = json.loads((cwd / "profile.json").read_text())
    model = {"alpha_s": 0.02, "beta_s_per_byte": 1.6e-7}
    raw["metadata"]["two_level"] = {"sites": 2, "ranks_per_site": 2, "cross": model, "intra": model}
    (cwd / "profile.json").write_text(json.dumps(raw))
    return []


def _damaged_two_level_profile(cwd: Path, _request) -> list[str]:
    """A two-level profile whose measured CPU share was edited to a negative number."""
    import json

    _two_level_profile(cwd, _request)
    raw = json.loads((cwd / "profile.json").read_text())
    raw["metadata"]["two_level"]["site_cpu_s_per_byte"] = -1e-9
    (cwd / "profile.json").write_text(json.dumps(raw))
    return []


def _damaged_measurement(section: str, key: str, value: float):
    """Setup: a good profile with one measured figure (``section.key``) edited to ``value``."""

    def setup(cwd: Path, _request) -> list[str]:
        import json

        _good_profile(cwd, _request)
        raw = json.loads((cwd / "profile.json").read_text())
        raw[section][key] = value
        (cwd / "profile.json").write_text(json.dumps(raw))
        return []

    return setup


def _other_comparison(cwd: Path, _request) -> list[str]:
    """A recorded convergence comparison of 4 steps in conv/ (resumed below with 6)."""
    import json

    _tiny(cwd)
    (cwd / "conv").mkdir()
    header = {"format": "dreamddp.convergence/1", "config": "tiny.toml", "overrides": [], "link": "100mbit,20ms"}
    header.update({"steps": 4, "sites": 2, "procs_per_site": 1, "periods": [4], "models": []})
    (cwd / "conv" / "convergence.json").write_text(json.dumps(header))
    return []


TINY = ("--config", "tiny.toml")
CLI_CASES = [
    CliCase("period-zero", "train", ("--set", "train.period=0"), ("train.period", "got 0", ">= 1 or 'auto'")),
    CliCase(
        "period-auto-without-profile",
        "train",
        ("--set", "train.period=auto"),
        ("train.period='auto'", "train.profile", "profile ''"),
    ),
    CliCase(
        "period-unbounded", "train", ("--set", "train.period=100000000"), ("train.period", "got 100000000", "at most")
    ),
    CliCase(
        "unknown-algorithm", "train", ("--set", "train.algorithm=fedavg"), ("'fedavg'", "local_sgd, post_local_sgd")
    ),
    CliCase("malformed-link", "train", ("--set", "train.link=100mbits,20ms"), ("'100mbits,20ms'", "mbit/gbit")),
    CliCase(
        "sync-unknown-compressor",
        "train",
        ("--set", "train.sync=delta", "--set", "train.compress=int4"),
        ("train.compress", "'int4'", "none, bf16, int8"),
    ),
    CliCase(
        "sync-unknown-outer",
        "train",
        ("--set", "train.sync=delta", "--set", "train.outer=adam"),
        ("train.outer", "'adam'", "sgd, nesterov"),
    ),
    CliCase(
        "sync-int8-block-zero",
        "train",
        ("--set", "train.sync=delta", "--set", "train.compress=int8", "--set", "train.compress_block=0"),
        ("train.compress_block", "got 0", ">= 1"),
    ),
    CliCase(
        "sync-outer-lr-not-positive",
        "train",
        ("--set", "train.sync=delta", "--set", "train.outer_lr=0"),
        ("train.outer_lr", "got 0", "> 0"),
    ),
    CliCase(
        "sync-options-without-delta",
        "train",
        ("--set", "train.outer=nesterov"),
        ("train.outer='nesterov'", "train.sync='delta'"),
    ),
    CliCase(
        "sync-delta-on-baseline",
        "train",
        ("--set", "train.algorithm=local_sgd", "--set", "train.sync=delta"),
        ("train.sync='delta'", "'local_sgd'", "plsgd or dreamddp"),
    ),
    CliCase("hierarchy-unknown", "train", ("--set", "train.hierarchy=sites"), ("train.hierarchy", "'sites'", "auto")),
    CliCase(
        "hierarchy-ranks-per-site-negative", "train", ("--set", "train.ranks_per_site=-1"), ("ranks_per_site", "-1")
    ),
    CliCase(
        "hierarchy-on-baseline",
        "train",
        ("--set", "train.algorithm=local_sgd", "--set", "train.hierarchy=hierarchical"),
        ("'hierarchical'", "'local_sgd'", "hier_local_sgd"),
    ),
    CliCase(
        "hierarchy-one-site",
        "train",
        ("--set", "train.hierarchy=hierarchical", "--set", "train.steps=2"),
        ("hierarchy='hierarchical'", "1 site x 1 rank", "ranks_per_site"),
    ),
    CliCase(
        "hier-local-sgd-one-site",
        "train",
        ("--set", "train.algorithm=hier_local_sgd", "--set", "train.steps=2"),
        ("'hier_local_sgd'", "1 site x 1 rank", "local_sgd"),
    ),
    CliCase(
        "link-delay-unbounded", "train", ("--set", "train.link=100mbit,1e400ms"), ("'1e400ms'", "out of range", "60s")
    ),
    CliCase(
        "link-rate-unbounded", "train", ("--set", "train.link=1e400mbit"), ("'1e400mbit'", "out of range", "1kbit")
    ),
    CliCase("unknown-config-key", "train", ("--set", "train.epochs=3"), ("train.epochs", "allowed: algorithm, steps")),
    CliCase("wrong-value-type", "train", ("--set", "train.steps=ten"), ("train.steps", "'ten'", "must be int")),
    CliCase("unknown-flag", "train", ("--resume", "ckpt"), ("--resume ckpt", "--help")),
    CliCase(
        "missing-config-file",
        "train",
        ("--config", "configs/gpt-tny.toml"),
        ("'configs/gpt-tny.toml'", "configs/gpt-tiny.toml"),
    ),
    CliCase(
        "config-is-directory",
        "train",
        ("--config", "configs"),
        ("'configs'", "Is a directory", "TOML file"),
        setup=_directory_in_the_way,
    ),
    CliCase("invalid-toml", "train", ("--config", "bad.toml"), ("'bad.toml'", "valid TOML", "line 2"), setup=_bad_toml),
    CliCase(
        "checkpoint-every-without-dir",
        "train",
        ("--checkpoint-every", "5"),
        ("checkpoint_every=5", "--checkpoint-dir", "checkpoint_every=0"),
    ),
    CliCase("metrics-port-out-of-range", "train", ("--metrics-port", "70000"), ("70000", "1..65535", "0 (off)")),
    CliCase(
        "time-budget-without-eval", "train", ("--set", "train.time_budget_s=60"), ("time_budget_s=60", "eval_every > 0")
    ),
    CliCase(
        "replan-without-profile",
        "train",
        ("--set", "train.replan_every=2"),
        ("replan_every=2", "train.profile", "profile ''"),
    ),
    CliCase(
        "fault-env-malformed", "train", (), ("'kill@one:5'", "kill@RANK:STEP"), env={"DREAMDDP_FAULT": "kill@one:5"}
    ),
    CliCase(
        "rank-without-master-addr",
        "train",
        TINY,
        ("MASTER_ADDR", "torchrun"),
        env={"RANK": "0", "WORLD_SIZE": "2"},
        setup=_tiny,
    ),
    CliCase(
        "trace-path-unwritable",
        "train",
        (*TINY, "--trace", "runs/trace.json"),
        ("'runs/trace.json'", "writable directory"),
        setup=_file_in_the_way,
    ),
    CliCase(
        "log-path-is-directory",
        "train",
        (*TINY, "--set", "train.log=runs"),
        ("'runs'", "'runs/train.jsonl'"),
        setup=_directory_in_the_way,
    ),
    CliCase(
        "schedule-misses-unit",
        "train",
        (*TINY, "--set", "train.schedule=partial.json"),
        ("'partial.json'", "'ln_f'", "at least once per period"),
        setup=_schedule_missing_unit,
    ),
    CliCase(
        "schedule-not-json",
        "train",
        (*TINY, "--set", "train.schedule=schedule.json"),
        ("'schedule.json'", "valid JSON"),
        setup=_schedule_not_json,
    ),
    CliCase(
        "schedule-world-size-changed",
        "train",
        (*TINY, "--set", "train.schedule=planned.json"),
        ("'planned.json'", "world_size 2", "plan again with 1 rank"),
        setup=_schedule_for_two_ranks,
    ),
    CliCase(
        "metrics-port-in-use", "train", TINY, ("metrics_port", "free", "0 to turn metrics off"), setup=_port_in_use
    ),
    CliCase(
        "metrics-port-past-65535",
        "train",
        (*TINY, "--metrics-port", "65535"),
        ("65536", "PORT + LOCAL_RANK", "0 to turn metrics off"),
        env={"LOCAL_RANK": "1"},
        setup=_tiny,
    ),
    CliCase(
        "checkpoint-different-model",
        "train",
        (*TINY, "--set", "model.d_model=48", "--checkpoint-dir", "ckpt"),
        ("iteration 2 in 'ckpt'", "model.d_model 32 → 48", "resume with the checkpoint's values"),
        setup=_checkpoint_copy("one_rank_checkpoint"),
    ),
    CliCase(
        "checkpoint-different-world-size",
        "train",
        (*TINY, "--checkpoint-dir", "ckpt"),
        ("ckpt/step-00000002", "2 ranks", "resume with 2 ranks"),
        setup=_checkpoint_copy("two_rank_checkpoint"),
    ),
    CliCase(
        "checkpoint-corrupt",
        "train",
        (*TINY, "--checkpoint-dir", "ckpt"),
        ("no checkpoint in ckpt verifies", "step-00000002 (rank 0: rank-00000.pt has", "were written"),
        setup=_truncated_checkpoint,
    ),
    CliCase(
        "hf-unknown-model-type",
        "train",
        ("--config", str(REPO / "configs" / "hf-gpt2-tiny.toml"), "--set", "model.model_type=gtp2"),
        ("'gtp2'", "gpt2, llama"),
    ),
    CliCase(
        "hf-unknown-config-key",
        "train",
        ("--config", str(REPO / "configs" / "hf-gpt2-tiny.toml"), "--set", "model.config.n_layers=2"),
        ("'n_layers'", "did you mean 'n_layer'?"),
    ),
    CliCase(
        "hf-config-does-not-build",
        "train",
        ("--config", str(REPO / "configs" / "hf-gpt2-tiny.toml"), "--set", "model.config.n_head=3"),
        ("{'n_head': 3}", "gpt2"),
    ),
    CliCase(
        "hf-unknown-preset",
        "train",
        ("--config", str(REPO / "configs" / "hf-gpt2-tiny.toml"), "--set", "model.preset=gpt2-huge"),
        ("'gpt2-huge'", "gpt2-tiny, gpt2-small"),
    ),
    CliCase("precision-unknown", "train", ("--set", "train.precision=fp16"), ("'fp16'", "fp32, bf16")),
    CliCase("grad-accum-zero", "train", ("--set", "train.grad_accum=0"), ("train.grad_accum", "got 0", ">= 1")),
    CliCase(
        "grad-accum-indivisible",
        "train",
        ("--set", "data.batch_size=8", "--set", "train.grad_accum=3"),
        ("data.batch_size=8", "train.grad_accum=3", "multiple of 3"),
    ),
    CliCase("lora-rank-zero", "train", ("--set", 'train.lora={ r = 0, targets = ["qkv"] }'), ("lora.r", "got 0")),
    CliCase(
        "lora-targets-match-nothing",
        "train",
        (*TINY, "--set", 'train.lora={ targets = ["qkvv"] }'),
        ("'qkvv'", "match no module", "qkv, proj"),
        setup=_tiny,
    ),
    CliCase(
        "profile-malformed",
        "plan",
        ("--profile", "profile.json", "--period", "4", "--out", "schedule.json"),
        ("'profile.json'", "'bytes'", "name, bytes, forward_s and backward_s"),
        setup=_bad_profile,
    ),
    CliCase(
        "plan-out-unwritable",
        "plan",
        ("--profile", "profile.json", "--period", "2", "--out", "runs/schedule.json"),
        ("'runs/schedule.json'", "writable directory"),
        setup=_good_profile,
    ),
    CliCase(
        "plan-unknown-compressor",
        "plan",
        ("--profile", "profile.json", "--period", "2", "--out", "s.json", "--sync", "delta", "--compress", "int4"),
        ("plan.compress", "'int4'", "none, bf16, int8"),
        setup=_good_profile,
    ),
    CliCase(
        "plan-hierarchy-without-sites",
        "plan",
        ("--profile", "profile.json", "--period", "2", "--out", "s.json", "--hierarchy", "hierarchical"),
        ("--hierarchy hierarchical", "'profile.json'", "ranks_per_site"),
        setup=_good_profile,
    ),
    CliCase(
        "plan-two-level-delta",
        "plan",
        ("--profile", "profile.json", "--period", "2", "--out", "s.json", "--sync", "delta"),
        ("--sync delta", "two-level", "--hierarchy flat"),
        setup=_two_level_profile,
    ),
    CliCase(
        "plan-two-level-damaged",
        "plan",
        ("--profile", "profile.json", "--period", "2", "--out", "s.json"),
        ("'profile.json'", "site_cpu_s_per_byte", "-1e-09"),
        setup=_damaged_two_level_profile,
    ),
    CliCase(
        "plan-burst-damaged",
        "plan",
        ("--profile", "profile.json", "--period", "2", "--out", "s.json"),
        ("'profile.json'", "comm burst_s", "-0.05"),
        setup=_damaged_measurement("comm", "burst_s", -0.05),
    ),
    CliCase(
        "plan-comm-cpu-damaged",
        "plan",
        ("--profile", "profile.json", "--period", "2", "--out", "s.json"),
        ("'profile.json'", "comm_cpu_s_per_byte", "-2e-09"),
        setup=_damaged_measurement("iteration", "comm_cpu_s_per_byte", -2e-9),
    ),
    CliCase(
        "plan-period-unbounded",
        "plan",
        ("--profile", "profile.json", "--period", "100000", "--out", "schedule.json"),
        ("got 100000", "at most 256"),
        setup=_good_profile,
    ),
    CliCase(
        "cluster-run-without-up",
        "cluster",
        ("run", "--name", "nosuch", "--", "true"),
        ("'nosuch'", "dreamddp cluster up --name nosuch"),
    ),
    CliCase("cluster-bad-sites", "cluster", ("up", "--sites", "0"), ("--sites", "got 0", ">= 1")),
    CliCase("bench-resume-without-convergence", "bench", ("--resume",), ("--resume", "--convergence")),
    CliCase(
        "bench-resume-other-comparison",
        "bench",
        (
            "--convergence",
            "--resume",
            "--config",
            "tiny.toml",
            "--links",
            "100mbit,20ms",
            "--steps",
            "6",
            "--out",
            "conv",
        ),
        ("'conv/convergence.json'", "steps 4", "asks for 6"),
        setup=_other_comparison,
    ),
    CliCase(
        "cluster-shape-without-up",
        "cluster",
        ("shape", "--name", "nosuch", "--wan", "20mbit"),
        ("'nosuch'", "cluster up"),
    ),
]


def _run(program: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in JOB_ENV}
    full_env = {**base, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "DREAMDDP_STATE_DIR": str(cwd), **env}
    return subprocess.run(
        [sys.executable, *PROGRAMS[program], *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _train_checkpoint(directory: Path, nproc: int) -> Path:
    """A finished tiny run's checkpoint directory (step 2), written by ``nproc`` ranks."""
    _tiny(directory)
    args = ["--config", "tiny.toml", "--checkpoint-dir", "ckpt"]
    if nproc == 1:
        proc = _run("train", args, directory, {}, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:
        from dreamddp.tools.runner import torchrun

        torchrun(
            ["dreamddp.train", *args],
            nproc=nproc,
            timeout=90,
            cwd=directory,
            env={"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"},
        )
    assert (directory / "ckpt" / "step-00000002" / "meta.json").exists()
    return directory / "ckpt"


@pytest.fixture(scope="module")
def one_rank_checkpoint(tmp_path_factory) -> Path:
    return _train_checkpoint(tmp_path_factory.mktemp("one-rank"), 1)


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory) -> Path:
    return _train_checkpoint(tmp_path_factory.mktemp("two-ranks"), 2)


# Each CLI row starts a Python process (a few seconds each); these cover the config, the link and the
# schedule file in `make test` (checkpoint damage: tests/test_checkpoint_safety.py), and every row
# runs in the slow tier.
FAST_CLI_CASES = {
    "period-zero",
    "malformed-link",
    "invalid-toml",
    "schedule-world-size-changed",
}
# API rows that spawn two ranks run in the slow tier; one (models-differ-across-ranks) stays fast.
SLOW_API_CASES = {
    "forward-overlap-stale-read",
    "join-not-first",
    "frozen-weights-differ",
    "sync-delta-join",
    "sync-checkpoint-mode-changed",
    "sites-uneven",
    "sites-disagree",
    "sites-malformed-id",
    "hierarchy-delta",
    "hierarchy-join",
    "hierarchy-checkpoint-changed",
    "hierarchy-sparse-gradient",
}


@pytest.mark.timeout(150)  # the checkpoint rows may first train the run they resume
@pytest.mark.parametrize(
    "case",
    [c if c.id in FAST_CLI_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CLI_CASES],
    ids=lambda c: c.id,
)
def test_cli_bad_input_is_one_line(case: CliCase, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    extra = case.setup(tmp_path, request) if case.setup else []
    proc = _run(case.program, [*case.args, *extra], tmp_path, case.env, timeout=60)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr[-3000:]}"
    line = lines[0]
    assert line.startswith(f"dreamddp {case.program}: error: "), line
    for text in case.must_contain:
        assert text in line, f"{text!r} not in {line!r}"
    expected_exit = doc_rows()[case.id].exit
    assert proc.returncode != 0 and str(proc.returncode) == expected_exit, (proc.returncode, expected_exit)
    assert_matches_doc(case.id, line)


# --------------------------------------------------------------------------- API rows
def _schedule_period_zero() -> BaseException:
    from dreamddp import Schedule

    with pytest.raises(ValueError) as info:
        Schedule(period=0, assignment={"wte": [0]})
    return info.value


def _deepspeed_hierarchy() -> BaseException:
    pytest.importorskip("deepspeed")
    from dreamddp.integrations.deepspeed import _parse_section

    with pytest.raises(ValueError) as info:
        _parse_section({"period": 4, "hierarchy": "auto"}, Path("."))
    return info.value


def _schedule_delay_too_long() -> BaseException:
    from dreamddp import Schedule

    with pytest.raises(ValueError) as info:
        Schedule(period=4, assignment={"wte": [0, 2]}, delays={"wte": 2}, overlap="forward")
    return info.value


def _different_models(rank: int, world_size: int) -> tuple[str, str]:
    """Each rank wraps its own model; rank 1's hidden layer is wider (a stale config on one node)."""
    import torch

    from dreamddp import DreamDDP, Schedule, sync_units

    width = 8 if rank == 0 else 16
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 2))
    try:
        DreamDDP(model, Schedule.every_step([u.name for u in sync_units(model)]))
    except ValueError as err:
        return type(err).__name__, str(err)
    return "", "no error"


def _models_differ_across_ranks() -> BaseException:
    from .dist_utils import run_workers

    results = run_workers(_different_models, 2, timeout=60)
    assert results[0] == results[1], f"ranks disagree: {results}"  # the same line on every rank, no hang
    kind, message = results[0]
    assert kind == "ValueError", results
    return ValueError(message)


def _forward_overlap_stale_read() -> BaseException:
    from .dist_utils import run_workers
    from .test_forward_reads import _refused

    return ValueError(run_workers(_refused, 2, timeout=60)[0]["parent"]["message"])


def _int8_too_many_ranks() -> BaseException:
    from dreamddp.core.compress import check_world

    with pytest.raises(ValueError) as info:
        check_world("int8", 8)
    return info.value


def _delta_join() -> BaseException:
    from .dist_utils import run_workers
    from .test_delta_sync import _join

    messages = run_workers(_join, 2, timeout=60)
    assert messages[0] == messages[1], messages  # every rank, the same line, no hang
    return ValueError(messages[0])


def _averaged_checkpoint_into_delta(rank: int, world_size: int) -> str:
    from dreamddp import DreamDDP, Schedule, sync_units

    from .nets import MLP

    model = MLP()
    schedule = Schedule.every_step([u.name for u in sync_units(model)])
    state = DreamDDP(MLP(), schedule).state_dict()
    try:
        DreamDDP(model, schedule, sync="delta").load_state_dict(state)
    except ValueError as err:
        return str(err)
    return ""


def _sync_checkpoint_mode_changed() -> BaseException:
    from .dist_utils import run_workers

    messages = run_workers(_averaged_checkpoint_into_delta, 2, timeout=60)
    assert messages[0] == messages[1], messages
    return ValueError(messages[0])


def _bad_site_map(case: str, rank: int) -> BaseException:
    from .dist_utils import run_workers
    from .test_topology import _bad

    messages = run_workers(_bad, 4, case, timeout=90)
    assert all(m and "\n" not in m for m in messages), messages  # every rank says it, no hang
    return ValueError(messages[rank])


@functools.cache
def _two_level_refusals() -> dict[str, str]:
    from .dist_utils import run_workers
    from .test_hierarchy import _refusals

    out = run_workers(_refusals, 4, timeout=120)
    assert all(o == out[0] for o in out), out
    return out[0]


def _join_not_first() -> BaseException:
    from .dist_utils import run_workers
    from .test_join import _second_joinable

    messages = run_workers(_second_joinable, 2, timeout=60)
    assert messages[0] == messages[1], messages  # every rank, the same line, no hang
    return ValueError(messages[0])


def _hf_extra_missing() -> BaseException:
    import sys

    from dreamddp.training.models import model_config

    saved = sys.modules.get("transformers")
    sys.modules["transformers"] = None  # type: ignore[assignment]  # what an uninstalled package looks like to import
    try:
        with pytest.raises(ValueError) as info:
            model_config("hf", {"preset": "gpt2-tiny"})
    finally:
        if saved is None:
            del sys.modules["transformers"]
        else:
            sys.modules["transformers"] = saved
    return info.value


def _frozen_weights_differ() -> BaseException:
    from .dist_utils import run_workers
    from .test_frozen import _frozen_mismatches

    results = run_workers(_frozen_mismatches, 2, timeout=60)
    assert results[0] == results[1], results  # every rank, the same line, no hang
    return ValueError(results[0]["differs"])


@dataclass(frozen=True)
class ApiCase:
    id: str
    raise_it: Callable[[], BaseException]
    must_contain: tuple[str, ...]


API_CASES = [
    ApiCase("schedule-period-zero", _schedule_period_zero, ("got 0", ">= 1")),
    ApiCase("schedule-delay-too-long", _schedule_delay_too_long, ("'wte'", "delay 2", "must be < 2")),
    ApiCase("deepspeed-hierarchy", _deepspeed_hierarchy, ("'auto'", "DeepSpeed adapter", '"flat"')),
    ApiCase("models-differ-across-ranks", _models_differ_across_ranks, ("'0'", "[16, 4]", "[8, 4]", "rank 0")),
    ApiCase(
        "forward-overlap-stale-read",
        _forward_overlap_stale_read,
        ("'parent.child.weight'", "'parent'", 'overlap="backward"'),
    ),
    ApiCase("join-not-first", _join_not_first, ("first joinable", "Join([ddp, ...])")),
    ApiCase("sync-int8-too-many-ranks", _int8_too_many_ranks, ("'int8'", "8 ranks", "at most 7")),
    ApiCase("sync-delta-join", _delta_join, ("Join([ddp])", "sync='delta'", "same number of batches")),
    ApiCase("sync-checkpoint-mode-changed", _sync_checkpoint_mode_changed, ("synchronizes deltas", "sync='average'")),
    ApiCase("frozen-weights-differ", _frozen_weights_differ, ("'mix.weight'", "rank 0 and rank 1", "same seed")),
    ApiCase("sites-uneven", lambda: _bad_site_map("uneven", 0), ("site 0: 3, site 1: 1", "DREAMDDP_SITE")),
    ApiCase("sites-disagree", lambda: _bad_site_map("disagree", 0), ("rank 0: 1, rank 1: 2", "ranks_per_site")),
    ApiCase("sites-malformed-id", lambda: _bad_site_map("malformed", 1), ("DREAMDDP_SITE='east'", "integer")),
    ApiCase("hierarchy-delta", lambda: ValueError(_two_level_refusals()["delta"]), ("sync='delta'", "2 sites x 2")),
    ApiCase("hierarchy-join", lambda: ValueError(_two_level_refusals()["join"]), ("Join([ddp])", "two-level")),
    ApiCase(
        "hierarchy-sparse-gradient",
        lambda: ValueError(_two_level_refusals()["sparse"]),
        ("sparse", "shape (10, 4)", "hierarchy='flat'"),
    ),
    ApiCase(
        "hierarchy-checkpoint-changed",
        lambda: ValueError(_two_level_refusals()["checkpoint"]),
        ("two-level synchronization (2 sites x 2 ranks)", "flat synchronization"),
    ),
    ApiCase("hf-extra-missing", _hf_extra_missing, ('model.name="hf"', "pip install 'dreamddp[hf]'")),
]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c.id in SLOW_API_CASES else c for c in API_CASES],
    ids=lambda c: c.id,
)
def test_api_bad_input_raises_one_line(case: ApiCase) -> None:
    err = case.raise_it()
    text = f"{type(err).__name__}: {err}"
    assert "\n" not in text and "Traceback" not in text, text
    for fragment in case.must_contain:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    assert f"`{type(err).__name__}`" in doc_rows()[case.id].exit
    assert_matches_doc(case.id, text)


# --------------------------------------------------------------------------- doc and tests agree
def test_every_documented_row_is_tested_and_every_test_documented() -> None:
    documented = set(doc_rows())
    tested = [c.id for c in CLI_CASES] + [c.id for c in API_CASES]
    assert len(tested) == len(set(tested)), "an id is tested twice"
    assert documented == set(tested), (
        f"in the doc only: {sorted(documented - set(tested))}; tested only: {sorted(set(tested) - documented)}"
    )
    assert len(documented) >= 15
