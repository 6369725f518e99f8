"""Locust users for optiserve. Run only as a subprocess by :mod:`optiserve.loadtests.runner`.

Inputs come from the environment, so the runner controls everything without locust CLI plumbing:
``OPTISERVE_PAYLOADS`` (Open Inference Protocol requests, one JSON line each with the base64
``body`` and its binary ``header_length``, null for a plain-JSON request; sent round-robin),
``OPTISERVE_PATH`` (the infer path) and ``OPTISERVE_SAMPLES`` (where raw samples are written).

Every request becomes one raw sample ``start_epoch_s,latency_ms,ok,error_kind`` in a CSV, written
when Locust quits (one ``<samples>.part-<pid>`` per Locust process; the runner merges them); the
runner computes all statistics from those samples, not from Locust's own.
"""

from __future__ import annotations

import base64
import csv
import itertools
import json
import os
import time

from locust import FastHttpUser, constant, constant_throughput, events, task

with open(os.environ["OPTISERVE_PAYLOADS"], "rb") as _fh:
    _records = [json.loads(line) for line in _fh.read().splitlines() if line.strip()]
PAYLOADS = [
    (
        base64.b64decode(r["body"]),
        {"content-type": "application/json"}
        if r["header_length"] is None
        else {
            "content-type": "application/octet-stream",
            "Inference-Header-Content-Length": str(r["header_length"]),
        },
    )
    for r in _records
]
PATH = os.environ["OPTISERVE_PATH"]
SAMPLES_FILE = os.environ["OPTISERVE_SAMPLES"]

_samples: list[tuple[float, float, int, str]] = []
_bodies = itertools.cycle(PAYLOADS)


@events.request.add_listener
def _record(  # type: ignore[no-untyped-def]
    request_type, name, response_time, response_length, response=None, exception=None, start_time=None, **kw
):
    start = start_time if start_time is not None else time.time() - response_time / 1000.0
    if exception is None:
        _samples.append((start, float(response_time), 1, ""))
    else:
        status = getattr(response, "status_code", 0) or 0
        kind = f"http-{status}" if status else type(exception).__name__
        _samples.append((start, float(response_time), 0, kind))


@events.quitting.add_listener
def _write(environment, **kw):  # type: ignore[no-untyped-def]
    # One part per process: with --processes N, Locust forks N workers that each hold their own samples.
    part = f"{SAMPLES_FILE}.part-{os.getpid()}"
    tmp = part + ".tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["start_s", "latency_ms", "ok", "error"])
        writer.writerows(_samples)
    os.replace(tmp, part)


class ClosedLoopUser(FastHttpUser):
    """Sends the next request as soon as the previous one returns (no think time)."""

    wait_time = constant(0)
    network_timeout = 60.0
    connection_timeout = 10.0

    @task
    def predict(self) -> None:
        body, headers = next(_bodies)
        with self.client.post(PATH, data=body, headers=headers, catch_response=True) as resp:  # type: ignore[arg-type]
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")


class PacedClosedLoopUser(ClosedLoopUser):
    """A closed loop paced to ``OPTISERVE_RATE`` requests/s per user (Locust's constant_throughput):
    the usual way load tools emulate a request rate, and the one coordinated omission fools."""

    wait_time = constant_throughput(float(os.environ.get("OPTISERVE_RATE", "1")))
