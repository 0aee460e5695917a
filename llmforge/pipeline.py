"""Stage registry, fingerprints, lineage, and the runner behind `llmforge run`, `status` and `lineage`.

A stage's **fingerprint** is the SHA-256 of

* its manifest sections (resolved, defaults included) and the project seed,
* the content hashes of the upstream outputs it reads (recorded in the upstream's lineage),
* the content hashes of external files it reads (``data.inputs``, ``tokenizer.from``, ``model.from`` …),
* the llmforge version.

When a stage's body returns, the runner hashes the outputs it named and writes ``<runs>/<stage>/lineage.json``
atomically: that file is the *only* mark of completion. A stage is **cached** when its lineage exists, its
fingerprint equals the current one and its outputs still hash to what was recorded. Because downstream
fingerprints include upstream *output* hashes, a change re-runs the changed stage and every stage whose
inputs actually changed as a result; a re-run that reproduces identical output leaves downstream cached.

Before a body runs, its old ``lineage.json`` is removed and a ``.running`` marker is written, so a crash or a
SIGKILL leaves a stage that `status` shows as interrupted and `run` re-runs (resuming where the stage supports it).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import importlib
import itertools
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, console
from .errors import LLMForgeError, NotBuiltError, StageError, UserInputError
from .manifest import LoadedManifest
from .stage import StageContext, StageResult
from .utils import atomic
from .utils.hashing import HashCache, sha256_json, sha256_listing

log = console.get_logger(__name__)

LINEAGE = "lineage.json"
RUNNING = ".running"
FAILED = ".failed.json"


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------


def _no_external(_: LoadedManifest) -> list[Path]:
    return []


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage. ``target`` is ``"module:function"`` (imported lazily) or ``None`` if not built."""

    name: str
    sections: tuple[str, ...]
    needs: tuple[str, ...]
    target: str | None
    description: str
    toggle: str = ""  # manifest section whose `enabled` switches the stage (default: sections[-1])
    external_inputs: Callable[[LoadedManifest], list[Path]] = _no_external
    command: str = ""  # the CLI command that runs this stage alone
    key_metrics: tuple[str, ...] = ()  # shown by `llmforge status` (default: the first few metrics)

    @property
    def built(self) -> bool:
        return self.target is not None

    def enabled(self, loaded: LoadedManifest) -> bool:
        return bool(getattr(loaded.manifest, self.toggle or self.sections[-1]).enabled)

    def load(self) -> Callable[[StageContext], StageResult]:
        if self.target is None:
            raise NotBuiltError(f"stage '{self.name}' is not built yet in llmforge {__version__}")
        module, _, fn = self.target.partition(":")
        return getattr(importlib.import_module(module), fn)


_GLOB_CHARS = re.compile(r"[*?\[]")  # as in llmforge.data.readers: a `data.inputs` path may be a glob


def _hash_external(p: Path, hashes: HashCache) -> str:
    """Content hash of an external input: a file, a folder (hidden files left out, as readers do) or a glob."""
    if _GLOB_CHARS.search(str(p)):
        matches = sorted(m for m in glob.glob(str(p), recursive=True) if os.path.isfile(m))
        if not matches:
            return "missing"
        # names relative to the pattern's fixed prefix, so a moved project keeps its fingerprints
        base = Path(*itertools.takewhile(lambda part: not _GLOB_CHARS.search(part), p.parts))
        return sha256_listing(
            (Path(os.path.relpath(m, base)).as_posix(), hashes.file(Path(m))) for m in matches
        )
    if not p.exists():
        return "missing"
    return hashes.path(p, skip_hidden=True)[0]


def _crawl_inputs(lm: LoadedManifest) -> list[Path]:
    site = lm.manifest.crawl.local_site  # an edited local site re-runs the crawl (and what reads it)
    return [lm.resolve(site)] if site else []


def _data_inputs(lm: LoadedManifest) -> list[Path]:
    return [lm.resolve(i.path) for i in lm.manifest.data.inputs]


def _tokenizer_inputs(lm: LoadedManifest) -> list[Path]:
    src = lm.manifest.tokenizer.from_
    return [lm.resolve(src)] if src is not None else []


