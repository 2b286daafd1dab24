"""The convergence part of the benchmark report: validation loss against time and iterations.

A convergence file (``dreamddp.convergence/1``) holds, per model, S-SGD's runs (one per seed;
each one's training time is that seed's budget) and every other algorithm's runs at each
averaging period H, cut by the same budget. Seeds are aggregated here, not in the harness: a
row shows the mean and, when several seeds ran, ± half their range, so a difference smaller
than the seeds' disagreement reads as such. Every comparison with S-SGD is made seed by seed
first (same data order, same initialisation), then averaged. Files written before seeds and
periods existed (one seed, one H, no bytes) render the same way, as single numbers.

The cell formatting (every missing value is "–") is shared with the grid in ``report``, which
re-exports this module's public functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from dreamddp.tools.bench.names import CONVERGENCE_FORMAT, FORWARD_VARIANTS
from dreamddp.tools.bench.report import (
    MISSING,
    Run,
    _algorithms,
    _expect,
    _link_rate,
    _num,
    _percent,
    _pyplot,
    _ratio,
    _table,
    _times,
)

__all__ = ["CONVERGENCE_HEADER", "convergence_table", "convergence_targets", "plot_convergence"]

Target = tuple[str, bool | None, str]  # (description, met or None if unknown, measured value)

DELTA_SLOW_LINK_BPS = 20e6  # links at or below this rate carry the delta-sync speed target
INT8_BYTES_SHARE = 0.27  # int8 deltas: at most this share of averaging's bytes (a quarter plus the scales)
DELTA_SPEEDUP = 1.5  # nesterov-int8 over averaging in time to S-SGD's loss, on slow links
LOSS_TOLERANCE = 0.02  # relative loss gap at N iterations a variant may pay (a lower loss meets it)
NESTEROV_PERIOD = 32  # outer Nesterov is held to S-SGD's loss at this H, where plain averaging drifts


# ---- one run's curve ----


def _curve(run: Run) -> list[dict]:
    """Curve points by iteration: what follows assumes time and step grow together."""
    return sorted(run.get("curve", []), key=lambda p: p["step"])


def _loss_at_step(run: Run, steps: int) -> dict | None:
    """The curve point at ``steps`` iterations, else the last one before it (a run cut by the budget)."""
    points = [p for p in _curve(run) if p["step"] <= steps]
    return max(points, key=lambda p: p["step"]) if points else None


def _time_to_loss(run: Run, target: float) -> float | None:
    """Training time at which validation loss first reaches ``target``.

    Linearly interpolated between the two curve points that straddle the target; if the first
    point is already below it, that point's time (nothing is known before it). None if never.
    """
    previous = None
    for point in _curve(run):
        if point["val_loss"] <= target:
            if previous is None or previous["val_loss"] == point["val_loss"]:
                return point["time_s"]
            frac = (previous["val_loss"] - target) / (previous["val_loss"] - point["val_loss"])
            return previous["time_s"] + frac * (point["time_s"] - previous["time_s"])
        previous = point
    return None


def _relative(value: float | None, base: float | None) -> float | None:
    """(value - base) / base: a loss gap that reads the same for models whose losses differ in scale."""
    return None if value is None or base is None else _ratio(value - base, base)


# ---- aggregating seeds ----


@dataclass(frozen=True)
class Spread:
    """One quantity over seeds: the mean is what is compared, half the range shows how far seeds disagree."""

    values: tuple[float, ...] = ()

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread:
        """The seeds that have the value; one without it (not measured, never reached) is left out."""
        return cls(tuple(float(v) for v in values if v is not None))

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def half_range(self) -> float | None:
        return (max(self.values) - min(self.values)) / 2 if self.values else None

    def text(self, spec: str) -> str:
        """``mean ± half-range``; a single seed shows its number alone (there is no spread to show)."""
        if len(self.values) < 2:
            return _num(self.mean, spec)
        return f"{_num(self.mean, spec)} ± {_num(self.half_range, spec)}"


@dataclass(frozen=True)
class Aggregate:
    """One algorithm at one H over its seeds: what its table row, the notes and the targets read."""

    algorithm: str
    seeds: int
    steps_done: Spread
    iter_s: Spread
    bytes_per_iter: Spread
    loss_at_n: Spread
    steps_at_n: frozenset[int]  # where the at-N losses were read (below N: the run was cut by the budget)
    vs_ssgd_at_n: Spread  # per seed, relative to the same seed's S-SGD loss at N
    final_val_loss: Spread
    time_to_loss: Spread  # per seed, to that seed's S-SGD final loss; only the seeds that reached it
    with_target: int  # seeds with an S-SGD final loss to reach


def _aggregate(algorithm: str, runs: dict[int, Run], ssgd: dict[int, Run], steps: int) -> Aggregate:
    """Per-seed numbers first, each against the same seed's S-SGD run, then their spread."""
    at_n = {seed: p for seed, run in runs.items() if (p := _loss_at_step(run, steps)) is not None}
    base = {seed: p["val_loss"] for seed, run in ssgd.items() if (p := _loss_at_step(run, steps)) is not None}
    finals = {seed: run.get("final_val_loss") for seed, run in ssgd.items()}
    targets = {seed: t for seed in runs if (t := finals.get(seed)) is not None}
    return Aggregate(
        algorithm=algorithm,
        seeds=len(runs),
        steps_done=Spread.of(run.get("steps_done") for run in runs.values()),
        iter_s=Spread.of(run.get("iter_s") for run in runs.values()),
        bytes_per_iter=Spread.of(run.get("bytes_per_iter") for run in runs.values()),
        loss_at_n=Spread.of(p["val_loss"] for p in at_n.values()),
        steps_at_n=frozenset(p["step"] for p in at_n.values()),
        vs_ssgd_at_n=Spread.of(_relative(p["val_loss"], base.get(seed)) for seed, p in at_n.items()),
        final_val_loss=Spread.of(run.get("final_val_loss") for run in runs.values()),
        time_to_loss=Spread.of(_time_to_loss(runs[seed], target) for seed, target in targets.items()),
        with_target=len(targets),
    )


