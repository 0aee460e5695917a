"""Robust input reading for the data stage: find the input files, then turn each into documents.

Two halves:

* ``discover_inputs`` runs in the main process. It resolves every ``data.inputs`` entry (a file, a folder or a
  glob) plus the crawl's WARC folder into a sorted list of ``InputFile`` — one format per file, decided from
  the extension unless the entry forces one. Missing paths are a ``UserInputError`` naming the manifest key.
* ``InputReader`` is the first datatrove step of the pipeline. Each task reads its share of that list
  (``files[rank::world_size]``) with the per-format readers below. When there are fewer files than tasks
  (one crawl WARC, one big JSONL), ``work_units`` splits the WARC and JSONL files by record — part ``p`` of
  ``n`` keeps records ``p, p+n, p+2n, …`` — so every task has work; each part still decompresses the whole
  file, which costs far less than extracting and filtering its documents.

Why our own readers instead of datatrove's ``WarcReader`` / ``JsonlReader``: a truncated gzip member, a WARC
cut mid-record or one undecodable line makes those stop the file with an exception or a warning, and the
documents they skip are not counted. The issue asks for the opposite: *keep* everything read before the damage,
skip what cannot be read, and count every skip by reason so the report shows it. The readers here never raise
for bad data; they yield ``Skip(reason)`` markers (one bad record) or raise ``FileDamaged`` after the good
records (the rest of the file is unreadable), and ``InputReader`` turns both into counters.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from ..errors import UserInputError

# Extension → format. Checked longest first so `.warc.gz` wins over `.gz`.
_EXTENSIONS: tuple[tuple[str, str], ...] = (
    (".warc.gz", "warc"),
    (".warc", "warc"),
    (".jsonl.gz", "jsonl"),
    (".ndjson.gz", "jsonl"),
    (".json.gz", "jsonl"),
    (".jsonl", "jsonl"),
    (".ndjson", "jsonl"),
    (".parquet", "parquet"),
    (".txt.gz", "text"),
    (".md.gz", "text"),
    (".txt", "text"),
    (".md", "text"),
    (".markdown", "text"),
)
_GLOB_CHARS = re.compile(r"[*?\[]")
_HTML_TYPES = ("text/html", "application/xhtml+xml")
# One text file or one JSONL line larger than this is not prose; skipping it keeps a worker's memory bounded.
MAX_DOC_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class InputFile:
    """One file to read, with how to read it and which manifest entry brought it in (for messages)."""

    path: str
    format: str  # warc | jsonl | parquet | text
    source: str  # e.g. "data.inputs[0]" or "crawl.warc"
    text_key: str = "text"
    id_key: str = "id"


@dataclass(frozen=True)
class InputSource:
    """One entry to resolve: a manifest ``data.inputs[i]`` or the crawl's WARC folder."""

    path: Path
    label: str  # the manifest key, used in errors
    format: str = "auto"
    text_key: str = "text"
    id_key: str = "id"


