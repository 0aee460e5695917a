"""The one exception hierarchy library code raises.

Library code raises an ``LLMForgeError`` subclass with a message that says what is wrong *and what to change*.
The CLI edge (``llmforge.cli.app``) turns it into a one-line red message and the class's ``exit_code``;
``--debug`` shows the traceback. Anything that is not an ``LLMForgeError`` is a bug in llmforge and is shown
with its traceback.

Exit codes: 1 = a stage failed at run time, 2 = the user's input (manifest, flags, files) is wrong,
3 = the requested stage or feature is not built yet, 130 = interrupted.
"""

from __future__ import annotations


class LLMForgeError(Exception):
    """Base class: a problem the user can act on. ``str(err)`` is the whole message."""

    exit_code: int = 1


class UserInputError(LLMForgeError):
    """The user asked for something malformed (bad flag, missing file, unknown stage)."""

    exit_code = 2


class ManifestError(UserInputError):
    """``llmforge.yaml`` (or a dotted override) does not parse or does not validate.

    Carries the file and one line per problem, each naming the dotted key, e.g.
    ``llmforge.yaml:12: pretrain.lr: must be > 0 (got -1)``.
    """

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{path}: {len(self.problems)} problems\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(msg)


class NotBuiltError(LLMForgeError):
    """The stage or feature exists in the design but is not implemented in this version."""

    exit_code = 3


class MissingDependencyError(LLMForgeError):
    """An optional dependency is not installed; the message carries the pip command that fixes it."""

    exit_code = 2

    def __init__(self, package: str, extra: str, purpose: str, hint: str | None = None):
        self.package = package
        self.extra = extra
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: {hint or f'pip install {chr(39)}llmforge[{extra}]{chr(39)}'}"
        )


class StageError(LLMForgeError):
    """A stage could not produce its artifact (bad data, diverged training, unreadable input)."""

    exit_code = 1


class StageInputError(StageError):
    """A stage's input is missing or inconsistent (e.g. run `tokenizer` before `pretrain`)."""

    exit_code = 2


class DataError(StageError):
    """The data stage could not produce a corpus (e.g. every document was dropped)."""


class TokenizerError(StageError):
    """Tokenizer training/export failed or a tokenizer check (round trip, special ids) did not hold."""


class ModelError(StageError):
    """A model config or checkpoint is invalid or cannot be loaded."""


class CheckpointError(ModelError):
    """A checkpoint directory is incomplete, corrupt or does not match the config."""


class TrainingError(StageError):
    """Training stopped: non-finite loss, diverged run, or an impossible setup."""


def require(module: str, *, extra: str, purpose: str, package: str | None = None):
    """Import an optional dependency or raise ``MissingDependencyError`` with an install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(package or module.split(".")[0], extra, purpose) from err
