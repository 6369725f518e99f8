"""Server-side measurements: what a served variant measured itself, over the client's measured window.

Three sources give the same figures (:func:`server_side_stats` → :class:`ServerSideStats`):

- :class:`PrometheusServer`: a ``prometheus`` that optiserve starts for the run (1 s scrapes, one target
  per server, added as servers start), queried with PromQL;
- :class:`ExternalPrometheus`: a Prometheus the user runs (``--prometheus-url``, the Kubernetes path),
  which must already scrape the services (the Helm chart's ServiceMonitor);
- :class:`ScrapeSource`: no ``prometheus`` on PATH: optiserve reads each service's ``/metrics`` itself,
  once a second, and computes the same figures in Python.

One window semantic for all three: a cumulative series (a counter, a histogram's buckets, sum and
count) is read at ``start`` and at ``end`` by linear interpolation between the scrapes either side of
each edge, per series, then summed over replicas and the metrics' other labels; the figures are the
growth between the two. Not PromQL's ``increase()``: it extrapolates the growth it sees to the
window's edges, so a count over a window whose load is idle at the edges reads high (300 requests
over a 5 s window read as 371 in our test). Interpolation is exact when the load is idle for a scrape
interval on both sides of each edge, and under steady load it errs only by the rate's variation
within one scrape interval (the last sample before each edge alone would err by up to an interval's
worth of requests). Where the load stops at ``end`` (a load level), ``idle_after`` reads that edge
from the scrape after it, exactly. Quantiles are Prometheus's ``histogram_quantile`` (linear inside
the bucket) on the bucket growths, computed here.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from optiserve import metrics as contract
from optiserve.errors import LoadTestError
from optiserve.procs import free_port, spawn, stop_group, tail
from optiserve.types import BenchResult, Endpoint, ServerSideStats

LOG = logging.getLogger(__name__)
JOB = "optiserve"
MIB = 1024 * 1024
SourceKind = Literal["prometheus", "scrape"]
WINDOW_SERIES: tuple[str, ...] = tuple(
    name
    for metric in (contract.REQUESTS, contract.REQUEST_DURATION, contract.QUEUE_WAIT, contract.BATCH_SIZE)
    for name in contract.counter_series(metric)
) + contract.counter_series(contract.PROCESS_CPU)
"""The cumulative series a window's figures are computed from."""
Key = tuple[str, str]
"""(sample name, ``le`` or "")."""
Snapshot = dict[Key, float]
"""Key → value, summed over the series of one variant (protocols, codes, replicas)."""


