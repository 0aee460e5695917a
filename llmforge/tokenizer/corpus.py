"""Reading the data stage's corpus: ``*.jsonl.gz`` / ``*.jsonl`` files of ``{"text": ...}`` objects.

The corpus may come from an interrupted or still-running writer, so reading is forgiving in one specific way:
a gzip stream that ends early (truncated tail) stops that file and is *counted*, and a line that is not a
JSON object with a string ``text`` is skipped and counted. Anything else (missing folder, no files) is an
error the user has to act on.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..console import get_logger
from ..errors import StageInputError

log = get_logger(__name__)

try:  # orjson is ~3x faster on the hot path; the stdlib is the fallback
    import orjson as _json_fast

    _loads = _json_fast.loads
    _JSONError: tuple[type[BaseException], ...] = (_json_fast.JSONDecodeError, UnicodeDecodeError)
except ImportError:  # pragma: no cover - orjson ships with datatrove
    import json as _json_std

    _loads = _json_std.loads
    _JSONError = (ValueError, UnicodeDecodeError)

CORPUS_PATTERNS = ("*.jsonl.gz", "*.jsonl")


@dataclass
class ReadStats:
    """What reading skipped, so a stage can report it instead of silently losing data."""

    documents: int = 0
    empty: int = 0
    bad_lines: int = 0
    truncated_files: list[str] = field(default_factory=list)

    def merge(self, other: ReadStats) -> None:
        self.documents += other.documents
        self.empty += other.empty
        self.bad_lines += other.bad_lines
        self.truncated_files += other.truncated_files


def list_corpus_files(corpus: str | Path) -> list[Path]:
    """All corpus files under ``corpus`` (recursively, sorted by relative path), or ``[corpus]`` for a file."""
    corpus = Path(corpus)
    if corpus.is_file():
        return [corpus]
    if not corpus.is_dir():
        raise StageInputError(
            f"{corpus}: corpus folder not found. Run the data stage first (`llmforge run data`, with "
            "`data.enabled: true`)."
        )
    files = {p for pat in CORPUS_PATTERNS for p in corpus.rglob(pat) if p.is_file()}
    # Skip hidden files: datatrove and our own atomic writers use dot-prefixed temporary names.
    files = {p for p in files if not any(part.startswith(".") for part in p.relative_to(corpus).parts)}
    return sorted(files, key=lambda p: p.relative_to(corpus).as_posix())


def iter_texts(path: Path, stats: ReadStats, text_key: str = "text") -> Iterator[str]:
    """Yield the non-empty ``text`` of each line of one corpus file, counting what was skipped."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = _loads(line)
                except _JSONError:
                    stats.bad_lines += 1
                    continue
                text = obj.get(text_key) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    stats.bad_lines += 1
                    continue
                if not text:
                    stats.empty += 1
                    continue
                stats.documents += 1
                yield text
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        # A writer killed mid-file leaves a gzip stream without its end marker: keep what was readable.
        stats.truncated_files.append(str(path))
        log.warning(
            "%s: truncated or corrupt gzip stream (%s); using the %s lines before it", path, err, "readable"
        )


def iter_split_documents(
    files: list[Path], base: Path, *, seed: int, val_fraction: float, stats: ReadStats, text_key: str = "text"
) -> Iterator[tuple[str, bool]]:
    """Yield ``(text, is_val)`` for every document, with the same split the shards use (``split.val_mask``)."""
    from .split import file_key, val_mask

    for path in files:
        key = file_key(seed, path.relative_to(base).as_posix())
        batch: list[str] = []
        done = 0
        for text in iter_texts(path, stats, text_key):
            batch.append(text)
            if len(batch) == 1024:
                yield from zip(batch, val_mask(key, done, len(batch), val_fraction).tolist(), strict=True)
                done += len(batch)
                batch = []
        if batch:
            yield from zip(batch, val_mask(key, done, len(batch), val_fraction).tolist(), strict=True)
