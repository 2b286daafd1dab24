"""Link strings, bucketing, and the simulated link's timing on real gloo ranks."""

from __future__ import annotations

import os
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dreamddp.core.collectives import average_tensors, pack_buckets
from dreamddp.emulation.link import WIRE_FRAMING, LinkSpec, SimulatedLink

from .dist_utils import run_workers


@pytest.mark.parametrize(
    "text,bps,latency",
    [
        ("100mbit,20ms", 1e8, 0.02),
        ("1gbit", 1e9, 0.0),
        ("20mbit, 50ms", 2e7, 0.05),
        ("10mbps,1s", 8e7, 1.0),
        ("500kbit,250us", 5e5, 2.5e-4),
    ],
)
def test_link_parse(text, bps, latency):
    spec = LinkSpec.parse(text)
    assert spec.bandwidth_bps == pytest.approx(bps) and spec.latency_s == pytest.approx(latency)
    assert LinkSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    "text", ["", "fast", "100", "100mbit,20", "100mbit,20ms,1", "0mbit", "-5mbit", "100mbit,20lightyears", "mbit"]
)
def test_malformed_link_strings_get_one_line_errors(text):
    with pytest.raises(ValueError, match="malformed link") as info:
        LinkSpec.parse(text)
    assert "\n" not in str(info.value) and repr(text) in str(info.value)


@pytest.mark.parametrize(
    "text,what",
    [
        ("100mbit,1e400ms", "delay '1e400ms' is out of range; use 0 to 60s"),
        ("100mbit,61s", "delay '61s' is out of range"),
        ("1e400mbit", "rate '1e400mbit' is out of range"),
        ("999bit,20ms", "rate '999bit' is out of range"),
    ],
)
def test_unbounded_links_are_refused_at_the_edge(text, what):
    """Past these a run hangs for hours or overflows a timer mid-run (1e400 parses as inf)."""
    with pytest.raises(ValueError, match="malformed link") as info:
        LinkSpec.parse(text)
    assert what in str(info.value) and "\n" not in str(info.value)
    assert LinkSpec.parse("1kbit,60s").latency_s == 60.0 and LinkSpec.parse("inf,20ms").latency_only


def test_pack_buckets_respects_cap_dtype_and_order():
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(5, dtype=torch.float64), torch.zeros(1)]
    assert pack_buckets(ts, cap_bytes=80) == [[0, 1], [2], [3], [4]]
    assert pack_buckets(ts, cap_bytes=10**6) == [[0, 1, 2], [3], [4]]


def test_all_reduce_seconds_follow_ring_traffic():
    link = SimulatedLink(LinkSpec.parse("8mbit,10ms"), world_size=4)
    assert link.all_reduce_seconds(1_000_000) == pytest.approx(0.01 + 1.5 * 1_000_000 * 8 / 8e6)
    assert SimulatedLink(LinkSpec.parse("8mbit,10ms"), world_size=1).all_reduce_seconds(10**6) == 0.0


def _timings(rank: int, world: int) -> dict:
    link = SimulatedLink(LinkSpec.parse("8mbit,50ms"), world)  # 100 kB -> 0.05 + 0.1 s
    t = torch.full((25_000,), float(rank))
    start = time.perf_counter()
    average_tensors([t], link=link)
    single = time.perf_counter() - start
    start = time.perf_counter()
    average_tensors([t.clone(), t.clone()], link=link, cap_bytes=100_000)  # two buckets, serial channel
    serial = time.perf_counter() - start
    from dreamddp.core.collectives import BucketAverage

    start = time.perf_counter()
    pending = BucketAverage([t], None, link)
    time.sleep(0.2)  # "compute" that hides the transfer
    pending.wait()
    overlapped = time.perf_counter() - start
    return {
        "single": single,
        "serial": serial,
        "overlapped": overlapped,
        "value": float(t[0]),
        "bytes": link.stats.bytes,
    }


