"""``runs/data/report.json`` and the summary tables, built from datatrove's per-task stats files.

Every task of every pass saves its steps' counters to ``<logging_dir>/stats/<rank>.json`` (also for tasks a
resumed run skipped, because they were saved by the run that did them), so the report sums those files rather
than trusting one run's in-memory totals.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import DataError
from .process import Plan

# Which manifest key to loosen when a step drops too much (or everything).
STEP_KEYS: dict[str, str] = {
    "read": "data.inputs",
    "extract": "data.extract",
    "fix_unicode": "data.fix_unicode",
    "language": "data.language (languages / min_score)",
    "gopher_repetition": "data.quality.gopher_repetition",
    "gopher_quality": "data.quality.gopher_quality",
    "c4": "data.quality.c4",
    "fineweb": "data.quality.fineweb",
    "pii": "data.pii",
    "exact_dedup": "data.dedup.exact",
    "near_dedup": "data.dedup.minhash",
}
# Steps whose thresholds come from `data.profile`: a warning about them also suggests a gentler profile.
_PROFILE_STEPS = {"language", "gopher_repetition", "gopher_quality", "c4", "fineweb"}
_GENTLER = {"web": "docs", "docs": "code"}
# Exact duplicates are redundant by definition: dropping many of them is not the corpus being destroyed.
_NO_WARNING = {"read", "exact_dedup"}
_OWN_COUNTERS = {"docs_in", "docs_out", "bytes_in", "bytes_out", "seconds", "total", "forwarded", "dropped"}


def _total(value: Any) -> float:
    if isinstance(value, dict):
        return float(value.get("total", 0))
    return float(value or 0)


def load_stats(logging_dir: Path) -> dict[str, dict[str, float]]:
    """Sum the per-task stats files of one pass: ``{step label: {counter: total}}`` in pipeline order."""
    merged: dict[str, dict[str, float]] = {}
    for path in sorted((logging_dir / "stats").glob("*.json")):
        try:
            steps = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        for step in steps:
            counters = merged.setdefault(step["name"], {})
            for key, value in step.get("stats", {}).items():
                counters[key] = counters.get(key, 0.0) + _total(value)
    return merged


def all_stats(plan: Plan) -> dict[str, dict[str, float]]:
    """Stats of every pass, merged into one mapping (step labels are unique across passes)."""
    out: dict[str, dict[str, float]] = {}
    for p in plan.passes:
        for name, counters in load_stats(plan.logging_dir(p.name)).items():
            if name in out:  # e.g. "read_intermediate" appears in two passes: keep both, apart
                name = f"{name}@{p.name}"
            out[name] = counters
    return out


def _prefixed(counters: dict[str, float], prefix: str) -> dict[str, int]:
    return {k[len(prefix) :]: int(v) for k, v in counters.items() if k.startswith(prefix) and v}


def step_rows(plan: Plan, stats: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per measured step: docs/bytes in and out, drops by reason, seconds."""
    rows = []
    for name in plan.steps:
        c = stats.get(name)
        if c is None:
            continue
        row: dict[str, Any] = {
            "step": name,
            "docs_in": int(c.get("docs_in", 0)),
            "docs_out": int(c.get("docs_out", 0)),
            "bytes_in": int(c.get("bytes_in", 0)),
            "bytes_out": int(c.get("bytes_out", 0)),
            "dropped": int(c.get("docs_in", 0) - c.get("docs_out", 0)),
            "drop_reasons": dict(sorted(_prefixed(c, "dropped_").items(), key=lambda kv: -kv[1])),
            "seconds": round(c.get("seconds", 0.0), 3),
        }
        rescued = _prefixed(c, "rescued_")
        if rescued:
            row["rescued"] = rescued
        if name == "read":
            row["files"] = int(c.get("input_files", 0))
            row["file_bytes"] = int(c.get("input_bytes", 0))
            row["bytes_in"] = row["file_bytes"]
            row["dropped"] = int(c.get("skipped", 0))
            row["drop_reasons"] = {
                **{f"skipped_{k}": v for k, v in _prefixed(c, "skipped_").items()},
                **{f"damaged_file_{k}": v for k, v in _prefixed(c, "damaged_").items()},
            }
        rows.append(row)
    return rows


