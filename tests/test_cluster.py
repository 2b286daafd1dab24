"""The emulated cluster: real namespaces, veths and tc, a real gloo all-reduce across sites.

The tests that build a cluster need root and iproute2 and are skipped with the reason
otherwise; validation and "run without up" need neither.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest

from dreamddp.emulation import netns
from dreamddp.emulation.cluster import main as cluster_main
from dreamddp.emulation.cluster import measure_rate, run_on_sites
from dreamddp.emulation.netns import ClusterError, ClusterSpec


def _cluster_unavailable() -> str:
    try:
        netns.check_environment()
    except ClusterError as err:
        return str(err)
    return ""


needs_root = pytest.mark.skipif(bool(_cluster_unavailable()), reason=_cluster_unavailable() or "ok")

ALLREDUCE = (
    "import os, torch, torch.distributed as dist; "
    "dist.init_process_group('gloo', rank=int(os.environ['NODE_RANK']), world_size=int(os.environ['NNODES'])); "
    "t = torch.tensor([float(os.environ['NODE_RANK']) + 1.0]); dist.all_reduce(t); "
    "print('sum', t.item(), os.environ['GLOO_SOCKET_IFNAME'], flush=True); dist.barrier(); dist.destroy_process_group()"
)


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(netns.STATE_DIR_ENV, str(tmp_path))
    return tmp_path


@pytest.fixture
def spec(state_dir):
    name = f"dt{os.getpid() % 100000}"
    yield ClusterSpec(
        sites=2, procs_per_site=1, wan="50mbit", wan_delay="5ms", subnet="10.214.77.0/24", name=name, master_port=29611
    )
    if not _cluster_unavailable():
        netns.down(name)


def _root_interfaces() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


@needs_root
@pytest.mark.slow  # the fast tier's budget; CI's slow tier builds the cluster
def test_cluster_up_allreduce_rate_and_down_leaves_nothing(spec, state_dir, monkeypatch):
    state = netns.up(spec)
    assert netns.namespaces(spec.name) == sorted([f"{spec.name}-hub", f"{spec.name}-s0", f"{spec.name}-s1"])
    assert state.delay_mode in ("software", "kernel netem")
    shaped = netns.qdiscs(state)
    assert all(("tbf" in q or "netem" in q) for q in shaped.values()), shaped

    out = io.StringIO()
    assert run_on_sites(state, [sys.executable, "-c", ALLREDUCE], out=out, timeout=120) == 0
    lines = out.getvalue().splitlines()
    assert "[s0] sum 3.0 wan0" in lines and "[s1] sum 3.0 wan0" in lines, lines

    # The sites share this machine's cores: OMP_NUM_THREADS = cores / all processes, unless set.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = io.StringIO()
    assert run_on_sites(state, ["echo threads $OMP_NUM_THREADS"], out=out, timeout=60) == 0
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"[s0] threads {expected}" in out.getvalue() and f"OMP_NUM_THREADS={expected} for each" in out.getvalue()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    out = io.StringIO()
    assert run_on_sites(state, ["echo threads $OMP_NUM_THREADS"], out=out, timeout=60) == 0
    assert "[s1] threads 3" in out.getvalue() and "OMP_NUM_THREADS=" not in out.getvalue()

    rate = measure_rate(state, seconds=1.0)
    assert 0.8 * 50e6 <= rate <= 1.2 * 50e6, f"measured {rate / 1e6:.1f} Mbit/s on a 50 Mbit/s link"

    state, note = netns.shape(spec.name, "20mbit")  # the link changes under a running cluster
    assert netns.load_state(spec.name).spec.wan == "20mbit" and note == ""
    rate = measure_rate(state, seconds=1.0)
    assert 0.8 * 20e6 <= rate <= 1.2 * 20e6, f"measured {rate / 1e6:.1f} Mbit/s after shaping to 20 Mbit/s"
    with pytest.raises(ClusterError, match="mbits"):
        netns.shape(spec.name, "20mbits")

    assert netns.down(spec.name)
    assert netns.namespaces(spec.name) == []
    assert spec.name not in _root_interfaces()
    assert not (state_dir / f"{spec.name}.json").exists()
    assert not os.path.exists(f"/etc/netns/{spec.name}-s0")
    assert netns.down(spec.name) == []  # idempotent


@needs_root
def test_down_cleans_up_after_a_crash_that_lost_the_state(spec, state_dir):
    netns.up(spec)
    (state_dir / f"{spec.name}.json").unlink()
    with pytest.raises(ClusterError, match="already up"):
        netns.up(spec)  # leftovers are noticed, not clobbered
    assert len(netns.down(spec.name)) == 3
    assert netns.namespaces(spec.name) == []


@needs_root
def test_one_failing_site_stops_the_others(spec, monkeypatch):
    import dreamddp.emulation.cluster as cluster

    monkeypatch.setattr(cluster, "GRACE_S", 1.0)
    state = netns.up(spec)
    start = time.monotonic()
    code = run_on_sites(state, ['if [ "$NODE_RANK" = 1 ]; then exit 3; fi; sleep 60'], out=io.StringIO(), timeout=60)
    assert code == 3 and time.monotonic() - start < 20


def test_run_without_up_is_a_clear_error(state_dir, capsys):
    with pytest.raises(ClusterError, match="no cluster 'nosuch' is up; run `dreamddp cluster up --name nosuch` first"):
        netns.load_state("nosuch")
    assert cluster_main(["run", "--name", "nosuch", "--", "true"]) == 2
    assert "no cluster 'nosuch' is up" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sites": 3, "subnet": "10.9.9.0/30"}, "--sites 3 does not fit --subnet 10.9.9.0/30: it has 2 host addresses"),
        ({"wan": "100mbits"}, "malformed link '100mbits,20ms'"),
        ({"wan_delay": "soon"}, "malformed link '100mbit,soon'"),
        ({"wan": "inf"}, "--wan 'inf' must be a finite rate"),
        ({"subnet": "8.8.8.0/24"}, "must be a private IPv4 network"),
        ({"subnet": "banana"}, "--subnet 'banana' is not an IPv4 network"),
        ({"name": "Bad-Name"}, "--name 'Bad-Name'"),
        ({"sites": 0}, "--sites must be an integer >= 1, got 0"),
        ({"procs_per_site": 0}, "--procs-per-site must be an integer >= 1, got 0"),
        ({"master_port": 80}, "--master-port must be in 1024..65535, got 80"),
    ],
)
def test_bad_cluster_specs_are_one_line_errors(kwargs, message):
    with pytest.raises(ClusterError) as info:
        ClusterSpec(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_reports_bad_input_in_one_line(capsys):
    assert cluster_main(["up", "--sites", "300", "--subnet", "10.1.2.0/24"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dreamddp cluster: error: --sites 300 does not fit --subnet 10.1.2.0/24: it has 254 host addresses"


def test_site_env_gives_torchrun_its_multi_node_settings():
    state = netns.ClusterState(ClusterSpec(sites=2, procs_per_site=2), "software", ["10.213.0.1", "10.213.0.2"])
    env = netns.site_env(state, 1)
    assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "10.213.0.1"
    assert env["NODE_RANK"] == env["PET_NODE_RANK"] == "1"
    assert env["NNODES"] == env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "2"
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "wan0"
    assert env["NCCL_HOSTID"] == "dreamddp-s1"  # NCCL must not take two sites for one host
    assert env["DREAMDDP_SOFTWARE_DELAY"] == "20ms"
    assert env["DREAMDDP_CLUSTER_STATE"].endswith("/dreamddp.json")  # the rate tc shapes to, kept current
    kernel = netns.ClusterState(ClusterSpec(), "kernel netem", ["10.213.0.1", "10.213.0.2"])
    assert "DREAMDDP_SOFTWARE_DELAY" not in netns.site_env(kernel, 0)
    assert "DREAMDDP_CLUSTER_STATE" not in netns.site_env(kernel, 0)


@needs_root
@pytest.mark.slow  # two 4-process jobs on an emulated cluster
@pytest.mark.timeout(400)
def test_two_level_sends_the_scheduled_bytes_once_per_site(state_dir):
    """Issue 15: each site's uplink (kernel counters) carries the scheduled bytes once, not G times."""
    spec = ClusterSpec(
        sites=2,
        procs_per_site=2,
        wan="200mbit",
        wan_delay="1ms",
        subnet="10.214.78.0/24",
        name="dt2l",
        master_port=29613,
    )
    state = netns.up(spec)
    steps, model_bytes = 10, 512 * 512 * 4
    sent: dict[str, list[int]] = {}
    try:
        for mode in ("hierarchical", "flat"):
            before = netns.uplink_bytes(state)
            out = io.StringIO()
            job = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "tests/two_level_job.py"]
            code = run_on_sites(state, [*job, mode, str(steps)], out=out, timeout=300)
            assert code == 0, out.getvalue()[-3000:]
            after = netns.uplink_bytes(state)
            sent[mode] = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    finally:
        netns.down(spec.name)
    # Two-level: each site sends the model once per iteration (plus the start-up broadcast, headers).
    for site_sent in sent["hierarchical"]:
        assert steps * model_bytes <= site_sent <= 1.3 * (steps + 1) * model_bytes, sent
    # Flat: a ring over all four ranks crosses each uplink with more than that.
    assert sum(sent["hierarchical"]) <= 0.75 * sum(sent["flat"]), sent