def _model_inputs(lm: LoadedManifest) -> list[Path]:
    src = lm.manifest.model.from_
    return [lm.resolve(src)] if src is not None else []


def _sft_inputs(lm: LoadedManifest) -> list[Path]:
    sft = lm.manifest.sft
    paths = [lm.resolve(p) for p in [*sft.data, *sft.val_data]]
    return paths + ([lm.resolve(sft.from_)] if sft.from_ else [])


def _reward_inputs(lm: LoadedManifest) -> list[Path]:
    r = lm.manifest.reward
    return [lm.resolve(p) for p in r.data] + ([lm.resolve(r.from_)] if r.from_ else [])


def _align_inputs(lm: LoadedManifest) -> list[Path]:
    a = lm.manifest.align
    dpo_data = a.dpo.data or (lm.manifest.reward.data if a.method == "dpo" else [])
    files = [*dpo_data, *a.grpo.prompts, *a.ppo.prompts, *a.rejection_sampling.prompts]
    return [lm.resolve(p) for p in files] + ([lm.resolve(a.from_)] if a.from_ else [])


def _quantize_inputs(lm: LoadedManifest) -> list[Path]:
    q = lm.manifest.quantize
    paths = [lm.resolve(q.from_)] if q.from_ else []
    if q.calibration == "sft":
        paths += [lm.resolve(p) for p in lm.manifest.sft.data]
    return paths


def _serve_inputs(lm: LoadedManifest) -> list[Path]:
    srv = lm.manifest.serve
    return [lm.resolve(p) for p in (srv.model, srv.adapter) if p]


def _distill_inputs(lm: LoadedManifest) -> list[Path]:
    d = lm.manifest.distill
    data = d.data or lm.manifest.sft.data
    paths = [lm.resolve(p) for p in [*data, *d.generations.prompts]]
    return paths + ([lm.resolve(d.teacher)] if d.teacher else [])


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "crawl",
        ("crawl",),
        (),
        "llmforge.data.crawl:run_crawl",
        "crawl seed URLs politely into WARC files",
        external_inputs=_crawl_inputs,
        command="llmforge data crawl",
        key_metrics=("pages_stored", "requests", "pages_per_s"),
    ),
    StageSpec(
        "data",
        ("data",),
        ("crawl",),
        "llmforge.data.stage:run_data",
        "extract, filter, scrub PII, deduplicate → JSONL.gz corpus",
        external_inputs=_data_inputs,
        command="llmforge data process",
        key_metrics=("docs_in", "docs_out", "duplicates_removed"),
    ),
    StageSpec(
        "tokenizer",
        ("tokenizer",),
        ("data",),
        "llmforge.tokenizer.stage:run_tokenizer",
        "train/export the tokenizer and chat template, tokenize the corpus into shards",
        external_inputs=_tokenizer_inputs,
        command="llmforge train tokenizer",
        key_metrics=("vocab_size", "bytes_per_token", "train_tokens"),
    ),
    StageSpec(
        "pretrain",
        ("model", "pretrain"),
        ("tokenizer",),
        "llmforge.train.stage:run_pretrain",
        "pretrain (or continue training) the Llama-architecture model",
        external_inputs=_model_inputs,
        command="llmforge train pretrain",
        key_metrics=("val_loss", "val_ppl", "tokens_per_s"),
    ),
    StageSpec(
        "sft",
        ("sft",),
        ("tokenizer", "pretrain"),
        "llmforge.train.sft:run_sft",
        "supervised fine-tuning on chat data (full or LoRA)",
        external_inputs=_sft_inputs,
        command="llmforge train sft",
        key_metrics=("val_loss", "format_rate_after", "tokens_per_s"),
    ),
    StageSpec(
        "reward",
        ("reward",),
        ("tokenizer", "pretrain", "sft"),
        "llmforge.align.reward:run_reward",
        "train the reward model (scalar head, Bradley–Terry) on preference pairs",
        external_inputs=_reward_inputs,
        command="llmforge align reward",
        key_metrics=("val_accuracy", "val_loss"),
    ),
    StageSpec(
        "align",
        ("align",),
        ("tokenizer", "pretrain", "sft", "reward"),
        "llmforge.align.stage:run_align",
        "align the policy: DPO and variants, GRPO, PPO, rejection sampling",
        external_inputs=_align_inputs,
        command="llmforge align",
        key_metrics=("reward_after", "reward_before"),
    ),
    StageSpec(
        "distill",
        ("distill",),
        ("tokenizer", "pretrain", "sft", "align"),
        "llmforge.train.distill:run_distill",
        "distill the final model into a smaller student",
        external_inputs=_distill_inputs,
        command="llmforge train distill",
        key_metrics=("val_loss", "val_kl", "tokens_per_s"),
    ),
    StageSpec(
        "quantize",
        ("quantize",),
        ("tokenizer", "pretrain", "sft", "align", "distill"),
        "llmforge.quantize.stage:run_quantize",
        "GPTQ-quantize the final model, judged against round-to-nearest",
        external_inputs=_quantize_inputs,
        command="llmforge quantize",
        key_metrics=("ppl_increase", "method"),
    ),
    StageSpec(
        "serve",
        ("serve",),
        ("tokenizer", "pretrain", "sft", "align", "distill", "quantize"),
        "llmforge.serve.stage:run_serve",
        "deploy check: serve the final model and answer a smoke conversation",
        external_inputs=_serve_inputs,
        command="llmforge serve",
        key_metrics=("engine", "ttft_s", "tokens_per_s"),
    ),
)


