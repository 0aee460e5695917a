"""Stage command groups: data, train, align, quantize, serve, chat.

Each stage command runs exactly that stage through the pipeline runner (so caching and lineage are the same as
under `llmforge run`), using the outputs its upstream stages recorded. Commands for stages that are not built
yet say so and exit with code 3.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from ..errors import NotBuiltError
from .common import (
    DEFAULT_MANIFEST,
    ForceOpt,
    ManifestOpt,
    OverridesArg,
    load_manifest,
    only_overrides,
    run_stages,
)

data_app = typer.Typer(help="Crawl the web and build a clean corpus.", no_args_is_help=True)
train_app = typer.Typer(help="Tokenizer, pretraining, fine-tuning, distillation.", no_args_is_help=True)
align_app = typer.Typer(help="Reward model, DPO, GRPO, PPO, rejection sampling.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.add_typer(train_app, name="train")
    app.add_typer(align_app, name="align")
    app.command(
        "quantize",
        help="GPTQ-quantize the final model and compare it with round-to-nearest (stage `quantize`).",
    )(quantize)
    from ..serve.cli import register as register_serve

    register_serve(app)


def _warn_stale_upstream(loaded, stage: str) -> None:
    from .. import console, pipeline

    spec = pipeline.Pipeline().get(stage)
    states = {s.name: s for s in pipeline.status(loaded)}
    for dep in spec.needs:
        st = states.get(dep)
        if st is not None and st.enabled and st.state == "stale":
            console.get_logger("cli").warning(
                "upstream stage '%s' is stale (%s); using its last outputs. `llmforge run %s` re-runs it first.",
                dep,
                st.reason,
                stage,
            )


def _run_stage(stage: str, manifest, overrides, force: bool, options: dict | None = None) -> None:
    loaded = load_manifest(manifest, only_overrides(overrides))
    _warn_stale_upstream(loaded, stage)
    run_stages(loaded, [stage], only=True, force=[stage] if force else [], options=options)


def built_commands() -> list[str]:
    """The stage commands that run something today, read from the stage registry."""
    from ..pipeline import STAGES

    return [s.command.removeprefix("llmforge ") for s in STAGES if s.built and s.command]


def _not_built(command: str, what: str) -> None:
    raise NotBuiltError(
        f"`llmforge {command}` is not built yet in llmforge {__version__}: {what} lands in a later release. "
        f"Built today: {', '.join(built_commands())}."
    )


# ---------------------------------------------------------------------------------------------------- data


@data_app.command("crawl", help="Crawl `crawl.seeds` politely into WARC files (stage `crawl`).")
def data_crawl(
    overrides: OverridesArg = None, manifest: ManifestOpt = DEFAULT_MANIFEST, force: ForceOpt = False
):
    _run_stage("crawl", manifest, overrides, force)


@data_app.command("process", help="Extract, filter, scrub PII and deduplicate into a corpus (stage `data`).")
def data_process(
    overrides: OverridesArg = None, manifest: ManifestOpt = DEFAULT_MANIFEST, force: ForceOpt = False
):
    _run_stage("data", manifest, overrides, force)


@data_app.command(
    "tokenize",
    help="Tokenize the corpus into token shards. Shards are made by the `tokenizer` stage together with the "
    "tokenizer, so this runs that stage (cached when nothing changed).",
)
def data_tokenize(
    overrides: OverridesArg = None, manifest: ManifestOpt = DEFAULT_MANIFEST, force: ForceOpt = False
):
    _run_stage("tokenizer", manifest, overrides, force)


# ---------------------------------------------------------------------------------------------------- train


@train_app.command(
    "tokenizer", help="Train (or import) the tokenizer and chat template, then shard the corpus."
)
def train_tokenizer(
    overrides: OverridesArg = None,
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    force: ForceOpt = False,
    eval_: Annotated[
        bool, typer.Option("--eval", help="Report compression and byte-fallback rate on held-out text.")
    ] = False,
):
    _run_stage("tokenizer", manifest, overrides, force or eval_, {"eval": eval_})


@train_app.command("pretrain", help="Pretrain (or continue training) the model on the token shards.")
def train_pretrain(
    overrides: OverridesArg = None,
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    force: ForceOpt = False,
    nproc: Annotated[
        int | None, typer.Option("--nproc", help="Processes (DDP/FSDP through torchrun).")
    ] = None,
    print_slurm: Annotated[
        bool, typer.Option("--print-slurm", help="Print a multi-node Slurm script and exit.")
    ] = False,
):
    if print_slurm:
        from .. import pipeline
        from ..errors import StageInputError
        from ..train.launch import slurm_script

        loaded = load_manifest(manifest, only_overrides(overrides))
        lin = pipeline.read_lineage(loaded, "tokenizer")
        if lin is None:
            raise StageInputError(
                "--print-slurm needs the tokenizer and token shards: run `llmforge run tokenizer` first"
            )
        upstream = {"tokenizer": {k: loaded.resolve(v["path"]) for k, v in lin["outputs"].items()}}
        typer.echo(slurm_script(loaded, upstream=upstream))
        return
    # batch_size is per process, so the process count sets the global batch: it is part of what is computed
    # and goes in as a manifest override (fingerprint, lineage and resume hash all see it).
    ov = only_overrides(overrides)
    if nproc is not None:
        ov = [*ov, f"pretrain.nproc={nproc}"] + (["pretrain.launcher=torchrun"] if nproc > 1 else [])
    _run_stage("pretrain", manifest, ov, force)


@train_app.command("sft", help="Supervised fine-tuning on chat data, full or LoRA (stage `sft`).")
def train_sft(
    overrides: OverridesArg = None,
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    force: ForceOpt = False,
    nproc: Annotated[
        int | None, typer.Option("--nproc", help="Processes (DDP/FSDP through torchrun).")
    ] = None,
):
    ov = only_overrides(overrides)
    if nproc is not None:
        ov = [*ov, f"sft.nproc={nproc}"] + (["sft.launcher=torchrun"] if nproc > 1 else [])
    _run_stage("sft", manifest, ov, force)


@train_app.command(
    "merge-lora",
    help="Fold a PEFT LoRA adapter into its base model and write a full Hugging Face checkpoint.",
)
def train_merge_lora(
    adapter: Annotated[
        str, typer.Argument(help="Adapter folder (adapter_config.json + adapter_model.safetensors).")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Where to write the merged model.")],
    base: Annotated[
        str | None,
        typer.Option("--base", help="Base model folder (default: base_model_name_or_path of the adapter)."),
    ] = None,
):
    from ..train.merge import merge_adapter

    path = merge_adapter(adapter, out, base=base)
    typer.echo(f"merged model written to {path}")


@train_app.command(
    "distill",
    help="Distill the final model into a smaller student: logit KD or teacher answers (stage `distill`).",
)
def train_distill(
    overrides: OverridesArg = None, manifest: ManifestOpt = DEFAULT_MANIFEST, force: ForceOpt = False
):
    _run_stage("distill", manifest, overrides, force)


# ---------------------------------------------------------------------------------------------------- align


@align_app.command(
    "reward",
    help="Train the reward model on preference pairs (stage `reward`), or with --score FILE score "
    "prompt/response pairs with the trained one.",
)
def align_reward(
    overrides: OverridesArg = None,
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    force: ForceOpt = False,
    score: Annotated[
        str | None,
        typer.Option("--score", help="JSONL of prompt/response (or chosen/rejected) rows to score."),
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", help="Where --score writes (default: FILE.scored.jsonl).")
    ] = None,
):
    if score is None:
        _run_stage("reward", manifest, overrides, force)
        return
    from pathlib import Path

    from .. import pipeline
    from ..align.reward import score_file
    from ..errors import StageInputError

    loaded = load_manifest(manifest, only_overrides(overrides))
    lin = pipeline.read_lineage(loaded, "reward")
    if lin is None:
        raise StageInputError("--score needs a trained reward model: run `llmforge align reward` first")
    model_dir = loaded.resolve(lin["outputs"]["model"]["path"])
    target = Path(out) if out else Path(score).with_suffix(".scored.jsonl")
    res = score_file(model_dir, Path(score), target)
    mean = "-" if res.mean is None else f"{res.mean:.4f}"
    typer.echo(f"scored {res.rows} rows (mean {mean}) -> {res.out}")


def _align_cmd(name: str, method: str | None, what: str):
    def cmd(
        overrides: OverridesArg = None, manifest: ManifestOpt = DEFAULT_MANIFEST, force: ForceOpt = False
    ):
        ov = only_overrides(overrides)
        if method == "sample":
            ov = [*ov, "align.rejection_sampling.enabled=true", "align.method=none"]
        elif method is not None:
            ov = [*ov, f"align.method={method}"]
        _run_stage("align", manifest, ov, force)

    cmd.__name__ = f"align_{name}"
    how = "rejection sampling on, align.method=none" if method == "sample" else f"align.method={method}"
    align_app.command(name, help=f"{what} (stage `align` with {how}).")(cmd)


for _name, _method, _what in (
    ("dpo", "dpo", "Direct preference optimisation and its variants (IPO, SimPO, ORPO, cDPO)"),
    ("grpo", "grpo", "Group relative policy optimisation with verifiable rewards"),
    ("ppo", "ppo", "Proximal policy optimisation with a value head"),
    ("sample", "sample", "Rejection sampling: best-of-N answers as an SFT set and preference pairs"),
):
    _align_cmd(_name, _method, _what)


# ---------------------------------------------------------------------------------------------------- rest


def quantize(
    overrides: OverridesArg = None, manifest: ManifestOpt = DEFAULT_MANIFEST, force: ForceOpt = False
):
    _run_stage("quantize", manifest, overrides, force)