def _periods(conv: dict) -> list[Any]:
    """The H values compared; a file from before several periods names one, ``period``."""
    return list(dict.fromkeys(conv.get("periods") or [conv.get("period")]))


def _groups(model: dict, period: Any, default_period: Any) -> dict[str, dict[int, Run]]:
    """The runs of one H section by algorithm, then seed: S-SGD first (it has no H, every section
    shares it), then the others trained at ``period`` in the canonical order. Runs without a
    period or a seed are from a file that had one of each."""
    groups: dict[str, dict[int, Run]] = {}
    for run in model.get("runs", []):
        if run["algorithm"] == "ssgd" or run.get("period", default_period) == period:
            groups.setdefault(run["algorithm"], {})[int(run.get("seed", 0))] = run
    order = ["ssgd", *_algorithms([model.get("runs", [])])]
    return {name: groups[name] for name in dict.fromkeys(order) if name in groups}


def _aggregates(conv: dict, model: dict) -> dict[Any, dict[str, Aggregate]]:
    """Every H section's rows, computed once for the tables, the notes and the targets."""
    steps, out = model.get("steps", 0), {}
    for period in _periods(conv):
        groups = _groups(model, period, conv.get("period"))
        ssgd = groups.get("ssgd", {})
        out[period] = {name: _aggregate(name, runs, ssgd, steps) for name, runs in groups.items()}
    return out


# ---- the table ----

CONVERGENCE_HEADER = [
    "algorithm",
    "seeds",
    "iterations in budget",
    "s / iteration",
    "MB / iteration",
    "bytes vs dreamddp",
    "val loss at N iterations",
    "vs ssgd at N",
    "final val loss in budget",
    "time to ssgd's final val loss (s)",
    "speedup in time-to-loss vs ssgd",
    "vs dreamddp",
]


