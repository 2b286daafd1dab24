"""An emulated geo-distributed cluster on one machine: network namespaces joined by shaped links.

Each site is a network namespace (``<name>-s0``, ``<name>-s1``, ...) with one interface,
``wan0``, whose peer sits on a bridge in a hub namespace (``<name>-hub``). Nothing is added
to the machine's own namespace, so the cluster cannot touch its real network, and removing
the namespaces removes every veth, bridge and qdisc with them.

Each site's egress is shaped by ``tc``: where the kernel has ``netem``, by ``netem delay D
rate R`` (a per-packet, one-way delay: a round trip pays 2D and a ring all-reduce several
D); otherwise by ``tbf`` for the rate, with the delay added per collective. Many kernels
(this project's CI among them) ship ``tbf``/``htb`` but not ``netem``; then the delay is
added in software at the collective layer instead — ``cluster run`` exports
``DREAMDDP_SOFTWARE_DELAY`` and the trainer and profiler add that latency to every
collective after its real, ``tc``-shaped transfer (``SimulatedLink`` with ``inf`` rate).
``status`` and every benchmark report say which one is in force.

Processes in one site reach each other through the site's own address, which the kernel
routes over loopback: the LAN is unshaped unless ``lan`` is given (``tbf`` on ``lo``).

The cluster's description is kept in a small JSON state file so ``run``, ``status`` and
``down`` find it; ``down`` works from the namespace names alone, so it also cleans up after
a crash that lost the state file.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamddp.emulation.link import CLUSTER_STATE_ENV, SOFTWARE_DELAY_ENV, LinkSpec
from dreamddp.ops.files import atomic_write
from dreamddp.validation import is_int, positive_int, require

__all__ = [
    "ClusterError",
    "ClusterSpec",
    "ClusterState",
    "check_environment",
    "up",
    "down",
    "load_state",
    "site_env",
    "namespaces",
    "WAN_IFACE",
    "SOFTWARE_DELAY_ENV",
]

logger = logging.getLogger(__name__)

WAN_IFACE = "wan0"
STATE_DIR_ENV = "DREAMDDP_STATE_DIR"
_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")


class ClusterError(RuntimeError):
    """A cluster operation that cannot be done, with a message that says what to do instead."""


@dataclass(frozen=True)
class ClusterSpec:
    """What ``dreamddp cluster up`` builds; validated here, before anything is created."""

    sites: int = 2
    procs_per_site: int = 1
    wan: str = "100mbit"  # each site's uplink rate (tc units)
    wan_delay: str = "20ms"  # added per collective in software, or per packet by netem
    lan: str = ""  # rate for traffic inside a site (shapes loopback); empty = unshaped
    subnet: str = "10.213.0.0/24"
    name: str = "dreamddp"
    master_port: int = 29500

    def __post_init__(self) -> None:
        positive_int("--sites", self.sites, error=ClusterError)
        positive_int("--procs-per-site", self.procs_per_site, error=ClusterError)
        _check_name(self.name)
        try:
            self.wan_link  # noqa: B018 - parse to validate
            if self.lan:
                LinkSpec.parse(self.lan)
        except ValueError as err:
            raise ClusterError(str(err)) from None
        if self.wan_link.latency_only:
            raise ClusterError(f"--wan {self.wan!r} must be a finite rate such as 100mbit")
        try:
            network = ipaddress.ip_network(self.subnet, strict=False)
        except ValueError:
            raise ClusterError(f"--subnet {self.subnet!r} is not an IPv4 network such as 10.213.0.0/24") from None
        if network.version != 4 or not network.is_private:
            raise ClusterError(f"--subnet {self.subnet!r} must be a private IPv4 network (10/8, 172.16/12, 192.168/16)")
        hosts = network.num_addresses - 2
        if self.sites > hosts:
            raise ClusterError(
                f"--sites {self.sites} does not fit --subnet {self.subnet}: it has {hosts} host addresses"
            )
        port = self.master_port
        require(is_int(port) and 1024 <= port <= 65535, "--master-port", "in 1024..65535", port, ClusterError)

    @property
    def wan_link(self) -> LinkSpec:
        return LinkSpec.parse(f"{self.wan},{self.wan_delay}")

    def site_namespace(self, site: int) -> str:
        return f"{self.name}-s{site}"

    @property
    def hub_namespace(self) -> str:
        return f"{self.name}-hub"

    def site_address(self, site: int) -> str:
        return str(ipaddress.ip_network(self.subnet, strict=False).network_address + 1 + site)


@dataclass
class ClusterState:
    """The cluster as built: its spec and how the delay is applied."""

    spec: ClusterSpec
    delay_mode: str  # "kernel netem" or "software"
    addresses: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"spec": dataclasses.asdict(self.spec), "delay_mode": self.delay_mode, "addresses": self.addresses}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ClusterState:
        return cls(ClusterSpec(**raw["spec"]), raw["delay_mode"], list(raw["addresses"]))

    @property
    def software_delay(self) -> str:
        """The delay the collectives must add themselves (empty when the kernel adds it)."""
        return self.spec.wan_delay if self.delay_mode == "software" else ""


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ClusterError(f"--name {name!r} must be 1-12 lower-case letters/digits, starting with a letter")


def _state_path(name: str) -> Path:
    return Path(os.environ.get(STATE_DIR_ENV, "/run/dreamddp")) / f"{name}.json"


def check_environment() -> None:
    """Root and iproute2 are needed; say what is missing and what to use instead."""
    fallback = "without them, use a simulated link instead: --set train.link=100mbit,20ms (dreamddp.emulation.link.SimulatedLink)"
    if os.geteuid() != 0:
        raise ClusterError(f"dreamddp cluster needs root for network namespaces and tc; {fallback}")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ClusterError(
            f"dreamddp cluster needs iproute2 ({' and '.join(missing)} not found; apt-get install -y iproute2); {fallback}"
        )
    reason = _namespace_probe()
    if reason:
        raise ClusterError(f"dreamddp cluster cannot create network namespaces here ({reason}); {fallback}")


@functools.lru_cache(maxsize=1)
def _namespace_probe() -> str:
    """Empty if a namespace can be created and removed here (a container may forbid it)."""
    probe = f"dreamddp-probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return made.stderr.strip().splitlines()[-1] if made.stderr.strip() else f"ip netns add exited {made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _tc(namespace: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", "netns", "exec", namespace, "tc", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"`tc {' '.join(args)}` in {namespace} failed: {proc.stderr.strip()}")
    return proc


def namespaces(name: str) -> list[str]:
    """This cluster's namespaces that exist now (sites and hub)."""
    proc = _ip("netns", "list", check=False)
    found = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return sorted(ns for ns in found if _owned_by(name, ns))