class MeasurementSource:
    """What :func:`server_side_stats` reads from; a context manager that stops what it started."""

    kind: SourceKind = "prometheus"
    description: str = ""

    def add_target(self, endpoint: Endpoint) -> None:
        """Start measuring a server that just started (before any load is sent to it)."""

    def stop(self) -> None:
        """Stop whatever this source started; idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _host_port(endpoint: Endpoint) -> str:
    return urlsplit(endpoint.url).netloc


def _duration(seconds: float) -> str:
    """A Prometheus duration (whole milliseconds: ``1000ms``; PromQL takes no fractional seconds)."""
    return f"{max(1, round(seconds * 1000))}ms"


# --- PromQL sources ----------------------------------------------------------------------------------------


class PromQLSource(MeasurementSource):
    """Instant queries against a Prometheus HTTP API at ``url``."""

    kind: SourceKind = "prometheus"
    scrape_wait_s: float = 60.0
    """How long :meth:`wait_for_scrape` waits for a sample after a window's end."""
    edge_span_s: float = 120.0
    """How far either side of a window's edge :meth:`at` looks for the scrapes around it."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET an ``/api/v1`` path and return its ``data``; any failure is a one-line LoadTestError."""
        import httpx

        try:
            response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=15.0)
        except httpx.HTTPError as e:
            raise LoadTestError(f"Prometheus at {self.url} did not answer: {e}") from e
        try:
            doc = response.json()
        except ValueError:
            doc = {}
        if response.status_code != 200 or doc.get("status") != "success":
            why = doc.get("error") or response.text[:200].replace("\n", " ")
            raise LoadTestError(
                f"Prometheus at {self.url} refused /api/v1/{path} ({response.status_code}): {why}"
            )
        return doc.get("data")

    def query(self, promql: str, at: float) -> float | None:
        """The value of an instant query at ``at`` (epoch seconds); an empty result or NaN gives None."""
        data = self._api("query", {"query": promql, "time": f"{at:.3f}"})
        if data["resultType"] == "scalar":
            values = [data["result"]]
        else:
            values = [item["value"] for item in data["result"]]
        if not values:
            return None
        if len(values) > 1:
            raise LoadTestError(f"PromQL {promql!r} gave {len(values)} series; expected one")
        value = float(values[0][1])
        return value if math.isfinite(value) else None

    def scrape_probe(self, endpoint: Endpoint) -> str:
        """PromQL for when ``endpoint`` was last scraped: the latest sample of its variant's readiness
        (``min``: of the replica scraped longest ago, so every replica's window is complete)."""
        labels = contract.identity(endpoint.service)
        return f"min(timestamp({contract.READY.series}{contract.selector(**labels)}))"

    def wait_for_scrape(self, endpoint: Endpoint, after: float) -> None:
        """Wait until ``endpoint`` was scraped after ``after``, so that its last sample at or before
        ``after`` is final; go on (with a warning) after ``scrape_wait_s``."""
        probe = self.scrape_probe(endpoint)
        deadline = time.monotonic() + self.scrape_wait_s
        while time.monotonic() < deadline:
            latest = self.query(probe, time.time())
            if latest is not None and latest > after:
                return
            time.sleep(0.2)
        LOG.warning("no scrape of %s after the window's end within %.0fs", endpoint.url, self.scrape_wait_s)

    def at(self, endpoint: Endpoint, when: float, *, idle_after: bool = False) -> Snapshot:
        """The variant's cumulative series at ``when``, interpolated between the scrapes around it:
        raw samples through a PromQL range selector, read per series (:func:`value_at`), summed per
        (name, le)."""
        selector = contract.series_selector(WINDOW_SERIES, contract.identity(endpoint.service))
        span = self.edge_span_s
        data = self._api(
            "query", {"query": f"{selector}[{_duration(2 * span)}]", "time": f"{when + span:.3f}"}
        )
        out: dict[Key, float] = collections.defaultdict(float)
        for item in data["result"]:
            key = (item["metric"]["__name__"], item["metric"].get("le", ""))
            out[key] += value_at(
                [(float(t), float(v)) for t, v in item["values"]], when, idle_after=idle_after
            )
        return dict(out)

    def peak_memory(self, endpoint: Endpoint, start: float, end: float) -> float | None:
        """Bytes: the highest resident memory scraped in the window, summed over replicas."""
        selector = (
            f"{contract.PROCESS_MEMORY.series}{contract.selector(**contract.identity(endpoint.service))}"
        )
        return self.query(f"sum(max_over_time({selector}[{_duration(end - start)}]))", end)

    def has_samples(self, endpoint: Endpoint, at: float) -> bool:
        labels = contract.identity(endpoint.service)
        found = self.query(
            f"count(last_over_time({contract.READY.series}{contract.selector(**labels)}[5m]))", at
        )
        return bool(found)


class ExternalPrometheus(PromQLSource):
    """A Prometheus the user runs (``--prometheus-url``); it must scrape the services itself."""

    def __init__(self, url: str, *, scrape_wait_s: float = 60.0) -> None:
        super().__init__(url)
        self.scrape_wait_s = scrape_wait_s
        self.description = f"Prometheus at {self.url}"
        self._api("status/buildinfo")  # reachable and a Prometheus, or a clear error now


