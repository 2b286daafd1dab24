"""Turn benchmark JSON into a markdown report with plots.

    python -m dreamddp.tools.bench.report --results grid.json [--convergence conv.json] --out DIR

The harness writes raw numbers only; every ratio people quote (speedups, distance to the
cost model's lower bound, how far the prediction was off) is derived here, in one place, so
the README, the report and the tracked targets cannot disagree. Plots need matplotlib
(``pip install dreamddp[bench]``); without it the report is written without images.
The grid part and the shared cell formatting are here; the convergence part (seeds, periods,
its targets and plot) is in ``convergence_report``, re-exported below.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dreamddp.emulation.link import LinkSpec
from dreamddp.ops.files import read_json
from dreamddp.tools.bench.names import (
    BENCH_ALGORITHMS,
    CONVERGENCE_FORMAT,
    FORWARD_VARIANTS,
    REFERENCE,
    RESULTS_FORMAT,
)

__all__ = [
    "convergence_table",
    "convergence_targets",
    "grid_table",
    "load_results",
    "main",
    "plot_convergence",
    "plot_iteration_times",
    "targets",
    "write_report",
]

MISSING = "–"
PREDICTION_TOLERANCE = 0.10  # |measured - predicted| / predicted beyond this is flagged
SLOW_LINK_BPS = 100e6  # links at or below this rate carry the slow-link targets
FAST_LINK_BPS = 1e9  # links at or above it (or unshaped) carry the "no overhead" target

Run = dict[str, Any]


def load_results(path: str | Path) -> dict:
    """Read a grid or convergence file; ValueError naming the file if it is neither."""
    data = read_json(path, "benchmark results")
    found = data.get("format") if isinstance(data, dict) else None
    if found not in (RESULTS_FORMAT, CONVERGENCE_FORMAT):
        raise ValueError(f"{path}: format {found!r} is not {RESULTS_FORMAT!r} or {CONVERGENCE_FORMAT!r}")
    return data


def _expect(data: dict, fmt: str) -> None:
    """A grid file given where a convergence file belongs (or back) fails loudly, not as a KeyError."""
    if data.get("format", fmt) != fmt:
        raise ValueError(f"expected a {fmt!r} results dict, got format {data.get('format')!r}")


# ---- formatting: every cell goes through one of these, so a missing value is always "–" ----


def _num(value: float | None, spec: str, scale: float = 1.0) -> str:
    return MISSING if value is None else format(value * scale, spec)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _times(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}x"


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{value * 100:+.1f}%"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


# ---- grid: one table per link ----


def _by_algorithm(link: dict) -> dict[str, Run]:
    return {run["algorithm"]: run for run in link.get("runs", [])}


def _dreamddp(link: dict) -> Run | None:
    """The run that stands for DreamDDP: plain if it ran, else the bubble-filling variant."""
    runs = _by_algorithm(link)
    return runs.get("dreamddp") or runs.get("dreamddp+fill")


def _prediction_error(run: Run, key: str = "predicted_iter_s") -> float | None:
    """(measured - predicted) / predicted: how far the cost model was off for this run.

    ``key="calibrated_iter_s"``: the prediction at the compute speed the run's own forwards
    had (``dreamddp.tools.bench.predict``).
    """
    measured, predicted = run.get("iter_s"), run.get(key)
    return None if measured is None or not predicted else (measured - predicted) / predicted


def _link_rate(link: dict) -> float | None:
    """Nominal rate in bit/s from the link's name; unshaped links count as infinitely fast."""
    name = str(link.get("link", "")).strip()
    if name.lower() in ("", "none"):
        return math.inf
    try:
        return LinkSpec.parse(name).bandwidth_bps
    except ValueError:
        return None


def _heading(link: dict) -> str:
    network, delay = link.get("network", "?"), link.get("delay")
    if network == "netns":
        how = f"netns (tc tbf rate, {delay} delay)" if delay else "netns (tc tbf rate)"
    else:
        how = network if not delay or delay == network else f"{network} ({delay} delay)"
    return f"### {link.get('link', '?')} — {how}"


