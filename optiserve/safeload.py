"""What a variant's model files must pass before any runtime reads them.

Two checks, before any runtime opens the model: sizes come from the file system, and external data
locations from the model's protobuf read with ``load_external_data=False`` (no tensor data file is read).

- **Confinement.** Every file the model needs lies inside the variant's folder, symlinks resolved: the
  manifest's artifact paths, and the files an ONNX model keeps tensors in. An ONNX initializer stored
  as *external data* names its file in ``external_data`` (``location``), and a runtime opens that path
  as given, relative to the model's folder. A variant from elsewhere (a Bento, a shared work directory,
  a hand-edited folder) could otherwise make the server read any file its process can (``/etc/...``,
  another variant's weights) and serve it as weights; the sha256 check of the manifest does not cover
  files the manifest does not list. ONNX Runtime 1.32 and OpenVINO 2026.4 refuse such paths
  themselves (checked when this was written), in a multi-line native error; older ONNX Runtimes, which
  the ``onnx`` extra allows, may not. The check here comes first, the same for every runtime.
- **Size.** The files together stay under ``limits.max_model_gib``: a runtime holds at least that much
  in memory, and a model far larger than expected (a wrong file, a padded one) should be a one-line
  refusal, not an out-of-memory kill minutes into the load.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from optiserve.errors import ArtifactError, PluginUnavailable

if TYPE_CHECKING:
    import onnx

    from optiserve.types import Variant

GIB = 1024**3
ONNX_SUFFIX = ".onnx"


def confined(root: Path, relpath: str, what: str, *, base: Path | None = None) -> Path:
    """``relpath`` resolved against ``base`` (default: ``root``) with symlinks followed, refused unless
    it stays inside ``root``."""
    if PurePosixPath(relpath).is_absolute() or PureWindowsPath(relpath).anchor:
        raise ArtifactError(
            f"{what} is the absolute path {relpath!r}; it must be a path relative to the variant's "
            f"folder {root}, to a file inside it"
        )
    folder = root.resolve()
    path = ((base or root) / relpath).resolve()
    if not path.is_relative_to(folder):
        raise ArtifactError(
            f"{what} is {relpath!r}, which leads to {path}, outside the variant's folder {folder}; "
            "it must be a file inside that folder (no '..' or symlink out of it)"
        )
    return path


def onnx_external_data(model: Path, root: Path) -> list[Path]:
    """The files an ONNX model keeps tensor data in, each confined to ``root`` (the variant's folder).

    Locations are relative to the model's own folder, as runtimes read them. Only the protobuf's
    metadata is read (``load_external_data=False``)."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise PluginUnavailable(
            f"checking where {model.name} keeps its weights needs the onnx package",
            hint="pip install 'optiserve[onnx]'",
        )
    try:
        stat = model.stat()
    except OSError as e:
        raise ArtifactError(f"{model} is not a readable ONNX model: {e.strerror}") from e
    files: dict[Path, None] = {}
    for name, location in _external_locations(str(model), stat.st_mtime_ns, stat.st_size):
        what = f"{model.name}: the external data of tensor {name!r}"
        if not location:
            raise ArtifactError(f"{what} has no location; re-export the model with its data saved beside it")
        path = confined(root, location, what, base=model.parent)
        if not path.is_file():
            raise ArtifactError(
                f"{what} is {location!r}, and {path} is not a file (missing from the variant)"
            )
        files[path] = None
    return list(files)


@functools.lru_cache(maxsize=8)
def _external_locations(model: str, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    """(tensor name, location) of every tensor stored outside ``model``. Parsing a large model takes
    seconds and its size in memory, and both the service and its runtime check the same file at start-up:
    the file's modification time and size in the key make the second check free, and a changed file is
    read again."""
    import onnx

    try:
        proto = onnx.load(model, load_external_data=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{model} is not a readable ONNX model: {first[:200]}") from e
    return tuple(
        (tensor.name, next((e.value for e in tensor.external_data if e.key == "location"), ""))
        for tensor in _tensors(proto)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
    )


def check_artifacts(variant: Variant, variant_dir: Path, max_gib: float) -> dict[Path, int]:
    """Refuse a variant whose artifact paths lead outside ``variant_dir``, or whose artifacts take more
    than ``max_gib`` in all, by their size on disk alone (nothing is read: run it before the checksums).
    Returns each artifact's size; missing ones are left to the manifest's checksum check."""
    sizes: dict[Path, int] = {}
    for name, art in variant.artifacts.items():
        path = confined(variant_dir, art.path, f"variant {variant.id}: artifact {name!r}")
        if path.is_file():
            sizes[path] = path.stat().st_size
    _within(variant, sizes, max_gib)
    return sizes


def check_model_files(variant: Variant, variant_dir: Path, max_gib: float) -> int:
    """:func:`check_artifacts`, then the same for the files an ONNX model keeps external data in (their
    locations read from the model, which is parsed for it). Returns the total size in bytes."""
    sizes = check_artifacts(variant, variant_dir, max_gib)
    for path in list(sizes):
        if path.suffix == ONNX_SUFFIX:
            for data in onnx_external_data(path, variant_dir):
                sizes.setdefault(data, data.stat().st_size)
    return _within(variant, sizes, max_gib)


def _within(variant: Variant, sizes: dict[Path, int], max_gib: float) -> int:
    """The total; refused above the limit, in a message that stays whole in a server's log (no hint)."""
    total = sum(sizes.values())
    limit = max_gib * GIB
    if total > limit:
        biggest = max(sizes, key=lambda p: sizes[p])
        raise ArtifactError(
            f"variant {variant.id}: its model files take {_size(total)} ({biggest.name}: "
            f"{_size(sizes[biggest])}), above the {_size(round(limit))} of "
            f"limits.max_model_gib = {max_gib:g}; raise serving.limits.max_model_gib in the experiment "
            "file to serve it"
        )
    return total


def _size(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n:,} bytes"


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a model holds: initializers (dense and sparse), and those in node attributes, in
    subgraphs (If/Loop/Scan bodies) and in local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
        for s in [*sparse, *attr.sparse_tensors]:
            yield from (s.values, s.indices)
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)
