"""Progress for long steps: Rich bars on a terminal, plain lines otherwise (CI logs stay readable)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

console = Console(stderr=True, highlight=False)


class Steps:
    """``with steps.task("Exporting", total=3) as advance: ...; advance()``."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.live = enabled and console.is_terminal

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[_Advance]:
        if not self.enabled:
            yield _Advance(None, None, quiet=True)
            return
        if not self.live:
            started = time.monotonic()
            console.print(f"… {description}")
            yield _Advance(None, None)
            console.print(f"✓ {description} ({time.monotonic() - started:.1f}s)")
            return
        columns = (
            [
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            ]
            if total
            else [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
        )
        with Progress(*columns, console=console, transient=False) as progress:
            tid = progress.add_task(description, total=total)
            yield _Advance(progress, tid)
            progress.update(tid, completed=total or 1, total=total or 1)

    def note(self, text: str) -> None:
        if self.enabled:
            console.print(text)


class _Advance:
    def __init__(self, progress: Progress | None, tid: object, *, quiet: bool = False) -> None:
        self._progress = progress
        self._tid = tid
        self._quiet = quiet

    def __call__(self, step: int = 1, description: str | None = None) -> None:
        if self._progress is not None:
            kwargs = {"description": description} if description else {}
            self._progress.advance(self._tid, step)  # type: ignore[arg-type]
            if kwargs:
                self._progress.update(self._tid, **kwargs)  # type: ignore[arg-type]
        elif description and not self._quiet and not sys.stderr.isatty():
            console.print(f"  · {description}")
