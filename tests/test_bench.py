"""The benchmark harness end to end on a tiny config: results, the table and the plots.

Runs use the simulated link (fast, no root); one run goes through the emulated cluster
where root and iproute2 are available.
"""

from __future__ import annotations

import json

import pytest

from dreamddp.emulation import netns
from dreamddp.tools.bench.run import BenchConfig, main


def _cluster_unavailable() -> str:
    try:
        netns.check_environment()
    except netns.ClusterError as err:
        return str(err)
    return ""


TINY = [
    "model.n_layer=2",
    "model.d_model=32",
    "model.n_head=2",
    "model.block_size=16",
    "data.seq_len=16",
    "data.batch_size=4",
    "data.max_bytes=200000",
    "train.eval_batches=2",
    "train.timing_warmup=1",
]


def _bench(tmp_path, *extra: str) -> int:
    args = ["--config", "configs/gpt-tiny.toml", "--links", "100mbit,20ms", "--steps", "4", "--out", str(tmp_path)]
    for item in TINY:
        args += ["--set", item]
    return main([*args, *extra])


def _is_png(path) -> bool:
    return path.exists() and path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_grid_and_convergence_end_to_end_with_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert _bench(tmp_path, "--network", "simulated", "--algorithms", "ssgd", "dreamddp+fill", "--report") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["format"] == "dreamddp.bench/1"
    (link,) = results["links"]
    assert link["network"] == "simulated" and link["delay"] == "simulated"
    assert [r["algorithm"] for r in link["runs"]] == ["ssgd", "dreamddp+fill", "none"]  # the reference last
    for run in link["runs"]:
        assert run["iter_s"] > 0 and run["predicted_iter_s"] > 0 and run["calibrated_iter_s"] > 0
    ssgd, dream, reference = link["runs"]
    # Every run is priced at its own forwards' speed; the reference's drift is reported beside.
    assert link["compute_drift"] > 0 and all(r["compute_speed"] > 0 and r["forward_s"] > 0 for r in link["runs"])
    assert dream["bytes_per_iter"] > 0 and reference["bytes_per_iter"] == 0
    assert dream["bytes_per_iter"] < ssgd["bytes_per_iter"]  # a slice per iteration, not every gradient
    assert link["lower_bound_s"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "dreamddp+fill" in report and "100mbit,20ms" in report
    assert _is_png(tmp_path / "iteration_time.png")

    conv_dir = tmp_path / "conv"
    assert (
        _bench(
            conv_dir,
            "--network",
            "simulated",
            "--algorithms",
            "ssgd",
            "dreamddp",
            "--convergence",
            "--eval-every",
            "2",
            "--report",
        )
        == 0
    )
    conv = json.loads((conv_dir / "convergence.json").read_text())
    (model,) = conv["models"]
    ssgd_run, dream_run = model["runs"]
    assert ssgd_run["steps_done"] == 4 and model["budget_s"] > 0
    assert dream_run["steps_done"] >= 2 and dream_run["steps_done"] % 2 == 0  # stops at an evaluation
    assert all(p["time_s"] > 0 for p in dream_run["curve"])
    assert _is_png(conv_dir / "convergence.png")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_convergence_resume_adds_a_seed_and_keeps_what_was_recorded(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    conv = ["--network", "simulated", "--algorithms", "ssgd", "dreamddp", "--convergence", "--eval-every", "2"]
    assert _bench(tmp_path, *conv, "--seeds", "1") == 0
    first = json.loads((tmp_path / "convergence.json").read_text())
    schedule = (tmp_path / "schedule-gpt-tiny-dreamddp.json").read_text()
    profile = (tmp_path / "profile-gpt-tiny.json").read_text()

    assert _bench(tmp_path, *conv, "--seeds", "2", "--resume", "--report") == 0
    second = json.loads((tmp_path / "convergence.json").read_text())
    (model,) = second["models"]
    assert [(r["algorithm"], r["seed"]) for r in model["runs"]] == [
        ("ssgd", 0),
        ("dreamddp", 0),
        ("ssgd", 1),
        ("dreamddp", 1),
    ]
    assert model["runs"][:2] == first["models"][0]["runs"]  # the recorded runs are kept as they were
    assert set(model["budgets_s"]) == {"0", "1"} and second["seeds"] == 2
    assert second["started"] == first["started"] and len(second["resumed"]) == 1
    # The new seed trained on the recorded profile and schedule, not on fresh ones.
    assert (tmp_path / "schedule-gpt-tiny-dreamddp.json").read_text() == schedule
    assert (tmp_path / "profile-gpt-tiny.json").read_text() == profile
    assert "Continued with: `dreamddp bench" in (tmp_path / "report.md").read_text()

    # Nothing left to run: a third call trains nothing and changes no run.
    assert _bench(tmp_path, *conv, "--seeds", "2", "--resume") == 0
    assert json.loads((tmp_path / "convergence.json").read_text())["models"][0]["runs"] == model["runs"]

    # Another comparison in the same folder is refused, naming what differs.
    capsys.readouterr()
    assert (
        main(
            ["--config", "configs/gpt-tiny.toml", "--links", "100mbit,20ms", "--steps", "6", "--out", str(tmp_path)]
            + [x for item in TINY for x in ("--set", item)]
            + [*conv, "--resume"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "was run with steps 4, this run asks for 6" in err and "\n" not in err, err


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(bool(_cluster_unavailable()), reason=_cluster_unavailable() or "ok")
def test_grid_through_the_emulated_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMDDP_STATE_DIR", str(tmp_path / "state"))
    assert _bench(tmp_path, "--network", "netns", "--algorithms", "ssgd") == 0
    (link,) = json.loads((tmp_path / "results.json").read_text())["links"]
    assert link["network"] == "netns" and link["delay"] in ("software", "kernel netem")
    assert 0.8 * 100e6 <= link["measured_rate_bps"] <= 1.2 * 100e6
    assert link["runs"][0]["iter_s"] > 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--algorithms", "ssgd", "warp_sgd"], "algorithm 'warp_sgd' is unknown"),
        (["--links", "100mbits,20ms"], "malformed link '100mbits,20ms'"),
        (["--links", "inf,20ms"], "link 'inf,20ms' needs a finite rate"),
        (["--network", "carrier-pigeon"], "--network 'carrier-pigeon' is unknown"),
        (["--period", "0"], "--period must be >= 1, got 0"),
        (["--config", "configs/nope.toml"], "nope.toml"),
        (["--resume"], "--resume continues a --convergence comparison"),
    ],
)
def test_bad_bench_input_is_a_one_line_error(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dreamddp bench: error:") and message in err and "\n" not in err


def test_bench_config_validates_before_anything_runs():
    with pytest.raises(ValueError, match="algorithm 'x' is unknown"):
        BenchConfig(["configs/gpt-tiny.toml"], algorithms=["x"])


def test_delta_variants_train_with_their_sync_and_are_planned_priced_for_it(tmp_path) -> None:
    from dreamddp.planning import simulate
    from dreamddp.planning.compression import priced_for
    from dreamddp.planning.profile import CommModel, Profile
    from dreamddp.tools.bench.names import DEFAULT_ALGORITHMS, PLANNED
    from dreamddp.tools.bench.run import _plan, _train_overrides

    cfg = BenchConfig(["configs/gpt-tiny.toml"], algorithms=["dreamddp-nesterov-int8"])
    items = _train_overrides(cfg, "dreamddp-nesterov-int8", {}, tmp_path / "log.jsonl", period=16)
    assert "train.algorithm=dreamddp" in items and "train.period=16" in items
    assert {"train.sync=delta", "train.outer=nesterov", "train.compress=int8"} <= set(items)
    assert not any(PLANNED[a].sync for a in DEFAULT_ALGORITHMS if a in PLANNED)  # the default grid is unchanged

    profile = Profile.synthetic([0.01] * 8, [0.0] * 8, forward_s=0.04, nbytes=[200_000] * 8)
    profile = profile.with_comm(CommModel(0.02, 8 / 20e6))
    profile.to_json(tmp_path / "p.json")
    paths, predicted, _ = _plan(tmp_path / "p.json", 4, tmp_path, "t")
    from dreamddp import Schedule

    int8 = PLANNED["dreamddp-int8"].sync_options
    assert int8.delta and int8.compress == "int8"
    assert predicted["dreamddp-int8"] == pytest.approx(
        simulate(priced_for(profile, int8), Schedule.from_json(paths["dreamddp-int8"])).iteration_s
    )
    assert predicted["dreamddp-int8"] < predicted["dreamddp"]  # a quarter of the bytes on a slow link