def emptying_step(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first step that received documents and passed none on (None if documents got through)."""
    for row in rows:
        if row["docs_out"] == 0 and (row["docs_in"] > 0 or row["step"] == "read"):
            return row
    return None


def empty_error(rows: list[dict[str, Any]], n_files: int) -> DataError:
    """The error for a run that produced no documents, naming the step and the knob to look at."""
    row = emptying_step(rows)
    if row is None or row["step"] == "read":
        reasons = row["drop_reasons"] if row else {}
        why = ", ".join(f"{k}: {v}" for k, v in reasons.items()) or "the files hold no documents"
        return DataError(
            f"data: no documents could be read from {n_files} input file(s) ({why}). Check `data.inputs` "
            "(paths, `format`, `text_key`) and the crawl output."
        )
    reasons = ", ".join(f"{k}: {v}" for k, v in list(row["drop_reasons"].items())[:4]) or "no reason recorded"
    key = STEP_KEYS.get(row["step"], "data")
    return DataError(
        f"data: step '{row['step']}' dropped all {row['docs_in']} documents it received ({reasons}); the corpus "
        f"would be empty. Loosen or disable `{key}`, or check that the inputs are what you expect."
    )


def output_shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jsonl.gz"))


def count_output(folder: Path) -> tuple[int, int]:
    """(documents, text bytes) in the final shards, read back from disk — the number that matters."""
    docs = size = 0
    for shard in output_shards(folder):
        with gzip.open(shard, "rb") as f:
            for line in f:
                row = json.loads(line)
                docs += 1
                size += len(row["text"].encode("utf-8", "surrogatepass"))
    return docs, size


def pick_samples(samples_dir: Path, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` before/after pairs, preferring variety: one with PII redacted, one from HTML, then others."""
    records: list[dict[str, Any]] = []
    for path in sorted(samples_dir.glob("*.json")):
        try:
            records.extend(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    chosen: list[dict[str, Any]] = []
    for pred in (lambda r: r.get("pii_redacted"), lambda r: r.get("html"), lambda r: r.get("changed")):
        for r in records:
            if len(chosen) >= n:
                return chosen
            if pred(r) and r not in chosen:
                chosen.append(r)
                break
    for r in records:
        if len(chosen) >= n:
            break
        if r not in chosen:
            chosen.append(r)
    return chosen


def minhash_clusters(stats: dict[str, dict[str, float]]) -> int:
    c = stats.get("minhash_cluster", {})
    return int(c.get("clusters", 0))


def exact_clusters(plan: Plan) -> int:
    """Groups of identical documents: one (doc, count) record of 8 bytes per group in datatrove's counts files."""
    from datatrove.utils.typeshelper import ExtensionHelperSD

    folder = plan.work_dir / "exact" / "dups"
    return sum(p.stat().st_size for p in folder.rglob(f"*{ExtensionHelperSD.stage_2_counts}")) // 8


def dropped_samples(samples_dir: Path, per_step: int = 6) -> dict[str, list[dict[str, Any]]]:
    """Examples of dropped documents per step (written by ``Measured``), spread over the drop reasons."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((samples_dir / "dropped").glob("*.json")):
        step = path.name.split(".")[0]
        try:
            found.setdefault(step, []).extend(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    out: dict[str, list[dict[str, Any]]] = {}
    for step, records in found.items():
        # round-robin over reasons so a step with two reasons shows both
        by_reason: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            by_reason.setdefault(r["reason"], []).append(r)
        chosen: list[dict[str, Any]] = []
        while len(chosen) < per_step and any(by_reason.values()):
            for reason in list(by_reason):
                if by_reason[reason] and len(chosen) < per_step:
                    chosen.append(by_reason[reason].pop(0))
        if chosen:
            out[step] = chosen
    return out


def drop_warnings(
    rows: list[dict[str, Any]], share: float, examples: dict[str, list[dict[str, Any]]], profile: str
) -> list[dict[str, Any]]:
    """One warning per step that dropped more than ``share`` of what it received: step, share, knob, examples."""
    warnings = []
    for row in rows:
        if row["step"] in _NO_WARNING or row["docs_in"] == 0:
            continue
        frac = row["dropped"] / row["docs_in"]
        if frac <= share:
            continue
        knob = STEP_KEYS.get(row["step"], "data")
        hint = f"relax `{knob}`"
        if row["step"] in _PROFILE_STEPS and profile in _GENTLER:
            hint += f" or try `data.profile: {_GENTLER[profile]}`"
        elif row["step"] == "extract":
            hint = f"check the pages (boilerplate only?) or `{knob}`"
        reasons = (
            ", ".join(f"{k} {v}" for k, v in list(row["drop_reasons"].items())[:3]) or "no reason recorded"
        )
        warnings.append(
            {
                "step": row["step"],
                "dropped": row["dropped"],
                "docs_in": row["docs_in"],
                "share": round(frac, 3),
                "knob": knob,
                "message": f"step '{row['step']}' dropped {frac:.0%} of its input ({row['dropped']:,} of "
                f"{row['docs_in']:,}; {reasons}): {hint}",
                "examples": examples.get(row["step"], [])[:3],
            }
        )
    return warnings


def build_report(
    plan: Plan,
    *,
    cfg: Any,
    wall_s: float,
    pass_seconds: dict[str, float],
    corpus_dir: Path,
    notes: list[str],
    resumed: bool,
    config_digest: str,
) -> dict[str, Any]:
    stats = all_stats(plan)
    rows = step_rows(plan, stats)
    read = stats.get("read", {})
    docs_out, bytes_out = count_output(corpus_dir)
    docs_in = int(read.get("docs_out", 0))
    pii_stats = stats.get("pii", {})
    exact = next((r for r in rows if r["step"] == "exact_dedup"), None)
    near = next((r for r in rows if r["step"] == "near_dedup"), None)
    lang_stats = stats.get("language", {})
    languages = dict(sorted(_prefixed(lang_stats, "lang_").items(), key=lambda kv: -kv[1]))
    formats = Counter(f.format for f in plan.files)
    mh = cfg.dedup.minhash
    report: dict[str, Any] = {
        "status": "ok" if docs_out else "empty",
        "config_hash": config_digest,
        "profile": cfg.profile,
        "resumed": resumed,
        "executor": cfg.executor,
        "tasks": cfg.tasks,
        "inputs": {
            "files": len(plan.files),
            "by_format": dict(formats),
            "file_bytes": int(read.get("input_bytes", 0)),
            "damaged_files": _prefixed(read, "damaged_"),
            "skipped_records": _prefixed(read, "skipped_"),
            "files_without_documents": int(read.get("files_without_documents", 0)),
            "notes": notes,
        },
        "documents": {"in": docs_in, "out": docs_out},
        "bytes": {"in": int(read.get("bytes_out", 0)), "out": bytes_out},
        "steps": rows,
        "languages": languages,
        "pii": {
            "actions": cfg.pii.model_dump(exclude={"enabled"}) if cfg.pii.enabled else {},
            "documents_with_pii": int(pii_stats.get("docs_with_pii", 0)),
            "matches": _prefixed(pii_stats, "pii_"),
            "redacted": _prefixed(pii_stats, "redacted_"),
            "documents_dropped": _prefixed(pii_stats, "dropped_"),
        },
        "dedup": {
            "exact": {
                "enabled": cfg.dedup.exact,
                "removed": exact["dropped"] if exact else 0,
                "clusters": exact_clusters(plan) if exact else 0,
            },
            "near": {
                "enabled": mh.enabled,
                "ngram_size": mh.ngram_size,
                "num_buckets": mh.num_buckets,
                "hashes_per_bucket": mh.hashes_per_bucket,
                "removed": near["dropped"] if near else 0,
                "clusters": minhash_clusters(stats),
            },
        },
        "samples": pick_samples(plan.samples_dir, cfg.samples) if cfg.samples else [],
        "timing": {
            "wall_s": round(wall_s, 2),
            "passes_s": {k: round(v, 2) for k, v in pass_seconds.items()},
            "docs_per_s": round(docs_in / wall_s, 1) if wall_s > 0 and pass_seconds else None,
            "step_seconds": {r["step"]: r["seconds"] for r in rows},
        },
        "output": {
            "dir": str(corpus_dir),
            "shards": [p.name for p in output_shards(corpus_dir)],
            "documents": docs_out,
            "bytes": bytes_out,
        },
    }
    dropped = dropped_samples(plan.samples_dir) if cfg.samples else {}
    report["dropped_samples"] = dropped
    report["warnings"] = drop_warnings(rows, cfg.warn_drop_share, dropped, cfg.profile)
    return report


# --------------------------------------------------------------------------------------------------------
# summary for the CLI


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def diff_window(before: str, after: str, n: int) -> tuple[str, str]:
    """The parts of ``before`` / ``after`` around their first difference, whitespace-collapsed, ``n`` chars."""
    b, a = " ".join(before.split()), " ".join(after.split())
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    start = max(0, p - n // 4) if p < min(len(a), len(b)) else 0
    return _clip(("…" if start else "") + b[start:], n), _clip(("…" if start else "") + a[start:], n)


def summary(report: dict[str, Any]) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """(label, value) rows and rich tables for ``StageResult``."""
    d, b = report["documents"], report["bytes"]
    exact, near = report["dedup"]["exact"], report["dedup"]["near"]
    langs = report["languages"]
    total_lang = sum(langs.values()) or 1
    rows: list[tuple[str, str]] = [
        ("documents", f"{d['in']:,} → {d['out']:,}"),
        ("text", f"{_human(b['in'])} → {_human(b['out'])}"),
        (
            "input files",
            f"{report['inputs']['files']} ({', '.join(f'{k} {v}' for k, v in report['inputs']['by_format'].items())})",
        ),
    ]
    bad = {**report["inputs"]["damaged_files"], **report["inputs"]["skipped_records"]}
    if bad:
        rows.append(("unreadable (skipped)", ", ".join(f"{k} {v}" for k, v in bad.items())))
    if langs:
        rows.append(
            ("languages", ", ".join(f"{k} {100 * v / total_lang:.0f}%" for k, v in list(langs.items())[:6]))
        )
    pii = report["pii"]["matches"]
    if report["pii"]["actions"]:
        rows.append(("PII found", ", ".join(f"{k} {v}" for k, v in pii.items()) or "none"))
    rows.append(
        (
            "duplicates removed",
            f"exact {exact['removed']} ({exact['clusters']} groups), near {near['removed']} ({near['clusters']} clusters)",
        )
    )
    if report["timing"]["docs_per_s"]:
        rows.append(
            ("throughput", f"{report['timing']['docs_per_s']:,} docs/s ({report['timing']['wall_s']} s)")
        )
    rows.append(("output", f"{report['output']['dir']} ({len(report['output']['shards'])} shards)"))
    rows.append(("filter profile", str(report.get("profile", "?"))))
    rescued = next((r.get("rescued") for r in report["steps"] if r["step"] == "extract"), None)
    if rescued:
        rows.append(
            ("extraction fallback", ", ".join(f"{k} {v}" for k, v in rescued.items()) + " pages rescued")
        )
    for note in report.get("notes", []):
        rows.append(("⚠ note", note))
    for w in report.get("warnings", []):
        rows.append((f"⚠ {w['step']}", w["message"]))

    step_table = {
        "title": "data: documents and bytes per step",
        "columns": ["step", "docs in", "docs out", "bytes in", "bytes out", "dropped: top reasons", "s"],
        "rows": [
            [
                r["step"],
                f"{r['docs_in']:,}" if r["step"] != "read" else f"{r.get('files', 0)} files",
                f"{r['docs_out']:,}",
                _human(r["bytes_in"]),
                _human(r["bytes_out"]),
                ", ".join(f"{k} {v}" for k, v in list(r["drop_reasons"].items())[:3]),
                f"{r['seconds']:.2f}",
            ]
            for r in report["steps"]
        ],
    }
    tables = [step_table]
    examples = [
        [w["step"], e["reason"], _clip(str(e.get("url") or e["id"]), 40), _clip(e["text"], 160)]
        for w in report.get("warnings", [])
        for e in w["examples"]
    ]
    if examples:
        tables.append(
            {
                "title": "data: examples of what the warned steps dropped (all steps: report.json dropped_samples)",
                "columns": ["step", "reason", "document", "text"],
                "rows": examples,
            }
        )
    if report["samples"]:
        tables.append(
            {
                "title": "data: before → after samples",
                "columns": ["document", "before", "after"],
                "rows": [
                    [_clip(str(s.get("url") or s["id"]), 40), *diff_window(s["before"], s["after"], 160)]
                    for s in report["samples"]
                ],
            }
        )
    return rows, tables
