"""Assemble the `data` section into datatrove passes and run them on the configured executor.

A *pass* is one datatrove executor run (one ``logging_dir`` with its own ``completions/`` markers). Dedup needs
several, because finding duplicates needs every task's signatures before any task can drop a document:

=================  =========  ================================================================================
pass               tasks      steps
=================  =========  ================================================================================
``clean``          tasks      read → extract → fix Unicode → language → Gopher rep./quality → C4 → FineWeb →
                              PII → write ``filtered/`` (→ exact-dedup signatures, or MinHash signatures)
``exact_find``     1          datatrove ExactFindDedups over all signatures
``exact_filter``   tasks      re-read ``filtered/`` → drop exact duplicates → write (→ MinHash signatures)
``minhash_buckets`` buckets   datatrove MinHash stage 2 (one task per LSH band, as datatrove requires)
``minhash_cluster`` 1         datatrove MinHash stage 3 (union-find over duplicate pairs)
``minhash_filter`` tasks      re-read → datatrove MinHash stage 4 → write the final shards
=================  =========  ================================================================================

Exact dedup runs *before* the MinHash signatures are computed, so the two never pick different survivors of
one duplicate group (each decides independently otherwise, and together they could drop every copy). Passes
that a configuration does not need are left out; whichever pass comes last writes the final JSONL.gz shards.

Resume and invalidation: all work lives in ``<out>/work/<config hash>/``. The hash covers the data settings
that change results and the input files (path, size, mtime), so a re-run after a kill with the same settings
finds its completion markers and skips finished tasks, while a run with other settings gets a fresh folder (the
stale one is deleted). A folder whose run finished (``DONE``) is never resumed: the runner only re-runs a
finished stage when it was asked to (``--force``), so it starts clean.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__, console
from ..errors import DataError
from ..manifest.data import DataSection
from .readers import InputFile

log = console.get_logger(__name__)


@dataclass
class Pass:
    name: str
    pipeline: list[Any]
    tasks: int
    workers: int


@dataclass
class Plan:
    """The passes for one configuration plus where each of them reads and writes."""

    work_dir: Path
    passes: list[Pass]
    output_dir: Path  # final shards, written by the last pass (moved to the corpus folder by the stage)
    samples_dir: Path
    files: list[InputFile]
    steps: list[str] = field(default_factory=list)  # labels of the measured steps, in pipeline order

    def logging_dir(self, pass_name: str) -> Path:
        return self.work_dir / "logs" / pass_name


# --------------------------------------------------------------------------------------------------------
# work folder: config hash, stale folders, resume


def config_hash(cfg: DataSection, files: list[InputFile]) -> str:
    """Hash of the result-changing settings and the input files (identity by path, size and mtime)."""
    from importlib.metadata import version

    # knobs marked runtime_only in the schema change how the work runs, not what it produces: changing them
    # must not discard work
    settings = cfg.semantic_dump()
    inputs = []
    for f in files:
        try:
            st = os.stat(f.path)
            inputs.append([f.path, f.format, f.text_key, f.id_key, st.st_size, st.st_mtime_ns])
        except OSError:
            inputs.append([f.path, f.format, f.text_key, f.id_key, None, None])
    key = {"data": settings, "inputs": inputs, "llmforge": __version__, "datatrove": version("datatrove")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def prepare_work_dir(root: Path, digest: str, record: dict) -> tuple[Path, bool]:
    """Create (or reuse) ``root/<digest>``; delete other configurations' folders. Returns (folder, resuming)."""
    root.mkdir(parents=True, exist_ok=True)
    for other in root.iterdir():
        if other.is_dir() and other.name != digest:
            log.info(f"data: discarding work of a previous configuration ({other.name})")
            shutil.rmtree(other, ignore_errors=True)
    work = root / digest
    if (work / "DONE").exists():
        shutil.rmtree(work)  # a finished run is re-run only on request: start clean, do not "resume" it
    resuming = (work / "logs").is_dir() and any((work / "logs").glob("*/completions/*"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    return work, resuming


# --------------------------------------------------------------------------------------------------------
# plan


def quality_steps(cfg: DataSection) -> list[tuple[str, Any]]:
    """(label, datatrove filter) for each enabled heuristic filter, in FineWeb's order."""
    from datatrove.pipeline.filters import (
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    from .steps import C4Filter

    q = cfg.quality
    steps: list[tuple[str, Any]] = []
    if q.gopher_repetition.enabled:
        r = q.gopher_repetition
        # datatrove's own n-gram limits, scaled (capped below 1: a share of 1 would disable the rule silently)
        top = tuple((n, min(0.95, thr * r.ngram_scale)) for n, thr in ((2, 0.2), (3, 0.18), (4, 0.16)))
        dup = tuple(
            (n, min(0.95, thr * r.ngram_scale))
            for n, thr in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
        )
        steps.append(
            (
                "gopher_repetition",
                GopherRepetitionFilter(
                    dup_line_frac=r.dup_line_frac,
                    dup_para_frac=r.dup_para_frac,
                    dup_line_char_frac=r.dup_line_char_frac,
                    dup_para_char_frac=r.dup_para_char_frac,
                    top_n_grams=top,
                    dup_n_grams=dup,
                ),
            )
        )
    if q.gopher_quality.enabled:
        g = q.gopher_quality
        steps.append(
            (
                "gopher_quality",
                GopherQualityFilter(
                    min_doc_words=g.min_doc_words,
                    max_doc_words=g.max_doc_words,
                    min_avg_word_length=g.min_avg_word_length,
                    max_avg_word_length=g.max_avg_word_length,
                    max_symbol_word_ratio=g.max_symbol_word_ratio,
                    max_bullet_lines_ratio=g.max_bullet_lines_ratio,
                    max_ellipsis_lines_ratio=g.max_ellipsis_lines_ratio,
                    max_non_alpha_words_ratio=g.max_non_alpha_words_ratio,
                    min_stop_words=g.min_stop_words,
                ),
            )
        )
    if q.c4.enabled:
        # C4's bad-words list is a download (C4BadWordsFilter); the line/document rules here are offline.
        steps.append(
            (
                "c4",
                C4Filter(
                    edit_lines=q.c4.edit_lines,
                    filter_no_terminal_punct=q.c4.filter_no_terminal_punct,
                    min_num_sentences=q.c4.min_num_sentences,
                    min_words_per_line=q.c4.min_words_per_line,
                    filter_curly_bracket=q.c4.filter_curly_bracket,
                    filter_javascript=q.c4.filter_javascript,
                    filter_policy=q.c4.filter_policy,
                    filter_lorem_ipsum=q.c4.filter_lorem_ipsum,
                ),
            )
        )
    if q.fineweb.enabled:
        f = q.fineweb
        steps.append(
            (
                "fineweb",
                FineWebQualityFilter(
                    line_punct_thr=f.line_punct_thr,
                    short_line_thr=f.short_line_thr,
                    short_line_length=f.short_line_length,
                    char_duplicates_ratio=f.char_duplicates_ratio,
                    new_line_ratio=f.new_line_ratio,
                ),
            )
        )
    return steps


def build_plan(cfg: DataSection, files: list[InputFile], work_dir: Path) -> Plan:
    """Turn the manifest's ``data`` section into the list of passes (see the module docstring)."""
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.formatters import FTFYFormatter
    from datatrove.pipeline.writers import JsonlWriter

    from .readers import InputReader
    from .steps import (
        HtmlExtract,
        LanguageID,
        Measured,
        PIIScrub,
        RankFileReader,
        SampleProbe,
        exact_dedup_key,
        intermediate_adapter,
        label,
        output_adapter,
    )

    w = work_dir
    output_dir = w / "output"
    samples_dir = w / "samples"
    exact_on = cfg.dedup.exact
    mh = cfg.dedup.minhash
    minhash_on = mh.enabled
    steps: list[str] = []

    dropped_dir = samples_dir / "dropped" if cfg.samples else None

    def measured(step: Any, name: str) -> Measured:
        steps.append(name)
        return Measured(step, name, dropped_dir=dropped_dir)

    def writer(folder: Path, final: bool) -> Any:
        if final:
            return label(
                JsonlWriter(
                    str(folder),
                    output_filename="${rank}.jsonl.gz",
                    adapter=output_adapter,
                    max_file_size=cfg.max_file_size_mb * 1024 * 1024,
                ),
                "write_output",
            )
        return label(
            JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz", adapter=intermediate_adapter),
            "write_intermediate",
        )

    minhash_cfg = MinhashConfig(
        n_grams=mh.ngram_size, num_buckets=mh.num_buckets, hashes_per_bucket=mh.hashes_per_bucket
    )
    exact_cfg = ExactDedupConfig(content_getter=exact_dedup_key)

    # -- pass 1: clean ------------------------------------------------------------------------------------
    steps.append("read")
    clean: list[Any] = [Measured(InputReader(files), "read")]  # a reader drops nothing: no examples to keep
    if cfg.samples:
        clean.append(SampleProbe("mark", samples_dir, limit=max(8, 8 * cfg.samples)))
    if cfg.extract.enabled:
        clean.append(
            measured(
                HtmlExtract(
                    favour_precision=cfg.extract.favour_precision,
                    timeout=cfg.extract.timeout_s,
                    fallback=cfg.extract.fallback,
                ),
                "extract",
            )
        )
    if cfg.fix_unicode:
        clean.append(measured(FTFYFormatter(), "fix_unicode"))
    if cfg.language.enabled:
        clean.append(measured(LanguageID(cfg.language.languages, cfg.language.min_score), "language"))
    for name, step in quality_steps(cfg):
        clean.append(measured(step, name))
    if cfg.pii.enabled:
        actions = cfg.pii.model_dump(exclude={"enabled"})
        clean.append(measured(PIIScrub(actions, sample_redactions=2 if cfg.samples else 0), "pii"))
    if cfg.samples:
        clean.append(SampleProbe("record", samples_dir))

    passes: list[Pass] = []
    tasks, workers = cfg.tasks, cfg.workers
    filtered = w / "filtered"
    exact_out = w / "exact_deduped"
    if not exact_on and not minhash_on:
        clean.append(writer(output_dir, final=True))
        passes.append(Pass("clean", clean, tasks, workers))
        return Plan(w, passes, output_dir, samples_dir, files, steps)

    clean.append(writer(filtered, final=False))
    if exact_on:
        clean.append(
            label(ExactDedupSignature(str(w / "exact" / "sigs"), config=exact_cfg), "exact_signatures")
        )
    else:
        clean.append(
            label(
                MinhashDedupSignature(str(w / "minhash" / "sigs"), config=minhash_cfg), "minhash_signatures"
            )
        )
    passes.append(Pass("clean", clean, tasks, workers))

    last_written = filtered
    if exact_on:
        passes.append(
            Pass(
                "exact_find",
                [
                    label(
                        ExactFindDedups(
                            str(w / "exact" / "sigs"), str(w / "exact" / "dups"), config=exact_cfg
                        ),
                        "exact_find",
                    )
                ],
                1,
                1,
            )
        )
        exact_filter: list[Any] = [
            label(RankFileReader(filtered), "read_intermediate"),
            measured(ExactDedupFilter(str(w / "exact" / "dups"), config=exact_cfg), "exact_dedup"),
        ]
        if minhash_on:
            exact_filter.append(writer(exact_out, final=False))
            exact_filter.append(
                label(
                    MinhashDedupSignature(str(w / "minhash" / "sigs"), config=minhash_cfg),
                    "minhash_signatures",
                )
            )
        else:
            exact_filter.append(writer(output_dir, final=True))
        passes.append(Pass("exact_filter", exact_filter, tasks, workers))
        last_written = exact_out

    if minhash_on:
        buckets = mh.num_buckets
        passes.append(
            Pass(
                "minhash_buckets",
                [
                    label(
                        MinhashDedupBuckets(
                            str(w / "minhash" / "sigs"), str(w / "minhash" / "buckets"), config=minhash_cfg
                        ),
                        "minhash_buckets",
                    )
                ],
                buckets,
                min(workers, buckets),
            )
        )
        passes.append(
            Pass(
                "minhash_cluster",
                [
                    label(
                        MinhashDedupCluster(
                            str(w / "minhash" / "buckets"),
                            str(w / "minhash" / "remove"),
                            config=minhash_cfg,
                            save_cluster_id=True,
                        ),
                        "minhash_cluster",
                    )
                ],
                1,
                1,
            )
        )
        passes.append(
            Pass(
                "minhash_filter",
                [
                    label(RankFileReader(last_written), "read_intermediate"),
                    measured(MinhashDedupFilter(str(w / "minhash" / "remove")), "near_dedup"),
                    writer(output_dir, final=True),
                ],
                tasks,
                workers,
            )
        )
    return Plan(w, passes, output_dir, samples_dir, files, steps)


# --------------------------------------------------------------------------------------------------------
# executors


def build_executor(cfg: DataSection, plan: Plan, p: Pass, depends: Any = None) -> Any:
    """The datatrove executor for one pass, from ``data.executor``."""
    logging_dir = str(plan.logging_dir(p.name))
    if cfg.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        s = cfg.slurm
        return SlurmPipelineExecutor(
            pipeline=p.pipeline,
            tasks=p.tasks,
            workers=-1,
            time=s.time,
            partition=s.partition,
            cpus_per_task=s.cpus_per_task,
            # sbatch wants an integer with a unit: "3G", not datatrove's f"{3.0}G"; fractions go as MiB.
            mem_per_cpu_gb=int(s.mem_per_cpu_gb)
            if float(s.mem_per_cpu_gb).is_integer()
            else s.mem_per_cpu_gb,
            sbatch_args=None
            if float(s.mem_per_cpu_gb).is_integer()
            else {"mem-per-cpu": f"{round(s.mem_per_cpu_gb * 1024)}M"},
            qos=s.qos or "",
            job_name=f"{s.job_name}-{p.name}",
            env_command=s.env_command,
            logging_dir=logging_dir,
            slurm_logs_folder=str(plan.work_dir / "slurm_logs" / p.name),
            depends=depends,
            mail_type="NONE",
        )
    if cfg.executor == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(
            pipeline=p.pipeline,
            tasks=p.tasks,
            workers=p.workers,
            logging_dir=logging_dir,
            cpus_per_task=cfg.ray.cpus_per_task,
            mem_per_cpu_gb=cfg.ray.mem_per_cpu_gb,
        )
    from datatrove.executor import LocalPipelineExecutor

    return LocalPipelineExecutor(
        pipeline=p.pipeline,
        tasks=p.tasks,
        workers=p.workers,
        logging_dir=logging_dir,
        start_method=cfg.start_method,
    )


def pass_complete(plan: Plan, p: Pass) -> bool:
    done = plan.logging_dir(p.name) / "completions"
    return done.is_dir() and all((done / f"{r:05d}").exists() for r in range(p.tasks))


# --------------------------------------------------------------------------------------------------------
# logging: datatrove's loguru output goes to files; warnings and errors reach our logger


class _Forward:
    """A loguru sink that re-emits records of ``min_level`` and above through llmforge's logger."""

    def __init__(self, min_level: int):
        self.min_level = min_level
        self.seen: set[str] = set()

    def __call__(self, message: Any) -> None:
        rec = message.record
        level = logging.ERROR if rec["level"].no >= 40 else logging.WARNING
        text = rec["message"].strip().splitlines()[0][:500] if rec["message"].strip() else ""
        # datatrove repeats some warnings once per pass (e.g. Ray's shared-filesystem note): say each once.
        if rec["level"].no >= self.min_level and text and text not in self.seen:
            self.seen.add(text)
            console.get_logger("data.datatrove").log(level, text)


def _task_logger_to_file(logging_dir: Any, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
    """Replacement for datatrove's ``add_task_logger``: the task log file only, errors forwarded."""
    from loguru import logger

    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    fmt = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}"
    logger.add(logfile, colorize=False, level="DEBUG", format=fmt)
    logger.add(_Forward(40), level="ERROR", format="{message}")
    logger.info(f"Launching pipeline for {rank=}")
    return logfile


def _close_task_logger(logfile: Any) -> None:
    from loguru import logger

    logger.complete()
    logger.remove()
    logger.add(_Forward(40), level="ERROR", format="{message}")
    logfile.close()


def _silence_tqdm() -> list[tuple[Any, Any]]:
    """Replace ``tqdm`` in every loaded datatrove module with a disabled one; returns what to restore.

    (tqdm's ``TQDM_DISABLE`` variable is read when tqdm is imported, too early to set it here.)
    """
    import functools
    import sys

    from tqdm import tqdm

    saved = []
    for name, module in list(sys.modules.items()):
        if name.startswith("datatrove.") and getattr(module, "tqdm", None) is tqdm:
            saved.append((module, tqdm))
            module.tqdm = functools.partial(tqdm, disable=True)
    return saved


@contextlib.contextmanager
def datatrove_logs_to(main_log: Path) -> Iterator[None]:
    """Send datatrove's loguru output to ``main_log`` (and per-task files) instead of the console.

    datatrove's task logger adds a stderr sink in every task; we swap it (module globals, inherited by forked
    workers) for a file-only one. tqdm bars inside datatrove's dedup steps are switched off the same way.
    """
    import datatrove.executor.base as dt_base
    import datatrove.utils.logging as dt_logging
    from loguru import logger

    saved = (dt_base.add_task_logger, dt_base.close_task_logger)
    saved_tqdm = _silence_tqdm()
    main_log.parent.mkdir(parents=True, exist_ok=True)
    logger.remove()
    sink = logger.add(str(main_log), level="INFO", colorize=False)
    logger.add(_Forward(30), level="WARNING", format="{message}")
    dt_base.add_task_logger, dt_base.close_task_logger = _task_logger_to_file, _close_task_logger
    try:
        yield
    finally:
        dt_base.add_task_logger, dt_base.close_task_logger = saved
        for module, value in saved_tqdm:
            module.tqdm = value
        with contextlib.suppress(ValueError):
            logger.remove(sink)
        dt_logging.setup_default_logger()


# --------------------------------------------------------------------------------------------------------
# running


def prewarm(cfg: DataSection) -> None:
    """Import the heavy libraries once in this process so forked workers start with them loaded (~2 s each)."""
    if cfg.executor != "local" or cfg.start_method != "fork":
        return
    q = cfg.quality
    if cfg.dedup.minhash.enabled or any(
        s.enabled for s in (q.gopher_quality, q.gopher_repetition, q.c4, q.fineweb)
    ):
        from datatrove.utils.word_tokenizers import load_word_tokenizer

        load_word_tokenizer("en").word_tokenize("warm up")
    if cfg.extract.enabled:
        import trafilatura  # noqa: F401
    if cfg.fix_unicode:
        import ftfy  # noqa: F401


def _task_log_hint(plan: Plan, p: Pass) -> str:
    logs = sorted((plan.logging_dir(p.name) / "logs").glob("task_*.log"))
    return str(logs[0].parent) if logs else str(plan.logging_dir(p.name))


def run_plan(
    cfg: DataSection,
    plan: Plan,
    *,
    after_pass: Callable[[Pass], None] | None = None,
    wait: bool = True,
) -> dict[str, float]:
    """Run every pass in order (skipping finished tasks). Returns wall seconds per pass.

    ``after_pass`` is called after each pass (the stage checks that the ``clean`` pass kept something before
    spending time on dedup). With ``executor: slurm`` all passes are submitted at once as dependent job arrays;
    ``wait`` then polls the completion markers until the last pass is done.
    """
    timings: dict[str, float] = {}
    with datatrove_logs_to(plan.work_dir / "logs" / "datatrove.log"):
        if cfg.executor == "slurm":
            _run_slurm(cfg, plan, wait=wait)
            return timings
        if cfg.executor == "ray":
            _ray_init(cfg)
        prewarm(cfg)
        with console.progress("data passes", total=len(plan.passes), unit="passes") as bar:
            for p in plan.passes:
                if pass_complete(plan, p):
                    log.info(f"data: pass '{p.name}' already complete, skipping (resume)")
                    bar.advance(1)
                    if after_pass:
                        after_pass(p)
                    continue
                t0 = time.perf_counter()
                executor = build_executor(cfg, plan, p)
                try:
                    executor.run()
                except Exception as err:
                    raise DataError(
                        f"data pass '{p.name}' failed: {type(err).__name__}: {err}. Task logs: "
                        f"{_task_log_hint(plan, p)}. Re-running the stage resumes from the finished tasks."
                    ) from err
                if not pass_complete(plan, p):
                    raise DataError(
                        f"data pass '{p.name}' ended with unfinished tasks; see {_task_log_hint(plan, p)}. "
                        "Re-running the stage resumes from the finished tasks."
                    )
                timings[p.name] = time.perf_counter() - t0
                log.info(f"data: pass '{p.name}' done in {timings[p.name]:.1f}s")
                bar.advance(1, step=p.name)
                if after_pass:
                    after_pass(p)
    return timings


def _ray_init(cfg: DataSection) -> None:
    from ..errors import require

    ray = require("ray", extra="ray", purpose="`data.executor: ray`")
    if not ray.is_initialized():
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, log_to_driver=False)
        else:
            ray.init(log_to_driver=False, include_dashboard=False)


def _run_slurm(cfg: DataSection, plan: Plan, *, wait: bool) -> None:
    """Submit every pass as a Slurm job array depending on the previous one; optionally wait for the last."""
    if wait and shutil.which("sbatch") is None:
        raise DataError(
            "`data.executor: slurm` but `sbatch` is not on PATH: run llmforge on a Slurm login node, or set "
            "`data.executor: local`"
        )
    executors: list[Any] = []
    prev = None
    for p in plan.passes:
        ex = build_executor(cfg, plan, p, depends=prev)
        executors.append(ex)
        prev = ex
    executors[-1].run()  # launches the whole dependency chain, first pass first
    job_ids = [str(ex.job_id) for ex in executors if ex.job_id not in (None, -1)]
    log.info(f"data: submitted Slurm jobs {', '.join(job_ids) or '(none: all passes complete)'}")
    if not wait:
        return
    last = plan.passes[-1]
    while not pass_complete(plan, last):
        time.sleep(cfg.slurm.poll_s)
        if job_ids and not _slurm_jobs_alive(job_ids) and not pass_complete(plan, last):
            raise DataError(
                f"the Slurm data jobs ({', '.join(job_ids)}) ended before the last pass completed; see "
                f"{plan.work_dir / 'slurm_logs'}. Re-running the stage resubmits only unfinished tasks."
            )


def _slurm_jobs_alive(job_ids: list[str]) -> bool:
    try:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: keep waiting rather than fail a healthy run
    return bool(out.stdout.strip())
