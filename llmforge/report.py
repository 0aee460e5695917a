"""The run report: ``runs/report.md`` and ``runs/report.html``, built only from what is on disk.

`llmforge run` writes it when it ends (whether every stage succeeded or one failed) and `llmforge report`
rebuilds it from the same files, byte for byte: each stage's ``lineage.json`` (what it did, wall time, metrics,
summary rows, outputs), a failed stage's ``.failed.json`` and the training stages' ``metrics.jsonl`` step logs
(``llmforge.train.metrics`` writes them for pretrain, sft, distill, reward and align). Nothing here depends on
the clock, so a report of the same runs folder is always the same file.

* **Results** — the figures that show the model learned: pretrain perplexity, SFT answer-format rate before and
  after, reward-model accuracy, alignment held-out reward before and after, distilled student vs teacher, GPTQ vs
  round-to-nearest perplexity, the first served answer and its latency.
* **Stages** — per stage: what it does, state, wall time, its summary rows and tables, a loss curve (and the
  reward curve of alignment) as a PNG drawn with matplotlib's Agg backend, and where each artifact is.

Disabled stages and stages that never ran are left out; a failed or interrupted stage is shown as such. The
Markdown references the PNGs in ``runs/report_assets/``; the HTML embeds them (base64), so it is one
self-contained file that loads nothing from the network.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import console, pipeline
from .manifest import LoadedManifest
from .utils import atomic

log = console.get_logger(__name__)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
ASSETS = "report_assets"  # the PNGs, next to report.md (not a stage folder: no stage is named so)
METRICS_LOG = "metrics.jsonl"

# metric keys that hold a run's "before" and "after" for one measure, per stage (the first pair present wins)
_BEFORE_AFTER: dict[str, list[tuple[str, str, str, str]]] = {
    # stage: [(measure, before key, after key, kind)]
    "sft": [("answer-format rate (held-out prompts)", "format_rate_before", "format_rate_after", "pct")],
    "reward": [("preference accuracy (held-out pairs)", "accuracy_before", "accuracy_after", "pct")],
    "align": [
        ("held-out reward", "held_out_reward_before", "held_out_reward_after", "num"),
        ("held-out reward (reward model)", "reward_before", "reward_after", "num"),
        ("preference accuracy (held-out pairs)", "accuracy_before", "accuracy_after", "pct"),
    ],
}


@dataclass
class Curve:
    """One PNG: named series of (step, value) drawn on shared axes."""

    filename: str
    title: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]]


@dataclass
class StageSection:
    name: str
    description: str
    state: str  # done | stale | failed | interrupted | running
    reason: str = ""
    wall_time_s: float | None = None
    finished_at: str | None = None
    fingerprint: str = ""
    summary: list[tuple[str, str]] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[tuple[str, str, int | None]] = field(default_factory=list)  # (name, path, bytes)
    curves: list[Curve] = field(default_factory=list)
    error: str = ""
    key: str = ""  # the one-line result shown in the overview


@dataclass
class RunReport:
    project: str
    runs_dir: str
    stages: list[StageSection]
    results: list[tuple[str, str, str, str, str]]  # (stage, measure, before, after, note)

    @property
    def total_wall_s(self) -> float:
        return sum(s.wall_time_s or 0.0 for s in self.stages)

    @property
    def finished_at(self) -> str:
        return max((s.finished_at or "" for s in self.stages), default="")


# ----------------------------------------------------------------------------------------------------
# Reading the runs folder
# ----------------------------------------------------------------------------------------------------


def read_metrics_log(stage_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``stage_dir/metrics.jsonl``; a line cut by a kill (or unreadable file) is skipped."""
    path = Path(stage_dir) / METRICS_LOG
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return rows
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    out = []
    for r in rows:
        step, v = _num(r.get("step")), _num(r.get(key))
        if step is not None and v is not None:
            out.append((step, v))
    return out


