"""Console, logging and progress: the one place library code talks to the user through.

Library code never calls ``print``. It logs with ``get_logger(__name__)`` and reports long work with
``progress(...)``. The CLI calls ``configure()`` once; library code works unconfigured too (tests), in which
case logs go to the standard logging machinery and progress is silent unless configured.

Two rendering modes:

* ``rich``  — a live rich progress bar on a terminal (description, bar, counts, rate, ETA, extra fields).
* ``plain`` — one line every ``plain_interval`` seconds and one at the end; used when stderr is not a TTY or
  the ``CI`` environment variable is set, so CI logs stay readable.

Usage::

    from llmforge import console
    log = console.get_logger(__name__)
    with console.progress("tokenize", total=n_docs, unit="docs") as bar:
        for doc in docs:
            ...
            bar.advance(1, tokens=n_tokens)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["auto", "rich", "plain"]

_LOGGER_ROOT = "llmforge"


@dataclass
class _State:
    configured: bool = False
    mode: Literal["rich", "plain"] = "plain"
    quiet: bool = False
    plain_interval: float = 10.0
    console: Any = None  # rich.console.Console on stderr, created lazily
    extra: dict = field(default_factory=dict)


_state = _State()


def _is_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def resolve_mode(mode: Mode = "auto") -> Literal["rich", "plain"]:
    if mode != "auto":
        return mode
    if _is_ci() or not sys.stderr.isatty():
        return "plain"
    return "rich"


def configure(
    mode: Mode = "auto", *, quiet: bool = False, verbose: bool = False, plain_interval: float | None = None
) -> None:
    """Set up logging handlers and the progress mode. Called by the CLI; safe to call again."""
    _state.mode = resolve_mode(mode)
    _state.quiet = quiet
    if plain_interval is not None:
        _state.plain_interval = plain_interval
    else:
        try:
            _state.plain_interval = float(os.environ.get("LLMFORGE_PROGRESS_INTERVAL", "10"))
        except ValueError:  # a bad environment value must not crash a command; fall back to the default
            _state.plain_interval = 10.0
    logger = logging.getLogger(_LOGGER_ROOT)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logger.setLevel(level)
    logger.propagate = False
    if _state.mode == "rich":
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=get_console(), show_path=False, show_time=False, markup=False, rich_tracebacks=False
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    handler.setLevel(level)
    logger.addHandler(handler)
    _state.configured = True


def get_console():
    """The rich Console the CLI writes human output to (stderr for logs/progress)."""
    if _state.console is None:
        from rich.console import Console

        _state.console = Console(stderr=True, highlight=False)
    return _state.console


# Width of results printed when stdout is not a terminal (a pipe, a file, a CI log): wide enough that rich never
# cuts a figure, a fingerprint or a drop reason to fit, and tables only take the width their content needs.
PIPE_WIDTH = 4096


def output_width() -> int | None:
    """Width for results on stdout: None (the terminal's own) on a TTY; under a pipe ``$COLUMNS`` when the
    user set it, else ``PIPE_WIDTH``. rich would otherwise assume 80 columns and cut cells with ``…``."""
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stdout
        tty = False
    if tty:
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH


def stdout_console():
    """A rich Console on stdout for results (tables, summaries), sized by ``output_width()``.

    Made afresh on each call so that the width follows where stdout points now (tests swap it)."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False, width=output_width())


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``llmforge`` hierarchy (pass ``__name__``)."""
    if not name.startswith(_LOGGER_ROOT):
        name = f"{_LOGGER_ROOT}.{name}"
    return logging.getLogger(name)


def _fmt_num(x: float) -> str:
    if isinstance(x, int) or float(x).is_integer():
        x = int(x)
        if abs(x) >= 10_000:
            return f"{x:,}"
        return str(x)
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return f"{x:.3g}"


def format_duration(seconds: float | None) -> str:
    """Seconds as people read them: ``"2.3s"``, ``"1m02s"``, ``"2h05m"`` (``""`` for None: not measured).

    The one duration format of llmforge: progress lines, the run summary and ``status`` all use it, so a time
    reads the same wherever it is shown. Negative values (clock skew) read as zero.
    """
    if seconds is None:
        return ""
    s = max(float(seconds), 0.0)
    if round(s, 1) < 60:
        return f"{s:.1f}s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class Progress:
    """Handle returned by ``progress()``. ``advance`` counts work; keyword fields show beside the bar."""

    def __init__(self, description: str, total: float | None, unit: str):
        self.description = description
        self.total = total
        self.unit = unit
        self.completed: float = 0
        self.fields: dict[str, Any] = {}
        self.start = time.monotonic()
        self._last_line = self.start
        self._rich = None
        self._task = None

    # -- public API -------------------------------------------------------------------------------
    def advance(self, n: float = 1, **fields: Any) -> None:
        self.completed += n
        self._update(fields)

    def update(self, *, completed: float | None = None, total: float | None = None, **fields: Any) -> None:
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        self._update(fields)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    # -- rendering --------------------------------------------------------------------------------
    def _fields_text(self) -> str:
        parts = []
        for k, v in self.fields.items():
            parts.append(f"{k}={_fmt_num(v) if isinstance(v, int | float) else v}")
        return " ".join(parts)

    def _line(self, final: bool = False) -> str:
        el = self.elapsed
        rate = self.completed / el if el > 0 else 0.0
        done = _fmt_num(self.completed)
        if self.total:
            pct = 100.0 * self.completed / self.total
            head = f"{self.description}: {done}/{_fmt_num(self.total)} {self.unit} ({pct:.0f}%)"
            if not final and rate > 0:
                head += f" eta {format_duration((self.total - self.completed) / rate)}"
        else:
            head = f"{self.description}: {done} {self.unit}"
        head += f" {_fmt_num(rate)} {self.unit}/s elapsed {format_duration(el)}"
        f = self._fields_text()
        return f"{head} {f}".rstrip() + (" done" if final else "")

    def _update(self, fields: dict[str, Any]) -> None:
        if fields:
            self.fields.update(fields)
        if _state.quiet or not _state.configured:
            return
        if self._rich is not None:
            self._rich.update(
                self._task, completed=self.completed, total=self.total, info=self._fields_text()
            )
            return
        now = time.monotonic()
        if now - self._last_line >= _state.plain_interval:
            self._last_line = now
            get_logger("progress").info(self._line())

    def _open(self) -> None:
        if _state.quiet or not _state.configured or _state.mode != "rich":
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._rich = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn() if self.total else TextColumn("{task.completed:,.0f}"),
            TextColumn(self.unit),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=get_console(),
            transient=False,
        )
        self._rich.start()
        self._task = self._rich.add_task(self.description, total=self.total, info="")

    def _close(self, ok: bool) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        elif ok and _state.configured and not _state.quiet:
            get_logger("progress").info(self._line(final=True))


@contextmanager
def progress(description: str, total: float | None = None, unit: str = "it") -> Iterator[Progress]:
    """Report progress of long work. Renders as configured by ``configure``; silent when unconfigured."""
    bar = Progress(description, total, unit)
    bar._open()
    ok = False
    try:
        yield bar
        ok = True
    finally:
        bar._close(ok)
