"""`data:` — the datatrove pipeline: extraction, filtering, PII scrubbing, dedup, shards."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .base import Section, StageSection

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
    timeout_s: float = Field(default=1.0, gt=0, description="Per-document extraction timeout, seconds.")


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


class C4Config(Section):
    enabled: bool = Field(default=True, description="C4-style line and document rules (no bad-word list).")
    filter_no_terminal_punct: bool = Field(
        default=False, description="Drop lines without terminal punctuation."
    )
    min_num_sentences: int = Field(default=3, ge=0, description="Drop documents with fewer sentences.")
    min_words_per_line: int = Field(default=3, ge=0, description="Drop lines with fewer words.")


class FineWebConfig(Section):
    enabled: bool = Field(
        default=True, description="FineWeb quality rules (line punctuation, short lines, dup chars)."
    )
    line_punct_thr: float = Field(
        default=0.12, ge=0, le=1, description="Min fraction of lines ending in punctuation."
    )
    short_line_thr: float = Field(default=0.67, ge=0, le=1, description="Max fraction of short lines.")
    char_duplicates_ratio: float = Field(
        default=0.01, ge=0, le=1, description="Max fraction of duplicated line chars."
    )
    new_line_ratio: float = Field(default=0.3, ge=0, le=1, description="Max ratio of newlines to words.")


class QualityConfig(Section):
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


class DataSection(StageSection):
    inputs: list[InputSpec] = Field(
        default_factory=list,
        description="Where documents come from, besides the crawl's WARC files (used automatically when the "
        "crawl stage is enabled).",
    )
    executor: Literal["local", "slurm", "ray"] = Field(
        default="local", description="datatrove executor: local processes, Slurm jobs, or a Ray cluster."
    )
    tasks: int = Field(default=2, gt=0, description="Parallel tasks the input is split into.")
    workers: int = Field(default=2, gt=0, description="Tasks run at once (local executor).")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="Settings for `executor: slurm`.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Settings for `executor: ray`.")
    start_method: Literal["fork", "forkserver", "spawn"] = Field(
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
    samples: int = Field(
        default=3, ge=0, le=50, description="Before/after document samples shown in the report and summary."
    )
    output_dir: Path | None = Field(
        default=None, description="Override where the cleaned JSONL.gz shards go (default runs/data/output)."
    )

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