def curves_for(stage: str, rows: list[dict[str, Any]]) -> list[Curve]:
    """The loss curve of a training stage (train and held-out loss) and, for alignment, its reward curve."""
    curves = []
    loss = {"train loss": _series(rows, "loss"), "held-out loss": _series(rows, "val_loss")}
    loss = {k: v for k, v in loss.items() if v}
    if loss:
        curves.append(Curve(f"{stage}-loss.png", f"{stage}: loss per step", "loss", loss))
    if stage == "align":
        for key, label in (
            ("reward", "mean reward of the sampled answers"),
            ("rewards/margins", "DPO margin"),
        ):
            pts = _series(rows, key)
            if pts:
                name = "reward" if key == "reward" else "implicit reward margin (chosen − rejected)"
                series = {name: pts}
                if len(pts) >= 20:  # a per-step reward is noisy; the trend is what shows learning
                    series[f"mean of the last {_WINDOW} steps"] = _moving_mean(pts, _WINDOW)
                curves.append(Curve("align-reward.png", f"align: {label} per step", name, series))
                break
    return curves


_WINDOW = 10


def _moving_mean(pts: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    out = []
    for i in range(len(pts)):
        chunk = pts[max(0, i - window + 1) : i + 1]
        out.append((pts[i][0], sum(v for _, v in chunk) / len(chunk)))
    return out


def _fmt(v: Any, kind: str = "num") -> str:
    if v is None:
        return "—"
    if kind == "pct" and _num(v) is not None:
        return f"{100 * float(v):.0f}%"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:,.4g}"
    return str(v)


def _pretrain_results(metrics: dict, rows: list[dict]) -> list[tuple[str, str, str, str]]:
    after = metrics.get("val_ppl")
    if after is None:
        return []
    # "before": a measured value when the stage records one, else the earliest figure in its step log
    if metrics.get("val_ppl_before") is not None:
        return [
            ("held-out perplexity", _fmt(metrics["val_ppl_before"]), _fmt(after), "before the first step")
        ]
    vals = _series(rows, "val_ppl")
    last_step = vals[-1][0] if vals else None
    if len(vals) > 1 and vals[0][0] != last_step:
        return [
            ("held-out perplexity", _fmt(vals[0][1]), _fmt(after), f"first evaluation at step {vals[0][0]:g}")
        ]
    train = _series(rows, "loss")
    if train:
        step, loss = train[0]
        note = f"before: exp(train loss) at step {step:g}; after: held-out"
        return [("perplexity", _fmt(math.exp(min(loss, 700.0))), _fmt(after), note)]
    return [("held-out perplexity", "—", _fmt(after), "")]


def _distill_results(m: dict) -> list[tuple[str, str, str, str]]:
    out = []
    if m.get("val_ce_teacher") is not None or m.get("val_ce_student") is not None:
        note = f"KL(teacher‖student) {_fmt(m.get('val_kl'))}" if m.get("val_kl") is not None else ""
        out.append(
            (
                "held-out CE: teacher → student",
                _fmt(m.get("val_ce_teacher")),
                _fmt(m.get("val_ce_student")),
                note,
            )
        )
    if m.get("teacher_params") and m.get("student_params"):
        ratio = m["student_params"] / m["teacher_params"]
        layers = ""
        if m.get("teacher_layers") and m.get("student_layers"):
            layers = f"{m['teacher_layers']} → {m['student_layers']} layers, "
        out.append(
            (
                "parameters: teacher → student",
                _fmt(m["teacher_params"]),
                _fmt(m["student_params"]),
                f"{layers}{ratio:.0%}",
            )
        )
    return out


def _quantize_results(m: dict) -> list[tuple[str, str, str, str]]:
    ppl = m.get("perplexity") or {}
    method = m.get("method")
    if not isinstance(ppl, dict) or "original" not in ppl or method not in ppl:
        return []
    note = f"round-to-nearest {_fmt(ppl['rtn'])}" if "rtn" in ppl and method != "rtn" else ""
    if "gptq_beats_rtn" in m:
        note += " (GPTQ is better)" if m["gptq_beats_rtn"] else " (GPTQ is not better)"
    label = "GPTQ" if method == "gptq" else str(method)
    return [(f"held-out perplexity: original → {label}", _fmt(ppl["original"]), _fmt(ppl[method]), note)]


