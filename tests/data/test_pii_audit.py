"""Independent audit of the PII detectors on a hand-written labelled set (``tests/data/pii_audit``).

Unlike ``test_pii_eval.py`` (the set generated alongside the detectors), these cases were written without
looking at the detectors: web/forum/log/code/config text with national phone formats, logs, keys and many hard
negatives. See ``pii_audit/build_cases.py`` for the labelling conventions.

Two scores per kind:

* exact   — a prediction counts only if kind, start and end all equal a gold span;
* lenient — a prediction counts if it has the gold kind and overlaps a gold span (one-to-one).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest

from llmforge.data.pii import KINDS, find_pii

HERE = Path(__file__).parent / "pii_audit"
CASES = HERE / "cases.jsonl"
MIN_PRECISION = 0.98
MIN_RECALL = 0.95

Span = tuple[str, int, int]


def load_cases() -> list[dict]:
    return [json.loads(line) for line in CASES.read_text(encoding="utf-8").splitlines() if line.strip()]


def _match(gold: list[Span], pred: list[Span], lenient: bool) -> set[tuple[int, int]]:
    """One-to-one (gold index, pred index) pairs that count as hits."""
    pairs: set[tuple[int, int]] = set()
    used: set[int] = set()
    for gi, (gk, gs, ge) in enumerate(gold):
        for pi, (pk, ps, pe) in enumerate(pred):
            if pi in used or pk != gk:
                continue
            if (ps, pe) == (gs, ge) if not lenient else (ps < ge and gs < pe):
                pairs.add((gi, pi))
                used.add(pi)
                break
    return pairs


def score(cases: list[dict], lenient: bool) -> tuple[dict[str, dict[str, float]], list[str]]:
    counts = {k: {"tp": 0, "fp": 0, "fn": 0} for k in KINDS}
    errors: list[str] = []
    for i, case in enumerate(cases):
        text = case["text"]
        gold = [(s["kind"], s["start"], s["end"]) for s in case["spans"]]
        pred = [(m.kind, m.start, m.end) for m in find_pii(text)]
        pairs = _match(gold, pred, lenient)
        hit_gold = {g for g, _ in pairs}
        hit_pred = {p for _, p in pairs}
        for gi, (k, s, e) in enumerate(gold):
            if gi in hit_gold:
                counts[k]["tp"] += 1
            else:
                counts[k]["fn"] += 1
                errors.append(f"FN {k:<11} #{i} {text[s:e]!r}  ({case['note']})")
        for pi, (k, s, e) in enumerate(pred):
            if pi not in hit_pred:
                counts[k]["fp"] += 1
                errors.append(f"FP {k:<11} #{i} {text[s:e]!r}  ({case['note']})")
    scores = {}
    for k, c in counts.items():
        tp, fp, fn = c["tp"], c["fp"], c["fn"]
        scores[k] = {
            "support": tp + fn,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else 1.0,
            "recall": tp / (tp + fn) if tp + fn else 1.0,
        }
    return scores, errors


def format_table(exact: dict[str, dict[str, float]], lenient: dict[str, dict[str, float]]) -> str:
    lines = [
        f"{'kind':<12}{'support':>8}{'P exact':>9}{'R exact':>9}{'P lenient':>11}{'R lenient':>11}{'FP':>5}{'FN':>5}",
    ]
    for k in KINDS:
        e, le = exact[k], lenient[k]
        lines.append(
            f"{k:<12}{e['support']:>8}{e['precision']:>9.3f}{e['recall']:>9.3f}"
            f"{le['precision']:>11.3f}{le['recall']:>11.3f}{e['fp']:>5}{e['fn']:>5}"
        )
    return "\n".join(lines)


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return load_cases()


def test_cases_file_is_built_from_builder(cases: list[dict]) -> None:
    spec = importlib.util.spec_from_file_location("pii_audit_build_cases", HERE / "build_cases.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert CASES.read_text(encoding="utf-8") == mod.render(mod.build()), "run build_cases.py to regenerate"
    assert 250 <= len(cases) <= 400
    for case in cases:
        spans = sorted(case["spans"], key=lambda s: s["start"])
        assert all(s["kind"] in KINDS and 0 <= s["start"] < s["end"] <= len(case["text"]) for s in spans)
        assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(spans))
    negatives = sum(1 for c in cases if not c["spans"])
    assert negatives >= 100, negatives


def test_audit_precision_recall(cases: list[dict], capsys: pytest.CaptureFixture[str]) -> None:
    exact, errors = score(cases, lenient=False)
    lenient, lenient_errors = score(cases, lenient=True)
    table = format_table(exact, lenient)
    with capsys.disabled():
        print(f"\nPII detectors on the independent audit set ({len(cases)} cases):\n{table}")
        if errors:
            print("exact-match errors:\n  " + "\n  ".join(errors))
    failing = [k for k, s in exact.items() if s["precision"] < MIN_PRECISION or s["recall"] < MIN_RECALL]
    assert not failing, f"below target for {failing}\n{table}\n" + "\n".join(errors)
    # the lenient score can only be at least as good as the exact one
    for k in KINDS:
        assert lenient[k]["recall"] >= exact[k]["recall"]
        assert lenient[k]["precision"] >= exact[k]["precision"]
    assert len(lenient_errors) <= len(errors)
