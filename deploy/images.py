"""One OCI image per variant × runtime, from its Bento, on the locally built base image.

Dependencies come in hermetically, the way this machine reaches them: pip (with the machine's own pip
configuration: index, extra indexes, find-links, constraints) builds a wheelhouse of the Bento's pinned
requirements on the host, cached by a digest of the requirements; the image installs from it with
``--no-index`` into ``/opt/venv`` in a build stage, and only the venv is copied into the final image,
so the wheels never weigh on it. An ONNX Runtime image holds no torch: the requirements are the
runtime's and the model's own (:func:`optiserve.deploy.bento.pinned_requirements`).

The image is laid out as BentoML's own: the Bento at ``/home/bentoml/bento``, run as ``bentoml`` (uid
1034) with ``bentoml serve /home/bentoml/bento``, the port from ``BENTOML_PORT`` (3000), so the chart
serves it as it would serve ``bentoml containerize``'s output.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from optiserve.errors import ServingError

from .base_image import UID, ensure_base_image
from .bento import BuiltBento
from .engine import docker, image_size_bytes, require_engine

BENTO_DIR = "/home/bentoml/bento"
PORT = 3000
SPEC_IN_IMAGE = f"{BENTO_DIR}/src/model/service.json"


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    size_bytes: int
    build_s: float
    base: str
    base_built: bool


def cache_root() -> Path:
    return Path(os.environ.get("OPTISERVE_CACHE") or Path.home() / ".cache" / "optiserve")


def image_tag(bento: BuiltBento) -> str:
    """The Bento tag, unchanged: ``<variant id>:<runtime>``."""
    return bento.tag


def wheelhouse(requirements: tuple[str, ...], log: Path | None = None) -> Path:
    """Wheels for ``requirements`` and everything they pull in, built once per requirement set."""
    digest = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:16]
    house = cache_root() / "wheelhouse" / digest
    done_marker = house / ".complete"
    if done_marker.is_file():
        return house
    tmp = house.with_name(f".{digest}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "requirements.txt").write_text("\n".join(requirements) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-q",
        "-w",
        str(tmp),
        "-r",
        str(tmp / "requirements.txt"),
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ServingError("building the wheelhouse timed out after 1800s") from e
    if log is not None:
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n{result.stdout}{result.stderr}\n")
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        errors = [
            ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")
        ] or result.stderr.splitlines()
        raise ServingError(f"pip could not build the wheelhouse: {(errors or ['?'])[-1][:300]}")
    (tmp / ".complete").write_text(" ".join(requirements) + "\n")
    shutil.rmtree(house, ignore_errors=True)
    os.replace(tmp, house)
    return house


def dockerfile(base: str, labels: dict[str, str]) -> str:
    label_lines = " \\\n      ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"""\
# Written by optiserve (optiserve.deploy.images): the Bento on optiserve's Debian base image.
FROM {base} AS deps
USER root
COPY wheels/ /wheels/
RUN python3 -m venv /opt/venv \\
 && /opt/venv/bin/pip install --no-index --no-cache-dir --disable-pip-version-check \\
      --find-links /wheels -r /wheels/requirements.txt /wheels/optiserve/*.whl \\
 && (/opt/venv/bin/pip uninstall -y -q pip setuptools wheel 2>/dev/null || true)

FROM {base}
COPY --from=deps /opt/venv /opt/venv
COPY bento/ {BENTO_DIR}/
ENV PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    VIRTUAL_ENV=/opt/venv \\
    BENTO_PATH={BENTO_DIR} \\
    BENTOML_HOME=/home/bentoml/bentoml \\
    BENTOML_PORT={PORT} \\
    BENTOML_DO_NOT_TRACK=true \\
    OPTISERVE_SERVICE_SPEC={SPEC_IN_IMAGE} \\
    PYTHONDONTWRITEBYTECODE=1
LABEL {label_lines}
# A build that cannot import the server fails here, not when the container starts.
RUN python -c "import bentoml, optiserve.services.service"
WORKDIR {BENTO_DIR}
USER {UID}:{UID}
EXPOSE {PORT}
ENTRYPOINT ["python", "-m", "bentoml", "serve", "{BENTO_DIR}"]
"""


def build_image(bento: BuiltBento, wheel: Path, log: Path | None = None) -> BuiltImage:
    """``docker build`` of one Bento; the same tag is replaced. Raises with one line on failure."""
    require_engine()
    started = time.monotonic()
    base, base_built = ensure_base_image(log)
    house = wheelhouse(bento.requirements, log)
    tag = image_tag(bento)
    labels = {
        "org.opencontainers.image.title": tag,
        "org.opencontainers.image.description": f"optiserve: {tag}",
        "io.optiserve.base": base,
        **{f"io.optiserve.{k}": v for k, v in bento.labels.items()},
    }
    with tempfile.TemporaryDirectory(prefix="optiserve-image.") as tmp:
        ctx = Path(tmp)
        wheels = ctx / "wheels"
        wheels.mkdir()
        for item in house.iterdir():
            if item.suffix == ".whl" or item.name == "requirements.txt":
                _link_or_copy(item, wheels / item.name)
        (wheels / "optiserve").mkdir()
        _link_or_copy(wheel, wheels / "optiserve" / wheel.name)
        shutil.copytree(bento.path, ctx / "bento", ignore=shutil.ignore_patterns("env", "__pycache__"))
        _world_readable(ctx / "bento")
        (ctx / "Dockerfile").write_text(dockerfile(base, labels))
        output = docker(
            ["build", "--tag", tag, "--rm", "--force-rm", str(ctx)],
            what=f"docker build {tag}",
            timeout=1800,
        )
    if log is not None:
        with log.open("a") as fh:
            fh.write(output)
    return BuiltImage(tag, image_size_bytes(tag), time.monotonic() - started, base, base_built)


def _world_readable(root: Path) -> None:
    """Files 0644 and folders 0755 (the Bento store keeps its build's 0700 temp folders), since the
    server runs as uid 1034 and COPY keeps the modes it finds."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() or path.stat().st_mode & 0o100 else 0o644)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
