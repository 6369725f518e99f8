"""How much open-loop load one generator process on one core can offer on schedule, in one run.

The null endpoint (``optiserve.loadtests.null_server``) runs on one CPU and the generator on another;
for each offered rate the generator runs for ``--seconds`` and this prints the achieved rate, the
fraction of sends that left more than 1 ms late, and the generator's CPU use (percent of one core).
Goal: >= 5,000 requests/s with < 1% late sends.

    python benchmarks/openloop_generator.py                       # rates 1000,2500,5000,7500
    python benchmarks/openloop_generator.py --rates 5000 --seconds 20
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

from optiserve.loadtests.stats import late_fraction, measured_window, read_samples
from optiserve.procs import free_port, spawn, stop_group

GOAL_RATE, GOAL_LATE = 5000.0, 0.01


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1000,2500,5000,7500")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--generator-cpu", type=int, default=0)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="openloop-bench.") as tmp:
        work = Path(tmp)
        port = free_port()
        log = work / "null.log"
        server = spawn(
            [sys.executable, "-m", "optiserve.loadtests.null_server", str(port)],
            log=log,
            cpus=frozenset({args.server_cpu}),
        )
        try:
            while b"ready" not in (log.read_bytes() if log.exists() else b""):
                time.sleep(0.05)
            body = b'{"inputs":[]}'
            payloads = work / "payloads.jsonl"
            payloads.write_text(
                json.dumps({"body": base64.b64encode(body).decode(), "header_length": len(body)})
            )
            print(
                f"null endpoint on CPU {args.server_cpu}, generator on CPU {args.generator_cpu}, "
                f"{args.connections} connections, {args.seconds:g} s per rate, constant spacing"
            )
            met = False
            for rate in rates:
                samples = work / f"r{rate:g}.csv"
                spec = work / f"r{rate:g}.json"
                spec.write_text(
                    json.dumps(
                        {
                            "host": "127.0.0.1",
                            "port": port,
                            "path": "/null",
                            "payloads": str(payloads),
                            "samples": str(samples),
                            "segments": [[args.seconds, rate]],
                            "arrival": "constant",
                            "users": args.connections,
                        }
                    )
                )
                gen = spawn(
                    [sys.executable, "-m", "optiserve.loadtests.openloop", "--spec", str(spec)],
                    log=work / "gen.log",
                    cpus=frozenset({args.generator_cpu}),
                )
                watcher = psutil.Process(gen.pid)
                watcher.cpu_percent(None)
                peaks = []
                while gen.poll() is None:
                    time.sleep(0.5)
                    try:
                        peaks.append(watcher.cpu_percent(None))
                    except psutil.Error:
                        break
                window = measured_window(read_samples(samples), 0.0)
                late = late_fraction(window) or 0.0
                offered = len(window.samples) / args.seconds
                ok = window.throughput >= 0.99 * rate and late < GOAL_LATE
                met = met or (ok and rate >= GOAL_RATE)
                own = json.loads(samples.with_name(samples.name + ".generator.json").read_text())
                busy = own["busy_percent"]
                print(
                    f"  target {rate:>6.0f}/s: offered {offered:>7.0f}/s, "
                    f"answered {window.throughput:>7.0f}/s, "
                    f"late > 1 ms {late:6.2%}, errors {window.n_errors}, "
                    f"generator CPU on work {busy:.0f}% (spin-waiting excluded) {'ok' if ok else 'NOT ok'}"
                )
        finally:
            stop_group(server, grace_s=2)
    print(f"goal (>= {GOAL_RATE:.0f}/s with < {GOAL_LATE:.0%} late sends): {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
