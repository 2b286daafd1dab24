"""The benchmark report: hand-built results in, the numbers people quote out (computed here by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dreamddp.tools.bench import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def _run(algorithm, iter_s, predicted=None, **extra):
    run = {
        "algorithm": algorithm,
        "iter_s": iter_s,
        "iter_s_median": iter_s,
        "predicted_iter_s": predicted,
        "comm_wait_s": None,
        "bytes_per_iter": 3.3e6,
        "peak_rss_mb": 560.0,
        "final_loss": 2.9,
        "val_loss": 2.95,
        "note": "",
    }
    run.update(extra)
    return run


def grid():
    # Slow link: dreamddp 0.9/0.28 = 3.21x ssgd (met), 0.36/0.28 = 1.29x local_sgd (met),
    # 0.28/0.25 = 1.12x the lower bound (missed); ssgd's prediction is off by (0.9-0.8)/0.8 = +12.5%.
    slow = {
        "link": "100mbit,20ms",
        "network": "netns",
        "delay": "software",
        "measured_rate_bps": 95.6e6,
        "note": "",
        "compute_s": 0.214,
        "lower_bound_s": 0.25,
        "runs": [_run("ssgd", 0.9, 0.8), _run("local_sgd", 0.36, 0.35), _run("dreamddp", 0.28, 0.27)],
    }
    # Fast link: dreamddp takes 0.205/0.2 = 1.025x ssgd's time (met); no local_sgd, no lower bound.
    fast = {
        "link": "1gbit,1ms",
        "network": "simulated",
        "delay": "simulated",
        "measured_rate_bps": None,
        "note": "",
        "compute_s": 0.2,
        "lower_bound_s": None,
        "runs": [_run("ssgd", 0.2), _run("dreamddp", 0.205, peak_rss_mb=None)],
    }
    return {
        "format": "dreamddp.bench/1",
        "config": "configs/gpt-tiny.toml",
        "overrides": ["data.batch_size=32"],
        "model": "gpt",
        "params": 830000,
        "period": 4,
        "steps": 40,
        "sites": 2,
        "procs_per_site": 2,
        "world_size": 4,
        "command": "python benchmarks/run.py",
        "started": "2026-11-25T10:00:00Z",
        "machine": "2 cores",
        "links": [slow, fast],
    }


def convergence():
    def curve(*points):
        return [{"step": s, "time_s": t, "val_loss": v} for s, t, v in points]

    runs = [
        {
            "algorithm": "ssgd",
            "steps_done": 50,
            "iter_s": 0.4,
            "final_val_loss": 2.6,
            "curve": curve((25, 10.0, 3.0), (50, 20.0, 2.6)),
        },
        # Crosses 2.6 halfway between (8 s, 2.7) and (12 s, 2.5): 10 s, so 20/10 = 2.00x ssgd.
        {
            "algorithm": "dreamddp",
            "steps_done": 100,
            "iter_s": 0.16,
            "final_val_loss": 2.4,
            "curve": curve((25, 4.0, 2.9), (50, 8.0, 2.7), (75, 12.0, 2.5), (100, 16.0, 2.4)),
        },
        # Cut by the budget at 40 iterations and never reaches 2.6.
        {
            "algorithm": "local_sgd",
            "steps_done": 40,
            "iter_s": 0.24,
            "final_val_loss": 3.0,
            "curve": curve((25, 6.0, 3.2), (40, 9.6, 3.0)),
        },
    ]
    return {
        "format": "dreamddp.convergence/1",
        "link": "100mbit,20ms",
        "network": "simulated",
        "period": 4,
        "command": "python benchmarks/convergence.py",
        "models": [{"config": "configs/gpt-tiny.toml", "model": "gpt", "steps": 50, "budget_s": 20.0, "runs": runs}],
    }


def _row(markdown, first_cell, after=""):
    """The cells of the first table row starting with ``first_cell`` after the line containing ``after``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    line = next(line for line in lines[start:] if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_grid_table_speedups_and_missing_values():
    md = report.grid_table(grid())
    assert "### 100mbit,20ms — netns (tc tbf rate, software delay)" in md
    dream = _row(md, "dreamddp", "### 100mbit")
    assert dream[1:5] == ["0.280", f"{0.9 / 0.28:.2f}x", f"{0.36 / 0.28:.2f}x", f"{0.28 / 0.25:.2f}x"]
    assert dream[6] == f"{(0.28 - 0.27) / 0.27 * 100:+.1f}%"
    assert dream[7] == "–" and dream[8] == "–"  # no compute-only reference ran
    assert dream[9] == "–"  # comm_wait_s is None
    assert _row(md, "ssgd", "### 100mbit")[6] == "+12.5%"
    fast = _row(md, "dreamddp", "### 1gbit")
    assert fast[2] == f"{0.2 / 0.205:.2f}x"
    assert fast[3] == "–" and fast[4] == "–" and fast[12] == "–"  # no local_sgd, no lower bound, no RSS
    assert "measured link rate 95.6 Mbit/s" in md
    assert "ssgd predicted s/it off by +12.5%" in md
    assert "local_sgd predicted" not in md  # +2.9% is within tolerance


def test_targets_met_and_missed():
    found = {what: (met, shown) for what, met, shown in report.targets(grid())}
    assert found["100mbit,20ms: DreamDDP >= 3x faster than ssgd"] == (True, "3.21x")
    assert found["100mbit,20ms: DreamDDP >= 1.2x faster than local_sgd"] == (True, "1.29x")
    assert found["100mbit,20ms: DreamDDP <= 1.10x the lower bound"] == (False, "1.12x")
    assert found["100mbit,20ms: every predicted s/it within 10%"] == (False, "worst ssgd +12.5%")
    assert found["1gbit,1ms: DreamDDP <= 1.05x ssgd's time"] == (True, "1.02x")
    assert not any(what.startswith("1gbit") and "3x" in what for what in found)  # slow-link targets only
    md = report.grid_table(grid())
    assert "- [x] 100mbit,20ms: DreamDDP >= 3x faster than ssgd: 3.21x" in md
    assert "- [ ] 100mbit,20ms: DreamDDP <= 1.10x the lower bound: 1.12x" in md


def test_predictions_are_also_checked_at_the_compute_speed_the_reference_measured():
    data = grid()
    slow = data["links"][0]
    # The machine ran 1.1x slower than profiled: at that speed ssgd was predicted 0.88 (+2.3%).
    slow["compute_drift"] = 1.1
    for run, at_speed in zip(slow["runs"], (0.88, 0.37, 0.29)):
        run["calibrated_iter_s"] = at_speed
    slow["runs"].append({**_run("none", 0.2354, 0.214), "calibrated_iter_s": 0.2354})
    found = {what: (met, shown) for what, met, shown in report.targets(data)}
    assert found["100mbit,20ms: every predicted s/it within 10%"] == (False, "worst ssgd +12.5%")  # none left out
    assert found["100mbit,20ms: every predicted s/it within 10% at the runs' compute speed"] == (
        True,
        "worst dreamddp -3.4%",
    )
    md = report.grid_table(data)
    assert "compute during the runs (the interleaved `none` reference) 1.10x the profile's" in md
    assert _row(md, "ssgd", "### 100mbit")[7:9] == ["0.880", "+2.3%"]
    assert "none predicted s/it off by" not in md


def test_target_without_comparison_run_is_unknown():
    data = grid()
    data["links"][0]["runs"] = [r for r in data["links"][0]["runs"] if r["algorithm"] != "local_sgd"]
    found = {what: (met, shown) for what, met, shown in report.targets(data)}
    assert found["100mbit,20ms: DreamDDP >= 1.2x faster than local_sgd"] == (None, "not measured")


def test_convergence_table():
    """A file from before seeds, periods and bytes: one seed, single numbers, no "±"."""
    md = report.convergence_table(convergence())
    assert md.startswith("Link 100mbit,20ms (simulated), period H=4.\n")
    assert "### gpt (`configs/gpt-tiny.toml`), H = 4: N = 50 iterations, budget 20 s" in md
    assert _row(md, "dreamddp") == [
        "dreamddp",
        "1",
        "100",
        "0.160",
        "–",  # no bytes_per_iter in the file
        "–",
        "2.700",
        f"{(2.7 - 2.6) / 2.6 * 100:+.1f}%",
        "2.400",
        "10.0",
        "2.00x",
        "1.00x",
    ]
    assert _row(md, "ssgd")[9:] == ["20.0", "1.00x", "0.50x"]  # dreamddp took 10 s of ssgd's 20
    local = _row(md, "local_sgd")
    assert local[6] == "3.000 (at 40)"
    assert local[9:] == ["not reached", "–", "–"]
    assert "±" not in md and "Targets:" not in md  # no delta variants: no targets apply


def test_plots_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    for plot, data, name in (
        (report.plot_iteration_times, grid(), "it.png"),
        (report.plot_convergence, convergence(), "conv.png"),
    ):
        plot(data, tmp_path / name)
        content = (tmp_path / name).read_bytes()
        assert len(content) > len(PNG_SIGNATURE) and content[:8] == PNG_SIGNATURE


def test_write_report_through_main(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    results, conv = _write(tmp_path, "grid.json", grid()), _write(tmp_path, "conv.json", convergence())
    out = tmp_path / "out"
    assert report.main(["--results", str(results), "--convergence", str(conv), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "](iteration_time.png)" in md and "](convergence.png)" in md
    assert "| dreamddp |" in md and "2.00x" in md
    for png in ("iteration_time.png", "convergence.png"):
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE
    assert str(out / "report.md") in capsys.readouterr().out


def test_bad_format(tmp_path, capsys):
    bad = _write(tmp_path, "bad.json", {"format": "something/2"})
    with pytest.raises(ValueError, match=r"bad\.json.*something/2"):
        report.load_results(bad)
    assert report.main(["--results", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dreamddp report: error:") and "bad.json" in err and len(err.splitlines()) == 1


def test_wrong_kind_and_missing_file(tmp_path, capsys):
    conv = _write(tmp_path, "conv.json", convergence())
    assert report.main(["--results", str(conv), "--out", str(tmp_path / "out")]) == 2
    assert "dreamddp.convergence/1" in capsys.readouterr().err
    assert report.main(["--results", str(tmp_path / "nope.json"), "--out", str(tmp_path / "out")]) == 2
    assert "nope.json" in capsys.readouterr().err
    with pytest.raises(ValueError):
        report.grid_table(convergence())


def test_wrapper_script(tmp_path):
    bad = _write(tmp_path, "bad.json", {"format": "x"})
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "report.py"), "--results", str(bad), "--out", str(tmp_path / "out")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("dreamddp report: error:"), proc.stderr


def test_forward_variants_are_held_to_the_paper_modes_loss():
    """At most 2% above paper-mode dreamddp's loss at N iterations; lower meets the target too."""
    data = convergence()
    runs = data["models"][0]["runs"]
    paper = next(r for r in runs if r["algorithm"] == "dreamddp")["curve"]  # 2.7 at N = 50
    for name, loss in (("dreamddp-forward", 2.7 * 1.03), ("dreamddp-delayed", 2.7 * 0.6)):
        runs.append(
            {
                "algorithm": name,
                "steps_done": 50,
                "iter_s": 0.15,
                "final_val_loss": loss,
                "curve": [dict(p, val_loss=loss if p["step"] == 50 else p["val_loss"]) for p in paper[:2]],
            }
        )
    md = report.convergence_table(data)
    assert (
        "- dreamddp-forward: validation loss at iteration 50 is +3.0% from the paper-mode dreamddp's "
        "(target: at most 2% above it, missed)" in md
    )
    assert (
        "- dreamddp-delayed: validation loss at iteration 50 is -40.0% from the paper-mode dreamddp's "
        "(target: at most 2% above it, met)" in md
    )


# ---- convergence over seeds and periods ----


def _seed_run(algorithm, period, seed, points, iter_s, bytes_per_iter):
    """One seed's run; it stops at its last curve point, whose loss is its final one."""
    curve = [{"step": s, "time_s": t, "val_loss": v} for s, t, v in points]
    return {
        "algorithm": algorithm,
        "period": period,
        "seed": seed,
        "steps_done": curve[-1]["step"],
        "iter_s": iter_s,
        "bytes_per_iter": bytes_per_iter,
        "curve": curve,
        "final_val_loss": curve[-1]["val_loss"],
    }


def convergence_seeds():
    """Three seeds, H = 4 and 32, over 20 Mbit/s; N = 50. Every number below is checked by hand.

    S-SGD's final (= its target per seed) and at-N losses are 2.6, 2.7, 2.5; it reaches them at
    20, 22, 24 s (22.0 ± 2.0). Each dreamddp-style seed s starts from the same seed's S-SGD.
    """
    ssgd = [
        _seed_run("ssgd", None, 0, [(25, 10.0, 3.0), (50, 20.0, 2.6)], 0.40, 10e6),
        _seed_run("ssgd", None, 1, [(25, 11.0, 3.1), (50, 22.0, 2.7)], 0.44, 10e6),
        _seed_run("ssgd", None, 2, [(25, 12.0, 2.9), (50, 24.0, 2.5)], 0.48, 10e6),
    ]
    # H = 4, averaging: to 2.6 at 10.0 s, to 2.7 at 11.0 s, to 2.5 at 12.0 s: 11.0 ± 1.0.
    average_4 = [
        [(25, 4.0, 2.9), (50, 8.0, 2.7), (75, 12.0, 2.5), (100, 16.0, 2.4)],
        [(25, 4.4, 3.0), (50, 8.8, 2.8), (75, 13.2, 2.6), (100, 17.6, 2.5)],
        [(25, 4.8, 2.8), (50, 9.6, 2.6), (75, 14.4, 2.4), (100, 19.2, 2.3)],
    ]
    # H = 4, outer Nesterov: 6.0, 6.6, 7.2 s: 6.6 ± 0.6, 11.0 / 6.6 = 1.67x sooner than averaging.
    nesterov_4 = [
        [(25, 4.0, 2.7), (50, 8.0, 2.5), (75, 12.0, 2.3), (100, 16.0, 2.2)],
        [(25, 4.4, 2.8), (50, 8.8, 2.6), (75, 13.2, 2.4), (100, 17.6, 2.3)],
        [(25, 4.8, 2.6), (50, 9.6, 2.4), (75, 14.4, 2.2), (100, 19.2, 2.1)],
    ]
    # H = 32, averaging: each seed exactly at its target at step 75: 9.0, 9.9, 10.8 s: 9.9 ± 0.9.
    average_32 = [
        [(25, 3.0, 3.0), (50, 6.0, 2.8), (75, 9.0, 2.6), (100, 12.0, 2.5)],
        [(25, 3.3, 3.1), (50, 6.6, 2.9), (75, 9.9, 2.7), (100, 13.2, 2.6)],
        [(25, 3.6, 2.9), (50, 7.2, 2.7), (75, 10.8, 2.5), (100, 14.4, 2.4)],
    ]
    # H = 32, nesterov-int8: 4.5 s and 6.5 s, seed 2 never gets to 2.5: 5.5 ± 1.0 (2/3 reached).
    nesterov_int8_32 = [
        [(25, 3.0, 2.8), (50, 6.0, 2.4)],
        [(25, 4.0, 2.9), (50, 9.0, 2.5)],
        [(25, 3.0, 2.9), (50, 6.0, 2.7)],
    ]
    # H = 32, nesterov: at N 2.60, 2.55, 2.70 against S-SGD's 2.6, 2.7, 2.5.
    nesterov_32 = [[(25, 3.0, 2.9), (50, 6.0, loss)] for loss in (2.60, 2.55, 2.70)]
    runs = list(ssgd)
    for algorithm, period, curves, iter_s, sent in (
        ("dreamddp", 4, average_4, 0.16, 4e6),
        ("dreamddp-int8", 4, average_4, 0.16, 1e6),  # 0.25x: met
        ("dreamddp-nesterov", 4, nesterov_4, 0.16, 4e6),
        ("dreamddp-nesterov-int8", 4, nesterov_4, 0.16, 1e6),  # 0.25x: met
        ("dreamddp", 32, average_32, 0.12, 0.5e6),
        ("dreamddp-int8", 32, average_32, 0.12, 0.125e6),  # 0.25x: met
        ("dreamddp-nesterov", 32, nesterov_32, 0.12, 0.5e6),
        ("dreamddp-nesterov-int8", 32, nesterov_int8_32, 0.12, 0.15e6),  # 0.30x: missed
    ):
        runs += [
            _seed_run(algorithm, period, seed, c, iter_s * (1 + 0.1 * seed), sent) for seed, c in enumerate(curves)
        ]
    return {
        "format": "dreamddp.convergence/1",
        "link": "20mbit,50ms",
        "network": "netns",
        "period": 4,
        "periods": [4, 32],
        "seeds": 3,
        "models": [
            {
                "config": "configs/gpt-tiny.toml",
                "model": "gpt",
                "steps": 50,
                "budgets_s": {"0": 20.0, "1": 22.0, "2": 24.0},
                "budget_s": 20.0,
                "runs": runs,
            }
        ],
    }


def test_convergence_over_seeds_and_periods():
    data = convergence_seeds()
    # "none" (no communication) precedes ssgd in BENCH_ALGORITHMS; ssgd still heads the table.
    data["models"][0]["runs"].append(_seed_run("none", 4, 0, [(25, 2.0, 3.5), (50, 4.0, 3.4)], 0.08, 0.0))
    md = report.convergence_table(data)
    assert md.startswith("Link 20mbit,50ms (netns), periods H=4, 32, 3 seeds.\n")
    h4 = "### gpt (`configs/gpt-tiny.toml`), H = 4: N = 50 iterations, budgets 20, 22, 24 s (one per seed)"
    h32 = "H = 32: N = 50 iterations"
    assert h4 in md and h32 in md and md.index(h4) < md.index(h32)
    algorithms = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")]
    order = ["ssgd", "dreamddp", "dreamddp-nesterov", "dreamddp-int8", "dreamddp-nesterov-int8"]
    assert algorithms == ["algorithm", "ssgd", "none", *order[1:], "algorithm", *order]  # then BENCH_ALGORITHMS'
    assert _row(md, "none", h4)[1:3] == ["1", "50"]  # one seed among three: its own count, no spread
    assert _row(md, "none", h4)[6] == "3.400"
    assert _row(md, "ssgd", h4) == [
        "ssgd",
        "3",
        "50",
        "0.440",  # mean of 0.40, 0.44, 0.48
        "10.00",
        "2.50x",  # 10 MB / dreamddp's 4 MB
        "2.600 ± 0.100",
        "+0.0%",
        "2.600 ± 0.100",
        "22.0 ± 2.0",
        "1.00x",
        f"{11.0 / 22.0:.2f}x",
    ]
    assert _row(md, "dreamddp", h4)[4:] == [
        "4.00",
        "1.00x",
        "2.700 ± 0.100",
        f"{(0.1 / 2.6 + 0.1 / 2.7 + 0.1 / 2.5) / 3 * 100:+.1f}%",
        "2.400 ± 0.100",
        "11.0 ± 1.0",  # each seed against its own S-SGD target (2.6, 2.7, 2.5)
        "2.00x",
        "1.00x",
    ]
    assert _row(md, "dreamddp-nesterov-int8", h4)[4:6] == ["1.00", "0.25x"]
    assert _row(md, "dreamddp-nesterov-int8", h4)[9:] == ["6.6 ± 0.6", f"{22 / 6.6:.2f}x", f"{11 / 6.6:.2f}x"]
    # The same S-SGD runs head the H = 32 section, compared with that H's dreamddp.
    assert _row(md, "ssgd", h32)[4:6] == ["10.00", "20.00x"]
    assert _row(md, "ssgd", h32)[-1] == f"{9.9 / 22.0:.2f}x"
    assert _row(md, "dreamddp-nesterov-int8", h32)[4:] == [
        "0.15",
        "0.30x",
        f"{(2.4 + 2.5 + 2.7) / 3:.3f} ± 0.150",
        f"{(-0.2 / 2.6 - 0.2 / 2.7 + 0.2 / 2.5) / 3 * 100:+.1f}%",
        f"{(2.4 + 2.5 + 2.7) / 3:.3f} ± 0.150",
        "5.5 ± 1.0 (2/3 reached)",  # mean of the two seeds that got there
        "4.00x",
        "1.80x",
    ]
    # vs ssgd at N is the mean of per-seed gaps (+0.8%), not the gap of the means (+0.6%).
    nesterov = _row(md, "dreamddp-nesterov", h32)
    assert (
        nesterov[6:8]
        == ["2.617 ± 0.075", f"{(0 - 0.15 / 2.7 + 0.2 / 2.5) / 3 * 100:+.1f}%"]
        == [
            "2.617 ± 0.075",
            "+0.8%",
        ]
    )


def test_convergence_targets_over_seeds_and_periods():
    found = report.convergence_targets(convergence_seeds())
    sooner = "dreamddp-nesterov-int8 reaches S-SGD's final val loss >= 1.5x sooner than dreamddp (average)"
    assert found == [
        ("gpt: H=4: dreamddp-int8 bytes per iteration <= 0.27x dreamddp's", True, "0.25x"),
        ("gpt: H=4: dreamddp-nesterov-int8 bytes per iteration <= 0.27x dreamddp's", True, "0.25x"),
        (f"gpt: H=4: {sooner}", True, f"{11 / 6.6:.2f}x"),
        ("gpt: H=32: dreamddp-int8 bytes per iteration <= 0.27x dreamddp's", True, "0.25x"),
        ("gpt: H=32: dreamddp-nesterov-int8 bytes per iteration <= 0.27x dreamddp's", False, "0.30x"),
        (f"gpt: H=32: {sooner}", True, "1.80x"),  # 9.9 s / 5.5 s, the mean over the seeds that reached it
        # The mean loss at N, (2.6 + 2.55 + 2.7) / 3, against S-SGD's mean 2.6: +0.6%, within 2%.
        ("gpt: H=32: dreamddp-nesterov val loss at N iterations within 2% of S-SGD's", True, "+0.6%"),
    ]
    md = report.convergence_table(convergence_seeds())
    assert "Targets:\n\n- [x] H=4: dreamddp-int8 bytes per iteration <= 0.27x dreamddp's: 0.25x\n" in md
    assert "- [ ] H=32: dreamddp-nesterov-int8 bytes per iteration <= 0.27x dreamddp's: 0.30x" in md
    assert f"- [x] H=32: {sooner}: 1.80x" in md


def test_convergence_targets_that_miss_or_do_not_apply():
    data = convergence_seeds()
    runs = data["models"][0]["runs"]
    for run in runs:
        if run["algorithm"] == "dreamddp-nesterov-int8" and run["period"] == 32:
            for point in run["curve"]:
                point["val_loss"] += 1.0  # now no seed reaches its S-SGD target
        if run["algorithm"] == "dreamddp-nesterov" and run["period"] == 32:
            run["curve"][-1]["val_loss"] = 2.6 * 1.03  # every seed: mean 2.678, +3.0% from S-SGD's 2.6
    found = {what: (met, shown) for what, met, shown in report.convergence_targets(data)}
    sooner = "gpt: H=32: dreamddp-nesterov-int8 reaches S-SGD's final val loss >= 1.5x sooner than dreamddp (average)"
    assert found[sooner] == (False, "not reached")
    assert found["gpt: H=32: dreamddp-nesterov val loss at N iterations within 2% of S-SGD's"] == (False, "+3.0%")
    assert _row(report.convergence_table(data), "dreamddp-nesterov-int8", "H = 32")[9:] == ["not reached", "–", "–"]
    # Above 20 Mbit/s the speed target does not apply; without dreamddp the bytes ones have no reference.
    data["link"] = "100mbit,20ms"
    data["models"][0]["runs"] = [r for r in runs if not (r["algorithm"] == "dreamddp" and r["period"] == 4)]
    found = {what: (met, shown) for what, met, shown in report.convergence_targets(data)}
    assert not any("sooner" in what for what in found)
    assert not any(what.startswith("gpt: H=4:") for what in found)
    assert len(found) == 3  # H=32: the two bytes targets and the nesterov one


def test_convergence_plot_over_seeds_and_periods(tmp_path):
    pytest.importorskip("matplotlib")
    from dreamddp.tools.bench import convergence_report

    runs = [r for r in convergence_seeds()["models"][0]["runs"] if r["algorithm"] == "dreamddp-nesterov-int8"]
    curve = convergence_report._mean_curve(r for r in runs if r["period"] == 32)
    assert [p.step for p in curve] == [25, 50]
    assert curve[1].time_s == pytest.approx((6.0 + 9.0 + 6.0) / 3)
    assert curve[1].val_loss == pytest.approx((2.4 + 2.5 + 2.7) / 3)
    assert (curve[1].low, curve[1].high) == (2.4, 2.7)
    report.plot_convergence(convergence_seeds(), tmp_path / "conv.png")
    assert (tmp_path / "conv.png").read_bytes()[:8] == PNG_SIGNATURE