def _grid_row(run: Run, ssgd: Run | None, local: Run | None, lower_bound: float | None) -> list[str]:
    t = run.get("iter_s")
    return [
        run["algorithm"],
        _num(t, ".3f"),
        _times(_ratio(ssgd.get("iter_s") if ssgd else None, t)),
        _times(_ratio(local.get("iter_s") if local else None, t)),
        _times(_ratio(t, lower_bound)),
        _num(run.get("predicted_iter_s"), ".3f"),
        _percent(_prediction_error(run)),
        _num(run.get("calibrated_iter_s"), ".3f"),
        _percent(_prediction_error(run, "calibrated_iter_s")),
        _num(run.get("comm_wait_s"), ".3f"),
        _num(run.get("bytes_per_iter"), ".2f", 1e-6),
        _num(run.get("wan_bytes_per_iter_site"), ".2f", 1e-6),
        _num(run.get("peak_rss_mb"), ".0f"),
        _num(run.get("final_loss"), ".3f"),
        _num(run.get("val_loss"), ".3f"),
    ]


GRID_HEADER = [
    "algorithm",
    "s / iteration",
    "vs ssgd",
    "vs local_sgd",
    "/ lower bound",
    "predicted s/it",
    "predicted error",
    "predicted at runs' compute",
    "error",
    "comm wait s/it",
    "MB sent / it",
    "WAN MB / it / site",
    "peak RSS MB",
    "final loss",
    "val loss",
]


def _link_section(link: dict) -> list[str]:
    runs = _by_algorithm(link)
    lower_bound = link.get("lower_bound_s")
    rows = [_grid_row(r, runs.get("ssgd"), runs.get("local_sgd"), lower_bound) for r in link.get("runs", [])]
    foot = f"Lower bound {_num(lower_bound, '.3f')} s/it; compute only {_num(link.get('compute_s'), '.3f')} s/it"
    if link.get("measured_rate_bps") is not None:
        foot += f"; measured link rate {link['measured_rate_bps'] / 1e6:.1f} Mbit/s"
    if link.get("compute_drift") is not None:
        foot += (
            f"; compute during the runs (the interleaved `none` reference) {link['compute_drift']:.2f}x the profile's"
        )
    speeds = [r["compute_speed"] for r in link.get("runs", []) if r.get("compute_speed")]
    if speeds:
        foot += f"; each run priced at its own forwards' speed, {min(speeds):.2f}x-{max(speeds):.2f}x the profile's"
    notes = [f"{link['note']}"] if link.get("note") else []
    notes += [f"{r['algorithm']}: {r['note']}" for r in link.get("runs", []) if r.get("note")]
    return [_heading(link), "", *_table(GRID_HEADER, rows), "", foot + ".", *(f"- {n}" for n in notes), ""]


def targets(results: dict) -> list[tuple[str, bool | None, str]]:
    """The targets the team tracks, as (description, met, measured value).

    Only targets that apply are listed: slow-link ones at links of at most 100 Mbit/s and the
    overhead one at links of at least 1 Gbit/s, each only where DreamDDP ran. ``met`` is None
    when the target applies but its comparison run (S-SGD, Local SGD, lower bound) is missing.
    """
    _expect(results, RESULTS_FORMAT)
    out: list[tuple[str, bool | None, str]] = []

    def check(what: str, value: float | None, ok: bool, shown: str) -> None:
        out.append((what, None if value is None else ok, "not measured" if value is None else shown))

    for link in results.get("links", []):
        name, rate, dream, runs = link.get("link", "?"), _link_rate(link), _dreamddp(link), _by_algorithm(link)
        if dream is None or rate is None:
            continue
        t = dream.get("iter_s")
        vs_ssgd = _ratio(runs.get("ssgd", {}).get("iter_s"), t)
        if rate <= SLOW_LINK_BPS:
            vs_local = _ratio(runs.get("local_sgd", {}).get("iter_s"), t)
            to_bound = _ratio(t, link.get("lower_bound_s"))
            check(f"{name}: DreamDDP >= 3x faster than ssgd", vs_ssgd, (vs_ssgd or 0) >= 3.0, _times(vs_ssgd))
            check(f"{name}: DreamDDP >= 1.2x faster than local_sgd", vs_local, (vs_local or 0) >= 1.2, _times(vs_local))
            check(f"{name}: DreamDDP <= 1.10x the lower bound", to_bound, (to_bound or 0) <= 1.10, _times(to_bound))
            for variant in FORWARD_VARIANTS:
                if variant not in runs:
                    continue
                tv = runs[variant].get("iter_s")
                v_bound, v_local = (
                    _ratio(tv, link.get("lower_bound_s")),
                    _ratio(runs.get("local_sgd", {}).get("iter_s"), tv),
                )
                check(f"{name}: {variant} <= 1.10x the lower bound", v_bound, (v_bound or 0) <= 1.10, _times(v_bound))
                check(
                    f"{name}: {variant} >= 1.2x faster than local_sgd", v_local, (v_local or 0) >= 1.2, _times(v_local)
                )
        if rate >= FAST_LINK_BPS:
            slowdown = _ratio(t, runs.get("ssgd", {}).get("iter_s"))
            check(f"{name}: DreamDDP <= 1.05x ssgd's time", slowdown, (slowdown or 0) <= 1.05, _times(slowdown))
        _two_level_targets(name, runs, check)
        for key, what in (
            ("predicted_iter_s", "every predicted s/it within 10%"),
            ("calibrated_iter_s", "every predicted s/it within 10% at the runs' compute speed"),
        ):
            errors = [
                (r["algorithm"], e)
                for r in link.get("runs", [])
                if r["algorithm"] != REFERENCE and (e := _prediction_error(r, key)) is not None
            ]
            if errors:
                algo, worst = max(errors, key=lambda ae: abs(ae[1]))
                check(f"{name}: {what}", worst, abs(worst) <= PREDICTION_TOLERANCE, f"worst {algo} {_percent(worst)}")
    return out