def test_simulated_link_delays_serialises_and_hides_behind_compute():
    for r in run_workers(_timings, 2):
        assert r["single"] >= 0.15
        assert r["serial"] >= 0.30
        assert r["overlapped"] < 0.2 + 0.1  # 0.15 s of link time fully inside 0.2 s of compute
        assert r["value"] == 0.5
        assert r["bytes"] == 4 * 100_000


def test_latency_only_link_parses_and_prints():
    spec = LinkSpec.parse("inf,20ms")
    assert spec.latency_only and spec.latency_s == pytest.approx(0.02)
    assert str(spec) == "inf,20ms" and LinkSpec.parse(str(spec)) == spec
    assert not LinkSpec.parse("100mbit,20ms").latency_only


def test_latency_only_link_adds_delay_after_the_real_transfer_in_series():
    link = SimulatedLink(LinkSpec.parse("inf,20ms"), world_size=2)
    first, second = link.book(100), link.book(100)
    t0 = first.issued
    # The real transfers finish 50 ms and 80 ms after issue: 50 ms then 30 ms of wire time.
    assert link.complete(first, t0 + 0.050) == pytest.approx(t0 + 0.020 + 0.050)
    # The second pays its latency after the first's release, plus its own 30 ms transfer.
    assert link.complete(second, t0 + 0.080) == pytest.approx(t0 + 0.020 + 0.050 + 0.020 + 0.030, abs=1e-3)
    assert second.wait_release() == second.release
    assert link.stats.busy_s == pytest.approx(0.020 + 0.050 + 0.020 + 0.030, abs=1e-3)


def test_bandwidth_link_releases_at_the_later_of_real_and_simulated():
    link = SimulatedLink(LinkSpec.parse("8mbit,10ms"), world_size=2)
    booking = link.book(1000)  # 10 ms + 1 ms simulated
    assert booking.deadline == pytest.approx(booking.issued + 0.011)
    assert link.complete(booking, booking.issued + 0.002) == pytest.approx(booking.deadline)
    slow = link.book(1000)
    assert link.complete(slow, slow.issued + 5.0) == pytest.approx(slow.issued + 5.0)


def test_software_delay_from_the_environment(monkeypatch):
    from dreamddp.emulation.link import SOFTWARE_DELAY_ENV, describe_link, link_from_settings

    monkeypatch.delenv(SOFTWARE_DELAY_ENV, raising=False)
    assert link_from_settings("", 2) is None
    assert describe_link(None) == "real network"
    monkeypatch.setenv(SOFTWARE_DELAY_ENV, "20ms")
    link = link_from_settings("", 2)
    assert link is not None and link.spec.latency_only and link.spec.latency_s == pytest.approx(0.02)
    assert "software delay" in describe_link(link)
    assert link_from_settings("100mbit,5ms", 2).spec.latency_s == pytest.approx(0.005)  # the config wins
    monkeypatch.setenv(SOFTWARE_DELAY_ENV, "soon")
    with pytest.raises(ValueError, match="DREAMDDP_SOFTWARE_DELAY='soon'"):
        link_from_settings("", 2)


def _latency_only_overlap(rank: int, world: int) -> dict:
    from dreamddp.core.collectives import BucketAverage

    link = SimulatedLink(LinkSpec.parse("inf,100ms"), world)
    t = torch.full((1000,), float(rank))
    start = time.perf_counter()
    BucketAverage([t], None, link).wait()
    exposed = time.perf_counter() - start
    start = time.perf_counter()
    pending = BucketAverage([t], None, link)
    time.sleep(0.15)  # compute longer than the delay hides it
    pending.wait()
    return {"exposed": exposed, "hidden": time.perf_counter() - start - 0.15, "value": float(t[0])}


def test_latency_only_link_delays_real_collectives_and_overlaps_with_compute():
    for r in run_workers(_latency_only_overlap, 2):
        assert r["value"] == pytest.approx(0.5)
        assert 0.1 <= r["exposed"] < 0.2
        assert r["hidden"] < 0.04


