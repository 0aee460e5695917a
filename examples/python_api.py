"""Drive llmforge from Python instead of the CLI: for people who embed it in their own tools.

Every step is the library call the CLI itself makes:

1. ``manifest.load`` — the project's ``llmforge.yaml`` plus dotted overrides, validated (a mistake raises an
   ``LLMForgeError`` naming the file, line and key);
2. ``pipeline.run`` — every enabled stage in order; cached stages are skipped exactly as under ``llmforge run``;
3. ``pipeline.status`` and ``lineage.json`` — each stage's state and metrics, as ``llmforge status`` shows them;
4. ``pipeline.lineage_tree`` — which stages, configs and inputs produced the final model (``llmforge lineage``);
5. ``llmforge.infer.Engine`` — the inference engine the server uses (continuous batching, per-request
   sampling), here offline: a continuation of plain text from the pretrained model (when the project
   pretrains) and a chat answer, rendered with the checkpoint's own chat template, from the final model.

    python examples/python_api.py path/to/project [key=value ...]

``main`` returns the text continuation (the chat answer when the project has no pretraining stage, "" when it
makes no model).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from llmforge import manifest, pipeline


def final_model(loaded: manifest.LoadedManifest) -> Path | None:
    """The model of the last stage in pipeline order that produced one (what `llmforge serve` serves)."""
    model = None
    for st in pipeline.status(loaded):
        if st.enabled and st.lineage and "model" in st.lineage.get("outputs", {}):
            model = loaded.resolve(st.lineage["outputs"]["model"]["path"])
    return model


def print_lineage(node: Any, depth: int = 0, shown: set[str] | None = None) -> None:
    """One line per stage that fed the artifact, indented by distance from it (each stage listed once)."""
    shown = set() if shown is None else shown
    ext = ", ".join(node.lineage.get("inputs", {}).get("external", {}))
    seen = " (see above)" if node.stage in shown else ""
    print(
        f"{'  ' * depth}{node.stage} {node.lineage['fingerprint'][:12]}{seen}"
        + (f" reads {ext}" if ext and not seen else "")
    )
    if not seen:
        shown.add(node.stage)
        for parent in node.inputs:
            print_lineage(parent, depth + 1, shown)


def _figure(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def generate(model_dir: Path, prompt: str | None = None, question: str | None = None, max_tokens: int = 24):
    """One request through the engine: ``prompt`` is continued as plain text, ``question`` is asked as a chat
    turn with the checkpoint's chat template. Greedy for chat (reproducible), sampled with a seed for text."""
    from llmforge.infer import Engine, Request, SamplingParams
    from llmforge.quantize.load import load_model  # plain and GPTQ checkpoints alike
    from llmforge.tokenizer.info import load_tokenizer

    tok = load_tokenizer(model_dir)
    engine = Engine(load_model(model_dir).eval(), tok, max_batch=1)
    if question is not None:
        ids, _mask = tok.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    else:
        ids = tok.encode(prompt)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=0)
    (out,) = engine.run([Request("example", list(ids), params)])
    return out.text, out.finish_reason


def main(project: str, *overrides: str) -> str:
    loaded = manifest.load(Path(project) / "llmforge.yaml", list(overrides))
    for outcome in pipeline.run(loaded):
        print(f"{outcome.name:10s} {outcome.action:7s} {outcome.wall_time_s:6.1f}s {outcome.reason}")

    print("\nstatus and key metrics (as `llmforge status`):")
    for st in pipeline.status(loaded):
        if st.lineage is not None:
            figures = ", ".join(f"{k}={_figure(v)}" for k, v in st.key_metrics.items())
            print(f"  {st.name:10s} {st.state:6s} {st.lineage['wall_time_s']:6.1f}s  {figures}")

    model_dir = final_model(loaded)
    if model_dir is None:
        print("\nthis project makes no model (a data-only project): nothing to generate with")
        return ""
    print(f"\nfinal model {model_dir.relative_to(loaded.root)} was produced by:")
    print_lineage(pipeline.lineage_tree(loaded, model_dir))

    text = ""
    pretrained = loaded.runs_dir / "pretrain" / "model"
    if loaded.manifest.pretrain.enabled and pretrained.is_dir():
        new, _ = generate(pretrained, prompt="The river")
        text = "The river" + new
        print(f"\npretrained model continues: {text!r}")
    question = (loaded.manifest.serve.smoke or ["Hello! Who are you?"])[0]
    answer, finish = generate(model_dir, question=question, max_tokens=loaded.manifest.serve.smoke_max_tokens)
    print(f"final model answers {question!r}: {answer!r} (finish: {finish})")
    return text or answer


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    from llmforge.errors import LLMForgeError

    try:
        main(sys.argv[1], *sys.argv[2:])
    except LLMForgeError as err:  # a bad manifest, override or input: the message says what to change
        sys.exit(f"error: {err}")
