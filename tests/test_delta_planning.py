"""The planner prices sync="delta": compressed bytes on the wire plus the codec's compute.

- averaging leaves a profile as it is; int8 scales beta by N/8 (plus its scales) and adds the
  codec's measured seconds per byte; bytes are packed on the weights' own sizes (units unchanged);
- `dreamddp plan --sync delta` writes the schedule planned on the priced profile, and its
  per-payload table's row for that payload is the written schedule; int8 sends the fewest MB;
- with outer momentum, `period="auto"` takes a period at least as long as without;
- the profiler's codec measurement covers every compressor.
"""

from __future__ import annotations

import dataclasses

import pytest

from dreamddp import Schedule
from dreamddp.core.compress import compressed_fraction
from dreamddp.core.sync_options import SyncOptions
from dreamddp.planning import AUTO_WITHIN, auto_period, simulate
from dreamddp.planning import cli as plan_cli
from dreamddp.planning.compression import auto_within, priced_for
from dreamddp.planning.profile import CommModel, Profile
from profiler.codec import profile_codecs

CODECS = {"none": 1e-10, "bf16": 2e-10, "int8": 4e-10}


def _profile(units: int = 12, world: int = 2, nbytes: int = 400_000) -> Profile:
    base = Profile.synthetic(
        backward_s=[0.01] * units, comm_s=[0.0] * units, forward_s=0.05, optimizer_s=0.01, nbytes=[nbytes] * units
    )
    base = dataclasses.replace(base, metadata={"world_size": world, "codec_s_per_byte": CODECS})
    return base.with_comm(CommModel(0.02, 8 / 20e6))  # 20 Mbit/s, 20 ms


def test_average_is_unpriced_and_int8_is_scaled_plus_codec() -> None:
    profile = _profile()
    assert priced_for(profile, SyncOptions()) is profile
    for world in (2, 4):
        p = _profile(world=world)
        priced = priced_for(p, SyncOptions(mode="delta", compress="int8"))
        fraction = (1 + 4 / 256) * world / 2 / 4
        assert compressed_fraction("int8", 256, world) == pytest.approx(fraction)
        assert priced.comm.beta_s_per_byte == pytest.approx(p.comm.beta_s_per_byte * fraction + CODECS["int8"])
        assert priced.comm.alpha_s == p.comm.alpha_s  # latency is per collective, not per byte
        assert [u.nbytes for u in priced.units] == [u.nbytes for u in p.units]  # buckets pack the same
    bf16 = priced_for(profile, SyncOptions(mode="delta", compress="bf16"))
    assert bf16.comm.beta_s_per_byte == pytest.approx(profile.comm.beta_s_per_byte * 0.5 + CODECS["bf16"])


def test_plan_cli_writes_the_delta_schedule_and_prints_every_payload(tmp_path, capsys) -> None:
    profile = _profile()
    src, out = tmp_path / "p.json", tmp_path / "s.json"
    profile.to_json(src)
    args = ["--profile", str(src), "--period", "4", "--out", str(out)]
    assert plan_cli.main([*args, "--sync", "delta", "--outer", "nesterov", "--compress", "int8"]) == 0
    text = capsys.readouterr().out
    rows = {}
    for line in text.split("per payload", 1)[1].splitlines()[2:6]:
        label, seconds, megabytes = line.rsplit(None, 2)
        rows[label.strip()] = (float(seconds), float(megabytes))
    assert list(rows) == ["average", "delta nesterov", "delta nesterov + bf16", "delta nesterov + int8"]
    assert rows["delta nesterov + int8"][1] < 0.3 * rows["delta nesterov"][1]
    assert rows["delta nesterov + int8"][0] < rows["average"][0]  # the link is the bottleneck here
    written = Schedule.from_json(out)
    priced = priced_for(profile, SyncOptions(mode="delta", outer="nesterov", compress="int8"))
    assert rows["delta nesterov + int8"][0] == pytest.approx(simulate(priced, written).iteration_s, abs=5e-5)
    assert "int8" in written.metadata["planned_for_sync"]
    # Averaging prints no per-payload table (and plans once).
    assert plan_cli.main(args) == 0
    assert "per payload" not in capsys.readouterr().out


def test_outer_momentum_lets_auto_take_a_longer_period() -> None:
    profile = _profile(units=24, nbytes=20_000)  # hidden from H = 3 on within 5%
    nesterov = SyncOptions(mode="delta", outer="nesterov")
    assert auto_within(SyncOptions()) == AUTO_WITHIN == auto_within(SyncOptions(mode="delta"))
    assert auto_within(nesterov) < AUTO_WITHIN
    plain = auto_period(profile)
    longer = auto_period(profile, within=auto_within(nesterov))
    assert longer > plain, (plain, longer)


def test_codec_costs_are_measured_for_every_compressor() -> None:
    costs = profile_codecs(elements=1 << 14, repeats=2)
    assert set(costs) == {"none", "bf16", "int8"}
    assert all(0 < c < 1e-6 for c in costs.values()), costs