def test_out_of_order_completions_are_released_in_issue_order():
    """gloo may finish a later collective first (two worker threads); the link still serialises."""
    link = SimulatedLink(LinkSpec.parse("inf,10ms"), world_size=2)
    first, second = link.book(100), link.book(100)
    t0 = first.issued
    seen = []
    second.when_released(seen.append)
    assert link.complete(second, t0 + 0.030) is None and second.release is None and not seen  # waits for the first
    assert link.complete(first, t0 + 0.050) == pytest.approx(t0 + 0.060)
    # the second's transfer overlapped the first's entirely: it pays only its latency after it
    assert second.release == pytest.approx(t0 + 0.070) and seen == [second.release]


def _two_rank_releases(issues: list[tuple[float, float]], rate: float | None, rt: float = 0.040) -> list[tuple]:
    """Releases on two ranks' latency-only links for collectives issued at ``issues`` (per rank).

    The real collective starts once both ranks issued it and the previous one is done, and
    takes ``rt`` (its wire time at ``rate``), finishing at the same moment on both ranks.
    """
    nbytes = int(rt * 1e6 / 8 / WIRE_FRAMING)  # wire bytes = nbytes on 2 ranks
    links = [SimulatedLink(LinkSpec.parse("inf,50ms"), 2, real_rate=(lambda: rate) if rate else None) for _ in "ab"]
    finished = 0.0
    releases = []
    for issue_a, issue_b in issues:
        finished = max(issue_a, issue_b, finished) + rt
        pair = []
        for link, issued in zip(links, (issue_a, issue_b), strict=True):
            booking = link.book(nbytes)
            booking.issued = issued
            pair.append(link.complete(booking, finished))
        releases.append(tuple(pair))
    return releases


def test_peer_wait_is_not_priced_as_transfer_with_the_real_rate():
    """Rank a issues a sync while the previous one's delay still runs; rank b issues 100 ms later.

    Priced from measured time alone, rank a counts its 100 ms wait for b as transfer and adds
    the delay after it: the 40 ms its wait overlapped the previous delay are paid twice, so a
    is released after b and becomes the late rank next iteration
    (the swing the emulated 20mbit grid showed). With the real rate both release together.
    """
    issues = [(0.0, 0.0), (0.05, 0.15)]  # the first sync's release (0.09) is after a's second issue
    unpriced = _two_rank_releases(issues, rate=None)
    assert unpriced[1][0] - unpriced[1][1] == pytest.approx(0.09 - 0.05, abs=1e-9)  # a: release 1 - a's issue
    priced = _two_rank_releases(issues, rate=1e6)
    assert priced[1][0] == pytest.approx(priced[1][1], abs=1e-12)
    assert priced[1][0] == pytest.approx(0.15 + 0.04 + 0.05)  # b's issue + transfer + delay


@given(
    st.lists(
        st.tuples(st.floats(0.0, 0.3), st.floats(0.0, 0.3)),
        min_size=1,
        max_size=12,
    )
)
def test_with_the_real_rate_every_rank_computes_the_same_release(steps):
    issues, t_a, t_b = [], 0.0, 0.0
    for gap_a, gap_b in steps:  # each rank issues its collectives in order, at its own pace
        t_a, t_b = t_a + gap_a, t_b + gap_b
        issues.append((t_a, t_b))
    for rel_a, rel_b in _two_rank_releases(issues, rate=1e6):
        assert rel_a == pytest.approx(rel_b, abs=1e-9)


def test_the_real_rate_follows_the_cluster_state_file(tmp_path, caplog):
    from dreamddp.emulation.link import RealRate

    path = tmp_path / "c.json"
    rate = RealRate(path, recheck_s=0.0)
    with caplog.at_level("WARNING", logger="dreamddp.emulation.link"):
        assert rate() is None  # no file yet: measured transfers are priced
        assert rate() is None
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and f"cannot read the WAN rate from {path}" in notices[0]  # once, one line
    assert notices[0].endswith("pricing measured transfers") and "\n" not in notices[0]
    path.write_text('{"spec": {"wan": "100mbit"}}')
    assert rate() == pytest.approx(1e8)
    path.write_text('{"spec": {"wan": "20mbit"}}')  # `cluster shape` under a running job
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert rate() == pytest.approx(2e7)
    path.write_text("not json")
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert rate() is None