class Pipeline:
    """An ordered set of stages. Tests build their own with dummy stages."""

    def __init__(self, stages: Iterable[StageSpec] | None = None):
        self.stages: tuple[StageSpec, ...] = tuple(STAGES if stages is None else stages)
        self.by_name = {s.name: s for s in self.stages}

    def get(self, name: str) -> StageSpec:
        try:
            return self.by_name[name]
        except KeyError:
            raise UserInputError(
                f"unknown stage {name!r}; stages in order: {', '.join(self.by_name)}"
            ) from None

    def order(self, names: Iterable[str]) -> list[StageSpec]:
        wanted = set(names)
        return [s for s in self.stages if s.name in wanted]

    def upstream_closure(self, loaded: LoadedManifest, names: Iterable[str]) -> set[str]:
        """Targets plus every enabled stage they (transitively) read from."""
        out: set[str] = set()
        todo = list(names)
        while todo:
            n = todo.pop()
            if n in out:
                continue
            out.add(n)
            for dep in self.get(n).needs:
                if dep in self.by_name and self.get(dep).enabled(loaded):
                    todo.append(dep)
        return out

    def downstream_of(self, name: str) -> list[str]:
        out, frontier = [], {name}
        for s in self.stages:
            if frontier & set(s.needs):
                out.append(s.name)
                frontier.add(s.name)
        return out


# ----------------------------------------------------------------------------------------------------
# Lineage records
# ----------------------------------------------------------------------------------------------------


def stage_dir(loaded: LoadedManifest, name: str) -> Path:
    return loaded.runs_dir / name