def _cut(steps_at_n: frozenset[int], steps: int) -> str:
    """Says where the at-N loss was read when a budget stopped a run before N iterations."""
    if not steps_at_n or steps_at_n == {steps}:
        return ""
    low, high = min(steps_at_n), max(steps_at_n)
    return f" (at {low})" if low == high else f" (at {low}–{high})"


def _reached(row: Aggregate) -> str:
    """Time to S-SGD's loss over the seeds that got there, saying how many did when not all."""
    reached = len(row.time_to_loss.values)
    if row.with_target == 0:
        return MISSING
    if reached == 0:
        return "not reached"
    shown = row.time_to_loss.text(".1f")
    return shown if reached == row.with_target else f"{shown} ({reached}/{row.with_target} reached)"


def _mean_of(row: Aggregate | None, field: str) -> float | None:
    return getattr(row, field).mean if row is not None else None


def _cells(row: Aggregate, ssgd: Aggregate | None, dream: Aggregate | None, steps: int) -> list[str]:
    """One row; the speedups are ratios of the mean times shown, so a reader can redo them."""
    ttl, sent = row.time_to_loss.mean, row.bytes_per_iter.mean
    return [
        row.algorithm,
        str(row.seeds),
        _num(row.steps_done.mean, ".0f"),
        _num(row.iter_s.mean, ".3f"),
        _num(sent, ".2f", 1e-6),
        _times(_ratio(sent, _mean_of(dream, "bytes_per_iter"))),
        row.loss_at_n.text(".3f") + _cut(row.steps_at_n, steps),
        _percent(row.vs_ssgd_at_n.mean),
        row.final_val_loss.text(".3f"),
        _reached(row),
        _times(_ratio(_mean_of(ssgd, "time_to_loss"), ttl)),
        _times(_ratio(_mean_of(dream, "time_to_loss"), ttl)),
    ]


def _budgets(model: dict) -> str:
    """S-SGD's training time per seed: each seed's runs had that seed's budget."""
    per_seed = model.get("budgets_s") or {}
    budgets = [per_seed[k] for k in sorted(per_seed, key=int)] or [model.get("budget_s")]
    if len(budgets) == 1:
        return f"budget {_num(budgets[0], '.0f')} s"
    return "budgets " + ", ".join(_num(b, ".0f") for b in budgets) + " s (one per seed)"


def _forward_notes(rows: dict[str, Aggregate]) -> list[str]:
    """Forward variants move averages later; they may cost at most 2% of paper-mode dreamddp's loss."""
    paper, notes = rows.get("dreamddp"), []
    for name in FORWARD_VARIANTS:
        row = rows.get(name)
        if row is None or paper is None or len(row.steps_at_n) != 1 or row.steps_at_n != paper.steps_at_n:
            continue
        gap = _relative(row.loss_at_n.mean, paper.loss_at_n.mean)
        # The target bounds the cost of moving the averages later: a lower loss meets it too.
        met = "met" if gap is not None and gap <= LOSS_TOLERANCE else "missed"
        notes.append(
            f"- {name}: validation loss at iteration {min(row.steps_at_n)} is {_percent(gap)} "
            f"from the paper-mode dreamddp's (target: at most 2% above it, {met})"
        )
    return notes


def _period_section(model: dict, period: Any, rows: dict[str, Aggregate]) -> list[str]:
    steps = model.get("steps", 0)
    title = (
        f"### {model.get('model', '?')} (`{model.get('config')}`), H = {'?' if period is None else period}: "
        f"N = {steps} iterations, {_budgets(model)}"
    )
    table = _table(
        CONVERGENCE_HEADER, [_cells(r, rows.get("ssgd"), rows.get("dreamddp"), steps) for r in rows.values()]
    )
    notes = _forward_notes(rows)
    return [title, "", *table, "", *(notes + [""] if notes else [])]


# ---- targets ----


def _check(what: str, value: float | None, ok: bool, shown: str) -> Target:
    return (what, None if value is None else ok, "not measured" if value is None else shown)


