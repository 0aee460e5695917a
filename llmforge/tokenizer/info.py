"""What later stages need to know about the tokenizer, and the check that they agree with it.

``load_tokenizer_info(dir)`` reads a tokenizer directory written by the tokenizer stage (or any Hugging Face
tokenizer directory with a ``tokenizer.json``) and returns the ids every stage must use. ``info.check(...)``
turns a disagreement into a ``TokenizerError``: an EOS id that differs between the shards, the model config and
the tokenizer is a silent, expensive bug, so it is an error, never a warning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StageInputError, TokenizerError, UserInputError
from ..utils.hashing import sha256_file
from . import chat
from .export import META_FILE


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path
    # ids in tokenizer.json, added tokens included (the model's embedding rows must be >= this)
    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int | None
    unk_id: int | None
    eos_token: str
    bos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_token_ids: dict[str, int] = field(default_factory=dict)  # e.g. {"<|im_start|>": 4, "<|im_end|>": 5}
    stop_ids: tuple[int, ...] = ()  # generation ends at any of these: EOS and the end-of-turn chat token
    chat_template: str | None = None
    sha256: str = ""  # of tokenizer.json; shards and checkpoints record it

    def template_variables(self) -> dict[str, Any]:
        """The names transformers exposes to a chat template (special tokens), for identical rendering."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        return {k: v for k, v in names.items() if v is not None}

    def generation_config(self) -> dict[str, Any]:
        """``generation_config.json`` ids for a checkpoint directory."""
        eos: int | list[int] = list(self.stop_ids) if len(self.stop_ids) > 1 else self.eos_id
        out: dict[str, Any] = {"eos_token_id": eos}
        if self.bos_id is not None:
            out["bos_token_id"] = self.bos_id
        if self.pad_id is not None:
            out["pad_token_id"] = self.pad_id
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["stop_ids"] = list(self.stop_ids)
        return d

    def check(self, where: str, **expected: Any) -> None:
        """Raise ``TokenizerError`` if any given field differs, e.g. ``info.check("shards", eos_id=2)``.

        ``vocab_size`` is satisfied by any value >= the tokenizer's (embeddings may be padded).
        """
        problems = []
        for name, want in expected.items():
            have = getattr(self, name)
            if name == "vocab_size":
                if want is None or int(want) < self.vocab_size:
                    problems.append(f"vocab_size {want} < the tokenizer's {self.vocab_size}")
            elif want != have:
                problems.append(f"{name} {want!r} != the tokenizer's {have!r}")
        if problems:
            raise TokenizerError(
                f"{where} does not match the tokenizer at {self.path}: {'; '.join(problems)}. Re-run the stages "
                "after `tokenizer` (e.g. `llmforge run --force tokenizer`) so everything uses one tokenizer."
            )


