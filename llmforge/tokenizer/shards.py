"""Corpus → token shards that pretraining memory-maps (format ``llmforge.shards.v1``, defined in ``llmforge.shards``).

Layout of ``out_dir`` (see ``llmforge.shards`` for the schema; this stage writes no loss mask)::

    index.json                 dtype, vocab size, special ids, tokenizer hash, per-split files and counts
    train_00000.bin            flat little-endian uint16/uint32 tokens; every document is followed by EOS
    train_00000.docs.npy       int64 start offset of each document inside that .bin
    val_00000.bin / .docs.npy  the same for validation

How it runs, and why that way:

1. **Parts.** Every corpus file is one unit of work, tokenized by one worker process into a *part* (its
   train and val tokens and document lengths) under a work folder, then marked done with a small JSON
   marker that carries the part's fingerprint. A killed run re-uses every part whose marker matches and only
   redoes the rest. Workers are spawned (never forked: the Rust tokenizer's thread pool does not survive a
   fork) and each gets an equal share of the cores for the tokenizer's own threads.
2. **Merge.** Parts are concatenated in corpus-file order into shards of about ``shard_tokens`` tokens, cut at
   document boundaries, inside a temporary folder that replaces ``out_dir`` atomically. Because the order is
   fixed by file name and the split by ``split.val_mask``, the output is byte-identical for any number of
   workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..console import get_logger, progress
from ..errors import StageInputError, TokenizerError
from ..shards import (
    SHARDS_FORMAT,
    SPLITS,
    ShardWriter,
    SplitStats,
    build_index,
    shard_dtype,
    shard_folder,
    write_index,
)
from ..utils.atomic import write_json
from .corpus import ReadStats, iter_texts, list_corpus_files
from .split import file_key, val_mask

log = get_logger(__name__)

__all__ = ["SHARDS_FORMAT", "ShardStats", "SplitStats", "shard_dtype", "tokenize_corpus"]

# Texts per encode call: large enough for the tokenizer's threads to stay busy, small enough to bound memory.
_BATCH_DOCS = 2048
_BATCH_CHARS = 8 << 20


@dataclass
class ShardStats:
    """What ``tokenize_corpus`` produced (mirrors ``index.json``) plus how the run went."""

    out_dir: Path
    dtype: str
    vocab_size: int
    splits: dict[str, SplitStats]
    input_files: int
    parts_reused: int
    read: ReadStats
    seconds: float
    skipped: bool = False  # the output already matched the inputs; nothing was redone

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.splits.values())

    @property
    def num_documents(self) -> int:
        return sum(s.num_documents for s in self.splits.values())

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------------------
# Worker side: one corpus file → one part
# --------------------------------------------------------------------------------------------------------

_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(path: str):
    tok = _TOKENIZERS.get(path)
    if tok is None:
        from tokenizers import Tokenizer

        tok = _TOKENIZERS[path] = Tokenizer.from_file(path)
        # Documents are framed by EOS here, never by a post-processor: the shard format must not depend on
        # whatever template a tokenizer.json happens to carry.
        tok.post_processor = None
    return tok


def _worker_init(threads: int) -> None:
    # Runs in a freshly spawned worker before tokenizers creates its thread pool.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["RAYON_RS_NUM_CPUS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"


@dataclass
class _PartJob:
    index: int
    path: str
    rel: str
    fingerprint: str
    tokenizer_json: str
    eos_id: int
    dtype: str
    seed: int
    val_fraction: float
    text_key: str
    work_dir: str


def _part_prefix(job: _PartJob) -> Path:
    return Path(job.work_dir) / f"part_{job.index:05d}"


def _process_part(job: _PartJob) -> dict[str, Any]:
    """Tokenize one corpus file into its part files and write the completion marker last."""
    tok = _tokenizer(job.tokenizer_json)
    dtype = np.dtype(job.dtype)
    prefix = _part_prefix(job)
    stats = ReadStats()
    key = file_key(job.seed, job.rel)
    tmp_suffix = f".tmp-{os.getpid()}"
    paths = {s: Path(f"{prefix}.{s}.bin") for s in SPLITS}
    files = {s: open(str(paths[s]) + tmp_suffix, "wb") for s in SPLITS}  # noqa: SIM115 - closed below
    lengths: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    n_docs = 0
    eos = job.eos_id

    def flush(texts: list[str]) -> None:
        nonlocal n_docs
        is_val = val_mask(key, n_docs, len(texts), job.val_fraction)
        n_docs += len(texts)
        encs = tok.encode_batch_fast(texts, add_special_tokens=False)
        for split, want in (("train", False), ("val", True)):
            sel = [e.ids for e, v in zip(encs, is_val, strict=True) if v == want]
            if not sel:
                continue
            lens = np.fromiter((len(ids) + 1 for ids in sel), dtype=np.int64, count=len(sel))
            flat = np.empty(int(lens.sum()), dtype=dtype)
            ends = np.cumsum(lens)
            flat[ends - 1] = eos
            pos = 0
            for ids, n in zip(sel, lens, strict=True):
                flat[pos : pos + n - 1] = ids
                pos += n
            files[split].write(flat.tobytes())
            lengths[split].append(lens)

    try:
        batch: list[str] = []
        chars = 0
        for text in iter_texts(Path(job.path), stats, job.text_key):
            batch.append(text)
            chars += len(text)
            if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
    finally:
        for f in files.values():
            f.close()
    counts: dict[str, dict[str, int]] = {}
    for s in SPLITS:
        lens = np.concatenate(lengths[s]) if lengths[s] else np.zeros(0, dtype=np.int64)
        np.save(f"{prefix}.{s}.lens.npy", lens)
        os.replace(str(paths[s]) + tmp_suffix, paths[s])
        counts[s] = {"num_tokens": int(lens.sum()), "num_documents": int(lens.size)}
    marker = {
        "fingerprint": job.fingerprint,
        "file": job.rel,
        "splits": counts,
        "read": asdict(stats),
    }
    write_json(f"{prefix}.done.json", marker)
    return marker


# --------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------


def _file_identity(path: Path, rel: str) -> dict[str, Any]:
    st = path.stat()
    return {"file": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _load_marker(path: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if marker.get("fingerprint") == fingerprint else None


def tokenize_corpus(
    corpus: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    shard_tokens: int = 100_000_000,
    workers: int = 2,
    text_key: str = "text",
    work_dir: str | os.PathLike | None = None,
) -> ShardStats:
    """Tokenize every document of ``corpus`` with the tokenizer in ``tokenizer_dir`` into ``out_dir``.

    ``corpus`` is a folder of ``*.jsonl.gz``/``*.jsonl`` files (read recursively, sorted) or one such file.
    Resumable: finished per-file parts under ``work_dir`` (default: a hidden folder beside ``out_dir``) are
    re-used after a crash; the work folder is removed on success. If ``out_dir`` already holds shards made
    from the same inputs and settings, nothing is redone. The arguments after ``out_dir`` match the
    ``tokenizer.shards`` manifest section (``tokenize_corpus(c, t, o, **cfg.shards.model_dump())``).
    """
    from .info import load_tokenizer_info

    t0 = time.monotonic()
    corpus, out_dir = Path(corpus), Path(out_dir)
    info = load_tokenizer_info(tokenizer_dir)
    files = list_corpus_files(corpus)
    if not files:
        raise StageInputError(
            f"{corpus}: the corpus has no *.jsonl.gz or *.jsonl files. Run the data stage (`llmforge run data`) "
            "or point the tokenizer at a folder that has them."
        )
    base = corpus if corpus.is_dir() else corpus.parent
    rels = [f.relative_to(base).as_posix() for f in files]
    dtype = shard_dtype(info.vocab_size)
    settings = {
        "format": SHARDS_FORMAT,
        "tokenizer_sha256": info.sha256,
        "eos_id": info.eos_id,
        "dtype": dtype.name,
        "seed": seed,
        "val_fraction": val_fraction,
        "text_key": text_key,
    }
    idents = [_file_identity(f, r) for f, r in zip(files, rels, strict=True)]
    run_fp = _fingerprint({**settings, "shard_tokens": shard_tokens, "files": idents})

    existing = out_dir / "index.json"
    if existing.exists():
        with contextlib.suppress(OSError, ValueError):
            index = json.loads(existing.read_text())
            if index.get("fingerprint") == run_fp:
                log.info("%s: shards are up to date with the corpus and tokenizer; nothing to do", out_dir)
                return _stats_from_index(index, out_dir, len(files), time.monotonic() - t0, skipped=True)

    work = Path(work_dir) if work_dir is not None else out_dir.parent / f".{out_dir.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("*.tmp-*"):  # leftovers of a killed worker
        stale.unlink(missing_ok=True)

    jobs = [
        _PartJob(
            index=i,
            path=str(f),
            rel=r,
            fingerprint=_fingerprint({**settings, **ident}),
            tokenizer_json=str(info.path / "tokenizer.json"),
            eos_id=info.eos_id,
            dtype=dtype.name,
            seed=seed,
            val_fraction=val_fraction,
            text_key=text_key,
            work_dir=str(work),
        )
        for i, (f, r, ident) in enumerate(zip(files, rels, idents, strict=True))
    ]
    markers: dict[int, dict[str, Any]] = {}
    for job in jobs:
        m = _load_marker(Path(f"{_part_prefix(job)}.done.json"), job.fingerprint)
        if m is not None:
            markers[job.index] = m
    reused = len(markers)
    todo = [j for j in jobs if j.index not in markers]
    if reused:
        log.info("resuming: %d of %d corpus files were already tokenized", reused, len(jobs))

    n_procs = max(1, min(workers, len(todo)))
    with progress("tokenize corpus", total=len(jobs), unit="files") as bar:
        bar.advance(reused)
        if n_procs == 1:
            for job in todo:
                markers[job.index] = _process_part(job)
                bar.advance(1, tokens=sum(c["num_tokens"] for c in _counts(markers)))
        else:
            import multiprocessing as mp

            threads = max(1, (os.cpu_count() or 1) // n_procs)
            with ProcessPoolExecutor(
                n_procs, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(threads,)
            ) as pool:
                futures = {pool.submit(_process_part, job): job for job in todo}
                for fut in as_completed(futures):
                    markers[futures[fut].index] = fut.result()
                    bar.advance(1, tokens=sum(c["num_tokens"] for c in _counts(markers)))

    read = ReadStats()
    for i in sorted(markers):
        read.merge(ReadStats(**markers[i]["read"]))
    total_docs = sum(c["num_documents"] for c in _counts(markers))
    if total_docs == 0:
        raise StageInputError(
            f"{corpus}: the corpus has no documents with text ({len(files)} files, {read.empty} empty, "
            f"{read.bad_lines} unreadable lines). Check the data stage's filters (`data:`) and re-run it."
        )

    index = _merge(jobs, markers, out_dir, dtype, shard_tokens, info, run_fp)
    shutil.rmtree(work, ignore_errors=True)
    stats = _stats_from_index(index, out_dir, len(files), time.monotonic() - t0)
    stats.parts_reused = reused
    stats.read = read
    log.info(
        "tokenized %s documents into %s tokens (%s) in %.1fs",
        f"{stats.num_documents:,}",
        f"{stats.num_tokens:,}",
        dtype.name,
        stats.seconds,
    )
    return stats


def _counts(markers: dict[int, dict[str, Any]]) -> list[dict[str, int]]:
    return [c for m in markers.values() for c in m["splits"].values()]


def _stats_from_index(
    index: dict[str, Any], out_dir: Path, n_files: int, seconds: float, *, skipped: bool = False
) -> ShardStats:
    splits = {
        s: SplitStats(v["num_tokens"], v["num_documents"], list(v["files"]))
        for s, v in index["splits"].items()
    }
    return ShardStats(
        out_dir=out_dir,
        dtype=index["dtype"],
        vocab_size=index["vocab_size"],
        splits=splits,
        input_files=n_files,
        parts_reused=n_files,
        read=ReadStats(),
        seconds=seconds,
        skipped=skipped,
    )


def _merge(
    jobs: list[_PartJob],
    markers: dict[int, dict[str, Any]],
    out_dir: Path,
    dtype: np.dtype,
    shard_tokens: int,
    info,
    fingerprint: str,
) -> dict[str, Any]:
    """Concatenate the parts in corpus order into the final shards; replaces ``out_dir`` atomically."""
    parts = {s: [] for s in SPLITS}
    for job in jobs:
        prefix = _part_prefix(job)
        for s in SPLITS:
            lens = np.load(f"{prefix}.{s}.lens.npy")
            if lens.size:
                # Memory-mapped: the merge streams parts to the shards without holding the corpus in RAM.
                tokens = np.memmap(f"{prefix}.{s}.bin", dtype=dtype, mode="r")
                if tokens.size != int(lens.sum()):
                    raise TokenizerError(
                        f"{prefix}.{s}.bin: part is corrupt (size mismatch); delete it and re-run"
                    )
                parts[s].append((tokens, lens))
    # A validation split is only useful if it exists: with a tiny corpus the seed may pick no document,
    # so the last training document is moved over (deterministically) rather than leaving val empty.
    if markers and not parts["val"] and _val_wanted(jobs) and sum(p[1].size for p in parts["train"]) >= 2:
        tokens, lens = parts["train"][-1]
        cut = int(lens[:-1].sum())
        parts["val"].append((tokens[cut:], lens[-1:]))
        if lens.size > 1:
            parts["train"][-1] = (tokens[:cut], lens[:-1])
        else:
            parts["train"].pop()
    with shard_folder(out_dir) as tmp:
        splits = {}
        for s in SPLITS:
            writer = ShardWriter(tmp, s, dtype, max_tokens=shard_tokens)
            for tokens, lens in parts[s]:
                writer.add(tokens, lens)
            splits[s] = writer.finish()
        index = build_index(
            dtype=dtype,
            vocab_size=info.vocab_size,
            eos_id=info.eos_id,
            bos_id=info.bos_id,
            pad_id=info.pad_id,
            splits=splits,
            tokenizer_sha256=info.sha256,
            fingerprint=fingerprint,
        )
        write_index(tmp, index)
    return index


def _val_wanted(jobs: list[_PartJob]) -> bool:
    return bool(jobs) and jobs[0].val_fraction > 0