class FileDamaged(Exception):
    """The rest of a file cannot be read (truncated gzip, cut WARC, corrupt Parquet); ``reason`` is a counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Skip:
    """One record that was skipped; ``reason`` becomes the ``skipped_<reason>`` counter."""

    reason: str


def format_of(path: str | os.PathLike) -> str | None:
    """The input format implied by a file name, or None for an unknown extension."""
    name = os.path.basename(str(path)).lower()
    for ext, fmt in _EXTENSIONS:
        if name.endswith(ext):
            return fmt
    return None


def discover_inputs(sources: list[InputSource]) -> tuple[list[InputFile], list[str]]:
    """Resolve sources into input files (sorted per source, in source order) and notes on what was ignored.

    Raises ``UserInputError`` naming the manifest key when a path does not exist or a glob matches nothing.
    """
    files: list[InputFile] = []
    notes: list[str] = []
    seen: set[str] = set()
    for src in sources:
        raw = str(src.path)
        if _GLOB_CHARS.search(raw):
            candidates = sorted(Path(p) for p in glob.glob(raw, recursive=True))
            if not candidates:
                raise UserInputError(f"{src.label}: {raw!r} matches no files; fix the path or the pattern")
        elif src.path.is_dir():
            candidates = sorted(
                p
                for p in src.path.rglob("*")
                if not any(part.startswith(".") for part in p.relative_to(src.path).parts)
            )
        elif src.path.exists():
            candidates = [src.path]
        else:
            raise UserInputError(
                f"{src.label}: {raw} does not exist; fix the path (relative to the manifest)"
            )
        n_before = len(files)
        for p in candidates:
            if not p.is_file():
                continue
            fmt = src.format if src.format != "auto" else format_of(p)
            if fmt is None:
                notes.append(f"{src.label}: ignored {p} (unknown extension; set `format` to read it anyway)")
                continue
            key = str(p.resolve())
            if key in seen:  # two entries naming the same file must not double its documents
                continue
            seen.add(key)
            files.append(InputFile(str(p), fmt, src.label, src.text_key, src.id_key))
        if len(files) == n_before:
            notes.append(f"{src.label}: {raw} holds no readable input files")
    return files, notes


# --------------------------------------------------------------------------------------------------------
# text checks


def looks_binary(text: str) -> bool:
    """True for text that is really binary data: NUL bytes, or > 1 % control / replacement characters.

    Tabs, newlines and other whitespace controls are normal text. A few stray control characters are left to
    ftfy (the Unicode-fixing step removes them); a text made of them is not a document.
    """
    if "\x00" in text:
        return True
    if not text:
        return False
    bad = 0
    for ch in text[:100_000]:
        if ch == "\ufffd" or (unicodedata.category(ch) == "Cc" and ch not in "\t\n\r\x0b\x0c"):
            bad += 1
    return bad > 0.01 * min(len(text), 100_000)


def _check_text(value: Any) -> str | Skip:
    """Validate a text field: a non-empty, non-binary string, or the reason it is skipped."""
    if value is None:
        return Skip("missing_text")
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return Skip("binary_text")
    if not isinstance(value, str):
        return Skip("non_string_text")
    if not value.strip():
        return Skip("empty_text")
    if looks_binary(value):
        return Skip("binary_text")
    return value


# --------------------------------------------------------------------------------------------------------
# per-format readers: yield dicts (text/id/metadata) or Skip; raise FileDamaged when the rest is unreadable

_DAMAGE = (EOFError, zlib.error, gzip.BadGzipFile, OSError)


def _open_maybe_gzip(path: str) -> io.BufferedIOBase:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def read_jsonl(f: InputFile, part: int = 0, parts: int = 1) -> Iterator[dict | Skip]:
    """One document per JSON line. Bad lines (invalid UTF-8 or JSON, bad text field) are skipped one by one.

    ``part``/``parts``: read only the non-blank lines whose index ``% parts == part`` (see ``work_units``).
    """
    import orjson

    index = -1
    try:
        with _open_maybe_gzip(f.path) as fh:
            for lineno, raw in enumerate(fh):
                if not raw.strip():
                    continue
                index += 1
                if index % parts != part:
                    continue
                if len(raw) > MAX_DOC_BYTES:
                    yield Skip("too_large")
                    continue
                try:
                    row = orjson.loads(raw)  # orjson rejects invalid UTF-8 itself
                except orjson.JSONDecodeError as err:
                    yield Skip("invalid_utf8" if "utf-8" in str(err).lower() else "invalid_json")
                    continue
                if not isinstance(row, dict):
                    yield Skip("invalid_json")
                    continue
                text = _check_text(row.pop(f.text_key, None))
                if isinstance(text, Skip):
                    yield text
                    continue
                doc_id = row.pop(f.id_key, None)
                meta = {
                    k: v
                    for k, v in row.items()
                    if isinstance(v, str | int | float | bool) and k != "metadata"
                }
                yield {
                    "text": text,
                    "id": str(doc_id) if doc_id is not None else f"{Path(f.path).name}/{lineno}",
                    "metadata": meta,
                }
    except _DAMAGE as err:
        raise FileDamaged(
            "truncated_or_corrupt_gzip" if f.path.endswith(".gz") else "unreadable_file", str(err)
        ) from None


def read_text(f: InputFile, part: int = 0, parts: int = 1) -> Iterator[dict | Skip]:
    """A whole .txt/.md file is one document. Invalid UTF-8 skips the file (we do not guess encodings)."""
    try:
        with _open_maybe_gzip(f.path) as fh:
            data = fh.read(MAX_DOC_BYTES + 1)
    except _DAMAGE as err:
        raise FileDamaged(
            "truncated_or_corrupt_gzip" if f.path.endswith(".gz") else "unreadable_file", str(err)
        ) from None
    if len(data) > MAX_DOC_BYTES:
        yield Skip("too_large")
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        yield Skip("invalid_utf8")
        return
    checked = _check_text(text)
    if isinstance(checked, Skip):
        yield checked
        return
    yield {"text": checked, "id": Path(f.path).name, "metadata": {}}


def read_parquet(f: InputFile, part: int = 0, parts: int = 1) -> Iterator[dict | Skip]:
    """Rows of a Parquet file, batch by batch; only the text and id columns are loaded."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError subclasses for every kind of damage
        raise FileDamaged("corrupt_parquet", str(err)) from None
    names = set(pf.schema_arrow.names)
    if f.text_key not in names:
        raise FileDamaged("missing_text_column", f"no column {f.text_key!r} (columns: {sorted(names)})")
    columns = [f.text_key] + ([f.id_key] if f.id_key in names else [])
    row = 0
    try:
        for batch in pf.iter_batches(columns=columns, batch_size=1024):
            data = batch.to_pydict()
            ids = data.get(f.id_key)
            for i, value in enumerate(data[f.text_key]):
                text = _check_text(value)
                if isinstance(text, Skip):
                    yield text
                else:
                    doc_id = (
                        ids[i] if ids is not None and ids[i] is not None else f"{Path(f.path).name}/{row}"
                    )
                    yield {"text": text, "id": str(doc_id), "metadata": {}}
                row += 1
    except Exception as err:
        raise FileDamaged("corrupt_parquet", str(err)) from None


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def decode_html(payload: bytes, content_type: str | None) -> str | None:
    """Decode an HTML payload: the HTTP charset, then a ``<meta charset>``, then UTF-8. None if none works."""
    candidates: list[str] = []
    if content_type:
        m = re.search(r"charset\s*=\s*[\"']?([A-Za-z0-9_.:-]+)", content_type, re.IGNORECASE)
        if m:
            candidates.append(m.group(1))
    m2 = _META_CHARSET.search(payload[:4096])
    if m2:
        candidates.append(m2.group(1).decode("ascii", "ignore"))
    candidates.append("utf-8")
    for enc in candidates:
        try:
            return payload.decode(enc)
        except (UnicodeDecodeError, LookupError):
            continue
    return None


