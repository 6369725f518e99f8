"""Writes that are never half-done, and checksums."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from optiserve.errors import DiskFull, Interrupted

DISK_FULL_BYTES = 256 * 1024
"""Free space below which a failed write is blamed on a full disk. Some writers (ONNX Runtime's model
serializer) report ENOSPC as an error of their own ("Protobuf serialization failed"); their partial
output is still on disk when this is checked, so the filesystem is then all but full."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file beside ``path``, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        full = disk_full(path.parent, e, path.name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full is not None:
            raise full from e
        raise


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty sibling directory; on success it replaces ``final``, on any error it is removed.

    This is how a variant directory is produced: a failed or interrupted optimizer leaves nothing
    behind, and a previous good variant with the same id survives until the new one is complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        full = disk_full(final.parent, e, final.name)  # before the partial output is removed
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from e
        raise


def disk_full(where: Path, error: BaseException, writing: str) -> DiskFull | None:
    """A DiskFull naming the filesystem when ``error`` (or what caused it) is ENOSPC, or when the
    filesystem holding ``where`` is all but full; else None."""
    if isinstance(error, DiskFull | Interrupted | KeyboardInterrupt):  # stopping is never a full disk
        return None
    seen: BaseException | None = error
    enospc = False
    while seen is not None and not enospc:
        enospc = isinstance(seen, OSError) and seen.errno == errno.ENOSPC
        seen = seen.__cause__ or seen.__context__
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return None
    if not enospc and free >= DISK_FULL_BYTES:
        return None
    return DiskFull(
        f"no space left on the filesystem of {where} ({free / 1024:.0f} KiB free) while writing {writing}; "
        "nothing was left half-written",
        hint="free some space or use another --workdir, then run again: what is missing is rebuilt",
    )
