"""Content hashes of files and folders, with a stat-keyed cache so unchanged files are not re-read.

A file's hash is the SHA-256 of its bytes. A folder's hash is the SHA-256 of the sorted list of
``(relative path, file hash)`` of the files inside it, skipping temporary names (``.*.tmp``) that atomic
writes use, so a folder's hash changes exactly when a finished file inside it changes.

A cached hash is reused only while the file's size, mtime, ctime and inode are unchanged, and never for a file
modified within ``_RACY_NS`` of being hashed: a rewrite inside the file system's timestamp granularity keeps
every one of those, so such a "racily clean" file is re-hashed until its timestamps are safely in the past.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import atomic

_CHUNK = 1 << 20
_RACY_NS = 2_000_000_000  # coarser than any common file system's timestamp granularity (FAT: 2 s)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and (name.endswith(".tmp") or ".old-" in name)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks so a multi-GB shard never sits in memory.

    The one file hash of llmforge: tokenizer metadata, checkpoints and stage fingerprints all compare digests
    from here, so they agree by construction.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of ``obj`` as canonical JSON (sorted keys; non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_listing(entries: Iterable[tuple[str, str]]) -> str:
    """Hex SHA-256 of a set of files given as ``(relative posix path, file sha256)``, in the order given.

    The one way llmforge hashes a group of files (a folder, the matches of a glob): names are part of the hash,
    so a rename changes it, and names are relative, so moving the project does not. Stage fingerprints are
    stored in ``runs/``, so this byte layout must never change.
    """
    h = hashlib.sha256()
    for rel, digest in entries:
        h.update(rel.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


class HashCache:
    """Remembers ``path -> (size, mtime_ns, ctime_ns, inode, sha256)`` in a JSON file; re-hashes changed files."""

    def __init__(self, cache_file: Path | None = None):
        self.cache_file = cache_file
        self._entries: dict[str, list] = {}
        self._dirty = False
        if cache_file is not None and cache_file.exists():
            with contextlib.suppress(OSError, ValueError):
                entries = json.loads(cache_file.read_text())
                self._entries = entries if isinstance(entries, dict) else {}

    def file(self, path: Path) -> str:
        path = Path(path)
        st = path.stat()
        key = str(path.resolve())
        sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        hit = self._entries.get(key)
        if hit is not None and hit[:4] == sig:
            return hit[4]
        digest = sha256_file(path)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
            self._entries[key] = [*sig, digest]
            self._dirty = True
        elif self._entries.pop(key, None) is not None:
            self._dirty = True
        return digest

    def files_in(self, folder: Path, skip_hidden: bool = False) -> list[tuple[str, str, int]]:
        """``(relative posix path, sha256, size)`` of every finished file under ``folder``, sorted.

        ``skip_hidden`` also leaves out dot-files and dot-folders (as the data stage does when reading a folder).
        """

        def skip(name: str) -> bool:
            return _is_temp(name) or (skip_hidden and name.startswith("."))

        out = []
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not skip(d))
            for name in sorted(files):
                if skip(name):
                    continue
                p = Path(root) / name
                out.append((p.relative_to(folder).as_posix(), self.file(p), p.stat().st_size))
        out.sort()
        return out

    def path(self, path: Path, skip_hidden: bool = False) -> tuple[str, int]:
        """(hash, total bytes) of a file or folder."""
        path = Path(path)
        if path.is_dir():
            entries = self.files_in(path, skip_hidden)
            digest = sha256_listing((rel, file_digest) for rel, file_digest, _ in entries)
            return digest, sum(size for *_, size in entries)
        return self.file(path), path.stat().st_size

    def save(self) -> None:
        if self.cache_file is None or not self._dirty:
            return
        # drop entries for files that no longer exist so the cache does not grow forever
        self._entries = {k: v for k, v in self._entries.items() if os.path.exists(k)}
        with contextlib.suppress(OSError):
            atomic.write_json(self.cache_file, self._entries, indent=0)
        self._dirty = False
