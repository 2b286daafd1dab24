"""``dreamddp bench`` / ``benchmarks/run.py``: every algorithm over the same throttled links.

    python benchmarks/run.py --config configs/gpt-tiny.toml --out benchmarks/results/grid

For each link: bring up the emulated cluster (``dreamddp.emulation.netns``: namespaces + ``tc``; where
that is not possible, a ``SimulatedLink`` — the results say which), profile the model once
on that cluster, plan DreamDDP's schedules, then train every algorithm for the same number
of iterations with the same H, and record time per iteration, blocked comm time, bytes
sent, peak memory, loss and the cost model's prediction. ``--convergence`` instead trains
each algorithm for S-SGD's wall-clock budget with regular evaluations, for loss against
time. Results are JSON (``results.json``/``convergence.json``); ``--report`` also writes the
markdown table and plots (``dreamddp.tools.bench.report``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dreamddp.emulation.link import LinkSpec
from dreamddp.ops.files import atomic_write
from dreamddp.tools.bench.names import (
    BENCH_ALGORITHMS,
    CONVERGENCE_FORMAT,
    DEFAULT_ALGORITHMS,
    PLANNED,
    REFERENCE,
    RESULTS_FORMAT,
)
from dreamddp.tools.bench.resume import has_run, load_prior, prior_model
from dreamddp.tools.runner import TrainRunFailed, median_run, read_summary, torchrun
from dreamddp.training.config import load_config
from dreamddp.validation import is_int, require

if TYPE_CHECKING:
    from dreamddp.emulation.netns import ClusterState

__all__ = ["BenchConfig", "Cluster", "main", "run_grid", "run_convergence", "BENCH_ALGORITHMS"]

DEFAULT_LINKS = ("1gbit,5ms", "100mbit,20ms", "20mbit,50ms")


@dataclass
class BenchConfig:
    """One benchmark invocation, validated before anything starts."""

    configs: list[str]
    overrides: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=lambda: list(DEFAULT_LINKS))
    algorithms: list[str] = field(default_factory=lambda: list(DEFAULT_ALGORITHMS))
    period: int = 4
    steps: int = 40
    sites: int = 2
    procs_per_site: int = 1
    network: str = "auto"  # auto | netns | simulated
    out: str = "runs/bench"
    timeout_s: float = 900.0  # per training run
    eval_every: int = 10  # convergence runs
    repeats: int = 1  # grid: each algorithm this many times, interleaved; the median is reported
    seeds: int = 1  # convergence: every run for train.seed 0..seeds-1 (mean and spread reported)
    periods: list[int] = field(default_factory=list)  # convergence: H values (S-SGD's run shared); [] = [period]
    name: str = "dreamddpb"  # namespace prefix, distinct from a user's own `dreamddp` cluster
    resume: bool = False  # convergence: keep the runs already in out/convergence.json, run the rest
    reference: bool = True  # grid: also run "none" (compute only) interleaved, to check predictions at the runs' speed

    def __post_init__(self) -> None:
        for algorithm in self.algorithms:
            if algorithm not in BENCH_ALGORITHMS:
                raise ValueError(f"algorithm {algorithm!r} is unknown; choose from: {', '.join(BENCH_ALGORITHMS)}")
        for link in self.links:
            spec = LinkSpec.parse(link)  # raises naming the malformed link
            if spec.latency_only:
                raise ValueError(f"link {link!r} needs a finite rate such as 100mbit,20ms")
        if self.network not in ("auto", "netns", "simulated"):
            raise ValueError(f"--network {self.network!r} is unknown; choose one of: auto, netns, simulated")
        for what, value in (
            ("--period", self.period),
            ("--steps", self.steps),
            ("--sites", self.sites),
            ("--procs-per-site", self.procs_per_site),
            ("--eval-every", self.eval_every),
            ("--repeats", self.repeats),
            ("--seeds", self.seeds),
            *(("--periods", p) for p in self.periods),
        ):
            require(is_int(value) and value >= 1, what, ">= 1", value)
        if self.procs_per_site == 1 and "hier_local_sgd" in self.algorithms:
            raise ValueError(
                "algorithm 'hier_local_sgd' needs sites of several processes: add --procs-per-site 2 (or more)"
            )
        if not self.configs:
            raise ValueError("--config: give at least one model config")
        for path in self.configs:
            load_config(path, self.overrides)  # a bad config fails here, not after a cluster is up

    @property
    def world_size(self) -> int:
        return self.sites * self.procs_per_site


def choose_network(requested: str) -> tuple[str, str]:
    """``netns`` where namespaces and ``tc`` work here, else ``simulated``; plus why."""
    from dreamddp.emulation import netns

    if requested == "simulated":
        return "simulated", "simulated link requested (--network simulated)"
    try:
        netns.check_environment()
    except netns.ClusterError as err:
        if requested == "netns":
            raise
        return "simulated", f"no emulated cluster here ({err}); fell back to SimulatedLink"
    return "netns", ""


class Cluster:
    """Runs ``python -m <module>`` on every worker of one link: in namespaces, or simulated."""

    def __init__(self, cfg: BenchConfig, link: str, network: str, log_dir: Path) -> None:
        self.cfg, self.link, self.network, self.log_dir = cfg, link, network, log_dir
        self.state: ClusterState | None = None
        self.delay_mode = "simulated"
        self.measured_rate_bps: float | None = None

    @contextmanager
    def up(self) -> Iterator[Cluster]:
        if self.network == "simulated":
            yield self
            return
        from dreamddp.emulation import netns
        from dreamddp.emulation.cluster import measure_rate

        rate, _, delay = self.link.partition(",")
        spec = netns.ClusterSpec(self.cfg.sites, self.cfg.procs_per_site, rate, delay or "0ms", name=self.cfg.name)
        netns.down(spec.name)  # leftovers of a crashed run
        self.state = netns.up(spec)
        try:
            self.delay_mode = self.state.delay_mode  # "software", "kernel netem" or "none"
            if spec.sites >= 2:
                self.measured_rate_bps = measure_rate(self.state)
            yield self
        finally:
            netns.down(spec.name)
            self.state = None

    def link_overrides(self) -> list[str]:
        """The simulated link, where the network is simulated; nothing where it is real."""
        return [f"train.link={self.link}"] if self.network == "simulated" else []

    def run_module(self, module_args: Sequence[str], tag: str) -> list[int] | None:
        """Run the module on every worker; the bytes each site's uplink sent meanwhile (kernel
        counters, the emulated cluster only; None where the network is simulated)."""
        log_path = self.log_dir / f"{tag}.out"
        if self.network == "simulated":
            try:
                out = torchrun(module_args, nproc=self.cfg.world_size, timeout=self.cfg.timeout_s)
            except TrainRunFailed as err:
                raise TrainRunFailed(f"{tag}: {err}") from None
            log_path.write_text(out)
            return None
        from dreamddp.emulation import netns
        from dreamddp.emulation.cluster import run_on_sites

        assert self.state is not None, "run_module on the emulated cluster needs `with cluster.up():`"
        command = [sys.executable, "-m", "torch.distributed.run", "-m", *module_args]
        env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        before = netns.uplink_bytes(self.state)
        with open(log_path, "w", encoding="utf-8") as log:
            code = run_on_sites(self.state, command, out=log, timeout=self.cfg.timeout_s, extra_env=env)
        if code != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-20:])
            raise TrainRunFailed(f"{tag}: exited {code} on the emulated cluster:\n{tail}")
        return [after[0] - earlier[0] for after, earlier in zip(netns.uplink_bytes(self.state), before, strict=True)]


def _train_overrides(
    cfg: BenchConfig, algorithm: str, schedules: dict[str, Path], log: Path, period: int | None = None
) -> list[str]:
    base = "dreamddp" if algorithm.startswith("dreamddp") else algorithm
    items = [
        f"train.algorithm={base}",
        f"train.period={period or cfg.period}",
        f"train.steps={cfg.steps}",
        f"train.log={log}",
        "train.progress=false",
    ]
    if algorithm in schedules:
        items.append(f"train.schedule={schedules[algorithm]}")
    if algorithm in PLANNED:
        items += PLANNED[algorithm].train_overrides()
    return items


def _module_args(module: str, config: str, overrides: Sequence[str], *extra: str) -> list[str]:
    args = [module, "--config", config]
    for item in overrides:
        args += ["--set", item]
    return [*args, *extra]


def _plan(
    profile_path: Path, period: int, folder: Path, tag: str, reuse: bool = False
) -> tuple[dict[str, Path], dict[str, float], dict[str, Any]]:
    """Schedules for dreamddp (+fill), each algorithm's predicted s/iteration, and the bounds.

    ``reuse``: a schedule file already in ``folder`` is kept and used (``--resume``: the runs
    still to do train on the schedules the recorded ones did, whatever the planner does today).
    """
    from dreamddp.core.schedule import Schedule
    from dreamddp.planning import plan, simulate
    from dreamddp.planning.profile import Profile
    from dreamddp.tools.bench.predict import predict_methods, priced_variants

    profile = Profile.from_json(profile_path)
    priced = priced_variants(profile)
    schedules = {name: plan(priced[name], period, **variant.plan_options(period)) for name, variant in PLANNED.items()}
    paths = {}
    for name, schedule in schedules.items():
        paths[name] = folder / f"schedule-{tag}-{name.replace('+', '-')}.json"
        if reuse and paths[name].exists():
            schedules[name] = Schedule.from_json(paths[name])
        else:
            schedule.to_json(paths[name])
    predicted = predict_methods(profile, schedules, period)
    bounds = {
        "compute_s": profile.compute_s,
        "lower_bound_s": simulate(profile, schedules["dreamddp"]).lower_bound_s / period,
        "params": int(sum(u.nbytes for u in profile.units) // 4),
        "fill_extra_syncs": schedules["dreamddp+fill"].syncs_per_period() - schedules["dreamddp"].syncs_per_period(),
    }
    return paths, predicted, bounds


def _at_runs_compute(profile_path: Path, schedules: dict[str, Path], period: int, entry: dict[str, Any]) -> None:
    """Add to each run of ``entry`` the compute speed its own forwards had (over the profile's
    forward) and its prediction at that speed; and, where the compute-only reference ran, the
    drift it measured (``dreamddp.tools.bench.predict``)."""
    from dreamddp.core.schedule import Schedule
    from dreamddp.planning.profile import Profile
    from dreamddp.tools.bench.predict import compute_only_s, predict_methods, with_compute_scaled

    profile = Profile.from_json(profile_path)
    planned = {n: Schedule.from_json(p) for n, p in schedules.items()}
    for run in entry["runs"]:
        speed = run.get("forward_s") / profile.forward_s if run.get("forward_s") and profile.forward_s > 0 else None
        run["compute_speed"] = speed
        if speed is not None:
            run["calibrated_iter_s"] = predict_methods(with_compute_scaled(profile, speed), planned, period).get(
                run["algorithm"]
            )
    reference = next((r for r in entry["runs"] if r["algorithm"] == REFERENCE), None)
    if reference is not None:
        entry["compute_drift"] = reference["iter_s"] / compute_only_s(profile)


def _run_row(
    summary: dict[str, Any], algorithm: str, predicted: float | None, uplink: list[int] | None = None
) -> dict[str, Any]:
    """One run's row. ``uplink``: bytes each site's uplink sent during the whole run (start-up,
    evaluation and the final average included), from the kernel; reported per iteration."""
    return {
        "algorithm": algorithm,
        "iter_s": summary["iter_s"],
        "iter_s_median": summary["iter_s_median"],
        "predicted_iter_s": predicted,
        "comm_wait_s": summary["comm_wait_s"],
        "forward_s": summary.get("forward_s"),  # the slowest rank's median forward: the run's compute speed
        "bytes_per_iter": summary["bytes_per_iter"],
        "wan_bytes_per_iter_site": sum(uplink) / len(uplink) / summary["steps"] if uplink else None,
        "peak_rss_mb": summary["peak_rss_mb"],
        "final_loss": summary["final_loss"],
        "val_loss": summary["val_loss"],
        "note": summary.get("note", ""),
    }


def _profile(cluster: Cluster, cfg: BenchConfig, config: str, folder: Path, tag: str) -> Path:
    profile_path = folder / f"profile-{tag}.json"
    overrides = [*cfg.overrides, *cluster.link_overrides()]
    cluster.run_module(
        _module_args("dreamddp.tools.profile", config, overrides, "--out", str(profile_path)), f"profile-{tag}"
    )
    return profile_path


def _profile_and_plan(cluster: Cluster, cfg: BenchConfig, config: str, folder: Path, tag: str):
    profile_path = _profile(cluster, cfg, config, folder, tag)
    return (profile_path, *_plan(profile_path, cfg.period, folder, tag))


def run_grid(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """The link × algorithm grid for ``cfg.configs[0]``; returns (and writes) the results."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    network, network_note = choose_network(cfg.network)
    config = cfg.configs[0]
    results: dict[str, Any] = _header(cfg, config, command, RESULTS_FORMAT)
    results["links"] = []
    for link in cfg.links:
        tag = link.replace(",", "-")
        cluster = Cluster(cfg, link, network, out)
        print(f"== link {link} ({network}) ==", flush=True)
        with cluster.up():
            profile_path, schedules, predicted, bounds = _profile_and_plan(cluster, cfg, config, out, tag)
            entry = {
                "link": link,
                "network": network,
                "delay": cluster.delay_mode,
                "measured_rate_bps": cluster.measured_rate_bps,
                "note": network_note,
                "compute_s": bounds["compute_s"],
                "lower_bound_s": bounds["lower_bound_s"],
                "runs": [],
            }
            if "dreamddp+fill" in cfg.algorithms:
                fill_note = f"fill-in added {bounds['fill_extra_syncs']} syncs per period to the dreamddp schedule"
                entry["note"] = "; ".join(x for x in (network_note, fill_note) if x)
            results["params"] = bounds["params"]
            # The compute-only reference runs interleaved too: it measures the machine's speed
            # during the runs, against which each prediction is also checked.
            algorithms = [*cfg.algorithms, *([] if REFERENCE in cfg.algorithms or not cfg.reference else [REFERENCE])]
            rows: dict[str, list[dict[str, Any]]] = {a: [] for a in algorithms}
            for repeat in range(cfg.repeats):  # interleaved, so drift on the machine hits every algorithm alike
                for algorithm in algorithms:
                    log = out / f"train-{tag}-{algorithm.replace('+', '-')}-r{repeat}.jsonl"
                    overrides = [
                        *cfg.overrides,
                        *cluster.link_overrides(),
                        *_train_overrides(cfg, algorithm, schedules, log),
                    ]
                    started = time.perf_counter()
                    uplink = cluster.run_module(
                        _module_args("dreamddp.train", config, overrides), f"train-{tag}-{algorithm}-r{repeat}"
                    )
                    row = _run_row(read_summary(log), algorithm, predicted.get(algorithm), uplink)
                    rows[algorithm].append(row)
                    print(
                        f"  {algorithm:<15} {row['iter_s']:.4f} s/it (predicted {row['predicted_iter_s'] or float('nan'):.4f}),"
                        f" val loss {row['val_loss']:.3f}  [{time.perf_counter() - started:.0f} s]",
                        flush=True,
                    )
            entry["runs"] = [median_run(rows[a]) for a in algorithms]
            _at_runs_compute(profile_path, schedules, cfg.period, entry)
        results["links"].append(entry)
        _write(out / "results.json", results)
    return results


