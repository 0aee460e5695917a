"""Chat template: the one renderer SFT, alignment, distillation and serving use.

The template is Jinja, rendered the way ``transformers.apply_chat_template`` renders it (sandboxed, with
``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``, ``strftime_now``, loop controls and the
``{% generation %}`` block), so text, ids and assistant masks from here are the ones transformers and vLLM get
from the same ``tokenizer_config.json``. The tests hold them equal.

The default is ChatML::

    <|im_start|>system\\n…<|im_end|>\\n<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n…<|im_end|>\\n

with ``{% generation %}`` around each assistant reply *including* its ``<|im_end|>`` (the model must learn
to end its turn) and excluding the newline after it (never generated: decoding stops at ``<|im_end|>``).

This module sits below ``info``: it knows templates and fast tokenizers, not tokenizer directories, so
``info.LoadedTokenizer`` calls into it and it never imports ``info`` (a test holds the direction).
"""

from __future__ import annotations

import contextvars
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

from ..errors import TokenizerError, UserInputError

Message = Mapping[str, Any]


@runtime_checkable
class ChatTokenizer(Protocol):
    """A fast tokenizer with its ids and template, as ``info.LoadedTokenizer`` is (structural, so no import)."""

    fast: Any  # tokenizers.Tokenizer
    info: Any  # info.TokenizerInfo: ``chat_template`` and ``template_variables()``


def default_chat_template(start: str = "<|im_start|>", end: str = "<|im_end|>") -> str:
    """llmforge's ChatML template with generation markers, for the given start/end-of-turn tokens."""
    s, e = json.dumps(start), json.dumps(end)
    return (
        "{% for message in messages %}"
        f"{{{{ {s} + message['role'] + '\\n' }}}}"
        "{% if message['role'] == 'assistant' %}"
        f"{{% generation %}}{{{{ message['content'] + {e} }}}}{{% endgeneration %}}{{{{ '\\n' }}}}"
        f"{{% else %}}{{{{ message['content'] + {e} + '\\n' }}}}{{% endif %}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {s} + 'assistant\\n' }}}}{{% endif %}}"
    )


DEFAULT_CHAT_TEMPLATE = default_chat_template()

# Set while a render tracks generation spans; a context variable so concurrent renders (serving threads) do
# not see each other's spans.
_TRACK: contextvars.ContextVar[_Track | None] = contextvars.ContextVar("llmforge_chat_track", default=None)


class _Track:
    def __init__(self) -> None:
        self.emitted = 0  # characters the template has produced so far
        self.spans: list[tuple[int, int]] = []


@lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}…{% endgeneration %}``: renders its body and records where it landed."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller) -> str:
            text = caller()
            track = _TRACK.get()
            if track is not None:
                # The output is consumed chunk by chunk (see _render), so everything before this block has
                # already been counted in ``emitted``.
                track.spans.append((track.emitted, track.emitted + len(text)))
            return text

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes; chat templates expect plain JSON (as transformers renders it).
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise UserInputError(
            f"tokenizer.chat_template: the chat template is not valid Jinja (line {err.lineno}: {err.message}). "
            "Fix it, or remove `tokenizer.chat_template` to use llmforge's ChatML template."
        ) from None


def _render(
    template: str,
    messages: Sequence[Message],
    add_generation_prompt: bool,
    variables: Mapping[str, Any] | None,
    track: bool,
) -> tuple[str, list[tuple[int, int]]]:
    import jinja2

    if not messages:
        raise UserInputError("cannot render an empty conversation: give at least one message")
    compiled = _compile(template)
    # Same convention as transformers: keys whose value is None are dropped, not rendered as "None".
    msgs = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    ctx = {
        **(variables or {}),
        "messages": msgs,
        "tools": None,
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
    }
    state = _Track() if track else None
    token = _TRACK.set(state)
    chunks: list[str] = []
    try:
        for chunk in compiled.generate(**ctx):
            chunks.append(chunk)
            if state is not None:
                state.emitted += len(chunk)
    except jinja2.TemplateError as err:
        raise TokenizerError(
            f"tokenizer.chat_template: rendering failed ({type(err).__name__}: {err}). Check the template "
            "against the messages (roles, content types)."
        ) from None
    finally:
        _TRACK.reset(token)
    return "".join(chunks), (state.spans if state is not None else [])


def render(
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    template: str | None = None,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """Render a conversation to text with ``template`` (default: llmforge's ChatML template).

    ``variables`` are extra names visible to the template; transformers passes the special tokens
    (``bos_token``, ``eos_token``, …), and ``encode_chat`` does the same from the tokenizer.
    """
    return _render(template or DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt, variables, False)[0]


def render_with_spans(
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    template: str | None = None,
    variables: Mapping[str, Any] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Like ``render`` and also the ``(start, end)`` character spans of every ``{% generation %}`` block."""
    return _render(template or DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt, variables, True)


def encode_chat(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    template: str | None = None,
    variables: Mapping[str, Any] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and its assistant mask (1 = a token the model is trained on).

    ``tokenizer`` is a ``ChatTokenizer`` (``info.load_tokenizer(dir)``: its template and special-token names
    are used unless ``template``/``variables`` are given) or a bare ``tokenizers.Tokenizer`` (then ``template``
    or the default template). Ids and mask equal ``apply_chat_template(..., return_dict=True,
    return_assistant_tokens_mask=True)`` of transformers: the text is tokenized without added BOS/EOS, and a
    token is in the mask from the token holding a generation block's first character through the token holding
    its last.
    """
    if isinstance(tokenizer, str | os.PathLike):
        # Loading a directory is info's job; taking it here would make this module import info again.
        raise TypeError(
            f"encode_chat takes a loaded tokenizer, not the path {os.fspath(tokenizer)!r}: use "
            "`llmforge.tokenizer.load_tokenizer(path).encode_chat(messages)`"
        )
    if isinstance(tokenizer, ChatTokenizer):
        fast = tokenizer.fast
        template = template or tokenizer.info.chat_template
        variables = tokenizer.info.template_variables() if variables is None else variables
    else:
        fast = tokenizer
    text, spans = render_with_spans(
        messages, add_generation_prompt=add_generation_prompt, template=template, variables=variables
    )
    enc = fast.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    mask = [0] * len(ids)
    for start, end in spans:
        if end <= start:
            continue
        first = enc.char_to_token(start)
        last = enc.char_to_token(end - 1)
        if first is None:
            break
        stop = last + 1 if last is not None else len(ids)
        for t in range(first, stop):
            mask[t] = 1
    return ids, mask


def check_template(
    template: str,
    *,
    fast: Any = None,
    variables: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Render a sample conversation with ``template``; raise naming ``tokenizer.chat_template`` if it fails.

    Returns facts later stages want: whether the template has generation markers (assistant masks) and
    whether ``add_generation_prompt`` changes the output.
    """
    sample = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    text, spans = render_with_spans(sample[:3], template=template, variables=variables)
    for m in sample[:3]:
        if m["content"] not in text:
            raise UserInputError(
                f"tokenizer.chat_template: the template drops message content (rendered {text[:200]!r}); it "
                "must write every message's `content`."
            )
    plain = render(sample, template=template, variables=variables)
    prompt = render(sample, add_generation_prompt=True, template=template, variables=variables)
    facts = {"generation_markers": bool(spans), "generation_prompt": prompt != plain}
    if spans and fast is not None:
        _, mask = encode_chat(fast, sample[:3], template=template, variables=variables)
        if not any(mask):
            raise UserInputError(
                "tokenizer.chat_template: the {% generation %} block covers no token of the assistant reply"
            )
    return facts
