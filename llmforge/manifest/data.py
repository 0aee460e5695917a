"""`data:` — the datatrove pipeline: extraction, filtering, PII scrubbing, dedup, shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from .base import Section, StageSection, runtime_only

PIIAction = Literal["redact", "drop-document", "keep"]


class InputSpec(Section):
    path: str = Field(description="File, folder or glob (relative to the manifest) to read documents from.")
    format: Literal["auto", "warc", "jsonl", "parquet", "text"] = Field(
        default="auto", description="Input format; `auto` decides from the file extension."
    )
    text_key: str = Field(default="text", description="Field holding the text in JSONL/Parquet rows.")
    id_key: str = Field(default="id", description="Field holding a document id in JSONL/Parquet rows.")


class ExtractConfig(Section):
    enabled: bool = Field(default=True, description="Extract main text from HTML with trafilatura.")
    favour_precision: bool = Field(default=True, description="Prefer less but cleaner text (trafilatura).")
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Per-document extraction budget in CPU seconds of the extractor process (not wall time, "
        "so a busy machine does not make pages time out). Typical pages take 0.01-0.2 s.",
    )
    fallback: bool = Field(
        default=True,
        description="When trafilatura times out, crashes or errors on a page, extract it again with a simple, "
        "linear-time HTML-to-text pass (headings, paragraphs, lists, tables, code) instead of dropping it. "
        "Rescued pages carry `metadata.extractor: fallback` and are counted as `rescued_<cause>`.",
    )


class LanguageConfig(Section):
    enabled: bool = Field(default=True, description="Keep only documents in `languages` (fastText LID-176).")
    languages: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep.")
    min_score: float = Field(default=0.65, ge=0, le=1, description="Minimum language-ID confidence to keep.")


class GopherQualityConfig(Section):
    enabled: bool = Field(default=True, description="Gopher quality rules (MassiveText).")
    min_doc_words: int = Field(default=50, ge=0, description="Drop documents with fewer words.")
    max_doc_words: int = Field(default=100_000, gt=0, description="Drop documents with more words.")
    min_avg_word_length: float = Field(default=3, ge=0, description="Minimum mean word length.")
    max_avg_word_length: float = Field(default=10, gt=0, description="Maximum mean word length.")
    max_symbol_word_ratio: float = Field(default=0.1, ge=0, description="Max ratio of '#'/'...' to words.")
    max_bullet_lines_ratio: float = Field(
        default=0.9, ge=0, le=1, description="Max fraction of bullet lines."
    )
    max_ellipsis_lines_ratio: float = Field(
        default=0.3, ge=0, le=1, description="Max fraction of lines ending in '...'."
    )
    max_non_alpha_words_ratio: float = Field(
        default=0.8,
        ge=0,
        le=1,
        description="Min fraction of words with an alphabetic character (datatrove naming).",
    )
    min_stop_words: int = Field(default=2, ge=0, description="Minimum English stop words present.")


class GopherRepetitionConfig(Section):
    enabled: bool = Field(
        default=True, description="Gopher repetition rules (duplicate lines/paragraphs/n-grams)."
    )
    dup_line_frac: float = Field(
        default=0.3, ge=0, le=1, description="Max fraction of lines that are duplicates of another line."
    )
    dup_para_frac: float = Field(
        default=0.3, ge=0, le=1, description="Max fraction of paragraphs that are duplicates."
    )
    dup_line_char_frac: float = Field(
        default=0.2, ge=0, le=1, description="Max fraction of characters in duplicated lines."
    )
    dup_para_char_frac: float = Field(
        default=0.2, ge=0, le=1, description="Max fraction of characters in duplicated paragraphs."
    )
    ngram_scale: float = Field(
        default=1.0,
        gt=0,
        description="Multiplies Gopher's n-gram limits (top 2-4-gram share 0.20/0.18/0.16, duplicated 5-10-gram "
        "share 0.15…0.10): 1.5 allows 50% more repeated phrasing (API references repeat signatures).",
    )


class C4Config(Section):
    enabled: bool = Field(default=True, description="C4-style line and document rules (no bad-word list).")
    filter_no_terminal_punct: bool = Field(
        default=False, description="Drop lines without terminal punctuation."
    )
    min_num_sentences: int = Field(default=3, ge=0, description="Drop documents with fewer sentences.")
    min_words_per_line: int = Field(
        default=3,
        ge=0,
        description="Remove lines with fewer words (0 = keep every line; short lines are code and table rows "
        "on documentation pages).",
    )
    filter_curly_bracket: bool = Field(
        default=True, description="Drop documents containing `{` (C4's rule against code; wrong for docs)."
    )
    filter_javascript: bool = Field(
        default=True,
        description="Remove lines mentioning 'javascript' (C4's rule against 'enable JavaScript').",
    )
    filter_policy: bool = Field(
        default=True, description="Remove lines with 'terms of use', 'privacy policy', 'cookie policy'…"
    )
    filter_lorem_ipsum: bool = Field(default=True, description="Drop documents containing 'lorem ipsum'.")
    edit_lines: bool = Field(
        default=True,
        description="Remove the lines C4's line rules reject from the text. Off: C4 only decides keep/drop and "
        "the text stays as extracted (C4 also strips every kept line's indentation, which breaks code).",
    )


class FineWebConfig(Section):
    enabled: bool = Field(
        default=True, description="FineWeb quality rules (line punctuation, short lines, dup chars)."
    )
    line_punct_thr: float = Field(
        default=0.12, ge=0, le=1, description="Min fraction of lines ending in punctuation."
    )
    short_line_thr: float = Field(default=0.67, ge=0, le=1, description="Max fraction of short lines.")
    short_line_length: int = Field(
        default=30, gt=0, description="A line shorter than this many characters counts as short."
    )
    char_duplicates_ratio: float = Field(
        default=0.01, ge=0, le=1, description="Max fraction of duplicated line chars."
    )
    new_line_ratio: float = Field(default=0.3, ge=0, le=1, description="Max ratio of newlines to words.")


class QualityConfig(Section):
    """The heuristic filters. Field defaults here are the ``web`` profile's; ``data.profile`` fills in its own
    values for every key the manifest leaves unset (see ``PROFILES``)."""

    gopher_quality: GopherQualityConfig = Field(
        default_factory=GopherQualityConfig, description="Gopher quality filter."
    )
    gopher_repetition: GopherRepetitionConfig = Field(
        default_factory=GopherRepetitionConfig, description="Gopher repetition filter."
    )
    c4: C4Config = Field(default_factory=C4Config, description="C4 quality filter.")
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig, description="FineWeb quality filter.")


class PIIConfig(Section):
    enabled: bool = Field(default=True, description="Scan every document for personal data and secrets.")
    email: PIIAction = Field(default="redact", description="E-mail addresses → `<EMAIL>`.")
    phone: PIIAction = Field(
        default="redact", description="Phone numbers (international formats) → `<PHONE>`."
    )
    ipv4: PIIAction = Field(default="redact", description="Public IPv4 addresses → `<IP_ADDRESS>`.")
    ipv6: PIIAction = Field(default="redact", description="Public IPv6 addresses → `<IP_ADDRESS>`.")
    credit_card: PIIAction = Field(default="redact", description="Luhn-valid card numbers → `<CREDIT_CARD>`.")
    iban: PIIAction = Field(default="redact", description="Checksum-valid IBANs → `<IBAN>`.")
    ssn: PIIAction = Field(default="redact", description="US social security numbers → `<SSN>`.")
    secret: PIIAction = Field(
        default="drop-document",
        description="API keys, tokens and private-key blocks (AWS, GitHub, Slack, bearer tokens, PEM) → `<SECRET>`.",
    )


class MinHashConfig(Section):
    enabled: bool = Field(default=True, description="MinHash near-duplicate removal (datatrove, 4 stages).")
    ngram_size: int = Field(default=5, gt=0, description="Word n-gram (shingle) size.")
    num_buckets: int = Field(default=14, gt=0, description="LSH bands.")
    hashes_per_bucket: int = Field(default=8, gt=0, description="Rows per LSH band.")


class DedupConfig(Section):
    exact: bool = Field(
        default=True, description="Drop documents whose normalised text is an exact duplicate."
    )
    minhash: MinHashConfig = Field(default_factory=MinHashConfig, description="Near-duplicate removal.")


class SlurmConfig(Section):
    partition: str | None = Field(
        default=None, description="Slurm partition for data jobs (required when `data.executor` is `slurm`)."
    )
    time: str = Field(default="04:00:00", description="Slurm time limit per job.")
    cpus_per_task: int = Field(default=1, gt=0, description="CPUs per Slurm task.")
    mem_per_cpu_gb: float = Field(default=2, gt=0, description="Memory per CPU, GiB.")
    qos: str | None = Field(default=None, description="Slurm QOS (`--qos`); unset = the cluster default.")
    env_command: str | None = Field(
        default=None,
        description="Shell line run at the start of every job to activate the Python environment "
        "(e.g. `source /shared/venv/bin/activate`). Unset = the jobs inherit the submitting shell's PATH.",
    )
    job_name: str = Field(
        default="llmforge-data", description="Prefix of the Slurm job names (one job per pass)."
    )
    poll_s: float = Field(
        default=30,
        gt=0,
        description="How often the stage checks the jobs' completion markers while it waits.",
    )


class RayConfig(Section):
    address: str | None = Field(
        default=None,
        description="Ray cluster to connect to (`ray.init(address=...)`, e.g. `auto` or `ray://head:10001`). "
        "Unset = connect to an already-initialised Ray, or start a local one.",
    )
    cpus_per_task: int = Field(default=1, gt=0, description="CPUs Ray reserves per task.")
    mem_per_cpu_gb: float = Field(default=2, gt=0, description="Memory Ray reserves per CPU, GiB.")


ProfileName = Literal["web", "docs", "code"]

# Each profile lists only what it changes from the field defaults (which are `web`, i.e. FineWeb's settings).
# The values and their reasons are documented in docs/data.md ("Filter profiles"); tests/data/test_profiles.py
# measures them on a documentation-like and a web-like site.
PROFILES: dict[str, dict[str, dict]] = {
    # Common Crawl-scale heuristics as FineWeb/Gopher/C4 tuned them: unknown sites, lots of spam.
    "web": {},
    # A project's own documentation / technical site: prose with code blocks, tables, API references,
    # short headings and lists. The web rules read all of those as "not prose".
    "docs": {
        "language": {"min_score": 0.5},  # code and identifiers lower fastText's confidence on English pages
        "quality": {
            "gopher_quality": {
                "min_doc_words": 25,  # short reference pages (one function, one option) are real content
                "max_avg_word_length": 14,  # identifiers like `get_logger`, `max_file_size_mb`
                "max_symbol_word_ratio": 0.5,  # '#' starts comments and headings in code blocks
                "max_bullet_lines_ratio": 0.95,  # option lists, tables of contents
                "max_non_alpha_words_ratio": 0.5,  # code tokens (`=`, `()`), numbers in tables
            },
            "gopher_repetition": {
                "dup_line_frac": 0.5,  # "Parameters", "Returns", "}" repeat on API pages
                "dup_para_frac": 0.5,
                "dup_line_char_frac": 0.4,
                "dup_para_char_frac": 0.4,
                # signatures and parameter names repeat by design (5-gram share 0.15 → 0.375); keyword-stuffed
                # spam repeats far more (> 0.9) and is still dropped
                "ngram_scale": 2.5,
            },
            "c4": {
                "min_num_sentences": 2,
                "min_words_per_line": 0,  # C4 deletes short lines: that would shred code blocks and tables
                "filter_curly_bracket": False,  # any `{` drops the page in C4: every code sample
                "filter_javascript": False,  # docs about JavaScript mention it on purpose
                "edit_lines": False,  # keep code indentation and table rows as extracted
            },
            "fineweb": {
                # code lines, table rows, headings and API signatures end without punctuation (rustdoc pages
                # have under 2% punctuated lines); link lists are caught by extraction and language ID
                "line_punct_thr": 0.0,
                "short_line_thr": 0.85,
                "char_duplicates_ratio": 0.2,  # repeated `}` / `Source§` / signature lines
                "new_line_ratio": 0.5,  # a code line holds ~3 words, a table row is a line
            },
        },
    },
    # Code-heavy pages (API listings, notebooks, source browsers): keep anything that is mostly text and not
    # repetitive spam; the prose-shape rules (C4, FineWeb) are off.
    "code": {
        "language": {"min_score": 0.3},
        "quality": {
            "gopher_quality": {
                "min_doc_words": 20,
                "max_avg_word_length": 20,
                "max_symbol_word_ratio": 1.0,
                "max_bullet_lines_ratio": 1.0,
                "max_non_alpha_words_ratio": 0.3,
                "min_stop_words": 0,
            },
            "gopher_repetition": {
                "dup_line_frac": 0.6,
                "dup_para_frac": 0.6,
                "dup_line_char_frac": 0.5,
                "dup_para_char_frac": 0.5,
                "ngram_scale": 3.0,
            },
            "c4": {"enabled": False},
            "fineweb": {"enabled": False},
        },
    },
}
DEFAULT_PROFILE: ProfileName = "docs"


def _overlay(defaults: dict, given: Any) -> Any:
    """``given`` with ``defaults`` filled in under every key it does not set (nested dicts merged)."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        return given  # an already-built model (assignment) or a wrong type pydantic will report
    out = dict(given)
    for key, value in defaults.items():
        if isinstance(value, dict):
            out[key] = _overlay(value, out.get(key))
        else:
            out.setdefault(key, value)
    return out