def run_convergence(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Each algorithm for S-SGD's training time on ``cfg.links[0]``: validation loss against time.

    For every seed (outermost, so drift on the machine hits every method alike): S-SGD once —
    its training time is that seed's budget — then every other algorithm at every period.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    network, network_note = choose_network(cfg.network)
    link = cfg.links[0]
    periods = cfg.periods or [cfg.period]
    results: dict[str, Any] = {
        **_header(cfg, ", ".join(cfg.configs), command, CONVERGENCE_FORMAT),
        "link": link,
        "network": network,
        "note": network_note,
        "periods": periods,
        "seeds": cfg.seeds,
        "models": [],
    }
    prior = load_prior(out / "convergence.json", results) if cfg.resume else None
    if prior is not None:  # the recorded comparison, continued: its start and command stay, ours is added
        results = {**prior, "seeds": max(cfg.seeds, prior.get("seeds", 1)), "models": []}
        results["resumed"] = [*prior.get("resumed", []), command]
    cluster = Cluster(cfg, link, network, out)
    with cluster.up():
        results["delay"] = cluster.delay_mode
        for config in cfg.configs:
            tag = Path(config).stem
            print(f"== convergence: {config} over {link} ({network}) ==", flush=True)
            recorded = prior_model(prior, config)
            profile_path = out / f"profile-{tag}.json"
            if recorded is None or not profile_path.exists():
                profile_path = _profile(cluster, cfg, config, out, tag)
            schedules = {
                h: _plan(profile_path, h, out, f"{tag}-h{h}" if len(periods) > 1 else tag, reuse=recorded is not None)[
                    0
                ]
                for h in periods
            }
            model: dict[str, Any] = recorded or {
                "config": config,
                "model": load_config(config, cfg.overrides).model_name,
                "steps": cfg.steps,
                "budgets_s": {},
                "runs": [],
            }
            results["models"].append(model)
            others = [a for a in cfg.algorithms if a != "ssgd"]
            for seed in range(cfg.seeds):
                if str(seed) not in model["budgets_s"]:
                    budget = _convergence_run(cluster, cfg, config, tag, model, "ssgd", None, seed, {})
                    model["budgets_s"][str(seed)] = budget
                    model.setdefault("budget_s", budget)  # the first seed's, for single-seed readers
                for period in periods:
                    for algorithm in others:
                        if has_run(model, algorithm, period, seed):
                            continue
                        _convergence_run(cluster, cfg, config, tag, model, algorithm, period, seed, schedules[period])
                        _write(out / "convergence.json", results)
            _write(out / "convergence.json", results)
    return results


def _convergence_run(
    cluster: Cluster,
    cfg: BenchConfig,
    config: str,
    tag: str,
    model: dict[str, Any],
    algorithm: str,
    period: int | None,
    seed: int,
    schedules: dict[str, Path],
) -> float:
    """One training run of a convergence comparison; appends its record, returns its training time."""
    name = f"{tag}-{algorithm.replace('+', '-')}" + (f"-h{period}" if period else "") + f"-s{seed}"
    log = Path(cfg.out) / f"conv-{name}.jsonl"
    overrides = [
        *cfg.overrides,
        *cluster.link_overrides(),
        *_train_overrides(cfg, algorithm, schedules, log, period),
        f"train.eval_every={cfg.eval_every}",
        f"train.seed={seed}",
    ]
    if algorithm != "ssgd":
        # S-SGD's training time is the budget; a faster method spends it on more iterations.
        budget = model["budgets_s"][str(seed)]
        overrides += [f"train.steps={cfg.steps * 8}", f"train.time_budget_s={budget}"]
    cluster.run_module(_module_args("dreamddp.train", config, overrides), f"conv-{name}")
    summary = read_summary(log)
    model["runs"].append(
        {
            "algorithm": algorithm,
            "period": period,
            "seed": seed,
            "steps_done": summary["steps"],
            "iter_s": summary["iter_s"],
            "bytes_per_iter": summary["bytes_per_iter"],
            "curve": _curve(summary),
            "final_val_loss": summary["val_loss"],
        }
    )
    print(
        f"  {algorithm:<22} H={period or '-':<3} seed {seed}: {summary['steps']} iterations in "
        f"{summary['train_time_s']:.1f} s, val loss {summary['val_loss']:.3f}, "
        f"{summary['bytes_per_iter'] / 1e6:.3f} MB/it",
        flush=True,
    )
    return float(summary["train_time_s"])


def _curve(summary: dict[str, Any]) -> list[dict[str, float]]:
    points = {
        r["step"] + 1: {"step": r["step"] + 1, "time_s": r["time_s"], "val_loss": r["val_loss"]}
        for r in summary["records"]
        if "val_loss" in r and "time_s" in r
    }
    points[summary["steps"]] = {
        "step": summary["steps"],
        "time_s": summary["train_time_s"],
        "val_loss": summary["val_loss"],
    }
    return [points[k] for k in sorted(points)]


def _header(cfg: BenchConfig, config: str, command: str, fmt: str) -> dict[str, Any]:
    loaded = load_config(cfg.configs[0], cfg.overrides)
    return {
        "format": fmt,
        "config": config,
        "overrides": cfg.overrides,
        "model": loaded.model_name,
        "period": cfg.period,
        "steps": cfg.steps,
        "sites": cfg.sites,
        "procs_per_site": cfg.procs_per_site,
        "world_size": cfg.world_size,
        "command": command,
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}",
    }