def read_lineage(loaded: LoadedManifest, name: str) -> dict | None:
    p = stage_dir(loaded, name) / LINEAGE
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        log.warning("%s: unreadable lineage record; the stage will re-run", p)
        return None


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "llmforge": __version__}
    for pkg in (
        "torch",
        "transformers",
        "tokenizers",
        "sentencepiece",
        "datatrove",
        "numpy",
        "safetensors",
        "pydantic",
        "vllm",
        "gptqmodel",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _rel(loaded: LoadedManifest, p: Path) -> str:
    try:
        return Path(os.path.relpath(Path(p).absolute(), loaded.root)).as_posix()
    except ValueError:  # different drive on Windows
        return str(p)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _upstream_outputs(loaded: LoadedManifest, lineage: dict) -> dict[str, Path]:
    return {k: loaded.resolve(v["path"]) for k, v in lineage.get("outputs", {}).items()}


# ----------------------------------------------------------------------------------------------------
# Fingerprints and states
# ----------------------------------------------------------------------------------------------------


@dataclass
class Fingerprint:
    digest: str
    config: dict[str, Any]
    upstream: dict[str, dict]
    external: dict[str, str]
    missing_upstream: list[str] = field(default_factory=list)


def fingerprint(
    pipeline: Pipeline, loaded: LoadedManifest, spec: StageSpec, hashes: HashCache
) -> Fingerprint:
    # runtime-only knobs (worker counts, logging cadence, `enabled`, ...) are marked in the schema and left out
    config = {sec: loaded.semantic_section(sec) for sec in spec.sections}
    config["project.seed"] = loaded.manifest.project.seed
    upstream: dict[str, dict] = {}
    missing: list[str] = []
    for dep in spec.needs:
        dep_spec = pipeline.by_name.get(dep)
        if dep_spec is None or not dep_spec.enabled(loaded):
            continue
        lin = read_lineage(loaded, dep)
        if lin is None:
            missing.append(dep)
            continue
        upstream[dep] = {
            "fingerprint": lin["fingerprint"],
            "outputs": {k: v["sha256"] for k, v in lin.get("outputs", {}).items()},
        }
    external: dict[str, str] = {}
    for p in spec.external_inputs(loaded):
        external[_rel(loaded, p)] = _hash_external(p, hashes)
    # Only upstream *output hashes* enter the digest (the upstream fingerprint is recorded for lineage but not
    # hashed): an upstream re-run that reproduces identical output leaves this stage cached.
    up_outputs = {dep: rec["outputs"] for dep, rec in upstream.items()}
    digest = sha256_json(
        {
            "stage": spec.name,
            "llmforge": __version__,
            "config": config,
            "upstream": up_outputs,
            "external": external,
        }
    )
    return Fingerprint(digest, config, upstream, external, missing)


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff_keys(
                old.get(k, "<unset>"), new.get(k, "<unset>"), f"{prefix}{k}." if prefix or k else ""
            )
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _outputs_intact(loaded: LoadedManifest, lineage: dict, hashes: HashCache) -> str | None:
    """None if every recorded output still hashes the same; else a reason."""
    for name, rec in lineage.get("outputs", {}).items():
        p = loaded.resolve(rec["path"])
        if not p.exists():
            return f"output '{name}' is missing ({rec['path']})"
        if hashes.path(p)[0] != rec["sha256"]:
            return f"output '{name}' was modified ({rec['path']})"
    return None


def why_stale(loaded: LoadedManifest, fp: Fingerprint, lineage: dict | None, hashes: HashCache) -> str | None:
    """None if the recorded run is still valid; else a short human reason."""
    if lineage is None:
        return "never run"
    if lineage.get("fingerprint") == fp.digest:
        return _outputs_intact(loaded, lineage, hashes)
    if lineage.get("llmforge_version") != __version__:
        return f"llmforge version changed ({lineage.get('llmforge_version')} → {__version__})"
    keys = _diff_keys(lineage.get("config", {}), fp.config)
    if keys:
        shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        return f"config changed: {shown}"
    old_up = lineage.get("inputs", {}).get("upstream", {})
    changed = [
        d
        for d in set(old_up) | set(fp.upstream)
        if old_up.get(d, {}).get("outputs") != fp.upstream.get(d, {}).get("outputs")
    ]
    if changed:
        return f"input changed: output of {', '.join(sorted(changed))}"
    old_ext = lineage.get("inputs", {}).get("external", {})
    ext = [k for k in set(old_ext) | set(fp.external) if old_ext.get(k) != fp.external.get(k)]
    if ext:
        return f"input file changed: {', '.join(sorted(ext)[:3])}"
    return "fingerprint changed"


@dataclass
class StageStatus:
    """One row of `llmforge status`."""

    name: str
    state: str  # done | stale | never run | running | interrupted | failed | disabled | not built | waiting
    reason: str = ""
    enabled: bool = True
    built: bool = True
    lineage: dict | None = None
    key_metrics: dict[str, Any] = field(default_factory=dict)


def status(loaded: LoadedManifest, pipeline: Pipeline | None = None) -> list[StageStatus]:
    pipeline = pipeline or Pipeline()
    hashes = HashCache(loaded.runs_dir / ".cache" / "hashes.json")
    busy = _run_in_progress(loaded)
    out: list[StageStatus] = []
    stale: set[str] = set()
    for spec in pipeline.stages:
        enabled = spec.enabled(loaded)
        lineage = read_lineage(loaded, spec.name)
        sdir = stage_dir(loaded, spec.name)
        st = StageStatus(spec.name, "", enabled=enabled, built=spec.built, lineage=lineage)
        metrics = (lineage or {}).get("metrics", {})
        keys = [k for k in spec.key_metrics if k in metrics] or list(metrics)[:3]
        st.key_metrics = {k: metrics[k] for k in keys}
        if not spec.built:
            st.state, st.reason = "not built", f"not in llmforge {__version__}"
            if enabled:
                st.reason = "enabled in the manifest but not built in this version: set enabled: false"
        elif not enabled and lineage is None:
            st.state = "disabled"
        else:
            fp = fingerprint(pipeline, loaded, spec, hashes)
            waiting = sorted(set([d for d in spec.needs if d in stale] + fp.missing_upstream))
            if lineage is None:
                failed = sdir / FAILED
                if (sdir / RUNNING).exists() and busy:
                    st.state, st.reason = "running", "another `llmforge run` is working on it"
                elif (sdir / RUNNING).exists():
                    st.state, st.reason = "interrupted", "did not finish; `llmforge run` re-runs (resumes) it"
                elif failed.exists():
                    st.state = "failed"
                    with contextlib.suppress(OSError, ValueError):
                        st.reason = json.loads(failed.read_text()).get("error", "")[:200]
                elif waiting:
                    st.state, st.reason = "waiting", f"needs {', '.join(waiting)}"
                else:
                    st.state, st.reason = "never run", ""
            elif waiting:
                st.state, st.reason = "stale", f"upstream {', '.join(waiting)} will re-run"
            else:
                reason = why_stale(loaded, fp, lineage, hashes)
                st.state, st.reason = ("done", "") if reason is None else ("stale", reason)
            if not enabled:
                st.reason = (st.reason + "; " if st.reason else "") + "disabled in the manifest"
            # a disabled stage will not re-run and its downstream does not read it: nothing waits on it
            if enabled and st.state in ("stale", "never run", "running", "interrupted", "failed", "waiting"):
                stale.add(spec.name)
        out.append(st)
    hashes.save()
    return out


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------


@dataclass
class StageOutcome:
    name: str
    action: str  # "ran" | "cached"
    reason: str
    fingerprint: str
    wall_time_s: float = 0.0
    result: StageResult | None = None
    lineage: dict | None = None


@contextlib.contextmanager
def project_lock(loaded: LoadedManifest):
    """One `llmforge run` per project at a time (a second one would corrupt the first's artifacts)."""
    loaded.runs_dir.mkdir(parents=True, exist_ok=True)
    path = loaded.runs_dir / ".lock"
    f = open(path, "a+")  # noqa: SIM115 - held for the duration of the context
    try:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserInputError(
                f"{loaded.runs_dir}: another llmforge run is in progress ({holder}); wait for it or stop it"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield
    finally:
        f.close()


def _run_in_progress(loaded: LoadedManifest) -> bool:
    """True while another process holds the project lock (a `llmforge run` is working)."""
    path = loaded.runs_dir / ".lock"
    try:
        import fcntl

        with open(path) as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except (ImportError, OSError):  # non-POSIX, or never run
        pass
    return False


def plan(
    loaded: LoadedManifest, targets: list[str] | None = None, pipeline: Pipeline | None = None
) -> list[StageSpec]:
    """Stages to consider, in order: every enabled stage, or the targets plus their enabled upstream."""
    pipeline = pipeline or Pipeline()
    if targets:
        for t in targets:
            pipeline.get(t)  # raises for unknown names
        names = pipeline.upstream_closure(loaded, targets)
    else:
        names = {s.name for s in pipeline.stages if s.enabled(loaded)}
    stages = pipeline.order(names)
    unbuilt = [s for s in stages if not s.built]
    if unbuilt:
        s = unbuilt[0]
        where = "requested" if targets and s.name in targets else f"enabled in {loaded.path.name}"
        raise NotBuiltError(
            f"stage '{s.name}' ({s.description}) is {where} but not built yet in llmforge {__version__}. "
            f"Set `{s.toggle or s.sections[-1]}.enabled: false`. Built stages: "
            + ", ".join(x.name for x in pipeline.stages if x.built)
        )
    return stages


def run(
    loaded: LoadedManifest,
    targets: list[str] | None = None,
    *,
    force: Iterable[str] = (),
    only: bool = False,
    options: dict[str, Any] | None = None,
    pipeline: Pipeline | None = None,
    on_event: Callable[[str, StageSpec, Any], None] | None = None,
) -> list[StageOutcome]:
    """Run the plan in order, skipping cached stages. ``only`` = run just the targets, not their upstream.

    ``on_event(kind, spec, payload)`` is called with kind ``"start"`` (payload: reason) before a stage body
    runs and ``"done"`` (payload: StageOutcome) after each stage — the CLI uses it to print as it goes.
    """
    pipeline = pipeline or Pipeline()
    force = set(force)
    for f in force:
        pipeline.get(f)
    stages = pipeline.order(targets) if (only and targets) else plan(loaded, targets, pipeline)
    if only and targets:
        plan(loaded, targets, Pipeline(stages))  # not-built check for the targets themselves
    outside = sorted(force - {s.name for s in stages})
    if outside:
        raise UserInputError(
            f"--force {outside[0]}: stage '{outside[0]}' is not part of this run (planned: "
            f"{', '.join(s.name for s in stages) or 'none'}); name it as a stage to run, or enable it"
        )
    outcomes: list[StageOutcome] = []
    with project_lock(loaded):
        hashes = HashCache(loaded.runs_dir / ".cache" / "hashes.json")
        try:
            for spec in stages:
                outcome = _run_one(
                    pipeline, loaded, spec, hashes, spec.name in force, options or {}, on_event
                )
                outcomes.append(outcome)
                if on_event:
                    on_event("done", spec, outcome)
        finally:
            hashes.save()
    return outcomes


def _run_one(pipeline, loaded, spec, hashes, forced, options, on_event) -> StageOutcome:
    fp = fingerprint(pipeline, loaded, spec, hashes)
    if fp.missing_upstream:
        raise StageError(
            f"stage '{spec.name}' needs {', '.join(fp.missing_upstream)} to have completed; "
            f"run `llmforge run {spec.name}` to run the chain up to it"
        )
    lineage = read_lineage(loaded, spec.name)
    reason = "forced (--force)" if forced else why_stale(loaded, fp, lineage, hashes)
    if reason is None:
        log.debug("%s: cached (%s)", spec.name, fp.digest[:12])
        return StageOutcome(spec.name, "cached", "inputs unchanged", fp.digest, lineage=lineage)

    body = spec.load()
    sdir = stage_dir(loaded, spec.name)
    sdir.mkdir(parents=True, exist_ok=True)
    # Remove the completion mark *before* touching any output: from here until the new lineage is written
    # the stage is not done, whatever happens to this process.
    (sdir / LINEAGE).unlink(missing_ok=True)
    (sdir / FAILED).unlink(missing_ok=True)
    atomic.write_json(sdir / RUNNING, {"pid": os.getpid(), "started_at": _now(), "fingerprint": fp.digest})
    upstream = {}
    for dep in spec.needs:
        lin = read_lineage(loaded, dep)
        if lin is not None and dep in fp.upstream:
            upstream[dep] = _upstream_outputs(loaded, lin)
    # A forced stage recomputes from scratch: stages that resume (crawl frontier, training checkpoints) see
    # options["force"] and drop their resume state instead of finding their finished work and doing nothing.
    opts = {**options, "force": True} if forced else dict(options)
    ctx = StageContext(name=spec.name, loaded=loaded, out_dir=sdir, upstream=upstream, options=opts)
    if on_event:
        on_event("start", spec, reason)
    log.info("%s: running (%s)", spec.name, reason)
    started_at, t0 = _now(), time.monotonic()
    try:
        result = body(ctx)
        if not isinstance(result, StageResult):
            raise StageError(f"stage '{spec.name}' returned {type(result).__name__}, expected StageResult")
        outputs = {}
        for name, path in result.outputs.items():
            path = Path(path)
            if not path.exists():
                raise StageError(
                    f"stage '{spec.name}' reported output '{name}' at {path}, which does not exist"
                )
            digest, size = hashes.path(path)
            outputs[name] = {
                "path": _rel(loaded, path),
                "sha256": digest,
                "bytes": size,
                "kind": "dir" if path.is_dir() else "file",
            }
    except BaseException as err:
        if not isinstance(err, KeyboardInterrupt | SystemExit):
            with contextlib.suppress(OSError):
                atomic.write_json(
                    sdir / FAILED,
                    {"error": str(err) or type(err).__name__, "type": type(err).__name__, "at": _now()},
                )
                (sdir / RUNNING).unlink(missing_ok=True)
        raise
    wall = time.monotonic() - t0
    record = {
        "stage": spec.name,
        "fingerprint": fp.digest,
        "llmforge_version": __version__,
        "started_at": started_at,
        "finished_at": _now(),
        "wall_time_s": round(wall, 3),
        "reason": reason,
        "config": fp.config,
        "resolved_config": {sec: loaded.section_dump(sec) for sec in spec.sections},
        "inputs": {
            "upstream": {
                dep: {
                    **fp.upstream[dep],
                    "paths": {k: _rel(loaded, v) for k, v in upstream.get(dep, {}).items()},
                }
                for dep in fp.upstream
            },
            "external": fp.external,
        },
        "outputs": outputs,
        "metrics": _jsonable(result.metrics),
        "summary": [list(r) for r in result.summary],
        "manifest": _rel(loaded, loaded.path),
        "overrides": loaded.overrides,
        "command": sys.argv,
        "packages": _package_versions(),
        "host": platform.node(),
    }
    atomic.write_json(sdir / LINEAGE, record)
    (sdir / RUNNING).unlink(missing_ok=True)
    return StageOutcome(spec.name, "ran", reason, fp.digest, wall, result, record)


def _jsonable(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return {k: str(v) for k, v in dict(obj).items()}


# ----------------------------------------------------------------------------------------------------
# Lineage of an artifact
# ----------------------------------------------------------------------------------------------------


@dataclass
class LineageNode:
    stage: str
    lineage: dict
    matched_output: str | None
    inputs: list[LineageNode] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    superseded: bool = False  # re-ran since its downstream read it: this record is not what was read


def _is_within(p: Path, root: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def find_producer(
    loaded: LoadedManifest, path: Path, pipeline: Pipeline | None = None
) -> tuple[str, str | None]:
    """(stage, output name) that produced ``path``; raises UserInputError if none did."""
    pipeline = pipeline or Pipeline()
    path = Path(path).absolute()
    best: tuple[int, str, str | None] | None = None
    for spec in pipeline.stages:
        lin = read_lineage(loaded, spec.name)
        if lin is None:
            continue
        for name, rec in lin.get("outputs", {}).items():
            out = loaded.resolve(rec["path"]).absolute()
            if _is_within(path, out):
                depth = len(out.parts)
                if best is None or depth > best[0]:
                    best = (depth, spec.name, name)
        sdir = stage_dir(loaded, spec.name)
        if best is None and _is_within(path, sdir):
            best = (len(sdir.parts), spec.name, None)
    if best is None:
        raise UserInputError(
            f"{path}: not produced by any completed stage of {loaded.path} (run `llmforge status` to see what ran)"
        )
    return best[1], best[2]


def lineage_tree(loaded: LoadedManifest, path: Path, pipeline: Pipeline | None = None) -> LineageNode:
    pipeline = pipeline or Pipeline()
    hashes = HashCache(loaded.runs_dir / ".cache" / "hashes.json")
    stage, output = find_producer(loaded, path, pipeline)

    def build(name: str, output: str | None, seen: frozenset) -> LineageNode:
        lin = read_lineage(loaded, name)
        if lin is None:  # pragma: no cover - upstream deleted after downstream ran
            raise LLMForgeError(f"lineage of stage '{name}' is missing; re-run it")
        node = LineageNode(name, lin, output)
        for oname, rec in lin.get("outputs", {}).items():
            p = loaded.resolve(rec["path"])
            if not p.exists() or hashes.path(p)[0] != rec["sha256"]:
                node.modified.append(oname)
        for dep, used in lin.get("inputs", {}).get("upstream", {}).items():
            if dep not in seen:
                child = build(dep, None, seen | {dep})
                now = {k: v["sha256"] for k, v in child.lineage.get("outputs", {}).items()}
                child.superseded = now != used.get("outputs")
                node.inputs.append(child)
        return node

    tree = build(stage, output, frozenset({stage}))
    hashes.save()
    return tree
