"""The launch templates: they parse, they build the torchrun command we mean, and run_train.sh trains.

No Slurm or Kubernetes here: the sbatch script is checked through its DRY_RUN output and the
PyTorchJob through its structure; both hand their torchrun and trainer arguments to the real
argument parsers, so a flag either side would reject fails here rather than on a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from torch.distributed.run import get_args_parser

from dreamddp.tools.train import parse_args as parse_trainer_args
from dreamddp.training.config import load_config

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
PYTORCHJOB = REPO / "launch" / "k8s" / "pytorchjob.yaml"
SCRIPTS = sorted((REPO / "launch").glob("*.sh")) + [SBATCH]

# Knobs of the sbatch script: cleared so the caller's environment cannot change what is tested.
_SBATCH_KNOBS = (
    "NPROC_PER_NODE",
    "CONFIG",
    "MAX_RESTARTS",
    "RDZV_PORT",
    "RDZV_HOST",
    "RDZV_JOIN_TIMEOUT",
    "PYTHON",
    "DRY_RUN",
    "WAN_IFNAME",
    "DREAMDDP_ROOT",
    "NCCL_SOCKET_IFNAME",
    "GLOO_SOCKET_IFNAME",
    "NCCL_IB_DISABLE",
    "NCCL_SOCKET_NTHREADS",
    "NCCL_NSOCKS_PERTHREAD",
    "CHECKPOINT_DIR",
    "CHECKPOINT_EVERY",
)


# ---------------------------------------------------------------------------------------------
# helpers


def _split_torchrun(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse a torchrun argument list with torch's own parser; returns (options, trainer args)."""
    opts = get_args_parser().parse_args(argv)
    assert opts.module, "torchrun must start the trainer as a module (-m)"
    assert opts.training_script == "dreamddp.train", opts.training_script
    return opts, list(opts.training_script_args)


def _check_trainer_args(args: list[str]) -> None:
    """The trainer's own parser and config loader accept the arguments (config paths from the repo)."""
    ns = parse_trainer_args(args)
    assert ns.config, "no --config given to the trainer"
    load_config(str(REPO / ns.config), ns.set)  # raises ValueError on a bad key or value