def _owned_by(name: str, namespace: str) -> bool:
    """Whether ``namespace`` is one of cluster ``name``'s (a site or its hub)."""
    return re.fullmatch(rf"{re.escape(name)}-(s\d+|hub)", namespace) is not None


def _tc_rate(bps: float) -> str:
    return f"{int(bps)}bit"


def _tbf_args(bps: float, mtu: int = 1500) -> list[str]:
    # Burst: room for two 64 KiB GSO super-packets. With a smaller bucket tbf segments every
    # GSO packet in software, and on a small machine that per-packet work steals the cores the
    # workers compute on (measured with benchmarks/comm_cpu_cost.py at 100 Mbit/s: a transfer
    # in flight slowed compute 1.08-1.57x with a 50 kB burst, 1.01-1.02x with 256 kB). Also
    # >= ~4 ms of traffic (tbf needs >= rate/HZ) and two MTUs. A 50 ms queue absorbs TCP
    # bursts without drops that would make the measured rate fall short.
    burst = max(2 * 65536 + 4096, 2 * mtu + 1024, int(bps / 8 * 0.004))
    return ["tbf", "rate", _tc_rate(bps), "burst", str(burst), "latency", "50ms"]


def _netem_args(link: LinkSpec) -> list[str]:
    """netem's delay and rate for ``link`` (where the kernel has netem)."""
    return ["netem", "delay", f"{link.latency_s * 1e3:g}ms", "rate", _tc_rate(link.bandwidth_bps), "limit", "100000"]


def _shape_wan(spec: ClusterSpec, namespace: str) -> str:
    """Shape a site's uplink; return the delay mode actually in force."""
    link = spec.wan_link
    if link.latency_s > 0:
        proc = _tc(namespace, "qdisc", "add", "dev", WAN_IFACE, "root", *_netem_args(link), check=False)
        if proc.returncode == 0:
            return "kernel netem"
        if "unknown" not in proc.stderr.lower():
            raise ClusterError(f"`tc qdisc add ... netem` in {namespace} failed: {proc.stderr.strip()}")
    _tc(namespace, "qdisc", "add", "dev", WAN_IFACE, "root", *_tbf_args(link.bandwidth_bps))
    return "software" if link.latency_s > 0 else "none"


