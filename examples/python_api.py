"""Drive llmforge from Python instead of the CLI.

Loads a project's manifest with overrides, runs the pipeline (cached stages are skipped exactly as under
`llmforge run`), prints what happened, then loads the pretrained model and tokenizer the pipeline produced and
samples a continuation.

    python examples/python_api.py path/to/project [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmforge import manifest, pipeline


def main(project: str, *overrides: str) -> str:
    loaded = manifest.load(Path(project) / "llmforge.yaml", list(overrides))
    for outcome in pipeline.run(loaded):
        print(f"{outcome.name:10s} {outcome.action:7s} {outcome.reason}")

    # Every checkpoint directory is self-describing: weights, config, tokenizer, generation ids.
    from llmforge.model import generate, load_pretrained
    from llmforge.tokenizer.info import load_tokenizer

    model_dir = loaded.runs_dir / "pretrain" / "model"
    model = load_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)
    prompt = tok.encode("The river")
    new = generate(model, [prompt], max_new_tokens=24, temperature=0.8, top_p=0.95, seed=0)[0]
    text = tok.decode(prompt + new, skip_special_tokens=True)
    print(f"sample: {text!r}")
    return text


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], *sys.argv[2:])
