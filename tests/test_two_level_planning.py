"""Planning two-level synchronization (issue 15, item 3): the price, the site's gradients, the CLI table.

- a bucket of B bytes costs cross(B/G) + an all-gather of B inside the site, one comm model;
- the site's gradient all-reduce adds its exposure past the end of backward to the step, and
  the CPU it takes from compute (measured by the profiler beyond that exposure) in proportion
  to the bytes;
- the profile's two-level measurements round-trip, and malformed ones are one line;
- ``dreamddp plan`` on a two-level profile prints flat vs two-level, and the written schedule's
  prediction is the table's two-level row; ``--link`` re-prices the cross-site model;
- the paper's setting (4 sites x 8 GPUs, 1 Gbit/s): two-level beats flat and DDP on paper.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from dreamddp.planning import plan, simulate
from dreamddp.planning.cli import main as plan_main
from dreamddp.planning.profile import CommModel, Profile
from dreamddp.planning.two_level import (
    TwoLevel,
    priced_two_level,
    site_cpu_per_byte,
    site_cpu_s,
    site_gradient_s,
    two_level_of,
)

CROSS = CommModel(0.02, 1.6e-7)
INTRA = CommModel(0.0005, 2e-9)


def _profile(two_level: TwoLevel | None = None) -> Profile:
    profile = Profile.synthetic(
        backward_s=[0.02] * 8, comm_s=[0.0] * 8, forward_s=0.08, optimizer_s=0.01, nbytes=[2_000_000] * 8
    ).with_comm(CommModel(0.06, 2.2e-7))
    metadata = {"world_size": 4, **({"two_level": two_level.to_dict()} if two_level else {})}
    return dataclasses.replace(profile, metadata=metadata)


def test_a_bucket_costs_its_shard_across_sites_and_an_all_gather_inside() -> None:
    two_level = TwoLevel(2, 2, CROSS, INTRA)
    priced = priced_two_level(_profile(), two_level)
    assert priced.comm is not None
    assert priced.comm.predict(4_000_000) == pytest.approx(CROSS.predict(2_000_000) + INTRA.alpha_s + 2e-9 * 2_000_000)
    assert priced.optimizer_s == pytest.approx(0.01 + site_gradient_s(_profile(), INTRA))
    assert priced.metadata["priced_for_sites"] == "2 sites x 2 ranks"


def test_site_gradients_are_exposed_only_past_the_end_of_backward() -> None:
    profile = _profile()
    assert site_gradient_s(profile, CommModel(0.0, 0.0)) == 0.0
    # One 16 MB bucket (under the 25 MiB cap) ready when backward ends: all of it is exposed.
    slow = CommModel(0.001, 1e-8)
    assert site_gradient_s(profile, slow) == pytest.approx(slow.predict(16_000_000))
    # Smaller buckets launched during backward hide part of it.
    assert site_gradient_s(profile, slow, cap_bytes=2_000_000) < slow.predict(16_000_000)


def test_the_cpu_the_site_reduction_takes_is_what_the_measurement_has_beyond_the_exposure() -> None:
    profile = _profile()  # 8 units of 2 MB
    slow = CommModel(0.001, 1e-8)
    exposed = site_gradient_s(profile, slow)
    # Measured 50 ms more than the modelled exposure over 16 MB of gradients: 50 ms of CPU, per byte.
    per_byte = site_cpu_per_byte(profile, slow, exposed + 0.05, 16_000_000)
    assert per_byte == pytest.approx(0.05 / 16_000_000)
    assert site_cpu_per_byte(profile, slow, exposed / 2, 16_000_000) == 0.0  # noise is not a speed-up
    assert site_cpu_per_byte(profile, slow, 1.0, 0) == 0.0  # nothing reduced (every parameter frozen)
    two_level = TwoLevel(2, 2, CROSS, slow, per_byte)
    assert site_cpu_s(profile, two_level) == pytest.approx(0.05)
    # The step pays both: the exposure and the CPU.
    assert priced_two_level(profile, two_level).optimizer_s == pytest.approx(0.01 + exposed + 0.05)
    # On a profile of twice the bytes the CPU share doubles.
    double = dataclasses.replace(
        profile, units=tuple(dataclasses.replace(u, nbytes=2 * u.nbytes) for u in profile.units)
    )
    assert site_cpu_s(double, two_level) == pytest.approx(0.1)


def test_two_level_measurements_round_trip_and_malformed_ones_are_one_line() -> None:
    two_level = TwoLevel(4, 8, CROSS, INTRA, 3e-9)
    profile = Profile.from_dict(_profile(two_level).to_dict())
    assert two_level_of(profile) == dataclasses.replace(two_level)
    assert two_level_of(_profile()) is None
    older = {k: v for k, v in two_level.to_dict().items() if k != "site_cpu_s_per_byte"}
    assert TwoLevel.from_dict(older).site_cpu_s_per_byte == 0.0  # profiled before it was measured
    with pytest.raises(ValueError, match=r"two_level site_cpu_s_per_byte must be a finite number >= 0, got -1e-09"):
        TwoLevel.from_dict({**two_level.to_dict(), "site_cpu_s_per_byte": -1e-9})
    with pytest.raises(ValueError, match=r"site_cpu_s_per_byte must be a finite number >= 0, got 'fast'"):
        TwoLevel.from_dict({**two_level.to_dict(), "site_cpu_s_per_byte": "fast"})
    with pytest.raises(ValueError, match=r"two_level is malformed \(KeyError: 'cross'\)"):
        TwoLevel.from_dict({"sites": 2, "ranks_per_site": 2})
    with pytest.raises(ValueError, match=r"two_level ranks_per_site must be an integer >= 2, got 1"):
        TwoLevel(2, 1, CROSS, INTRA)


def _plan_cli(tmp_path: Path, profile: Profile, *extra: str) -> tuple[int, str, str]:
    path = tmp_path / "profile.json"
    profile.to_json(path)
    out = tmp_path / "schedule.json"
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = plan_main(["--profile", str(path), "--period", "4", "--out", str(out), *extra])
    return code, stdout.getvalue(), stderr.getvalue()


def test_plan_prints_flat_vs_two_level_and_writes_the_two_level_schedule(tmp_path: Path) -> None:
    two_level = TwoLevel(2, 2, CROSS, INTRA)
    code, out, err = _plan_cli(tmp_path, _profile(two_level))
    assert code == 0, err
    rows = dict(
        re.findall(
            r"^(ssgd \(torch DDP, all ranks\)|hier_local_sgd|dreamddp two-level|dreamddp flat)\s+([\d.]+)", out, re.M
        )
    )
    assert set(rows) == {"ssgd (torch DDP, all ranks)", "hier_local_sgd", "dreamddp two-level", "dreamddp flat"}, out
    written = json.loads((tmp_path / "schedule.json").read_text())
    from dreamddp.core.schedule import Schedule

    schedule = Schedule.from_dict(written)
    priced = priced_two_level(_profile(), two_level)
    # The written schedule (before fill-in) is the table's two-level row; fill-in never makes it slower.
    assert simulate(priced, schedule).iteration_s <= float(rows["dreamddp two-level"]) + 1e-4
    assert "two-level 2 sites x 2 ranks" in out
    # --hierarchy flat plans the flat world and prints no two-level table.
    code, out, _ = _plan_cli(tmp_path, _profile(two_level), "--hierarchy", "flat")
    assert code == 0 and "flat vs two-level" not in out


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ("--hierarchy", "hierarchical"),
            "--hierarchy hierarchical needs a profile measured with sites of several ranks",
        ),
        (("--sync", "delta"), "--sync delta with two-level synchronization is not supported yet"),
    ],
)
def test_plan_refuses_what_two_level_cannot_do(tmp_path: Path, extra: tuple[str, ...], message: str) -> None:
    profile = _profile(TwoLevel(2, 2, CROSS, INTRA) if extra[0] == "--sync" else None)
    code, _, err = _plan_cli(tmp_path, profile, *extra)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_link_reprices_the_cross_site_model(tmp_path: Path) -> None:
    from dreamddp.emulation.link import LinkSpec
    from dreamddp.planning.cli import reprice

    repriced = two_level_of(reprice(_profile(TwoLevel(4, 8, CROSS, INTRA)), LinkSpec.parse("1gbit,30ms")))
    assert repriced is not None
    assert repriced.cross.alpha_s == pytest.approx(0.03)
    # 8 shard rings share each site's uplink; each moves 2 (S-1)/S of its shard.
    assert repriced.cross.beta_s_per_byte == pytest.approx(8 * 2 * 3 / 4 * 8 / 1e9)
    assert repriced.intra == INTRA


def test_paper_setting_two_level_beats_flat_and_ddp() -> None:
    from benchmarks.two_level_paper import paper_profile, predictions

    profile = paper_profile()
    rows = dict(predictions(profile, period=8))
    assert rows["dreamddp two-level"] < rows["dreamddp flat"] < rows["ssgd (torch DDP, all ranks)"]
    assert rows["dreamddp two-level"] < rows["hier_local_sgd"]
    schedule = plan(priced_two_level(profile, two_level_of(profile)), 8, fill=False)  # type: ignore[arg-type]
    assert schedule.period == 8