def _write(path: Path, data: dict[str, Any]) -> None:
    """Rewritten after every link or model: a reader (or a crash) sees the last complete state."""
    with atomic_write(path, fsync=False) as f:
        json.dump(data, f, indent=1)


def _exit_on_sigterm(signum: int, _frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not interrupt the clean-up
    sys.exit(128 + signum)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dreamddp bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="model config (repeat for --convergence)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--links", nargs="+", default=list(DEFAULT_LINKS), metavar="RATE,DELAY")
    parser.add_argument("--algorithms", nargs="+", default=list(DEFAULT_ALGORITHMS))
    parser.add_argument("--period", type=int, default=4, help="H for every local method")
    parser.add_argument("--steps", type=int, default=40, help="iterations per run (S-SGD's, for --convergence)")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--procs-per-site", type=int, default=1)
    parser.add_argument("--network", default="auto", help="auto (netns if root, else simulated), netns, simulated")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per training run")
    parser.add_argument("--eval-every", type=int, default=10, help="--convergence: evaluate every N iterations")
    parser.add_argument("--repeats", type=int, default=1, help="grid: runs per algorithm, interleaved; median reported")
    parser.add_argument("--convergence", action="store_true", help="loss against wall-clock time on the first link")
    parser.add_argument("--seeds", type=int, default=1, help="--convergence: runs per algorithm, train.seed 0..N-1")
    parser.add_argument(
        "--periods", type=int, nargs="+", default=[], metavar="H", help="--convergence: several H, S-SGD shared"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="--convergence: keep the runs, profile and schedules already in --out; run only what is missing",
    )
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="grid: skip the interleaved compute-only run that predictions are also checked against",
    )
    parser.add_argument("--report", action="store_true", help="also write report.md and the plots into --out")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.resume and not args.convergence:
        print(
            "dreamddp bench: error: --resume continues a --convergence comparison; add --convergence", file=sys.stderr
        )
        return 2
    try:
        cfg = BenchConfig(
            args.config or ["configs/gpt-tiny.toml"],
            args.set,
            args.links,
            args.algorithms,
            args.period,
            args.steps,
            args.sites,
            args.procs_per_site,
            args.network,
            args.out,
            args.timeout,
            args.eval_every,
            repeats=args.repeats,
            seeds=args.seeds,
            periods=args.periods,
            resume=args.resume,
            reference=args.reference,
        )
    except ValueError as err:
        print(f"dreamddp bench: error: {err}", file=sys.stderr)
        return 2
    if args.resume and not args.convergence:
        print(
            "dreamddp bench: error: --resume continues a --convergence comparison; add --convergence", file=sys.stderr
        )
        return 2
    command = "dreamddp bench " + shlex.join(argv)
    # A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the cluster is taken down.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if args.convergence:
            run_convergence(cfg, command)
        else:
            run_grid(cfg, command)
    except TrainRunFailed as err:
        print(f"dreamddp bench: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as err:
        print(f"dreamddp bench: error: {err}", file=sys.stderr)
        return 2
    if args.report:
        from dreamddp.tools.bench.report import write_report

        out = Path(cfg.out)
        results = out / "results.json"
        conv = out / "convergence.json"
        paths = write_report(str(results) if results.exists() else None, str(conv) if conv.exists() else None, out)
        print("report: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