def _bytes_targets(period: Any, rows: dict[str, Aggregate]) -> list[Target]:
    """int8 deltas must actually shrink the payload: about a quarter of averaging's fp32 bytes."""
    dream, out = rows.get("dreamddp"), []
    for name in ("dreamddp-int8", "dreamddp-nesterov-int8"):
        if dream is None or name not in rows:
            continue
        share = _ratio(rows[name].bytes_per_iter.mean, dream.bytes_per_iter.mean)
        what = f"H={period}: {name} bytes per iteration <= {INT8_BYTES_SHARE}x dreamddp's"
        out.append(_check(what, share, (share or 0) <= INT8_BYTES_SHARE, _times(share)))
    return out


def _speed_target(period: Any, rows: dict[str, Aggregate], rate: float | None) -> list[Target]:
    """On a slow link the smaller payload and outer momentum must pay off in time to S-SGD's loss."""
    fast, dream = rows.get("dreamddp-nesterov-int8"), rows.get("dreamddp")
    if rate is None or rate > DELTA_SLOW_LINK_BPS or fast is None or dream is None:
        return []
    what = f"H={period}: dreamddp-nesterov-int8 reaches S-SGD's final val loss >= {DELTA_SPEEDUP}x sooner than dreamddp (average)"
    if fast.with_target and not fast.time_to_loss.values:
        return [(what, False, "not reached")]
    if dream.with_target and not dream.time_to_loss.values:
        return [(what, None, "dreamddp did not reach it")]  # faster, but by how much is not known
    speedup = _ratio(dream.time_to_loss.mean, fast.time_to_loss.mean)
    return [_check(what, speedup, (speedup or 0) >= DELTA_SPEEDUP, _times(speedup))]


def _nesterov_target(period: Any, rows: dict[str, Aggregate]) -> list[Target]:
    """At a long H outer Nesterov must not cost accuracy: mean loss at N within 2% of S-SGD's."""
    run, ssgd = rows.get("dreamddp-nesterov"), rows.get("ssgd")
    if period != NESTEROV_PERIOD or run is None:
        return []
    gap = _relative(run.loss_at_n.mean, _mean_of(ssgd, "loss_at_n"))
    what = f"H={period}: dreamddp-nesterov val loss at N iterations within 2% of S-SGD's"
    return [_check(what, gap, (gap or 0) <= LOSS_TOLERANCE, _percent(gap))]


def _model_targets(conv: dict, by_period: dict[Any, dict[str, Aggregate]]) -> list[Target]:
    """Only where they apply: the runs they compare exist (and, for speed, the link is slow)."""
    rate, out = _link_rate(conv), []
    for period, rows in by_period.items():
        out += [*_bytes_targets(period, rows), *_speed_target(period, rows, rate), *_nesterov_target(period, rows)]
    return out


def convergence_targets(conv: dict) -> list[Target]:
    """Every model's convergence targets as ("model: description", met, measured value)."""
    _expect(conv, CONVERGENCE_FORMAT)
    return [
        (f"{model.get('model', '?')}: {what}", met, shown)
        for model in conv.get("models", [])
        for what, met, shown in _model_targets(conv, _aggregates(conv, model))
    ]


# ---- the markdown ----


def _model_section(conv: dict, model: dict) -> list[str]:
    """One table per H, then the model's targets as a checklist, as the grid lists its own."""
    by_period = _aggregates(conv, model)
    lines = [line for period, rows in by_period.items() for line in _period_section(model, period, rows)]
    checks = [f"- [{'x' if met else ' '}] {what}: {shown}" for what, met, shown in _model_targets(conv, by_period)]
    return lines + (["Targets:", "", *checks, ""] if checks else [])


def _overview(conv: dict) -> list[str]:
    periods, seeds = _periods(conv), int(conv.get("seeds") or 1)
    which = f"period H={periods[0]}" if len(periods) == 1 else "periods H=" + ", ".join(map(str, periods))
    lines = [f"Link {conv.get('link')} ({conv.get('network')}), {which}" + (f", {seeds} seeds." if seeds > 1 else ".")]
    if seeds > 1:
        lines.append(
            "Each number is the mean over seeds, ± half their range; comparisons with S-SGD are made "
            "per seed (against the same seed's run) and then averaged."
        )
    return [*lines, ""]


