"""`llmforge` — the root typer app, and the edge where errors become messages and exit codes.

Importing this module must stay cheap: no torch, transformers, datatrove or vllm. Commands import what they
need inside their function bodies.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .. import __version__
from . import common, project, stages

app = typer.Typer(
    name="llmforge",
    help="From raw web pages to a served, aligned, quantized chat model — one tool, one manifest.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmforge {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    progress: Annotated[
        str, typer.Option("--progress", help="Progress display: auto (bars on a terminal), rich, plain.")
    ] = "auto",
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    from .. import console

    if progress not in ("auto", "rich", "plain"):
        raise typer.BadParameter("must be auto, rich or plain", param_hint="--progress")
    common.state.debug = common.state.debug or debug
    console.configure(progress, quiet=quiet, verbose=verbose)  # type: ignore[arg-type]


project.register(app)
stages.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and map errors to messages and exit codes."""
    from ..errors import LLMForgeError

    try:  # typer >= 0.29 runs on its own copy of click (typer._click); older typer on click itself
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover - depends on the typer version
        from click import ClickException

    try:
        # Outside standalone mode typer *returns* the code of an Exit, including Exit(130) for Ctrl-C.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except typer.Exit as e:  # click.exceptions.Exit on older typer
        sys.exit(e.exit_code)
    except typer.Abort:
        _err("aborted")
        sys.exit(130)
    except ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except LLMForgeError as e:
        if common.state.debug:
            import traceback

            traceback.print_exc()
        _err(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _err("interrupted; unfinished stages will re-run (and resume where they can) next time")
        sys.exit(130)
    sys.exit(0)


def _err(msg: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(msg)}")