def _two_level_targets(name: str, runs: dict[str, Run], check: Callable[[str, float | None, bool, str], None]) -> None:
    """Issue 15's targets, where two-level DreamDDP ran beside flat DreamDDP (sites of several ranks)."""
    two, flat = runs.get("dreamddp"), runs.get("dreamddp-flat")
    if two is None or flat is None:
        return
    speedup = _ratio(flat.get("iter_s"), two.get("iter_s"))
    check(f"{name}: two-level DreamDDP >= 1.3x faster than flat", speedup, (speedup or 0) >= 1.3, _times(speedup))
    if "hier_local_sgd" in runs:
        vs_hier = _ratio(runs["hier_local_sgd"].get("iter_s"), two.get("iter_s"))
        check(f"{name}: two-level DreamDDP faster than hier_local_sgd", vs_hier, (vs_hier or 0) > 1.0, _times(vs_hier))
    wan = _ratio(two.get("wan_bytes_per_iter_site"), flat.get("wan_bytes_per_iter_site"))
    check(f"{name}: two-level WAN bytes per site <= 0.7x flat's", wan, (wan or 9) <= 0.7, _times(wan))
    loss = _ratio(two.get("val_loss"), flat.get("val_loss"))
    check(
        f"{name}: two-level validation loss no worse than flat's (at equal iterations)",
        loss,
        (loss or 9) <= 1.0,
        f"{_times(loss)} flat's",
    )


def _summary(results: dict) -> list[str]:
    lines = []
    for link in results.get("links", []):
        dream, runs = _dreamddp(link), _by_algorithm(link)
        if dream is not None:
            t = dream.get("iter_s")
            lines.append(
                f"- **{link.get('link')}**: {dream['algorithm']} "
                f"{_times(_ratio(runs.get('ssgd', {}).get('iter_s'), t))} vs ssgd, "
                f"{_times(_ratio(runs.get('local_sgd', {}).get('iter_s'), t))} vs local_sgd, "
                f"{_times(_ratio(t, link.get('lower_bound_s')))} the lower bound"
            )
        for run in link.get("runs", []):
            err = _prediction_error(run)
            if run["algorithm"] != REFERENCE and err is not None and abs(err) > PREDICTION_TOLERANCE:
                lines.append(f"- **{link.get('link')}**: {run['algorithm']} predicted s/it off by {_percent(err)}")
    checks = [f"- [{'x' if met else ' '}] {what}: {shown}" for what, met, shown in targets(results)]
    return lines + ([""] + ["Targets:", ""] + checks if checks else [])