def _serve_results(m: dict, sdir: Path) -> list[tuple[str, str, str, str]]:
    turns = []
    with contextlib.suppress(OSError, ValueError, AttributeError):
        turns = json.loads((sdir / "deploy.json").read_text()).get("turns") or []
    first = turns[0] if turns and isinstance(turns[0], dict) else {}
    answer = first.get("answer") or ((m.get("answers") or [None])[0])
    if answer is None:
        return []
    ttft = first.get("ttft_s", m.get("ttft_s"))
    speed = first.get("tokens_per_s", m.get("tokens_per_s"))
    latency = f"first token in {_fmt(ttft)} s" if ttft is not None else ""
    if speed:
        latency += f", {_fmt(speed)} tokens/s after it"
    prompt = first.get("user") or "—"
    return [("first served answer: prompt → answer", prompt, answer, latency)]


def _results(name: str, metrics: dict, rows: list[dict], sdir: Path) -> list[tuple[str, str, str, str]]:
    if name == "pretrain":
        return _pretrain_results(metrics, rows)
    if name == "distill":
        return _distill_results(metrics)
    if name == "quantize":
        return _quantize_results(metrics)
    if name == "serve":
        return _serve_results(metrics, sdir)
    for measure, b, a, kind in _BEFORE_AFTER.get(name, []):
        if _num(metrics.get(a)) is not None:
            return [(measure, _fmt(metrics.get(b), kind), _fmt(metrics[a], kind), "")]
    return []


def _key_line(metrics: dict, spec: pipeline.StageSpec) -> str:
    keys = [k for k in spec.key_metrics if k in metrics] or [
        k for k, v in metrics.items() if isinstance(v, int | float | str) and not isinstance(v, bool)
    ][:3]
    return ", ".join(f"{k}={_fmt(metrics[k])}" for k in keys if not isinstance(metrics[k], dict | list))


def _from_lineage(
    sec: StageSection, lin: dict, spec: pipeline.StageSpec, rows: list[dict], sdir: Path
) -> list[tuple[str, str, str, str]]:
    """Fill ``sec`` from a stage's lineage record; returns its Results rows."""
    metrics = lin.get("metrics") or {}
    sec.wall_time_s = _num(lin.get("wall_time_s"))
    sec.finished_at = lin.get("finished_at")
    sec.fingerprint = str(lin.get("fingerprint") or "")
    sec.summary = [
        (str(r[0]), str(r[1]))
        for r in lin.get("summary") or []
        if isinstance(r, list | tuple) and len(r) == 2
    ]
    table = metrics.get("table")
    if isinstance(table, dict) and table.get("rows"):
        sec.tables.append(table)
    for oname, rec in (lin.get("outputs") or {}).items():
        sec.outputs.append((oname, str(rec.get("path", "")), rec.get("bytes")))
    sec.key = _key_line(metrics, spec)
    return _results(spec.name, metrics, rows, sdir)


def collect(loaded: LoadedManifest, pipe: pipeline.Pipeline | None = None) -> RunReport:
    """Everything the report shows, read from ``loaded.runs_dir``. Never raises for a partial or odd runs folder."""
    pipe = pipe or pipeline.Pipeline()
    sections: list[StageSection] = []
    results: list[tuple[str, str, str, str, str]] = []
    for st in pipeline.status(loaded, pipe):
        if not st.built or not st.enabled:
            continue  # disabled: left out, even when an old run of it is on disk
        spec = pipe.get(st.name)
        sdir = pipeline.stage_dir(loaded, st.name)
        lin = st.lineage
        if lin is None and st.state not in ("failed", "interrupted", "running"):
            continue  # never ran (or waits on a stage that did not): nothing to report
        sec = StageSection(st.name, spec.description, st.state, reason=st.reason)
        rows = read_metrics_log(sdir)
        if lin is not None:
            try:
                results += [(st.name, *row) for row in _from_lineage(sec, lin, spec, rows, sdir)]
            except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
                # a hand-edited or foreign record: say so in its section rather than lose the whole report
                sec.state, sec.error = "failed", f"unreadable {pipeline.LINEAGE}: {type(e).__name__}: {e}"
        else:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                failed = json.loads((sdir / pipeline.FAILED).read_text())
                sec.error = f"{failed.get('type', 'error')}: {failed.get('error', '')}"
                sec.finished_at = failed.get("at")
            sec.error = sec.error or st.reason
        sec.curves = curves_for(st.name, rows)
        sections.append(sec)
    return RunReport(loaded.manifest.project.name, _rel_runs(loaded), sections, results)