def token_str(v: Any) -> str | None:
    """A special token's text from a HF config value: a string, or an ``AddedToken`` dict (older configs)."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def read_json(path: Path, *, knob: str | None = None) -> dict[str, Any]:
    """A JSON object from a tokenizer directory; ``{}`` when the file is absent (HF config files are optional).

    An unreadable file is a ``TokenizerError``, or, when ``knob`` names the manifest field that pointed here
    (``tokenizer.from``), a ``UserInputError`` naming it.
    """
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        if knob is not None:
            raise UserInputError(f"{knob}: {path} is not readable JSON ({err})") from None
        raise TokenizerError(f"{path}: not readable JSON ({err})") from None
    return data if isinstance(data, dict) else {}


def read_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """The chat template a HF directory carries: ``chat_template.jinja`` or ``tokenizer_config.json``."""
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}]
        by_name = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = by_name.get("default")
    return tpl if isinstance(tpl, str) else None


def load_tokenizer_info(directory: str | os.PathLike) -> TokenizerInfo:
    """Read the ids and template of the tokenizer in ``directory`` (needs ``tokenizer.json``)."""
    d = Path(directory)
    tj = d / "tokenizer.json"
    if not tj.exists():
        raise StageInputError(
            f"{d}: no tokenizer.json here. Run the tokenizer stage (`llmforge run tokenizer`) or point "
            "`tokenizer.from` at a Hugging Face tokenizer directory."
        )
    meta = read_json(d / META_FILE)
    config = read_json(d / "tokenizer_config.json")
    smap = read_json(d / "special_tokens_map.json")
    gen = read_json(d / "generation_config.json")
    tok_json = read_json(tj)
    vocab: dict[str, int] = {}
    model_vocab = tok_json.get("model", {}).get("vocab")
    if isinstance(model_vocab, dict):
        vocab.update(model_vocab)
    elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...]
        vocab.update({p[0]: i for i, p in enumerate(model_vocab)})
    for t in tok_json.get("added_tokens", []):
        vocab[t["content"]] = t["id"]

    def tok(name: str) -> str | None:
        return token_str(meta.get(name)) or token_str(config.get(name)) or token_str(smap.get(name))

    def tid(token: str | None) -> int | None:
        if token is None:
            return None
        if token not in vocab:
            raise TokenizerError(f"{d}: special token {token!r} is not in tokenizer.json's vocabulary")
        return vocab[token]

    eos = tok("eos_token")
    if eos is None:
        raise TokenizerError(
            f"{d}: the tokenizer names no eos_token (tokenizer_config.json); set `tokenizer.special_tokens.eos`"
        )
    chat_tokens = meta.get("chat_tokens")
    if chat_tokens is None:  # a foreign directory: the usual ChatML tokens, if it has them
        chat_tokens = [t for t in ("<|im_start|>", "<|im_end|>") if t in vocab]
    chat_ids = {t: vocab[t] for t in chat_tokens if t in vocab}
    stop = [vocab[eos]]
    gen_eos = gen.get("eos_token_id")
    for i in gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []:
        if i not in stop:
            stop.append(int(i))
    end_turn = meta.get("end_of_turn_token") or ("<|im_end|>" if "<|im_end|>" in chat_ids else None)
    if end_turn is not None and end_turn in vocab and vocab[end_turn] not in stop:
        stop.append(vocab[end_turn])
    size = max(vocab.values(), default=-1) + 1
    return TokenizerInfo(
        path=d,
        vocab_size=int(meta.get("vocab_size") or size),
        eos_id=vocab[eos],
        bos_id=tid(tok("bos_token")),
        pad_id=tid(tok("pad_token")),
        unk_id=tid(tok("unk_token")),
        eos_token=eos,
        bos_token=tok("bos_token"),
        pad_token=tok("pad_token"),
        unk_token=tok("unk_token"),
        chat_token_ids=chat_ids,
        stop_ids=tuple(stop),
        chat_template=read_chat_template(d, config),
        sha256=sha256_file(tj),
    )


@dataclass
class LoadedTokenizer:
    """A ready-to-use tokenizer: the Rust fast tokenizer plus its ids and chat template."""

    info: TokenizerInfo
    fast: Any  # tokenizers.Tokenizer

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with no BOS/EOS added (stages add them explicitly where they want them)."""
        return self.fast.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.fast.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self.fast.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_chat(
        self, messages: Sequence[chat.Message], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Ids and assistant mask of a conversation rendered with this tokenizer's template (``chat.encode_chat``)."""
        return chat.encode_chat(self, messages, add_generation_prompt=add_generation_prompt)

    def render(self, messages: Sequence[chat.Message], *, add_generation_prompt: bool = False) -> str:
        """Text of a conversation rendered with this tokenizer's template, as transformers renders it."""
        return chat.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            template=self.info.chat_template,
            variables=self.info.template_variables(),
        )


def load_tokenizer(directory: str | os.PathLike) -> LoadedTokenizer:
    """Load the fast tokenizer of ``directory`` with its ``TokenizerInfo``."""
    from ..errors import require

    require("tokenizers", extra="train", purpose="Loading the tokenizer")
    from tokenizers import Tokenizer

    info = load_tokenizer_info(directory)
    fast = Tokenizer.from_file(str(info.path / "tokenizer.json"))
    return LoadedTokenizer(info=info, fast=fast)