def grid_table(results: dict) -> str:
    """Markdown for a grid file: summary and targets first, then one table per link."""
    _expect(results, RESULTS_FORMAT)
    params = results.get("params")
    head = (
        f"Model {results.get('model', '?')} ({_num(params, '.2f', 1e-6)} M parameters), period H={results.get('period')}, "
        f"{results.get('steps')} steps, {results.get('world_size')} workers "
        f"({results.get('sites')} sites x {results.get('procs_per_site')}); config `{results.get('config')}`"
    )
    if results.get("overrides"):
        head += " with " + " ".join(f"`{o}`" for o in results["overrides"])
    meta = "; ".join(f"{k} {results[k]}" for k in ("machine", "started") if results.get(k))
    lines = [head + ".", *([f"Ran on: {meta}."] if meta else []), ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += _summary(results) + [""]
    for link in results.get("links", []):
        lines += _link_section(link)
    return "\n".join(lines)


# ---- convergence: in convergence_report, which formats its cells with the helpers above ----
# Imported when called, not at the top: that module imports this one, and either may be loaded first.


def convergence_table(conv: dict) -> str:
    """Markdown for a convergence file: per model and H, loss at equal iterations and time to S-SGD's loss."""
    from dreamddp.tools.bench import convergence_report

    return convergence_report.convergence_table(conv)


def convergence_targets(conv: dict) -> list[tuple[str, bool | None, str]]:
    """Every model's convergence targets as ("model: description", met, measured value)."""
    from dreamddp.tools.bench import convergence_report

    return convergence_report.convergence_targets(conv)


def plot_convergence(conv: dict, path: str | Path) -> None:
    """Validation loss against time (top row) and iterations (bottom), one column per model and H."""
    from dreamddp.tools.bench import convergence_report

    convergence_report.plot_convergence(conv, path)


# ---- plots ----


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window, also on machines without a display
    import matplotlib.pyplot as plt

    return plt


def _algorithms(run_lists: list[list[Run]]) -> list[str]:
    """Every algorithm that appears, in the canonical order, unknown ones after in order of appearance."""
    seen = list(dict.fromkeys(r["algorithm"] for runs in run_lists for r in runs))
    return [a for a in BENCH_ALGORITHMS if a in seen] + [a for a in seen if a not in BENCH_ALGORITHMS]


def plot_iteration_times(results: dict, path: str | Path) -> None:
    """Grouped bars: seconds per iteration per link and algorithm, dashed lower bound per link."""
    _expect(results, RESULTS_FORMAT)
    plt = _pyplot()
    links = results.get("links", [])
    algos = _algorithms([link.get("runs", []) for link in links])
    width = 0.8 / max(len(algos), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(links) * max(len(algos), 1) / 3), 4.5))
    for i, algo in enumerate(algos):
        xs = [x for x, link in enumerate(links) if _by_algorithm(link).get(algo, {}).get("iter_s") is not None]
        ys = [_by_algorithm(links[x])[algo]["iter_s"] for x in xs]
        ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], ys, width, label=algo)
    bounded = [(x, link["lower_bound_s"]) for x, link in enumerate(links) if link.get("lower_bound_s") is not None]
    for k, (x, bound) in enumerate(bounded):
        ax.hlines(bound, x - 0.45, x + 0.45, colors="black", linestyles="dashed", label=None if k else "lower bound")
    ax.set_xticks(range(len(links)), [link.get("link", "?") for link in links])
    ax.set_ylabel("seconds per iteration")
    modes = ", ".join(dict.fromkeys(_heading(link).split(" — ", 1)[1] for link in links))
    ax.set_title(f"{results.get('model', '')}: seconds per iteration\nnetwork: {modes}", fontsize="medium")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the report and its CLI ----


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(results_path: str | None, convergence_path: str | None, out_dir: str | Path) -> list[Path]:
    """Write report.md and its PNGs into ``out_dir``; returns the files written, report.md first."""
    if results_path is None and convergence_path is None:
        raise ValueError("nothing to report: give a results file, a convergence file, or both")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _can_plot()
    sections, images = ["# Benchmark report", ""], []
    parts = (
        (results_path, RESULTS_FORMAT, "Time per iteration", "iteration_time.png", grid_table, plot_iteration_times),
        (
            convergence_path,
            CONVERGENCE_FORMAT,
            "Convergence in a time budget",
            "convergence.png",
            convergence_table,
            plot_convergence,
        ),
    )
    for path, fmt, title, png, table, plot in parts:
        if path is None:
            continue
        data = load_results(path)
        if data["format"] != fmt:
            raise ValueError(f"{path}: format {data['format']!r} where a {fmt!r} file belongs")
        sections += [f"## {title}", ""]
        if plots:
            plot(data, out / png)
            images.append(out / png)
            sections += [f"![{title}]({png})", ""]
        else:
            sections += ["(no plot: matplotlib is not installed; `pip install dreamddp[bench]`)", ""]
        sections += [table(data), ""]
    report = out / "report.md"
    report.write_text("\n".join(sections).rstrip() + "\n", encoding="utf-8")
    return [report, *images]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreamddp report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", help="grid results JSON (format dreamddp.bench/1)")
    parser.add_argument("--convergence", help="convergence results JSON (format dreamddp.convergence/1)")
    parser.add_argument("--out", required=True, help="directory for report.md and the plots")
    args = parser.parse_args(argv)
    if args.results is None and args.convergence is None:
        parser.error("give --results and/or --convergence")
    try:
        written = write_report(args.results, args.convergence, args.out)
    except (ValueError, OSError) as err:
        print(f"dreamddp report: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