def convergence_table(conv: dict) -> str:
    """Markdown for a convergence file: per model and H, loss at equal iterations and time to S-SGD's loss."""
    _expect(conv, CONVERGENCE_FORMAT)
    lines = _overview(conv)
    if conv.get("note"):
        lines += [str(conv["note"]), ""]
    if conv.get("command"):
        lines += [f"Command: `{conv['command']}`", ""]
    for resumed in conv.get("resumed", []):  # --resume: the invocations that added runs
        lines += [f"Continued with: `{resumed}`", ""]
    for model in conv.get("models", []):
        lines += _model_section(conv, model)
    return "\n".join(lines)


# ---- the plot ----


class MeanPoint(NamedTuple):
    step: int
    time_s: float  # mean over the seeds that have this step
    val_loss: float  # mean over the same seeds
    low: float  # their lowest loss
    high: float  # their highest


def _mean_curve(runs: Iterable[Run]) -> list[MeanPoint]:
    """The seeds' curves averaged step by step; a seed cut short by its budget leaves the later points."""
    by_step: dict[int, list[dict]] = {}
    for run in runs:
        for point in _curve(run):
            by_step.setdefault(point["step"], []).append(point)
    out = []
    for step in sorted(by_step):
        times, losses = [p["time_s"] for p in by_step[step]], [p["val_loss"] for p in by_step[step]]
        out.append(MeanPoint(step, sum(times) / len(times), sum(losses) / len(losses), min(losses), max(losses)))
    return out


def _plot_algorithm(top: Any, bottom: Any, name: str, runs: dict[int, Run], color: str) -> None:
    """Mean curve against time (top) and iterations (bottom), min–max band when seeds can disagree."""
    curve = _mean_curve(runs.values())
    for ax, xs in ((top, [p.time_s for p in curve]), (bottom, [p.step for p in curve])):
        ax.plot(xs, [p.val_loss for p in curve], marker="o", markersize=3, color=color, label=name)
        if len(runs) > 1:
            ax.fill_between(xs, [p.low for p in curve], [p.high for p in curve], color=color, alpha=0.2, linewidth=0)


def _plot_panel(top: Any, bottom: Any, title: str, groups: dict[str, dict[int, Run]], colors: dict[str, str]) -> None:
    """One model at one H; S-SGD's mean final loss dotted, the level the time-to-loss column is about."""
    for name, runs in groups.items():
        _plot_algorithm(top, bottom, name, runs, colors[name])
    target = Spread.of(run.get("final_val_loss") for run in groups.get("ssgd", {}).values()).mean
    for ax, against in ((top, "training time (s)"), (bottom, "iterations")):
        if target is not None:
            ax.axhline(target, color="gray", linestyle="dotted", label="ssgd final val loss (mean)")
        ax.set_title(f"{title}: against {against.split(' (')[0]}", fontsize="medium")
        ax.set_xlabel(against)
        ax.set_ylabel("validation loss")
    top.legend(fontsize="small")


def plot_convergence(conv: dict, path: str | Path) -> None:
    """Validation loss against time (top row) and iterations (bottom), one column per model and H."""
    _expect(conv, CONVERGENCE_FORMAT)
    plt = _pyplot()
    models, periods = conv.get("models", []), _periods(conv)
    panels = [(model, period) for model in models for period in periods]
    names = _algorithms([model.get("runs", []) for model in models])
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    columns = max(len(panels), 1)
    fig, axes = plt.subplots(2, columns, figsize=(5.0 * columns, 8.0), squeeze=False)
    for column, (model, period) in enumerate(panels):
        title = f"{model.get('model', '?')} over {conv.get('link')}, H={period}"
        groups = _groups(model, period, conv.get("period"))
        _plot_panel(axes[0][column], axes[1][column], title, groups, colors)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