def _rel_runs(loaded: LoadedManifest) -> str:
    try:
        return loaded.runs_dir.relative_to(loaded.root).as_posix()
    except ValueError:
        return str(loaded.runs_dir)


# ----------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------


def draw(curve: Curve) -> bytes:
    """The curve as PNG bytes (matplotlib, Agg; no pyplot state, no timestamp: same data, same bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, pts in curve.series.items():
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o" if len(pts) < 12 else None, markersize=3, label=label)
    ax.set_title(curve.title)
    ax.set_xlabel("step")
    ax.set_ylabel(curve.ylabel)
    ax.grid(True, alpha=0.3)
    if len(curve.series) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return [*lines, ""]


def _size(n: int | None) -> str:
    if not isinstance(n, int):
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return ""  # pragma: no cover


def _state_text(s: StageSection) -> str:
    if s.state == "done":
        return "done"
    return f"{s.state} ({s.reason})" if s.reason and s.state != "failed" else s.state


def _took(s: StageSection) -> str:
    if s.wall_time_s is None:
        return ""
    return (
        f" in {console.format_duration(s.wall_time_s)}"
        if s.state == "done"
        else (f", its last run took {console.format_duration(s.wall_time_s)}")
    )


def _overview_rows(r: RunReport) -> list[list[str]]:
    return [
        [
            s.name,
            _state_text(s),
            console.format_duration(s.wall_time_s),
            s.key,
            ", ".join(o[1] for o in s.outputs),
        ]
        for s in r.stages
    ]


def _table_rows(t: dict) -> list[list[str]]:
    return [[_fmt(c) for c in row] for row in t.get("rows", [])]


def render_markdown(r: RunReport) -> str:
    lines = [f"# {r.project}: run report", ""]
    if not r.stages:
        lines += [f"No stage has run yet in `{r.runs_dir}`: `llmforge run` runs the pipeline.", ""]
        return "\n".join(lines)
    failed = [s.name for s in r.stages if s.state in ("failed", "interrupted")]
    lines += [
        f"{len(r.stages)} stage(s) in `{r.runs_dir}`, {console.format_duration(r.total_wall_s)} of stage time "
        f"in all (each stage's last run), last finished {r.finished_at or '—'}."
        + (f" **Not finished: {', '.join(failed)}.**" if failed else ""),
        "",
        "Rebuild this file with `llmforge report`.",
        "",
    ]
    if r.results:
        lines += ["## Results", ""]
        lines += _md_table(["stage", "measure", "before", "after", "note"], [list(x) for x in r.results])
    lines += ["## Stages", ""]
    lines += _md_table(["stage", "state", "time", "key metrics", "artifacts"], _overview_rows(r))
    for s in r.stages:
        lines += [f"### {s.name}", "", f"**{s.state}**{_took(s)}: {s.description}.", ""]
        if s.state in ("failed", "interrupted", "running"):
            lines += ["```text", s.error or s.reason, "```", ""]
        elif s.state != "done":
            lines += [f"*{s.state}: {s.reason}*", ""]
        if s.fingerprint:
            lines += [f"fingerprint `{s.fingerprint}`, finished {s.finished_at}", ""]
        if s.summary:
            lines += _md_table(["", ""], [list(x) for x in s.summary])
        for t in s.tables:
            if t.get("title"):
                lines += [f"**{t['title']}**", ""]
            lines += _md_table([str(c) for c in t.get("columns", [])], _table_rows(t))
        for c in s.curves:
            lines += [f"![{c.title}]({ASSETS}/{c.filename})", ""]
        if s.outputs:
            lines += _md_table(
                ["artifact", "path", "size"], [[n, f"`{p}`", _size(b)] for n, p, b in s.outputs]
            )
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f5f5f7}code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
pre{background:#fff4f4;border:1px solid #f0c0c0;padding:.6em;white-space:pre-wrap}
.done{color:#137333}.failed,.interrupted{color:#b3261e;font-weight:bold}.stale,.running{color:#a15c00}
img{max-width:100%;border:1px solid #eee}.dim{color:#666}
"""


