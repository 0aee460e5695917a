"""Resumable crawl state (SQLite) and the fetch log (JSONL).

Why SQLite rather than a periodically rewritten ``state.json``: "never re-fetch a page that is already
stored" needs the page's WARC records and its "done" mark (plus the links it discovered) to become durable
together. One small transaction per finished URL does that cheaply; rewriting a JSON snapshot per page would
be quadratic, and snapshotting every N pages would re-fetch up to N pages after a kill.

The commit protocol with the WARC writer (see ``warc.py``): records are appended and flushed to the open
WARC file first, then one transaction marks the URL done, inserts its new links and records the open file's
new committed length. After a kill, resume truncates the open file back to that length, so a record that was
written but never committed disappears together with the "done" mark it never got, and its URL is fetched
again exactly once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS urls (
    id       INTEGER PRIMARY KEY,        -- insertion order = frontier order (breadth first)
    url      TEXT NOT NULL UNIQUE,       -- normalised URL
    depth    INTEGER NOT NULL,           -- link hops from a seed
    chain    TEXT,                       -- JSON list of URLs that redirected here (loop detection)
    done     INTEGER NOT NULL DEFAULT 0, -- 0 = in the frontier, 1 = finished (whatever the outcome)
    outcome  TEXT,                       -- stored | redirect | skipped | failed
    reason   TEXT,                       -- why (robots, content_type, http_500, timeout, dns, ...)
    warc     TEXT                        -- WARC file holding the page, when stored
);
"""


@dataclass(frozen=True)
class Item:
    """One frontier entry."""

    url: str
    depth: int
    chain: tuple[str, ...] = ()  # earlier hops of a redirect chain, oldest first

    @property
    def redirects(self) -> int:
        return len(self.chain)


class CrawlState:
    """The frontier, the seen set and per-URL outcomes, in ``path`` (SQLite, WAL mode)."""

    def __init__(self, path: Path):
        self.path = path
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so one finished URL is one transaction.
        self.db = sqlite3.connect(path, isolation_level=None)
        # WAL + synchronous=NORMAL: a commit survives a killed process (what resume must handle) without
        # an fsync per page; only a power cut can lose the last commits, which resume then re-fetches.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self.seen: set[str] = {row[0] for row in self.db.execute("SELECT url FROM urls")}

    def close(self) -> None:
        self.db.close()

    # -- meta --------------------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def _set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def set_meta(self, **values: Any) -> None:
        with self._tx():
            for k, v in values.items():
                self._set_meta(k, v)

    # -- frontier ----------------------------------------------------------------------------------------
    def _insert(self, items: Iterable[Item]) -> list[Item]:
        new = [it for it in items if it.url not in self.seen]
        if new:
            self.db.executemany(
                "INSERT OR IGNORE INTO urls (url, depth, chain) VALUES (?, ?, ?)",
                [(it.url, it.depth, json.dumps(list(it.chain)) if it.chain else None) for it in new],
            )
            self.seen.update(it.url for it in new)
        return new

    def add(self, items: Iterable[Item]) -> list[Item]:
        """Put unseen items in the frontier; returns the ones that were new."""
        with self._tx():
            return self._insert(items)

    def pending(self) -> list[Item]:
        rows = self.db.execute("SELECT url, depth, chain FROM urls WHERE done = 0 ORDER BY id").fetchall()
        return [Item(u, d, tuple(json.loads(c)) if c else ()) for u, d, c in rows]

    def finish(
        self,
        url: str,
        outcome: str,
        reason: str | None = None,
        *,
        warc: str | None = None,
        new_items: Iterable[Item] = (),
        meta: dict[str, Any] | None = None,
    ) -> list[Item]:
        """Mark ``url`` done and enqueue what it led to, atomically; returns the newly enqueued items."""
        with self._tx():
            self.db.execute(
                "UPDATE urls SET done = 1, outcome = ?, reason = ?, warc = ? WHERE url = ?",
                (outcome, reason, warc, url),
            )
            for k, v in (meta or {}).items():
                self._set_meta(k, v)
            return self._insert(new_items)

    def requeue(self, urls: Iterable[str]) -> None:
        with self._tx():
            self.db.executemany(
                "UPDATE urls SET done = 0, outcome = NULL, reason = NULL, warc = NULL WHERE url = ?",
                [(u,) for u in urls],
            )

    # -- reporting ---------------------------------------------------------------------------------------
    def stored_in(self, warc_name: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT url FROM urls WHERE warc = ?", (warc_name,))]

    def count_stored(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM urls WHERE outcome = 'stored'").fetchone()[0]

    def outcome_counts(self) -> dict[tuple[str, str | None], int]:
        rows = self.db.execute("SELECT outcome, reason, COUNT(*) FROM urls WHERE done = 1 GROUP BY 1, 2")
        return {(o, r): n for o, r, n in rows}

    def outcome_of(self, url: str) -> tuple[str | None, str | None] | None:
        row = self.db.execute("SELECT outcome, reason FROM urls WHERE url = ?", (url,)).fetchone()
        return None if row is None else (row[0], row[1])

    def count_pending(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM urls WHERE done = 0").fetchone()[0]

    # -- transactions ------------------------------------------------------------------------------------
    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type, exc, tb) -> None:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _tx(self) -> CrawlState._Tx:
        return CrawlState._Tx(self.db)


class FetchLog:
    """Append-only ``fetches.jsonl``: one line per request (and per URL skipped without one).

    Appends across resumed runs. A kill can tear the last line; opening the log cuts it back to the last
    newline so every line stays valid JSON.
    """

    def __init__(self, path: Path):
        self.path = path
        if path.exists():
            _truncate_torn_tail(path)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, **entry: Any) -> None:
        entry = {"ts": round(time.time(), 3), **entry}
        # One write + flush per line: a killed crawl loses at most the line being written.
        self._f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _truncate_torn_tail(path: Path) -> None:
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as f:
        # Walk back in blocks to the last newline; everything after it is a torn line.
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            block = f.read(step)
            idx = block.rfind(b"\n")
            if idx >= 0:
                keep = pos - step + idx + 1
                if keep != size:
                    f.truncate(keep)
                return
            pos -= step
        f.truncate(0)


def read_fetch_log(path: Path) -> Iterator[dict[str, Any]]:
    """The fetch log's entries (for tests, the CLI and reports)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def remove_state(out_dir: Path, names: Iterable[str]) -> None:
    import shutil

    for name in names:
        p = out_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            for suffix in ("", "-wal", "-shm"):
                q = p.with_name(p.name + suffix)
                if q.exists():
                    os.remove(q)