def _sbatch_env(**overrides: str) -> dict[str, str]:
    """The caller's environment without Slurm variables or script knobs, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _SBATCH_KNOBS}
    env.update(overrides)
    return env


def _dry_run(env: dict[str, str], *args: str) -> tuple[list[str], list[str]]:
    """Run the sbatch script with DRY_RUN=1; returns (export lines, the srun command as argv)."""
    proc = subprocess.run(
        ["bash", str(SBATCH), *args], env=dict(env, DRY_RUN="1"), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    exports = [line for line in lines if line.startswith("export ")]
    commands = [line for line in lines if not line.startswith("export ")]
    assert len(commands) == 1, proc.stdout
    return exports, shlex.split(commands[0])


def _torchrun_part(argv: list[str]) -> list[str]:
    """The arguments after ``PYTHON -m torch.distributed.run`` in the srun command."""
    assert argv[0] == "srun", argv
    i = argv.index("torch.distributed.run")
    assert argv[i - 1] == "-m"
    return argv[i + 1 :]


def _fake_slurm(nodelist: str = "node[07-09],other", nnodes: str = "3", job_id: str = "4242") -> dict[str, str]:
    return {"SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": nnodes, "SLURM_JOB_ID": job_id}


# ---------------------------------------------------------------------------------------------
# shell scripts


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script: Path) -> None:
    """`bash -n` catches syntax errors that would only surface when a job starts on a cluster."""
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script: Path) -> None:
    """shellcheck finds quoting and word-splitting bugs in the argument pass-through."""
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not on PATH")
    proc = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sbatch_dry_run_builds_the_torchrun_command() -> None:
    """Every knob reaches torchrun, the rendezvous is on the head node, trainer args pass through intact."""
    env = _sbatch_env(**_fake_slurm(), NPROC_PER_NODE="4", MAX_RESTARTS="5", RDZV_PORT="29555")
    _, argv = _dry_run(env, "--set", "train.steps=3", "--set", "train.link=100mbit, 20ms")
    assert "--ntasks-per-node=1" in argv[: argv.index("-m")]
    opts, trainer = _split_torchrun(_torchrun_part(argv))
    assert opts.nnodes == "3"
    assert opts.nproc_per_node == "4"
    assert opts.rdzv_backend == "c10d"
    assert opts.rdzv_endpoint == "node07:29555"
    assert opts.rdzv_id == "4242"
    assert opts.max_restarts == 5
    assert "join_timeout=" in opts.rdzv_conf
    ckpt = str(REPO / "checkpoints" / "dreamddp-4242")  # default: under the checkout, per job
    assert trainer == [
        "--config",
        "configs/gpt-tiny.toml",
        "--checkpoint-dir",
        ckpt,
        "--checkpoint-every",
        "200",
        "--set",
        "train.steps=3",
        "--set",
        "train.link=100mbit, 20ms",
    ]
    _check_trainer_args(trainer)


def test_sbatch_dry_run_defaults_and_network_env() -> None:
    """Defaults: procs follow SLURM_GPUS_ON_NODE, port 29400; WAN_IFNAME sets both socket interfaces."""
    env = _sbatch_env(
        **_fake_slurm(nodelist="siteA-n1,siteB-n1", nnodes="2", job_id="9"),
        SLURM_GPUS_ON_NODE="8",
        WAN_IFNAME="wan0",
        NCCL_IB_DISABLE="1",
        CONFIG="configs/llama-tiny.toml",
        CHECKPOINT_DIR="",
    )
    if shutil.which("scontrol") is not None:
        pytest.skip("a real scontrol is on PATH; this test checks the script's fallback without it")
    exports, argv = _dry_run(env)
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: a restarted gloo job must not reuse the previous attempt's store.
    assert set(exports) == {
        "export NCCL_SOCKET_IFNAME=wan0",
        "export GLOO_SOCKET_IFNAME=wan0",
        "export NCCL_IB_DISABLE=1",
        "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
    }
    opts, trainer = _split_torchrun(_torchrun_part(argv))
    assert (opts.nnodes, opts.nproc_per_node, opts.rdzv_endpoint) == ("2", "8", "siteA-n1:29400")
    assert opts.max_restarts == 3
    assert trainer == ["--config", "configs/llama-tiny.toml"]  # CHECKPOINT_DIR="" below: no checkpoints
    _check_trainer_args(trainer)


def test_sbatch_uses_scontrol_when_present(tmp_path: Path) -> None:
    """On a real cluster the head node comes from `scontrol show hostnames`, whatever the list's form."""
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\nprintf "head-a\\nworker-b\\n"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = _sbatch_env(**_fake_slurm(nodelist="gpu[1-2]", nnodes="2"))
    env["PATH"] = f"{tmp_path}{os.pathsep}{env.get('PATH', '')}"
    _, argv = _dry_run(env)
    opts, _ = _split_torchrun(_torchrun_part(argv))
    assert opts.rdzv_endpoint == "head-a:29400"


