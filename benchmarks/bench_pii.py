"""Throughput of ``llmforge.data.pii.PIIScrubber`` (one core), side by side with datatrove's PIIFormatter.

Corpora:

* ``labelled`` — the generated labelled set (``tests/data/pii_eval.py``): every sentence plants PII or a
  look-alike, so this is the worst case for the validators.
* ``prose``    — PII-free web-like prose: the same generator's filler sentences only (numbers, dates, prices,
  versions, but no planted PII), joined into page-sized documents.
* ``docs``     — optional: ``--text-dir DIR`` reads every ``*.txt``/``*.md``/``*.rst`` file under DIR (real
  documents if you have some; e.g. a site-packages tree is number- and code-heavy technical prose).

For the "≤ 20 % of the pipeline" budget we also time the other stages on the same prose, as datatrove runs
them: trafilatura extraction of the text wrapped in a simple HTML page, the Gopher/C4/FineWeb quality filters,
and the MinHash signature step of dedup (each skipped when not installed).

Run: ``python benchmarks/bench_pii.py [--repeat 3] [--text-dir DIR]``
"""

from __future__ import annotations

import argparse
import html
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the labelled-set generator lives in tests/

from llmforge.data.pii import KINDS, PIIScrubber
from tests.data.pii_eval import _FILLER, _render, generate


def prose_corpus(n_docs: int = 2000, seed: int = 0) -> list[str]:
    """PII-free documents of ~1–3 KB made of the generator's filler sentences."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts: list[str] = []
        for i in range(rng.randint(15, 45)):
            if i:
                parts.append(" " if rng.random() < 0.8 else "\n\n")
            _render(rng, rng.choice(_FILLER), parts, [])
        docs.append("".join(parts))
    return docs


def files_corpus(root: Path, limit_mb: float = 20.0) -> list[str]:
    docs: list[str] = []
    total = 0
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".txt", ".md", ".rst") or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 500 <= len(text) <= 200_000:
            docs.append(text)
            total += len(text.encode())
            if total > limit_mb * 1e6:
                break
    return docs


def timeit(fn: Callable[[str], object], docs: list[str], repeat: int) -> float:
    """Best-of-``repeat`` seconds for one pass over ``docs``."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for d in docs:
            fn(d)
        times.append(time.perf_counter() - t0)
    return min(times)


def datatrove_formatter() -> Callable[[str], object] | None:
    try:
        from datatrove.pipeline.formatters import PIIFormatter
    except ImportError:
        return None
    fmt = PIIFormatter()
    return fmt.format


def pipeline_stages() -> dict[str, Callable[[str], object]]:
    """The other stages of `extract → filter → PII → dedup`, as datatrove runs them (where installed)."""
    stages: dict[str, Callable[[str], object]] = {}
    try:
        import trafilatura

        stages["extract (trafilatura)"] = lambda text: trafilatura.extract(as_html(text))
    except ImportError:
        pass
    try:
        from datatrove.data import Document
        from datatrove.pipeline.filters import (
            C4QualityFilter,
            FineWebQualityFilter,
            GopherQualityFilter,
            GopherRepetitionFilter,
        )

        filters = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter()]
        stages["filter (gopher+c4+fineweb)"] = lambda text: [
            f.filter(Document(text=text, id="0")) for f in filters
        ]
    except ImportError:
        pass
    try:
        from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

        sig = MinhashDedupSignature(output_folder=tempfile.mkdtemp())
        stages["dedup (minhash signature)"] = lambda text: sig.get_signature(sig.get_shingles(text))
    except ImportError:
        pass
    return stages


def as_html(text: str) -> str:
    paras = "".join(f"<p>{html.escape(p)}</p>" for p in text.split("\n\n"))
    return (
        "<html><head><title>Page</title></head><body><nav><a href='/'>Home</a><a href='/about'>About</a></nav>"
        f"<article><h1>Title</h1>{paras}</article><footer>© 2024 Example Ltd.</footer></body></html>"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--text-dir", type=Path, default=None)
    args = ap.parse_args()

    corpora = {"labelled": [d.text for d in generate(seed=0)], "prose": prose_corpus()}
    if args.text_dir:
        corpora["docs"] = files_corpus(args.text_dir)

    ours = PIIScrubber(dict.fromkeys(KINDS, "redact"))
    peer = datatrove_formatter()
    rows = []
    for name, docs in corpora.items():
        mb = sum(len(d.encode()) for d in docs) / 1e6
        t = timeit(ours, docs, args.repeat)
        row = [name, f"{len(docs)}", f"{mb:.2f}", f"{mb / t:.2f}", f"{len(docs) / t:,.0f}"]
        if peer is not None:
            tp = timeit(peer, docs, args.repeat)
            row += [f"{mb / tp:.2f}"]
        rows.append(row)
    header = ["corpus", "docs", "MB", "llmforge MB/s", "llmforge docs/s"]
    if peer is not None:
        header.append("datatrove PIIFormatter MB/s (email+IP only)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")

    # PII's share of the pipeline: per-document seconds of each stage on the same PII-free prose.
    sample = corpora["prose"][:400]
    per_doc = {}
    for stage, fn in pipeline_stages().items():
        timeit(fn, sample[:20], 1)  # warm-up: lazy model/tokenizer loads are not steady-state cost
        per_doc[stage] = timeit(fn, sample, 1) / len(sample)
    per_doc["PII (llmforge)"] = timeit(ours, sample, args.repeat) / len(sample)
    total = sum(per_doc.values())
    print("\n| stage | ms/doc | share |\n|---|---:|---:|")
    for stage, sec in per_doc.items():
        print(f"| {stage} | {1000 * sec:.3f} | {100 * sec / total:.1f}% |")
    per_doc = statistics.mean(len(d) for d in corpora["prose"])
    print(f"\nmean prose document: {per_doc / 1000:.1f} KB")


if __name__ == "__main__":
    main()
