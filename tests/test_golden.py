"""Golden fixtures: plans for a transformer-like and a ResNet-like profile, checked in.

A change to the cost model or the searches that moves these schedules must be deliberate:
regenerate with ``DREAMDDP_REGEN_GOLDEN=1 pytest tests/test_golden.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dreamddp import Schedule, plan, simulate
from profiler import CommModel, Profile, UnitProfile

GOLDEN = Path(__file__).parent / "golden"
COMM = CommModel(alpha_s=0.020, beta_s_per_byte=80e-9)  # ~100 Mbit/s, 20 ms


def transformer_like() -> Profile:
    """Backward order: ln_f, 2 blocks of (mlp.proj, mlp.fc, attn.proj, attn.qkv), then a huge
    tied embedding whose gradient completes last: the unit with no window to hide behind."""
    units = [UnitProfile("ln_f", 1024, 0.001, 0.004)]
    for b in (1, 0):
        units += [
            UnitProfile(f"blocks.{b}.mlp.proj", 262_656, 0.004, 0.012),
            UnitProfile(f"blocks.{b}.mlp.fc", 264_192, 0.004, 0.014),
            UnitProfile(f"blocks.{b}.attn.proj", 65_792, 0.002, 0.006),
            UnitProfile(f"blocks.{b}.attn.qkv", 198_144, 0.003, 0.016),
        ]
    units.append(UnitProfile("wte", 2_000_000, 0.002, 0.010))
    base = Profile(tuple(units), forward_s=0.040, backward_s=sum(u.backward_s for u in units), optimizer_s=0.004)
    return base.with_comm(COMM)


def resnet_like() -> Profile:
    """Output-side convolutions are big and quick to differentiate; the stem is small."""
    sizes = [20_480, 2_359_296, 2_359_296, 1_179_648, 589_824, 294_912, 147_456, 73_728, 36_864, 1_728]
    windows = [0.001, 0.006, 0.006, 0.005, 0.007, 0.006, 0.008, 0.007, 0.009, 0.004]
    names = [
        "fc",
        "layer4.1.conv2",
        "layer4.1.conv1",
        "layer4.0.conv1",
        "layer3.1.conv2",
        "layer3.0.conv1",
        "layer2.1.conv2",
        "layer2.0.conv1",
        "layer1.0.conv1",
        "conv1",
    ]
    units = tuple(UnitProfile(n, s, w / 2, w) for n, s, w in zip(names, sizes, windows))
    return Profile(units, forward_s=0.030, backward_s=sum(windows), optimizer_s=0.003).with_comm(COMM)


CASES = {
    "transformer-h4": (transformer_like, 4),
    "transformer-h8": (transformer_like, 8),
    "resnet-h4": (resnet_like, 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_schedules(case):
    make, period = CASES[case]
    profile = make()
    schedule = plan(profile, period)
    path = GOLDEN / f"{case}.json"
    if os.environ.get("DREAMDDP_REGEN_GOLDEN") == "1":
        schedule.to_json(path)
        profile.to_json(GOLDEN / f"{case}.profile.json")
    expected = Schedule.from_json(path)
    assert dict(schedule.assignment) == dict(expected.assignment), f"{case}: plan changed; regenerate deliberately"
    assert Profile.from_json(GOLDEN / f"{case}.profile.json") == profile
    predicted = json.loads(path.read_text())["metadata"]["predicted_exposed_s"]
    assert simulate(profile, plan(profile, period, fill=False)).exposed_s == pytest.approx(predicted, abs=1e-12)