class PrometheusServer(PromQLSource):
    """A ``prometheus`` process started for one run: storage, config and log under ``run_dir``.

    Servers start one after another during a run, so targets are added as they come: the config is
    rewritten and reloaded through ``/-/reload`` (``--web.enable-lifecycle``).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        scrape_interval_s: float = 1.0,
        binary: str = "prometheus",
        port: int | None = None,
        ready_timeout_s: float = 30.0,
        target_timeout_s: float = 30.0,
        cpus: frozenset[int] | None = None,
    ) -> None:
        self.run_dir = run_dir.resolve()  # prometheus runs in this folder: no relative paths
        self.cpus = cpus
        self.scrape_interval_s = scrape_interval_s
        self.binary = binary
        self.port = port or free_port()
        self.ready_timeout_s = ready_timeout_s
        self.target_timeout_s = target_timeout_s
        self.scrape_wait_s = 3 * scrape_interval_s + 5.0
        self.edge_span_s = 5 * scrape_interval_s + 5.0
        self.config_path = self.run_dir / "prometheus.yml"
        self.log = self.run_dir / "prometheus.log"
        self.targets: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = ""
        self.description = f"Prometheus (not started) on :{self.port}"
        super().__init__(f"http://127.0.0.1:{self.port}")

    def __enter__(self) -> Self:
        return self.start()

    def start(self) -> Self:
        if self.proc is not None:
            return self
        self._write_config()
        self.log.unlink(missing_ok=True)
        cmd = [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.run_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
        ]
        try:
            self.proc = spawn(cmd, log=self.log, cwd=self.run_dir, cpus=self.cpus)
        except OSError as e:
            raise LoadTestError(f"could not run {self.binary}: {e}") from e
        try:
            self._wait_ready()
            self.version = str(self._api("status/buildinfo").get("version", ""))
            major_minor = ".".join(self.version.split(".")[:2]) or "(unknown version)"
            self.description = f"Prometheus {major_minor} started by optiserve on :{self.port}"
        except BaseException:
            self.stop()
            raise
        return self

    def _write_config(self) -> None:
        import yaml

        from optiserve.fsutil import atomic_write_text

        interval = _duration(self.scrape_interval_s)
        job: dict[str, Any] = {"job_name": JOB, "metrics_path": "/metrics"}
        if self.targets:
            job["static_configs"] = [{"targets": list(self.targets)}]
        config = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "scrape_configs": [job],
        }
        atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    def _wait_ready(self) -> None:
        import httpx

        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise LoadTestError(
                    f"prometheus exited during start-up (exit {code}): {_log_reason(self.log)} "
                    f"(log: {self.log})"
                )
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise LoadTestError(
            f"prometheus not ready on :{self.port} after {self.ready_timeout_s:.0f}s: "
            f"{_log_reason(self.log)} (log: {self.log})"
        )

    def add_target(self, endpoint: Endpoint) -> None:
        """Scrape ``endpoint`` from now on; returns once its first scrape succeeded."""
        import httpx

        target = _host_port(endpoint)
        if target not in self.targets:
            self.targets.append(target)
            self._write_config()
            try:
                response = httpx.post(f"{self.url}/-/reload", timeout=15.0)
            except httpx.HTTPError as e:
                raise LoadTestError(f"prometheus on :{self.port} did not reload its config: {e}") from e
            if response.status_code != 200:
                why = response.text.strip().replace("\n", " ")[:300]
                raise LoadTestError(f"prometheus on :{self.port} refused its new config: {why}")
        self._wait_up(target)

    def _wait_up(self, target: str) -> None:
        deadline = time.monotonic() + self.target_timeout_s
        last_error = "not scraped yet"
        while time.monotonic() < deadline:
            for t in self._api("targets", {"state": "active"})["activeTargets"]:
                if t.get("scrapePool") == JOB and t["labels"].get("instance") == target:
                    if t.get("health") == "up":
                        return
                    last_error = t.get("lastError") or last_error
            time.sleep(0.1)
        raise LoadTestError(
            f"prometheus on :{self.port} could not scrape http://{target}/metrics "
            f"within {self.target_timeout_s:.0f}s: {last_error}"
        )

    def scrape_probe(self, endpoint: Endpoint) -> str:
        """Our own scrape job: ``up`` is written at every scrape attempt, failed ones included."""
        return f"max(timestamp(up{contract.selector(job=JOB, instance=_host_port(endpoint))}))"

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace_s=10.0)
            self.proc = None


def _log_reason(log: Path) -> str:
    """The last error Prometheus logged, as ``msg: err`` on one line (logfmt), else its last line."""
    lines = [line for line in tail(log, 40).splitlines() if line.strip()]
    if not lines:
        return "it logged nothing"
    errors = [line for line in lines if "level=error" in line] or lines
    line = errors[-1]
    fields = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line))
    reason = ": ".join(fields[k] for k in ("msg", "err") if fields.get(k)) or line
    return " ".join(reason.replace('\\"', '"').split())[:400]


# --- the scrape fallback --------------------------------------------------------------------------------


class ScrapeSource(MeasurementSource):
    """No Prometheus: a thread reads each target's ``/metrics`` every ``interval_s`` and keeps the
    last ``history_s`` of timestamped snapshots, reduced to the variant's figures we compute from."""

    kind: SourceKind = "scrape"
    description = "no prometheus on PATH: /metrics scraped directly"

    def __init__(
        self, endpoint: Endpoint | None = None, *, interval_s: float = 1.0, history_s: float = 900.0
    ) -> None:
        self.interval_s = interval_s
        self._history = max(2, math.ceil(history_s / interval_s))
        self._snapshots: dict[str, collections.deque[tuple[float, Snapshot]]] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        if endpoint is not None:
            self.add_target(endpoint)

    def add_target(self, endpoint: Endpoint) -> None:
        """Scrape ``endpoint`` from now on; returns once its first scrape succeeded."""
        with self._lock:
            self._endpoints[endpoint.url] = endpoint
            self._snapshots.setdefault(endpoint.url, collections.deque(maxlen=self._history))
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="optiserve-scrape", daemon=True)
            self._thread.start()
        deadline = time.monotonic() + 30.0
        while not self.snapshots(endpoint):
            if time.monotonic() > deadline:
                raise LoadTestError(f"could not read {endpoint.url}/metrics within 30s")
            time.sleep(0.05)

    def _loop(self) -> None:
        import httpx

        with httpx.Client(timeout=max(1.0, self.interval_s)) as client:
            while not self._stopped.is_set():
                began = time.monotonic()
                with self._lock:
                    endpoints = list(self._endpoints.values())
                for endpoint in endpoints:
                    self._scrape(client, endpoint)
                self._stopped.wait(max(0.0, self.interval_s - (time.monotonic() - began)))

    def _scrape(self, client: Any, endpoint: Endpoint) -> None:
        import httpx

        stamp = time.time()  # like Prometheus: the time the scrape began
        try:
            response = client.get(f"{endpoint.url}/metrics")
            response.raise_for_status()
        except httpx.HTTPError as e:
            LOG.debug("scrape of %s failed: %s", endpoint.url, e)
            return
        try:
            snapshot = parse_snapshot(response.text, contract.identity(endpoint.service))
        except ValueError as e:  # a malformed exposition: skip this reading, keep the thread alive
            LOG.warning("unreadable /metrics from %s: %s", endpoint.url, e)
            return
        with self._lock:
            self._snapshots[endpoint.url].append((stamp, snapshot))

    def snapshots(self, endpoint: Endpoint) -> list[tuple[float, Snapshot]]:
        with self._lock:
            return list(self._snapshots.get(endpoint.url, ()))

    def wait_for_scrape(self, endpoint: Endpoint, after: float) -> None:
        if endpoint.url not in self._endpoints:
            raise LoadTestError(f"{endpoint.url} is not measured (add_target it when its server starts)")
        deadline = time.monotonic() + 3 * self.interval_s + 5.0
        while time.monotonic() < deadline:
            taken = self.snapshots(endpoint)
            if taken and taken[-1][0] > after:
                return
            time.sleep(0.05)
        LOG.warning("no scrape of %s after the window's end", endpoint.url)

    def at(self, endpoint: Endpoint, when: float, *, idle_after: bool = False) -> Snapshot:
        """The variant's series at ``when``, from the snapshots either side of it (:func:`value_at`)."""
        taken = self.snapshots(endpoint)
        before = [(t, snap) for t, snap in taken if t <= when][-1:]
        after = [(t, snap) for t, snap in taken if t > when][:1]
        keys = {key for _, snap in before + after for key in snap}
        return {
            key: value_at(
                [(t, snap.get(key, 0.0)) for t, snap in before + after], when, idle_after=idle_after
            )
            for key in keys
        }

    def peak_memory(self, endpoint: Endpoint, start: float, end: float) -> float | None:
        """Bytes: the highest resident memory read in the window, else the last reading before it ends."""
        key = (contract.PROCESS_MEMORY.series, "")
        readings = [(t, snap[key]) for t, snap in self.snapshots(endpoint) if t <= end and key in snap]
        inside = [value for t, value in readings if t >= start]
        if inside:
            return max(inside)
        return readings[-1][1] if readings else None

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None


