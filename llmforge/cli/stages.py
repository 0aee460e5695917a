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
    app.command("quantize", help="GPTQ-quantize the final model (not built yet).")(quantize)
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


def _align_cmd(name: str, what: str):
    def cmd(overrides: OverridesArg = None, manifest: ManifestOpt = DEFAULT_MANIFEST):
        _not_built(f"align {name}", what)

    cmd.__name__ = f"align_{name}"
    align_app.command(name, help=f"{what[0].upper()}{what[1:]} (not built yet).")(cmd)


for _name, _what in (
    ("reward", "reward-model training"),
    ("dpo", "direct preference optimisation"),
    ("grpo", "group relative policy optimisation"),
    ("ppo", "proximal policy optimisation"),
    ("sample", "rejection sampling"),
):
    _align_cmd(_name, _what)


# ---------------------------------------------------------------------------------------------------- rest


def quantize(overrides: OverridesArg = None, manifest: ManifestOpt = DEFAULT_MANIFEST):
    _not_built("quantize", "GPTQ quantization")
