"""One Bento per (variant, runtime): the generic service, the variant's artifact and manifest, its
ServiceSpec, and Python dependencies pinned to the versions this machine runs.

The Bento's ``src/`` holds ``service.py`` (a one-line re-export of the generic service) and
``model/`` (``service.json`` + ``<variant id>/``, the variant directory, checksums re-verified at
start-up). optiserve itself goes in as a wheel built from this checkout. Images are built from the Bento
by :mod:`optiserve.deploy.images` (on a base image built here; BentoML's own Dockerfile starts from a
registry image, which cannot be pulled where no registry is reachable).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from optiserve.errors import OptiserveError, PluginUnavailable, ServingError
from optiserve.manifest import write_model
from optiserve.types import ServiceSpec

SPEC_IN_BENTO = "model/service.json"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SERVING_EXTRA = "serve"
"""Every Bento gets optiserve's own dependencies and this extra's (BentoML, the HTTP parser, the JSON
libraries, image decoding), read from its installed metadata so that a new one cannot be forgotten."""


@dataclass(frozen=True)
class BuiltBento:
    tag: str
    path: Path
    dockerfile: Path
    requirements: tuple[str, ...]
    labels: dict[str, str]


def bento_labels(spec: ServiceSpec) -> dict[str, str]:
    """What a Bento (and its image) says about itself: the metrics contract's labels, plus the CPU
    features an INT8 variant was tuned for."""
    labels = {
        "model": spec.variant.model.name,
        "variant": spec.variant.id,
        "runtime": spec.runtime,
        "precision": spec.variant.precision,
    }
    if spec.variant.cpu_features:
        labels["cpu-features"] = ",".join(spec.variant.cpu_features)
    return labels


def bento_name(spec: ServiceSpec) -> str:
    """The variant id, unchanged (it is already a valid Bento name)."""
    return spec.variant.id


def pinned_requirements(spec: ServiceSpec) -> tuple[str, ...]:
    """``name==version`` for the serving base, the runtime's packages and the model's, as installed here."""
    from optiserve.services.runtimes.base import Runtime

    runtime = Runtime.get(spec.runtime)
    imports: list[str] = list(runtime.requires)
    if spec.variant.model.source == "builtin":
        from optiserve.models.base import BuiltinModel

        model = BuiltinModel.get(spec.variant.model.ref)
        # torch variants rebuild the module from the model's own code; other runtimes only preprocess.
        imports += model.requires if "torch" in runtime.formats else model.serving_requires
    by_import = md.packages_distributions()
    names: list[str] = [*core_dependencies(), *core_dependencies(SERVING_EXTRA)]
    for module in imports:
        names += by_import.get(module, [module])
    pins = []
    for name in dict.fromkeys(n.lower() for n in names):
        if name == "optiserve":
            continue
        try:
            pins.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError as e:
            raise PluginUnavailable(
                f"cannot pin {name}: it is not installed here (needed by {spec.runtime})"
            ) from e
    return tuple(sorted(pins))


def core_dependencies(extra: str | None = None) -> list[str]:
    """The distributions optiserve itself requires (no extras), or those its ``extra`` adds, from its
    installed metadata."""
    import re

    found = []
    for requirement in md.requires("optiserve") or []:
        marker = requirement.partition(";")[2]
        wanted = f'extra == "{extra}"' if extra else None
        if (wanted is None and "extra ==" in marker) or (wanted is not None and wanted not in marker):
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        if match:
            found.append(match.group(0))
    return found


def build_wheel(out_dir: Path) -> Path:
    """A wheel of this optiserve checkout (the Bento installs it like any other package)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ServingError(f"cannot build the optiserve wheel: no pyproject.toml in {root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out_dir),
            str(root),
        ],
        capture_output=True,
        text=True,
    )
    wheels = sorted(out_dir.glob("optiserve-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ServingError(f"building the optiserve wheel failed: {result.stderr.strip()[-300:]}")
    return wheels[-1]


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_bento(spec: ServiceSpec, wheel: Path) -> BuiltBento:
    """``bentoml build`` for one served pair; an existing Bento with the same tag is replaced."""
    import bentoml
    import yaml

    name, version = bento_name(spec), spec.runtime
    requirements = pinned_requirements(spec)
    with tempfile.TemporaryDirectory(prefix="optiserve-bento.") as tmp:
        ctx = Path(tmp)
        (ctx / "service.py").write_text(
            '"""Entry point of this Bento: the generic optiserve service."""\n\n'
            "from optiserve.services.service import OptiserveService\n\n"
            '__all__ = ["OptiserveService"]\n'
        )
        shutil.copytree(spec.variant_dir, ctx / "model" / spec.variant.id)
        # Relative to service.json's folder: the service resolves it there, wherever the Bento lives.
        inside = spec.model_copy(update={"variant_dir": spec.variant.id, "port": None, "host": "0.0.0.0"})
        write_model(ctx / SPEC_IN_BENTO, inside)
        shutil.copy2(wheel, ctx / wheel.name)
        labels = bento_labels(spec)
        # A bentofile through BentoML's public build_bentofile (its Python API wants internal env types).
        bentofile = {
            "service": "service:OptiserveService",
            "labels": labels,
            "description": f"optiserve: {spec.variant.id} on {spec.runtime}",
            "include": ["service.py", "model/**", wheel.name],
            "envs": [
                {"name": "OPTISERVE_SERVICE_SPEC", "value": SPEC_IN_BENTO, "stage": "runtime"},
                {"name": "BENTOML_DO_NOT_TRACK", "value": "true"},
            ],
            "python": {
                "packages": list(requirements),
                "wheels": [wheel.name],
                "lock_packages": False,
                # the CPU build of torch (the default index would pull a multi-GB CUDA one)
                "extra_index_url": [TORCH_CPU_INDEX]
                if any(r.startswith("torch==") for r in requirements)
                else [],
            },
            "docker": {"python_version": f"{sys.version_info.major}.{sys.version_info.minor}"},
        }
        (ctx / "bentofile.yaml").write_text(yaml.safe_dump(bentofile, sort_keys=False))
        tag = f"{name}:{version}"
        with contextlib.suppress(bentoml.exceptions.NotFound):
            bentoml.bentos.delete(tag)
        previous = os.environ.get("OPTISERVE_SERVICE_SPEC")
        os.environ["OPTISERVE_SERVICE_SPEC"] = str(ctx / SPEC_IN_BENTO)
        try:
            # bentoml resolves the wheel path against the working directory, and prints notes we don't need
            noise = io.StringIO()
            with (
                contextlib.chdir(ctx),
                contextlib.redirect_stdout(noise),
                contextlib.redirect_stderr(noise),
                _quiet_logger("bentoml"),  # its notes on the wheels and a large model file, as warnings
            ):
                bento = bentoml.bentos.build_bentofile(
                    str(ctx / "bentofile.yaml"), name=name, version=version, build_ctx=str(ctx)
                )
        except OptiserveError:
            raise
        except Exception as e:
            raise ServingError(
                f"bentoml build failed for {tag}: {str(e).strip().splitlines()[0][:300]}"
            ) from e
        finally:
            if previous is None:
                os.environ.pop("OPTISERVE_SERVICE_SPEC", None)
            else:
                os.environ["OPTISERVE_SERVICE_SPEC"] = previous
    path = Path(bento.path)
    return BuiltBento(str(bento.tag), path, path / "env" / "docker" / "Dockerfile", requirements, labels)