def parse_snapshot(text: str, identity: Mapping[str, str]) -> Snapshot:
    """The samples of one variant in a /metrics text, summed per (name, ``le``) over the other labels."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Snapshot = collections.defaultdict(float)
    wanted = identity.items()
    kept = {*WINDOW_SERIES, contract.PROCESS_MEMORY.series}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("optiserve_"):
            continue
        for sample in family.samples:
            if sample.name in kept and wanted <= sample.labels.items():
                out[(sample.name, sample.labels.get("le", ""))] += sample.value
    return dict(out)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile`` on cumulative ``(upper bound, count)`` pairs; None for NaN.

    Same rules as Prometheus 2.x: rank = q × total; the first bucket whose count reaches the rank; linear
    interpolation from the previous bound (0 for the first bucket); the +Inf bucket answers the highest
    finite bound; counts are made monotonic first.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    merged: dict[float, float] = collections.defaultdict(float)
    for bound, count in buckets:
        merged[bound] += count
    ordered = sorted(merged.items())
    if len(ordered) < 2 or ordered[-1][0] != math.inf:
        return None
    monotonic: list[tuple[float, float]] = []
    highest = -math.inf
    for bound, count in ordered:
        highest = max(highest, count)
        monotonic.append((bound, highest))
    total = monotonic[-1][1]
    if total == 0:
        return None
    rank = q * total
    b = next((i for i, (_, c) in enumerate(monotonic[:-1]) if c >= rank), len(monotonic) - 1)
    if b == len(monotonic) - 1:
        return monotonic[-2][0]
    if b == 0 and monotonic[0][0] <= 0:
        return monotonic[0][0]
    low, (high, count) = 0.0, monotonic[b]
    if b > 0:
        low = monotonic[b - 1][0]
        count -= monotonic[b - 1][1]
        rank -= monotonic[b - 1][1]
    if count == 0:
        return None
    return low + (high - low) * (rank / count)


# --- the figures -----------------------------------------------------------------------------------------


def value_at(points: Sequence[tuple[float, float]], when: float, *, idle_after: bool = False) -> float:
    """A cumulative series at ``when`` from its (time, value) samples: linear between the last sample at
    or before it and the first after it (with ``idle_after``, nothing happened after ``when``: the first
    sample after it); the last one when none follows; 0 when none precedes (the series was created
    later). A drop (a restart) keeps the earlier value."""
    before = [p for p in points if p[0] <= when]
    after = [p for p in points if p[0] > when]
    t0, v0 = max(before) if before else (when, 0.0)
    if not after:
        return v0
    t1, v1 = min(after)
    if v1 <= v0:
        return v0
    return v1 if idle_after else v0 + (v1 - v0) * (when - t0) / (t1 - t0)


def server_side_stats(
    source: MeasurementSource, endpoint: Endpoint, start: float, end: float, *, idle_after: bool = False
) -> ServerSideStats:
    """What ``endpoint``'s variant measured over ``[start, end]`` (epoch seconds): requests answered,
    p50/p99 latency and queue-wait p50 (ms), mean batch size, CPU percent (of one core) and peak
    resident memory (MiB). Waits for one scrape after ``end`` first, so both edges can be interpolated.

    ``idle_after``: the server got no load between ``end`` and that scrape (a load level ends at its last
    answer and the next one starts after this call), so the scrape after ``end`` is its exact value;
    interpolating there would count the idle part of the interval as if the load went on (up to a
    quarter of an interval's requests low)."""
    if end <= start:
        raise LoadTestError(f"empty measurement window: start {start:.3f} is not before end {end:.3f}")
    if not isinstance(source, PromQLSource | ScrapeSource):
        raise TypeError(f"unknown measurement source {type(source).__name__}")
    source.wait_for_scrape(endpoint, end)
    if isinstance(source, PromQLSource) and not source.has_samples(endpoint, end):
        raise LoadTestError(
            f"Prometheus at {source.url} has no samples of {endpoint.service.variant.id} "
            f"(is it scraping {endpoint.url}/metrics?)"
        )
    before, after = source.at(endpoint, start), source.at(endpoint, end, idle_after=idle_after)
    if not after:
        raise LoadTestError(f"no metrics of {endpoint.service.variant.id} read at or before the window's end")
    memory = source.peak_memory(endpoint, start, end)
    return _figures(source.kind, before, after, end - start, memory)


def _figures(
    kind: SourceKind, before: Snapshot, after: Snapshot, seconds: float, memory_bytes: float | None
) -> ServerSideStats:
    def growth(name: str, le: str = "") -> float:
        return max(0.0, after.get((name, le), 0.0) - before.get((name, le), 0.0))

    def quantile_ms(metric: contract.MetricDef, q: float) -> float | None:
        bucket = f"{metric.name}_bucket"
        bounds = {le for name, le in after if name == bucket}
        found = histogram_quantile(q, [(float(le), growth(bucket, le)) for le in bounds])
        return None if found is None else found * 1000.0

    batches = growth(f"{contract.BATCH_SIZE.name}_count")
    return ServerSideStats(
        source=kind,
        requests=growth(contract.REQUESTS.series),
        p50_ms=quantile_ms(contract.REQUEST_DURATION, 0.5),
        p99_ms=quantile_ms(contract.REQUEST_DURATION, 0.99),
        mean_batch_size=growth(f"{contract.BATCH_SIZE.name}_sum") / batches if batches else None,
        queue_wait_p50_ms=quantile_ms(contract.QUEUE_WAIT, 0.5),
        cpu_percent=growth(contract.PROCESS_CPU.series) / seconds * 100.0,
        memory_mib=None if memory_bytes is None else memory_bytes / MIB,
    )


# --- choosing one -----------------------------------------------------------------------------------------


def measurement_source(
    prometheus_url: str | None,
    run_dir: Path,
    *,
    cpus: frozenset[int] | None = None,
    which: Callable[[str], str | None] = shutil.which,
) -> MeasurementSource:
    """The source for a run: the user's Prometheus when a URL is given, else a ``prometheus`` started
    here (storage and log under ``run_dir/prometheus``, on ``cpus`` when given: the load generator's,
    so it never takes the server's CPU) when one is on PATH, else direct /metrics scrapes.
    Its ``description`` is the one line the report shows."""
    if prometheus_url:
        return ExternalPrometheus(prometheus_url)
    binary = which("prometheus")
    if binary:
        return PrometheusServer(run_dir / "prometheus", binary=binary, cpus=cpus).start()
    return ScrapeSource()


def result_window(result: BenchResult) -> tuple[float, float]:
    """A load level's measured window in epoch seconds, as :func:`optiserve.loadtests.stats.measured_window`
    defines it: from ``warmup_s`` after the first request for ``measured_s``."""
    from optiserve.loadtests.stats import read_samples

    first = float(read_samples(Path(result.samples_path)).start_s.min())
    start = first + result.load.warmup_s
    return start, start + result.measured_s