def up(spec: ClusterSpec) -> ClusterState:
    """Build the cluster; on any failure remove what was built and raise ``ClusterError``."""
    check_environment()
    if _state_path(spec.name).exists() or namespaces(spec.name):
        raise ClusterError(f"cluster {spec.name!r} is already up; run `dreamddp cluster down --name {spec.name}` first")
    try:
        state = _build(spec)
    except BaseException:
        try:
            down(spec.name)
        except ClusterError as err:  # the original failure is the one to raise
            logger.warning("could not remove the half-built cluster %r: %s", spec.name, err)
        raise
    path = _state_path(spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, fsync=False) as f:
        json.dump(state.to_dict(), f, indent=2)
    return state


def _build(spec: ClusterSpec) -> ClusterState:
    hub = spec.hub_namespace
    prefix = ipaddress.ip_network(spec.subnet, strict=False).prefixlen
    _ip("netns", "add", hub)
    _ip("-n", hub, "link", "add", "br0", "type", "bridge")
    _ip("-n", hub, "link", "set", "br0", "up")
    modes, addresses = set(), []
    for site in range(spec.sites):
        ns, port = spec.site_namespace(site), f"s{site}"
        address = spec.site_address(site)
        _ip("netns", "add", ns)
        _ip("-n", hub, "link", "add", port, "type", "veth", "peer", "name", WAN_IFACE, "netns", ns)
        _ip("-n", hub, "link", "set", port, "master", "br0")
        _ip("-n", hub, "link", "set", port, "up")
        _ip("-n", ns, "addr", "add", f"{address}/{prefix}", "dev", WAN_IFACE)
        _ip("-n", ns, "link", "set", WAN_IFACE, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        modes.add(_shape_wan(spec, ns))
        if spec.lan:
            _tc(ns, "qdisc", "add", "dev", "lo", "root", *_tbf_args(LinkSpec.parse(spec.lan).bandwidth_bps, mtu=65536))
        addresses.append(address)
    _write_hosts_files(spec, addresses)
    mode = modes.pop() if len(modes) == 1 else "software"
    return ClusterState(spec, mode, addresses)


def _write_hosts_files(spec: ClusterSpec, addresses: list[str]) -> None:
    """``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts over ``/etc/hosts``.

    With the sites named there, reverse lookups of peer addresses (c10d does them) answer
    at once instead of failing after a DNS timeout with a warning per connection.
    """
    lines = ["127.0.0.1 localhost"]
    for i, address in enumerate(addresses):  # c10d looks peers up by their IPv4-mapped IPv6 form too
        lines += [f"{address} {spec.site_namespace(i)}", f"::ffff:{address} {spec.site_namespace(i)}"]
    for site in range(spec.sites):
        folder = Path("/etc/netns") / spec.site_namespace(site)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text("\n".join(lines) + "\n")


def _remove_hosts_files(name: str) -> None:
    root = Path("/etc/netns")
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if _owned_by(name, folder.name):
            shutil.rmtree(folder, ignore_errors=True)


def down(name: str = "dreamddp") -> list[str]:
    """Remove the cluster's namespaces (and with them every veth, bridge and qdisc). Idempotent."""
    _check_name(name)
    check_environment()
    removed = namespaces(name)
    for ns in removed:
        kill_namespace_processes(ns)
        _ip("netns", "del", ns, check=False)
    left = namespaces(name)
    if left:
        raise ClusterError(f"could not remove namespace {left[0]} (`ip netns del {left[0]}` failed); remove it by hand")
    _remove_hosts_files(name)
    _state_path(name).unlink(missing_ok=True)
    return removed


def kill_namespace_processes(namespace: str) -> None:
    """Processes left in a namespace would keep its interfaces alive after ``netns del``."""
    proc = _ip("netns", "pids", namespace, check=False)
    for pid in proc.stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def shape(name: str, wan: str, wan_delay: str | None = None) -> tuple[ClusterState, str]:
    """Change a running cluster's uplinks to ``wan`` (and ``wan_delay``); return the new state and
    a note on the delay when it cannot reach jobs already running (software delay mode).

    The rate changes in the kernel at once (``tc qdisc change``), under running jobs too: this is
    how a test or a benchmark makes the WAN degrade in the middle of a training run.
    """
    state = load_state(name)
    old = state.spec
    spec = dataclasses.replace(old, wan=wan, wan_delay=old.wan_delay if wan_delay is None else wan_delay)

    def qdisc(link: LinkSpec) -> list[str]:
        return _netem_args(link) if state.delay_mode == "kernel netem" else _tbf_args(link.bandwidth_bps)

    changed: list[str] = []
    for site in range(spec.sites):
        ns = spec.site_namespace(site)
        proc = _tc(ns, "qdisc", "change", "dev", WAN_IFACE, "root", *qdisc(spec.wan_link), check=False)
        if proc.returncode != 0:
            for done in changed:  # all sites or none: a half-shaped cluster would measure nonsense
                _tc(done, "qdisc", "change", "dev", WAN_IFACE, "root", *qdisc(old.wan_link), check=False)
            raise ClusterError(f"`tc qdisc change` in {ns} failed: {proc.stderr.strip()}")
        changed.append(ns)
    link = spec.wan_link
    note = ""
    mode = state.delay_mode
    if state.delay_mode != "kernel netem":
        mode = "software" if link.latency_s > 0 else "none"
        if spec.wan_delay != old.wan_delay:
            note = (
                f"the delay is added in software by each job: {spec.wan_delay} applies to commands started from now on, "
                f"jobs already running keep {old.wan_delay or '0ms'}"
            )
    new_state = ClusterState(spec, mode, state.addresses)
    with atomic_write(_state_path(name), fsync=False) as f:
        json.dump(new_state.to_dict(), f, indent=2)
    return new_state, note


def load_state(name: str = "dreamddp") -> ClusterState:
    """The state of a cluster that is up, or a ``ClusterError`` saying to bring it up."""
    path = _state_path(name)
    if not path.exists():
        raise ClusterError(f"no cluster {name!r} is up; run `dreamddp cluster up --name {name}` first")
    state = ClusterState.from_dict(json.loads(path.read_text()))
    missing = [
        state.spec.site_namespace(i)
        for i in range(state.spec.sites)
        if state.spec.site_namespace(i) not in namespaces(name)
    ]
    if missing:
        raise ClusterError(
            f"cluster {name!r} is broken (namespace {missing[0]} is gone); run `dreamddp cluster down --name {name}` and up again"
        )
    return state


def site_env(state: ClusterState, site: int) -> dict[str, str]:
    """Environment for a command on ``site``: torchrun's multi-node variables and the interface."""
    spec = state.spec
    env = {
        "MASTER_ADDR": state.addresses[0],
        "MASTER_PORT": str(spec.master_port),
        "NNODES": str(spec.sites),
        "NODE_RANK": str(site),
        "NPROC_PER_NODE": str(spec.procs_per_site),
        # torchrun reads PET_<OPTION> for every option left off its command line.
        "PET_NNODES": str(spec.sites),
        "PET_NODE_RANK": str(site),
        "PET_NPROC_PER_NODE": str(spec.procs_per_site),
        "PET_MASTER_ADDR": state.addresses[0],
        "PET_MASTER_PORT": str(spec.master_port),
        "GLOO_SOCKET_IFNAME": WAN_IFACE,
        "NCCL_SOCKET_IFNAME": WAN_IFACE,
        # NCCL treats ranks with one host id as one machine (shared memory, P2P), which would
        # bypass the shaped link; each site is its own host.
        "NCCL_HOSTID": spec.site_namespace(site),
        "DREAMDDP_CLUSTER": spec.name,
        "DREAMDDP_SITE": str(site),
    }
    if state.software_delay:
        env[SOFTWARE_DELAY_ENV] = state.software_delay
        # The rate tc shapes to (rewritten by `cluster shape`): lets the delay tell transfer from peer wait.
        env[CLUSTER_STATE_ENV] = str(_state_path(spec.name).resolve())
    return env


def uplink_bytes(state: ClusterState) -> list[tuple[int, int]]:
    """(sent, received) bytes of every site's uplink since ``up``, from the kernel's own counters.

    Read from the interface (``ip -s link``), not from any accounting of ours: what really
    crossed the WAN, headers and retransmissions included, and traffic a site's ranks exchange
    among themselves (routed through the namespace's loopback) excluded.
    """
    out = []
    for site in range(state.spec.sites):
        ns = state.spec.site_namespace(site)
        proc = _ip("-n", ns, "-j", "-s", "link", "show", "dev", WAN_IFACE)
        try:
            stats = json.loads(proc.stdout)[0]["stats64"]
            out.append((int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])))
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise ClusterError(f"cannot read {ns}'s {WAN_IFACE} counters from `ip -s link` ({err})") from None
    return out


def qdiscs(state: ClusterState) -> dict[str, str]:
    """``tc qdisc show`` of every site's uplink, for ``status``."""
    out = {}
    for site in range(state.spec.sites):
        ns = state.spec.site_namespace(site)
        out[ns] = _tc(ns, "qdisc", "show", "dev", WAN_IFACE, check=False).stdout.strip()
    return out
