"""Write the tiny template's alignment data (seeded, no download):

* ``llmforge/templates/tiny/reward/pairs.jsonl`` — preference pairs for the ``reward`` stage on the SFT task:
  ``chosen`` is the right answer in the format ``The answer is N.``; ``rejected`` is a wrong sum in the same
  format (half the pairs) or the right or a wrong number badly formatted (a bare number, a missing period, other
  wording). The reward model learns the format at once and the arithmetic only as far as a 1M-parameter model
  can; its held-out accuracy and margin are in the stage summary.
* ``llmforge/templates/tiny/align/prompts.jsonl`` — GRPO prompts with the verifiable ``answer`` field: single-digit
  addition and subtraction (operands 0..4) in the SFT set's phrasings, each question in every phrasing,
  so the held-out prompts (``align.eval_prompts``, split off by a seeded hash of their text) are questions the
  policy is never trained on in that wording. The rewards are verifiable: the exact answer, a numeric closeness
  bonus and the answer format.

    python scripts/make_demo_align.py          # rewrites both files; the output is identical for the same seed
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TINY = Path(__file__).resolve().parents[1] / "llmforge" / "templates" / "tiny"
PAIRS = TINY / "reward" / "pairs.jsonl"
PROMPTS = TINY / "align" / "prompts.jsonl"

# the SFT set's phrasings, imported so the two cannot drift: prompts render as the policy was fine-tuned on
from make_demo_sft import ASK_ADD, ASK_SUB  # noqa: E402  (scripts/ is on sys.path when this runs)

BAD_FORMATS = ["{n}", "The answer is {n}", "the answer is {n}.", "It is {n}.", "{n}, I think.", "Answer: {n}"]
MAX_OPERAND = 4  # GRPO questions: operands 0..4, 25 sums and 15 differences


def question(rng: random.Random, hi: int) -> tuple[str, int]:
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    if rng.random() < 0.5:
        return rng.choice(ASK_ADD).format(a=a, b=b), a + b
    a, b = max(a, b), min(a, b)
    return rng.choice(ASK_SUB).format(a=a, b=b), a - b


def wrong(rng: random.Random, n: int) -> int:
    """A near miss: the kind of mistake the SFT model makes."""
    m = n
    while m == n or m < 0:
        m = n + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    return m


def pair(rng: random.Random) -> dict:
    q, n = question(rng, 20)
    if rng.random() < 0.5:
        rejected = f"The answer is {wrong(rng, n)}."
    else:
        shown = n if rng.random() < 0.5 else wrong(rng, n)
        rejected = rng.choice(BAD_FORMATS).format(n=shown)
    return {"prompt": q, "chosen": f"The answer is {n}.", "rejected": rejected}


def prompts() -> list[dict]:
    rows = []
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            rows += [{"prompt": t.format(a=a, b=b), "answer": a + b} for t in ASK_ADD]
            if a >= b:
                rows += [{"prompt": t.format(a=a, b=b), "answer": a - b} for t in ASK_SUB]
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {path}")


def main(n_pairs: int = 1200, seed: int = 20261202) -> None:
    rng = random.Random(seed)
    write(PAIRS, [pair(rng) for _ in range(n_pairs)])
    write(PROMPTS, prompts())


if __name__ == "__main__":
    main()
