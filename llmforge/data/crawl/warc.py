"""WARC output: rotating ``*.warc.gz`` files that only appear in ``warc/`` once complete.

A file being written lives in ``warc.partial/``; closing it (rotation at ``warc_max_bytes`` or
``warc_max_records`` stored pages, or the end of the crawl) renames it into ``warc/``. So ``warc/`` — the folder the data stage reads with datatrove's
``WarcReader`` — never holds a truncated file, even after a kill.

Each record is its own gzip member (warcio's default), which is what makes the open file repairable: cutting
it at a committed record boundary leaves a valid WARC. Each file starts with a ``warcinfo`` record; each
stored page is a ``request`` + ``response`` pair linked by ``WARC-Concurrent-To``.

Payloads are stored decoded (identity), the way Common Crawl does: httpx undoes ``Content-Encoding`` and
chunked transfer coding, so the original ``Content-Encoding`` / ``Transfer-Encoding`` / ``Content-Length``
headers are kept under ``X-Crawler-…`` names and a ``Content-Length`` of the stored bytes is written. The
payload bytes themselves are exactly what the server sent (no charset decoding).

``reproducible=True`` (crawls of ``crawl.local_site``) makes the bytes a function of the content: record IDs are
name-based UUIDs of what the record holds instead of random ones, and the ``warcinfo`` record carries a fixed
date (``local_site.SITE_DATE``; page records carry the capture time the engine passes, fixed for local pages).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

from ... import __version__ as _llmforge_version
from ... import console

log = console.get_logger(__name__)

_NAME = re.compile(r"^crawl-(\d{5,})\.warc\.gz$")
_RENAMED_HEADERS = {"content-encoding", "transfer-encoding", "content-length"}


def warc_name(index: int) -> str:
    return f"crawl-{index:05d}.warc.gz"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Namespace of llmforge's name-based WARC record IDs (uuid5 of the namespace URL below).
_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/llmforge/llmforge/warc-record")


def content_record_id(*parts: str) -> str:
    """``<urn:uuid:…>`` named by ``parts`` (record type, URL, date, payload digest): the same record, the same ID."""
    return f"<urn:uuid:{uuid.uuid5(_ID_NAMESPACE, chr(0).join(parts))}>"


class WarcSink:
    """Appends request/response pairs; ``write`` returns (file name, committed length after the pair)."""

    def __init__(
        self,
        warc_dir: Path,
        partial_dir: Path,
        max_bytes: int,
        user_agent: str,
        max_records: int | None = None,
        *,
        reproducible: bool = False,
        info_date: float | None = None,
    ):
        from warcio.warcwriter import WARCWriter  # heavy-ish import, only when crawling

        self._writer_cls = WARCWriter
        self.warc_dir = warc_dir
        self.partial_dir = partial_dir
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.records = 0  # stored pages (response records) in the open file; the engine sets it on resume
        self.user_agent = user_agent
        self.reproducible = reproducible
        self.info_date = info_date  # fixed warcinfo date for reproducible files (None: now)
        warc_dir.mkdir(parents=True, exist_ok=True)
        partial_dir.mkdir(parents=True, exist_ok=True)
        self._f: io.BufferedWriter | None = None
        self._writer = None
        self.name: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _next_index(self) -> int:
        used = [
            int(m.group(1))
            for d in (self.warc_dir, self.partial_dir)
            for p in d.iterdir()
            if (m := _NAME.match(p.name))
        ]
        return max(used, default=0) + 1

    def recover(self, open_name: str | None, committed: int) -> list[str]:
        """Repair ``warc.partial/`` after a kill; returns names of files whose stored pages were lost.

        ``open_name``/``committed`` are what the state last committed. The open file is cut back to
        ``committed`` bytes and reopened for appending; stray partial files (created but never committed)
        are deleted.
        """
        lost: list[str] = []
        for p in self.partial_dir.iterdir():
            if p.name != open_name:
                log.info("crawl: removing uncommitted partial WARC %s", p.name)
                p.unlink()
        if open_name is None:
            return lost
        path = self.partial_dir / open_name
        if not path.exists():
            if not (self.warc_dir / open_name).exists():
                lost.append(open_name)  # vanished: its pages must be fetched again
            return lost  # else: it was closed (renamed) just before the kill
        size = path.stat().st_size
        if size > committed:
            log.info(
                "crawl: cutting %s back to its last committed record (%d → %d bytes)",
                open_name,
                size,
                committed,
            )
            with open(path, "rb+") as f:
                f.truncate(committed)
        elif size < committed:
            # Only after a power cut (the state was durable, the file tail was not). Pages in that file
            # get re-fetched rather than trusting a damaged file.
            log.warning(
                "crawl: %s is shorter than recorded (%d < %d bytes); re-fetching its pages",
                open_name,
                size,
                committed,
            )
            path.unlink()
            lost.append(open_name)
            return lost
        self._open(open_name, append=True)
        return lost

    def _open(self, name: str, append: bool = False) -> None:
        path = self.partial_dir / name
        self._f = open(path, "ab")  # noqa: SIM115 - closed in close_current()
        self._writer = self._writer_cls(self._f, gzip=True)
        self.name = name
        self.records = 0
        if not append:
            info = {
                "software": f"llmforge/{_llmforge_version} (crawl stage)",
                "format": "WARC File Format 1.1",
                "http-header-user-agent": self.user_agent,
            }
            record = self._writer.create_warcinfo_record(name, info)
            if self.reproducible:
                record.rec_headers.replace_header("WARC-Record-ID", content_record_id("warcinfo", name))
                if self.info_date is not None:
                    record.rec_headers.replace_header("WARC-Date", _iso(self.info_date))
            self._writer.write_record(record)

    def close_current(self) -> str | None:
        """Finish the open file: fsync and move it into ``warc/``. Returns its name."""
        if self._f is None:
            return None
        name = self.name
        assert name is not None
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.partial_dir / name, self.warc_dir / name)
        self._f, self._writer, self.name = None, None, None
        return name

    def needs_rotation(self) -> bool:
        """True once the open file holds ``max_bytes`` or ``max_records`` stored pages.

        Small files are what lets the data stage give each of its tasks whole files to read.
        """
        if self._f is None:
            return False
        if self.max_records is not None and self.records >= self.max_records:
            return True
        return self._f.tell() >= self.max_bytes

    # -- records -----------------------------------------------------------------------------------------
    def write(
        self,
        *,
        url: str,
        request_line: str,
        request_headers: list[tuple[str, str]],
        http_version: str,
        status: int,
        reason: str,
        response_headers: list[tuple[str, str]],
        body: bytes,
        payload_type: str,
        fetched_at: float,
    ) -> tuple[str, int]:
        from warcio.statusandheaders import StatusAndHeaders

        if self._f is None:
            self._open(warc_name(self._next_index()))
        assert self._writer is not None and self._f is not None and self.name is not None
        writer = self._writer
        headers = [(f"X-Crawler-{k}" if k.lower() in _RENAMED_HEADERS else k, v) for k, v in response_headers]
        headers.append(("Content-Length", str(len(body))))
        date = _iso(fetched_at)
        resp_headers: dict[str, str] = {"WARC-Date": date, "WARC-Identified-Payload-Type": payload_type}
        req_headers: dict[str, str] = {"WARC-Date": date}
        if self.reproducible:
            digest = hashlib.sha256(body).hexdigest()
            resp_headers["WARC-Record-ID"] = content_record_id("response", url, date, digest)
            req_headers["WARC-Record-ID"] = content_record_id("request", url, date, digest)
        resp = writer.create_warc_record(
            url,
            "response",
            payload=io.BytesIO(body),
            length=len(body),
            warc_headers_dict=resp_headers,
            http_headers=StatusAndHeaders(f"{status} {reason}".strip(), headers, protocol=http_version),
        )
        req = writer.create_warc_record(
            url,
            "request",
            warc_headers_dict=req_headers,
            http_headers=StatusAndHeaders(request_line, request_headers, is_http_request=True),
        )
        writer.write_request_response_pair(req, resp)
        self.records += 1
        # Flush to the OS (not fsync): enough for a killed process; the state commit follows this.
        self._f.flush()
        return self.name, self._f.tell()
