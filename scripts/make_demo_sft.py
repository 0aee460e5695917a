"""Write the tiny template's SFT set: `llmforge/templates/tiny/sft/arithmetic.jsonl` (seeded, no download).

A verifiable chat task small enough for a 1M-parameter model: single-digit and two-digit addition and
subtraction asked in several phrasings, every answer in one format, ``The answer is N.`` — so the demo can
measure how often held-out answers follow the format (``sft.answer_format``) before and after fine-tuning,
and later stages can reward exact answers. A fifth of the conversations carry a system prompt and a tenth
have two turns, so the chat template's multi-turn masking is exercised.

    python scripts/make_demo_sft.py            # rewrites the file; the output is identical for the same seed
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "llmforge" / "templates" / "tiny" / "sft" / "arithmetic.jsonl"
ASK_ADD = [
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
    "What do you get from {a} + {b}?",
]
ASK_SUB = ["What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.", "What is {a} - {b}?"]
SYSTEMS = ["You are a careful calculator.", "Answer briefly.", "You help with arithmetic."]


def question(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return rng.choice(ASK_ADD).format(a=a, b=b), a + b
    a, b = max(a, b), min(a, b)
    return rng.choice(ASK_SUB).format(a=a, b=b), a - b


def conversation(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(2 if rng.random() < 0.1 else 1):
        q, ans = question(rng)
        messages += [
            {"role": "user", "content": q},
            {"role": "assistant", "content": f"The answer is {ans}."},
        ]
    return {"messages": messages}


def main(n: int = 3000, seed: int = 20261201) -> None:
    rng = random.Random(seed)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(conversation(rng), ensure_ascii=False) + "\n")
    print(f"wrote {n} conversations to {OUT}")


if __name__ == "__main__":
    main()