def gzip_intact(path: str) -> bool:
    """True if every gzip member of ``path`` is complete (a cut file ends inside a member).

    Decompresses once more with output discarded (C speed, bounded memory); only used where the reader itself
    cannot tell a clean end from a cut one.
    """
    with open(path, "rb") as fh:
        d = zlib.decompressobj(31)
        fed = False
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            buf = chunk
            while buf:
                fed = True
                try:
                    d.decompress(buf, 1 << 24)
                except zlib.error:
                    return False
                if d.eof:
                    buf = d.unused_data
                    d = zlib.decompressobj(31)
                    fed = False
                else:
                    buf = d.unconsumed_tail
    return not fed or d.eof


def read_warc(f: InputFile, part: int = 0, parts: int = 1) -> Iterator[dict | Skip]:
    """HTML responses (and WET text conversions) of a WARC/WARC.gz file; other records are not documents.

    warcio reads record by record, so a file cut in the middle keeps every record before the cut.
    ``part``/``parts``: keep only the candidate records (response/resource/conversion) whose index
    ``% parts == part``; the others are skipped before their payload is read (see ``work_units``).
    """
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    size = os.path.getsize(f.path)
    try:
        with open(f.path, "rb") as fh:
            archive = ArchiveIterator(fh)
            n_records = 0
            index = -1
            for record in archive:
                n_records += 1
                if record.format != "warc":  # warcio reads any line-based text as a legacy ARC file
                    raise FileDamaged(
                        "truncated_or_corrupt_warc", f"not a WARC file (looks like {record.format})"
                    )
                if record.rec_type not in ("response", "resource", "conversion"):
                    continue
                index += 1
                if index % parts != part:
                    continue
                headers = record.rec_headers
                http = record.http_headers
                ctype = (http.get_header("Content-Type") if http is not None else None) or headers.get_header(
                    "Content-Type"
                )
                mime = (
                    (headers.get_header("WARC-Identified-Payload-Type") or ctype or "")
                    .split(";")[0]
                    .strip()
                    .lower()
                )
                if record.rec_type == "conversion":
                    kind = "text"
                elif mime in _HTML_TYPES:
                    kind = "html"
                else:
                    yield Skip("not_html")
                    continue
                if http is not None and record.rec_type == "response":
                    status = http.get_statuscode()
                    if status and not status.startswith("2"):
                        yield Skip("http_error_status")
                        continue
                payload = record.content_stream().read()
                if not payload.strip():
                    yield Skip("empty_text")
                    continue
                text = decode_html(payload, ctype) if kind == "html" else decode_html(payload, None)
                if text is None:
                    yield Skip("undecodable_html")
                    continue
                checked = _check_text(text)
                if isinstance(checked, Skip):
                    yield checked
                    continue
                url = headers.get_header("WARC-Target-URI")
                yield {
                    "text": checked,
                    "id": headers.get_header("WARC-Record-ID") or f"{Path(f.path).name}/{url}",
                    "metadata": {"url": url, "date": headers.get_header("WARC-Date"), "format": kind},
                }
            # warcio ends quietly at a gzip member cut short, so check what it could not tell us.
            if n_records == 0 and size > 0:
                raise FileDamaged("truncated_or_corrupt_warc", "no WARC record could be read")
            if archive.offset < size:
                raise FileDamaged(
                    "truncated_or_corrupt_warc", f"{size - archive.offset} bytes after the last record"
                )
            fh.seek(0)
            if part == 0 and fh.read(2) == b"\x1f\x8b" and not gzip_intact(f.path):
                raise FileDamaged("truncated_or_corrupt_warc", "the last gzip member is cut short")
    except ArchiveLoadFailed as err:
        raise FileDamaged("truncated_or_corrupt_warc", str(err)) from None
    except _DAMAGE as err:
        raise FileDamaged("truncated_or_corrupt_warc", str(err)) from None


