"""A Prometheus endpoint per rank: what each iteration computed, hid and exposed.

Off by default. With ``--metrics-port P`` every rank serves ``/metrics`` on ``P + LOCAL_RANK``
(one port per process on a node, so ranks never collide), bound to 127.0.0.1 unless
``train.metrics_addr`` says otherwise — a training job should not open a port to the world by
accident. Every series carries a ``rank`` label, so one Prometheus job scraping all ports
can compare ranks (a straggler shows up as one rank's compute time).

Each rank has its own registry rather than the process-global default one, so a library user
who already exports metrics does not get ours mixed in, and a test can run several trainers.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["IterationSample", "TrainingMetrics"]

_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class IterationSample:
    """One iteration as the trainer saw it. Times in seconds; None where not observable."""

    iteration: int
    iteration_s: float
    exposed_comm_s: float | None
    hidden_comm_s: float | None
    bytes_sent: int
    units_synced: int
    loss: float
    throughput: float  # tokens or samples per second, whole job


class TrainingMetrics:
    """Serves the metrics of one rank until ``close()``."""

    def __init__(self, port: int, addr: str, rank: int, unit: str = "samples") -> None:
        if not 0 < port <= 65535:
            raise ValueError(
                f"train.metrics_port: this rank's port {port} (PORT + LOCAL_RANK) is not a TCP port; choose "
                "PORT so that PORT + procs per node - 1 <= 65535, or 0 to turn metrics off"
            )
        self.registry = CollectorRegistry()
        labels = ["rank"]
        reg = self.registry
        self._iteration = Gauge("dreamddp_iteration", "Iterations completed", labels, registry=reg)
        self._iter_time = Histogram(
            "dreamddp_iteration_seconds", "Wall time per iteration", labels, buckets=_TIME_BUCKETS, registry=reg
        )
        self._compute = Histogram(
            "dreamddp_compute_seconds",
            "Iteration time not blocked on communication",
            labels,
            buckets=_TIME_BUCKETS,
            registry=reg,
        )
        self._exposed = Histogram(
            "dreamddp_comm_exposed_seconds",
            "Communication the iteration waited for (not hidden)",
            labels,
            buckets=_TIME_BUCKETS,
            registry=reg,
        )
        self._hidden = Histogram(
            "dreamddp_comm_hidden_seconds",
            "Communication that ran while the rank computed",
            labels,
            buckets=_TIME_BUCKETS,
            registry=reg,
        )
        self._bytes = Counter("dreamddp_sent_bytes", "Payload bytes all-reduced by this rank", labels, registry=reg)
        self._units = Gauge("dreamddp_units_synced", "Sync units averaged in the last iteration", labels, registry=reg)
        self._loss = Gauge(
            "dreamddp_loss", "Training loss of the last iteration (this rank's batch)", labels, registry=reg
        )
        self._throughput = Gauge(
            "dreamddp_throughput", f"Whole-job {unit} per second, last iteration", labels, registry=reg
        )
        self._rss = Gauge("dreamddp_rss_bytes", "Resident memory of this process", labels, registry=reg)
        self._label = str(rank)
        self._process = psutil.Process()
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as err:
            # The port is PORT + LOCAL_RANK, so the hint covers the whole range a node needs.
            raise ValueError(
                f"train.metrics_port: port {port} on {addr} cannot be opened ({err.strerror or err}); "
                "choose a port that is free on every rank (each uses PORT + LOCAL_RANK), "
                "or 0 to turn metrics off"
            ) from None
        self.port = port

    def observe(self, sample: IterationSample) -> None:
        r = self._label
        self._iteration.labels(r).set(sample.iteration + 1)
        self._iter_time.labels(r).observe(sample.iteration_s)
        exposed = sample.exposed_comm_s or 0.0
        self._compute.labels(r).observe(max(0.0, sample.iteration_s - exposed))
        if sample.exposed_comm_s is not None:
            self._exposed.labels(r).observe(sample.exposed_comm_s)
        if sample.hidden_comm_s is not None:
            self._hidden.labels(r).observe(sample.hidden_comm_s)
        self._bytes.labels(r).inc(sample.bytes_sent)
        self._units.labels(r).set(sample.units_synced)
        self._loss.labels(r).set(sample.loss)
        self._throughput.labels(r).set(sample.throughput)
        self._rss.labels(r).set(self._process.memory_info().rss)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