class DataSection(StageSection):
    profile: ProfileName = Field(
        default=DEFAULT_PROFILE,
        description="Filter profile: the thresholds of `language.min_score` and every `quality.*` filter that "
        "the manifest does not set itself. `web` = FineWeb/Gopher/C4 as tuned for Common Crawl (spam-heavy "
        "unknown sites; drops most documentation and code pages); `docs` (default) = documentation and "
        "technical sites: code blocks, tables, API references, short reference pages kept; `code` = "
        "code-heavy pages, C4/FineWeb off. Applied when the manifest is read (`llmforge run data.profile=web` "
        "works). Values and reasons: docs/data.md, 'Filter profiles'.",
    )
    warn_drop_share: float = runtime_only(
        default=0.3,
        gt=0,
        le=1,
        description="Warn (summary, log and report) when one step drops more than this share of the documents "
        "it receives, naming the step and the knob to relax, with examples of what it dropped.",
    )
    inputs: list[InputSpec] = Field(
        default_factory=list,
        description="Where documents come from, besides the crawl's WARC files (used automatically when the "
        "crawl stage is enabled).",
    )
    executor: Literal["local", "slurm", "ray"] = runtime_only(
        default="local", description="datatrove executor: local processes, Slurm jobs, or a Ray cluster."
    )
    tasks: int = Field(default=2, gt=0, description="Parallel tasks the input is split into.")
    workers: int = runtime_only(default=2, gt=0, description="Tasks run at once (local executor).")
    slurm: SlurmConfig = runtime_only(
        default_factory=SlurmConfig, description="Settings for `executor: slurm`."
    )
    ray: RayConfig = runtime_only(default_factory=RayConfig, description="Settings for `executor: ray`.")
    start_method: Literal["fork", "forkserver", "spawn"] = runtime_only(
        default="fork",
        description="How the local executor starts worker processes. `fork` shares the already-imported "
        "spaCy/trafilatura with the workers (seconds faster per pass); use `forkserver` if a library in your "
        "environment is not fork-safe.",
    )
    extract: ExtractConfig = Field(default_factory=ExtractConfig, description="HTML text extraction.")
    fix_unicode: bool = Field(default=True, description="Repair mojibake and odd Unicode with ftfy.")
    language: LanguageConfig = Field(default_factory=LanguageConfig, description="Language identification.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Heuristic quality filters.")
    pii: PIIConfig = Field(default_factory=PIIConfig, description="PII and secret scrubbing, per kind.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and near-duplicate removal.")
    max_file_size_mb: int = Field(default=256, gt=0, description="Rotate output shards at this size (MiB).")
    samples: int = runtime_only(
        default=3, ge=0, le=50, description="Before/after document samples shown in the report and summary."
    )
    output_dir: Path | None = runtime_only(
        default=None, description="Override where the cleaned JSONL.gz shards go (default runs/data/output)."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        """Fill unset thresholds from the chosen profile; keys the manifest sets always win."""
        if not isinstance(data, dict):
            return data
        name = data.get("profile", DEFAULT_PROFILE)
        if name not in PROFILES:
            return data  # the Literal check reports it with the allowed names
        out = dict(data)
        for section, values in PROFILES[name].items():
            out[section] = _overlay(values, out.get(section))
        return out

    @model_validator(mode="after")
    def _check(self):
        if self.workers > self.tasks:
            self.__dict__["workers"] = self.tasks
        if self.executor == "slurm" and not self.slurm.partition:
            raise ValueError("`executor: slurm` needs `slurm.partition` (the partition the data jobs run on)")
        if self.language.enabled and not self.language.languages:
            raise ValueError(
                "`language.languages` is empty: list the ISO 639-1 codes to keep, or set "
                "`language.enabled: false`"
            )
        return self


def _yaml(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _document_profiles() -> None:
    """Append each profile's value to the description of every knob a profile sets.

    Field defaults are the ``web`` values; without this, ``llmforge validate --explain`` would show those and
    hide that the default profile (``docs``) uses others.
    """
    owners: dict[str, type[Section]] = {
        "language": LanguageConfig,
        "quality.gopher_quality": GopherQualityConfig,
        "quality.gopher_repetition": GopherRepetitionConfig,
        "quality.c4": C4Config,
        "quality.fineweb": FineWebConfig,
    }

    def value(profile: str, path: str, key: str) -> Any:
        node: Any = PROFILES[profile]
        for part in path.split("."):
            node = node.get(part, {})
        if key in node:
            return node[key]
        owner_off = node.get("enabled") is False and key != "enabled"
        return "–" if owner_off else owners[path].model_fields[key].default

    touched: dict[str, set[str]] = {path: set() for path in owners}
    for profile in PROFILES.values():
        for path in owners:
            node: Any = profile
            for part in path.split("."):
                node = node.get(part, {})
            touched[path].update(node)
    for path, keys in touched.items():
        cls = owners[path]
        for key in sorted(keys):
            field = cls.model_fields[key]
            shown = ", ".join(f"{p} {_yaml(value(p, path, key))}" for p in PROFILES)
            field.description = f"{field.description} By `data.profile`: {shown}."
        cls.model_rebuild(force=True)
    for cls in (QualityConfig, DataSection):
        cls.model_rebuild(force=True)


_document_profiles()
