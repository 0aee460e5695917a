"""The red-team set: its size and coverage, that it is what the seeded script writes, and the recall /
false-positive thresholds of the red-team chain's filters (the figures are in docs/safety.md)."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

from llmforge.serve.safety.redteam import evaluate, load_set, report_lines

ROOT = Path(__file__).resolve().parents[2]


def test_the_set_is_large_and_covers_every_evasion():
    items = load_set()
    assert len(items) >= 200
    cats = Counter(i["category"] for i in items)
    for c in ["blocklist/plain", "blocklist/upper", "blocklist/mixed-case", "blocklist/spaced", "blocklist/homoglyph",
              "blocklist/zero-width", "blocklist/fullwidth", "blocklist/leet", "pii/email", "pii/phone",
              "pii/credit_card", "pii/iban", "pii/ssn", "pii/secret", "pii/phone-obfuscated", "benign/look-alike"]:  # fmt: skip
        assert cats[c] >= 2, c
    assert {i["direction"] for i in items} == {"input", "output"}
    assert sum(not i["catch"] for i in items) >= 100  # as many benign texts as attacks
    assert [i["id"] for i in items] == list(range(len(items)))


def test_the_set_is_what_the_seeded_script_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_redteam", ROOT / "scripts" / "make_redteam.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.OUT = tmp_path / "redteam.json"
    mod.main()
    assert json.loads(mod.OUT.read_text()) == load_set()


def test_recall_and_false_positive_rate_per_filter():
    reports = evaluate()
    lines = report_lines(reports)
    bl, pii = reports["blocklist"], reports["pii"]
    # measured: blocklist 97.8% recall (87/89) and 0% FP; pii 95.5% (64/67) and 2% FP (two version strings)
    assert bl.recall >= 0.95 and bl.false_positive_rate <= 0.02, lines
    assert pii.recall >= 0.93 and pii.false_positive_rate <= 0.03, lines
    assert bl.must_catch >= 80 and pii.must_catch >= 60 and bl.benign >= 100


def test_streaming_gives_the_whole_text_result_at_every_split():
    """For every item: streamed one character at a time, in threes, and split in two at each position, the
    red-team chain releases exactly what it gives for the whole text (the same redactions), or blocks with
    nothing of the blocked match released."""
    import asyncio

    from llmforge.manifest.serve import SafetyConfig
    from llmforge.serve.filters import ContentFiltered, FilterChain, RequestContext
    from llmforge.serve.safety import build_chain
    from llmforge.serve.safety.redteam import REDTEAM_FILTERS

    chain: FilterChain = build_chain(SafetyConfig.model_validate({"filters": REDTEAM_FILTERS}))
    ctx = RequestContext("r", "chat", "m")

    async def whole(text):
        try:
            return (await chain.check_input(ctx, [text]))[0], None
        except ContentFiltered:
            starts = [h.start for f in chain.filters if f.action == "block" for h in f.find(text)]
            return None, min(starts)

    async def streamed(text, sizes):
        out, got, i, k = chain.output(ctx, 0), [], 0, 0
        while i < len(text):
            v = await out.push(text[i : i + sizes[k % len(sizes)]])
            i, k = i + sizes[k % len(sizes)], k + 1
            got.append(v.text)
            if v.blocked:
                return "".join(got), True
        v = await out.finish()
        return "".join(got) + v.text, v.blocked

    async def run():
        for item in load_set():
            text = item["text"]
            expected, block_at = await whole(text)
            for sizes in [[1], [3], *([cut, 10_000] for cut in range(1, len(text)))]:
                released, blocked = await streamed(text, sizes)
                if expected is None:
                    assert blocked and text.startswith(released) and len(released) <= block_at, (item, sizes)
                else:
                    assert not blocked and released == expected, (item, sizes, released)

    asyncio.run(run())