def _h(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _html_table(header: list[str], rows: list[list[Any]], head: bool = True) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_h(c)}</th>" for c in header) + "</tr>")
    out += ["<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>" for row in rows]
    return "\n".join([*out, "</table>"])


def render_html(r: RunReport, images: dict[str, bytes]) -> str:
    """The report as one HTML file; ``images`` (file name → PNG bytes) are embedded as data URIs."""
    body = [f"<h1>{_h(r.project)}: run report</h1>"]
    if not r.stages:
        body.append(f"<p>No stage has run yet in <code>{_h(r.runs_dir)}</code>.</p>")
    else:
        failed = [s.name for s in r.stages if s.state in ("failed", "interrupted")]
        note = f' <strong class="failed">Not finished: {_h(", ".join(failed))}.</strong>' if failed else ""
        body.append(
            f"<p>{len(r.stages)} stage(s) in <code>{_h(r.runs_dir)}</code>, "
            f"{_h(console.format_duration(r.total_wall_s))} of stage time in all (each stage's last run), "
            f"last finished {_h(r.finished_at or '—')}.{note}</p>"
            '<p class="dim">Rebuild this file with <code>llmforge report</code>.</p>'
        )
        if r.results:
            body += [
                "<h2>Results</h2>",
                _html_table(["stage", "measure", "before", "after", "note"], r.results),
            ]
        body += [
            "<h2>Stages</h2>",
            _html_table(["stage", "state", "time", "key metrics", "artifacts"], _overview_rows(r)),
        ]
    for s in r.stages:
        body.append(f'<h3 id="{_h(s.name)}">{_h(s.name)}</h3>')
        body.append(
            f'<p><span class="{_h(s.state)}">{_h(s.state)}</span>{_h(_took(s))}: {_h(s.description)}.</p>'
        )
        if s.state in ("failed", "interrupted", "running"):
            body.append(f"<pre>{_h(s.error or s.reason)}</pre>")
        elif s.state != "done":
            body.append(f'<p class="stale">{_h(s.state)}: {_h(s.reason)}</p>')
        if s.fingerprint:
            body.append(
                f'<p class="dim">fingerprint <code>{_h(s.fingerprint)}</code>, finished {_h(s.finished_at)}</p>'
            )
        if s.summary:
            body.append(_html_table([], s.summary, head=False))
        for t in s.tables:
            if t.get("title"):
                body.append(f"<p><strong>{_h(t['title'])}</strong></p>")
            body.append(_html_table([str(c) for c in t.get("columns", [])], _table_rows(t)))
        for c in s.curves:
            data = images.get(c.filename)
            if data is not None:
                b64 = base64.b64encode(data).decode("ascii")
                body.append(f'<p><img alt="{_h(c.title)}" src="data:image/png;base64,{b64}"></p>')
        if s.outputs:
            body.append(
                _html_table(["artifact", "path", "size"], [[n, p, _size(b)] for n, p, b in s.outputs])
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_h(r.project)}: run report</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


@dataclass
class Written:
    markdown: Path
    html: Path
    images: list[Path]
    report: RunReport


def write(loaded: LoadedManifest, pipe: pipeline.Pipeline | None = None) -> Written:
    """Build the report from ``loaded.runs_dir`` and write report.md, report.html and the PNGs (atomically)."""
    rep = collect(loaded, pipe)
    runs = loaded.runs_dir
    assets = runs / ASSETS
    images: dict[str, bytes] = {}
    curves = [c for s in rep.stages for c in s.curves]
    if curves:
        try:
            for c in curves:
                images[c.filename] = draw(c)
        except ImportError:
            log.warning(
                "report: matplotlib is not installed, so the report has no curves; pip install matplotlib"
            )
            images = {}
            for s in rep.stages:
                s.curves = []
    written = []
    for name, data in images.items():
        atomic.write_bytes(assets / name, data)
        written.append(assets / name)
    if assets.is_dir():  # pictures of stages no longer in the report must not linger beside it
        for old in assets.glob("*.png"):
            if old.name not in images:
                old.unlink(missing_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    atomic.write_text(runs / REPORT_MD, render_markdown(rep))
    atomic.write_text(runs / REPORT_HTML, render_html(rep, images))
    return Written(runs / REPORT_MD, runs / REPORT_HTML, written, rep)
