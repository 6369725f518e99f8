"""The container engine (the ``docker`` CLI and its daemon), as one small boundary.

Every call goes through :func:`docker`, which turns a failure into one line naming what was attempted
and the engine's own last error line. :func:`require_engine` is the check every container command makes
first: no CLI, or a daemon that does not answer, is a :class:`PluginUnavailable` (exit 5) that says how
to get one (``make system-deps`` installs Debian's ``docker.io`` and starts ``dockerd``).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from optiserve.errors import OptiserveError, PluginUnavailable, ServingError

ENGINE = "docker"
START_HINT = (
    "as root: `make system-deps` (installs docker.io and starts dockerd), or start `dockerd` yourself"
)


def engine_problem(timeout_s: float = 20) -> str | None:
    """Why no container engine can be used here (None when ``docker info`` answers)."""
    cli = shutil.which(ENGINE)
    if cli is None:
        return "docker is not installed"
    try:
        done = subprocess.run(
            [cli, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return f"the docker daemon did not answer `docker info` in {timeout_s:.0f}s"
    if done.returncode != 0 or not done.stdout.strip():
        return f"the docker daemon does not answer ({last_line(done.stderr) or 'docker info failed'})"
    return None


def require_engine() -> None:
    problem = engine_problem()
    if problem:
        raise PluginUnavailable(f"no usable container engine: {problem}", hint=START_HINT)


def docker(
    args: Sequence[str],
    *,
    what: str,
    timeout: float = 120,
    error: type[OptiserveError] = ServingError,
    input_bytes: bytes | None = None,
) -> str:
    """Run ``docker ARGS``; stdout on success, else ``error`` with one line (what failed and why)."""
    cli = shutil.which(ENGINE)
    if cli is None:
        raise PluginUnavailable("no usable container engine: docker is not installed", hint=START_HINT)
    try:
        done = subprocess.run([cli, *args], capture_output=True, timeout=timeout, input=input_bytes)
    except subprocess.TimeoutExpired as e:
        raise error(f"{what} timed out after {timeout:.0f}s") from e
    if done.returncode != 0:
        # docker ends a refused command line with "Run 'docker run --help' ...": the reason is above it
        stderr = "\n".join(
            line
            for line in done.stderr.decode(errors="replace").splitlines()
            if "--help' for more" not in line
        )
        reason = last_line(stderr) or f"exit {done.returncode}"
        raise error(f"{what} failed: {reason}")
    return done.stdout.decode(errors="replace")


def image_exists(tag: str) -> bool:
    cli = shutil.which(ENGINE)
    if cli is None:
        return False
    done = subprocess.run([cli, "image", "inspect", tag], capture_output=True, timeout=60)
    return done.returncode == 0


def image_size_bytes(tag: str) -> int:
    return int(docker(["image", "inspect", "--format", "{{.Size}}", tag], what=f"docker image inspect {tag}"))


def last_line(text: str) -> str:
    """The engine's own summary: its last non-empty line, without docker's ``Error response ...`` prefix."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[-1]
    for prefix in ("docker: ", "Error response from daemon: ", "Error: "):
        line = line.removeprefix(prefix)
    return line[:300]
