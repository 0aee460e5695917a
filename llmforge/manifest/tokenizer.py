"""`tokenizer:` — sentencepiece training, Hugging Face export, chat template, token shards."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .base import Section, StageSection


class SpecialTokens(Section):
    bos: str = Field(default="<s>", description="Beginning-of-sequence token.")
    eos: str = Field(default="</s>", description="End-of-sequence token; also separates documents in shards.")
    pad: str = Field(default="<pad>", description="Padding token.")
    unk: str = Field(default="<unk>", description="Unknown token (rare with byte fallback).")


class ShardsConfig(Section):
    val_fraction: float = Field(
        default=0.01,
        ge=0,
        lt=1,
        description="Fraction of documents (chosen by seed) held out for validation.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the train/validation document split.")
    shard_tokens: int = Field(default=100_000_000, gt=0, description="Tokens per shard file.")
    workers: int = Field(default=2, gt=0, description="Processes that tokenize in parallel.")


class TokenizerSection(StageSection):
    from_: Path | None = Field(
        default=None,
        alias="from",
        description="Use this existing Hugging Face tokenizer directory instead of training one (it goes "
        "through the same export checks). Relative to the manifest.",
    )
    model_type: Literal["bpe", "unigram"] = Field(default="bpe", description="sentencepiece algorithm.")
    vocab_size: int = Field(
        default=8000, gt=0, description="Vocabulary size, special and byte tokens included."
    )
    character_coverage: float = Field(
        default=0.9995, gt=0, le=1, description="Fraction of characters covered by the vocabulary."
    )
    byte_fallback: bool = Field(
        default=True, description="Encode unseen characters as UTF-8 byte tokens instead of <unk>."
    )
    split_digits: bool = Field(default=True, description="Split numbers into single digits.")
    input_sentence_size: int = Field(
        default=2_000_000, ge=0, description="Sample at most this many lines for training (0 = all)."
    )
    max_sentence_length: int = Field(default=16384, gt=0, description="Longest training line in bytes.")
    num_threads: int = Field(default=2, gt=0, description="sentencepiece training threads.")
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens, description="BOS/EOS/PAD/UNK.")
    chat_tokens: list[str] = Field(
        default_factory=lambda: ["<|im_start|>", "<|im_end|>"],
        description="Chat markup tokens, added as user-defined symbols (ChatML by default). The default "
        "template uses the first as start-of-turn and the second as end-of-turn (which also stops generation).",
    )
    chat_template: str | None = Field(
        default=None,
        description="Jinja chat template (inline, or a path to a .jinja file relative to the manifest). "
        "Default: llmforge's ChatML template built from `chat_tokens`, with {% generation %} markers around "
        "assistant replies for assistant-only loss masks.",
    )
    shards: ShardsConfig = Field(default_factory=ShardsConfig, description="Corpus → token shards.")

    @model_validator(mode="after")
    def _check(self):
        # <unk>, BOS, EOS, PAD, the chat tokens and the newline symbol, then 256 byte pieces, then at least
        # one learned piece. (The corpus's characters need more; training reports that with the number.)
        n_special = 5 + len(self.chat_tokens)
        floor = n_special + (256 if self.byte_fallback else 0) + 1
        if self.from_ is None and self.vocab_size < floor:
            raise ValueError(
                f"tokenizer.vocab_size {self.vocab_size} is too small: {n_special} special/chat/newline tokens"
                + (" + 256 byte-fallback tokens" if self.byte_fallback else "")
                + f" need at least {floor} (in practice a few hundred more for the corpus's characters)"
            )
        toks = [*self.special_tokens.model_dump().values(), *self.chat_tokens]
        # A trained tokenizer gets one user-defined symbol per token; an imported one may legitimately reuse
        # a chat token as EOS (e.g. Qwen-style `<|im_end|>`).
        if self.from_ is None and len(set(toks)) != len(toks):
            raise ValueError("tokenizer.special_tokens and tokenizer.chat_tokens must all be distinct")
        return self
