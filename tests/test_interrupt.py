"""Ctrl-C or SIGTERM during `optiserve run`: exit 130, and every server and load generator is gone."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    cli_command,
    cli_env,
    describe,
    processes_mentioning,
    service_needles,
    wait_until_gone,
)

pytestmark = pytest.mark.slow


def _as_in_a_terminal() -> None:
    """A foreground command gets the default SIGINT action even when our own runner ignores SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_load_test(proc: subprocess.Popen[str], workdir: Path, timeout: float = 180) -> int:
    """Block until a server answers /readyz and Locust is driving it; return the server's port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"optiserve exited early:\n{proc.communicate()[1]}"
        for spec in (workdir / "services").glob("*/service.json"):
            port = json.loads(spec.read_text())["port"]
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ready = False
            locust = [
                p for p in processes_mentioning(f"127.0.0.1:{port}") if "locust" in " ".join(p.cmdline())
            ]
            if ready and locust:
                return int(port)
        time.sleep(0.25)
    raise AssertionError(f"no server with a load generator within {timeout}s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_everything_and_exits_130(mlp_onnx: Path, tmp_path: Path, sig: signal.Signals) -> None:
    workdir = tmp_path / "work"
    args = ["run", "--model", mlp_onnx, "--workdir", workdir, "-c", "1", "--duration", 30, "--warmup", 1]
    proc = subprocess.Popen(
        cli_command(*args),
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_in_a_terminal,
    )
    try:
        port = wait_for_load_test(proc, workdir)
        needles = service_needles(workdir, port)
        children = [p for p in processes_mentioning(*needles) if p.pid != proc.pid]
        assert len(children) >= 3, f"expected server, worker and locust:\n{describe(children)}"

        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 130, stderr
    assert "error: interrupted" in stderr
    assert "Traceback" not in stderr
    left = wait_until_gone(needles, timeout=5)
    assert not left, f"still running after optiserve exited:\n{describe(left)}"
