"""The base image every variant image starts from, built here from Debian's packages.

No container registry is needed (none may be reachable): ``debootstrap --variant=minbase`` lays out a
Debian root with Python, the user the chart runs as (``bentoml``, uid/gid 1034) is added, and the folder
is imported with ``docker import``. The tag carries a digest of this recipe, so the image is built once
and reused until the recipe changes. Debian's mirror is the one this machine's apt already uses.

Debian bookworm's Python is 3.11, the version optiserve's wheels and the wheelhouse are built for.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from optiserve.errors import PluginUnavailable, ServingError

from .engine import docker, image_exists, require_engine

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "ca-certificates", "libgomp1")
"""Python and a venv for the wheelhouse; CA roots; OpenMP (onnxruntime's and OpenVINO's wheels link it)."""
UID = 1034
USER = "bentoml"
PYTHON_VERSION = "3.11"
REPOSITORY = "optiserve-base"
SLIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt",
    "var/lib/apt/lists",
)
"""Folders no server needs (documentation, apt's caches), removed before import."""


def recipe() -> str:
    return f"{SUITE} minbase {','.join(PACKAGES)} uid={UID} user={USER} slim={','.join(SLIM)} v2"


def base_tag() -> str:
    """``optiserve-base:bookworm-py3.11-<digest of the recipe>``."""
    digest = hashlib.sha256(recipe().encode()).hexdigest()[:10]
    return f"{REPOSITORY}:{SUITE}-py{PYTHON_VERSION}-{digest}"


def apt_mirror(sources: Path = Path("/etc/apt")) -> str | None:
    """The Debian mirror this machine's apt uses for ``bookworm`` (None: debootstrap's default)."""
    texts = []
    for path in [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]:
        if path.is_file() and path.suffix in ("", ".list", ".sources"):
            texts.append(path.read_text(errors="replace"))
    for text in texts:
        # deb822 stanzas (``URIs:`` / ``Suites:``) and one-line ``deb URI SUITE ...`` entries
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.findall(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.findall(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites[0].split() and "security" not in uris[0]:
                return str(uris[0])
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if m.group(2) == SUITE and "security" not in m.group(1):
                return m.group(1)
    return None


def ensure_base_image(log: Path | None = None) -> tuple[str, bool]:
    """(the base image's tag, whether it was built now): built once, then found by tag."""
    require_engine()
    tag = base_tag()
    if image_exists(tag):
        return tag, False
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise PluginUnavailable(
            f"cannot build the base image {tag}: debootstrap is not installed",
            hint="as root: `make system-deps` (or apt-get install debootstrap)",
        )
    if os.geteuid() != 0:
        raise PluginUnavailable(
            f"cannot build the base image {tag}: debootstrap needs root",
            hint="run `optiserve build --containerize` once as root (the image is then reused)",
        )
    with tempfile.TemporaryDirectory(prefix="optiserve-rootfs.") as tmp:
        root = Path(tmp) / "rootfs"
        mirror = apt_mirror()
        cmd = [debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root)]
        if mirror:
            cmd.append(mirror)
        _run(cmd, what=f"debootstrap {SUITE}", log=log, timeout=1800)
        _run(
            ["chroot", str(root), "groupadd", "--gid", str(UID), USER],
            what="adding the bentoml group",
            log=log,
        )
        _run(
            [
                "chroot",
                str(root),
                "useradd",
                "--uid",
                str(UID),
                "--gid",
                str(UID),
                "--create-home",
                "--home-dir",
                f"/home/{USER}",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ],
            what="adding the bentoml user",
            log=log,
        )
        for rel in SLIM:
            shutil.rmtree(root / rel, ignore_errors=True)
            (root / rel).mkdir(parents=True, exist_ok=True)
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        try:
            docker(
                [
                    "import",
                    "--change",
                    "ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1",
                    "--change",
                    f"USER {UID}:{UID}",
                    "--change",
                    f"WORKDIR /home/{USER}",
                    "--message",
                    f"optiserve base image: {recipe()}",
                    "-",
                    tag,
                ],
                what=f"docker import {tag}",
                timeout=900,
                input_bytes=tar.stdout.read(),
            )
        finally:
            tar.wait()
    return tag, True


def _run(cmd: list[str], *, what: str, log: Path | None, timeout: float = 300) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ServingError(f"{what} timed out after {timeout:.0f}s") from e
    if log is not None:
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise ServingError(f"{what} failed: {(lines or [f'exit {done.returncode}'])[-1][:300]}")