READERS = {"jsonl": read_jsonl, "text": read_text, "parquet": read_parquet, "warc": read_warc}
SPLITTABLE = frozenset({"warc", "jsonl"})  # formats read record by record, so a file can be split by record


def work_units(files: list[InputFile], world_size: int) -> list[tuple[InputFile, int, int]]:
    """``(file, part, parts)`` units, in order; task ``r`` reads ``units[r::world_size]``.

    With at least as many files as tasks every file is one unit (whole files per task, as datatrove does).
    With fewer, each WARC/JSONL file is split into ``ceil(world_size / len(files))`` record-stripes so no
    task sits idle (a one-file crawl with two tasks used to leave one of them with nothing to do).
    """
    if world_size <= 1 or len(files) >= world_size or not files:
        return [(f, 0, 1) for f in files]
    n = -(-world_size // len(files))
    units: list[tuple[InputFile, int, int]] = []
    for f in files:
        parts = n if f.format in SPLITTABLE else 1
        units.extend((f, p, parts) for p in range(parts))
    return units


# --------------------------------------------------------------------------------------------------------
# the datatrove step


class InputReader(PipelineStep):
    """First pipeline step: read this task's share of the input files into ``Document``s.

    Counters (in the step's stats, summed over tasks by the report): ``input_files``, ``input_bytes`` (size on
    disk), ``documents``, ``skipped_<reason>`` per skipped record, ``damaged_<reason>`` per file whose rest
    could not be read. ``damaged_files`` lists those paths in the task log.
    """

    name = "read"
    type = "📖 - READER"

    def __init__(self, files: list[InputFile]):
        super().__init__()
        self.files = list(files)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from datatrove.utils.logging import logger

        if data:
            yield from data
        for f, part, parts in work_units(self.files, world_size)[rank::world_size]:
            first = part == 0  # file-level counters are counted once per file, by its first part
            if parts > 1:
                self.stat_update("split_parts")
            try:
                size = os.path.getsize(f.path)
            except OSError:
                if first:
                    self.stat_update("input_files")
                    self.stat_update("damaged", "damaged_missing_file")
                    logger.warning(f"{f.path}: vanished before it could be read")
                continue
            if first:
                self.stat_update("input_files")
                self.stat_update("input_bytes", value=size, unit="file")
            n = 0
            try:
                for item in READERS[f.format](f, part, parts):
                    if isinstance(item, Skip):
                        self.stat_update("skipped", f"skipped_{item.reason}")
                        continue
                    with self.track_time():
                        meta = {"source": f.source, "file": f.path, **item["metadata"]}
                        meta.setdefault("format", "text")
                        doc = Document(text=item["text"], id=item["id"], metadata=meta)
                    n += 1
                    self.stat_update("documents")
                    yield doc
            except FileDamaged as err:
                if first:
                    self.stat_update("damaged", f"damaged_{err.reason}")
                    logger.warning(
                        f"{f.path}: {err.reason} after {n} documents; kept those, skipped the rest "
                        f"({err.detail})"
                    )
            if n == 0 and parts == 1:
                self.stat_update("files_without_documents")


def write_inputs_list(path: Path, files: list[InputFile]) -> None:
    """Record the resolved input list beside the work files (what a resumed run must see unchanged)."""
    path.write_text(json.dumps([f.__dict__ for f in files], indent=1) + "\n", encoding="utf-8")