@pytest.mark.parametrize("missing", ["SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES"])
def test_sbatch_refuses_outside_an_allocation(missing: str) -> None:
    """Without Slurm's variables the script stops with a message instead of launching a broken job."""
    slurm = _fake_slurm()
    del slurm[missing]
    proc = subprocess.run(
        ["bash", str(SBATCH)], env=_sbatch_env(**slurm, DRY_RUN="1"), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert missing in proc.stderr
    assert "srun" not in proc.stdout


def test_sbatch_rejects_a_missing_config() -> None:
    """A mistyped CONFIG fails at submission time on the head node, not on every node later."""
    proc = subprocess.run(
        ["bash", str(SBATCH)],
        env=_sbatch_env(**_fake_slurm(), DRY_RUN="1", CONFIG="configs/nope.toml"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "configs/nope.toml" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Kubernetes


def _manifests() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(PYTORCHJOB.read_text()) if d is not None]
    assert docs, "empty manifest"
    return docs


def _job() -> dict[str, Any]:
    jobs = [d for d in _manifests() if d.get("kind") == "PyTorchJob"]
    assert len(jobs) == 1, "expected exactly one PyTorchJob"
    return jobs[0]


def _worker_container(job: dict[str, Any]) -> dict[str, Any]:
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    containers = worker["template"]["spec"]["containers"]
    named = [c for c in containers if c["name"] == "pytorch"]  # the operator requires this name
    assert len(named) == 1
    return named[0]


def test_pytorchjob_is_an_elastic_kubeflow_job() -> None:
    """Kind, apiVersion and the elastic policy the operator turns into torchrun's PET_* settings."""
    job = _job()
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert job["metadata"]["name"]
    spec = job["spec"]
    policy = spec["elasticPolicy"]
    assert policy["rdzvBackend"] == "c10d"
    assert isinstance(policy["minReplicas"], int) and isinstance(policy["maxReplicas"], int)
    # Fixed size: per-rank local-SGD state cannot be re-split, so a resized job could not resume.
    assert 1 <= policy["minReplicas"] == policy["maxReplicas"]
    assert isinstance(policy["maxRestarts"], int) and policy["maxRestarts"] >= 1
    assert "nProcPerNode" not in policy, "deprecated; the operator rejects it next to spec.nprocPerNode"
    assert isinstance(spec["nprocPerNode"], str)  # the CRD's field is a string ("2", "gpu", ...)
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}  # elastic jobs have no Master
    replicas = spec["pytorchReplicaSpecs"]["Worker"]["replicas"]
    assert policy["minReplicas"] <= replicas <= policy["maxReplicas"]


def test_pytorchjob_worker_runs_the_trainer_under_torchrun() -> None:
    """The Worker's command is torchrun -m dreamddp.train, with arguments torchrun and the trainer accept."""
    container = _worker_container(_job())
    assert container["image"]
    argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
    assert argv[0] == "torchrun" or argv[:3] == ["python", "-m", "torch.distributed.run"], argv
    rest = argv[1:] if argv[0] == "torchrun" else argv[3:]
    _, trainer = _split_torchrun(rest)
    _check_trainer_args(trainer)
    # Restarts resume: checkpoints go to the mounted claim.
    ckpt = trainer[trainer.index("--checkpoint-dir") + 1]
    assert any(ckpt.startswith(m["mountPath"] + "/") for m in container["volumeMounts"]), ckpt
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    policy = _job()["spec"]["elasticPolicy"]
    assert "rdzvPort" in policy or "pytorchjob-port" in ports, "the operator needs a port for PET_RDZV_ENDPOINT"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("GLOO_SOCKET_IFNAME") and env.get("NCCL_SOCKET_IFNAME")
    assert container["resources"]["limits"] and container["resources"]["requests"]


def test_pytorchjob_mounts_a_checkpoint_claim() -> None:
    """Checkpoints live on a PVC mounted in the Worker, and the claim the job names is in the file."""
    job = _job()
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    assert claims, "no PersistentVolumeClaim volume"
    mounts = {m["name"]: m["mountPath"] for m in _worker_container(job)["volumeMounts"]}
    mounted = [name for name in claims if name in mounts]
    assert mounted, "the claim is not mounted in the pytorch container"
    pvcs = {d["metadata"]["name"]: d for d in _manifests() if d.get("kind") == "PersistentVolumeClaim"}
    for name in mounted:
        assert claims[name] in pvcs, f"claim {claims[name]!r} is not defined in the manifest"
        # every Worker pod mounts it, on different nodes: it must be shareable
        assert "ReadWriteMany" in pvcs[claims[name]]["spec"]["accessModes"]


# ---------------------------------------------------------------------------------------------
# run_train.sh, for real


@pytest.mark.slow  # kept out of the fast tier's 6 minutes; torchrun training stays there via test_train
@pytest.mark.timeout(120)
def test_run_train_sh_trains_two_processes(tmp_path: Path) -> None:
    """The single-node launcher starts 2 gloo workers that train a few steps and write the summary."""
    log = tmp_path / "x.jsonl"
    env = dict(os.environ, NPROC="2", CONFIG="configs/gpt-tiny.toml", PYTHON=sys.executable, GLOO_SOCKET_IFNAME="lo")
    overrides = [
        "train.steps=3",
        "train.progress=false",
        f"train.log={log}",
        "train.eval_batches=1",
        "data.max_bytes=300000",
    ]
    cmd = ["bash", str(REPO / "launch" / "run_train.sh")]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [0, 1, 2]
    summary = [r["summary"] for r in records if r.get("event") == "summary"]
    assert len(summary) == 1
    assert summary[0]["world_size"] == 2 and summary[0]["steps"] == 3
