"""Training the sentencepiece model (BPE or Unigram) from corpus text.

Settings that are *not* knobs, because the Hugging Face export is exact only with them (DEPENDENCIES.md):
byte fallback, no dummy prefix, identity normalisation, whitespace kept as-is. Two more are fixed for code:
``allow_whitespace_only_pieces`` (indentation runs become single tokens) and the newline as a user-defined
symbol (one token per line break, never merged with its neighbours, never byte fallback).

BOS/EOS/PAD are user-defined symbols rather than sentencepiece control symbols: Hugging Face tokenizers match
special tokens written in text, and sentencepiece matches user-defined symbols the same way — with control
symbols the two would tokenize a literal ``</s>`` differently.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..console import get_logger
from ..errors import StageInputError, TokenizerError, UserInputError, require
from .export import NEWLINE

log = get_logger(__name__)


@dataclass
class TrainStats:
    lines: int
    documents: int
    characters: int
    seconds: float
    vocab_size: int


def user_symbols(bos: str, eos: str, pad: str, chat_tokens: Sequence[str]) -> list[str]:
    """The user-defined symbols in id order: BOS, EOS, PAD, chat tokens, newline (ids 1…, after <unk> = 0)."""
    return [bos, eos, pad, *chat_tokens, NEWLINE]


def _lines(texts: Iterable[str], counter: dict[str, int]) -> Iterator[str]:
    # sentencepiece trains on "sentences"; lines are the natural unit (the newline is its own symbol, so no
    # piece can span one) and keep every sentence far below max_sentence_length.
    for text in texts:
        counter["documents"] += 1
        counter["characters"] += len(text)
        for line in text.split("\n"):
            if line.strip():
                counter["lines"] += 1
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    *,
    model_type: str = "bpe",
    vocab_size: int = 8000,
    character_coverage: float = 0.9995,
    split_digits: bool = True,
    input_sentence_size: int = 2_000_000,
    max_sentence_length: int = 16384,
    num_threads: int = 2,
    unk: str = "<unk>",
    bos: str = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    chat_tokens: Sequence[str] = ("<|im_start|>", "<|im_end|>"),
    seed: int = 0,
) -> tuple[bytes, TrainStats]:
    """Train a sentencepiece model on ``texts`` (documents); return the serialized model and stats.

    Errors name the manifest knob: a corpus too small for ``tokenizer.vocab_size`` or a vocabulary too small
    for the special tokens and the characters of the corpus.
    """
    spm = require("sentencepiece", extra="train", purpose="Training a tokenizer")
    counter = {"documents": 0, "lines": 0, "characters": 0}
    lines = _lines(texts, counter)
    first = next(lines, None)
    if first is None:
        raise StageInputError(
            "the corpus is empty: no non-empty text to train the tokenizer on. Check that the data stage "
            "(`data:`) kept documents, or set `tokenizer.from` to reuse an existing tokenizer."
        )

    def all_lines() -> Iterator[str]:
        yield first
        yield from lines

    model = io.BytesIO()
    t0 = time.monotonic()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_lines(),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=split_digits,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads,
            add_dummy_prefix=False,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=True,
            unk_id=0,
            unk_piece=unk,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            user_defined_symbols=user_symbols(bos, eos, pad, chat_tokens),
            minloglevel=2,  # sentencepiece logs to stderr itself; llmforge reports through its own logger
        )
    except RuntimeError as err:
        raise _training_error(str(err), vocab_size, counter) from None
    stats = TrainStats(
        lines=counter["lines"],
        documents=counter["documents"],
        characters=counter["characters"],
        seconds=time.monotonic() - t0,
        vocab_size=vocab_size,
    )
    log.info(
        "trained %s tokenizer (%d pieces) on %s lines from %s documents in %.1fs",
        model_type,
        vocab_size,
        f"{stats.lines:,}",
        f"{stats.documents:,}",
        stats.seconds,
    )
    return model.getvalue(), stats


def _training_error(msg: str, vocab_size: int, counter: dict[str, int]) -> Exception:
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return UserInputError(
            f"tokenizer.vocab_size: {vocab_size} is more than this corpus supports ({counter['documents']:,} "
            f"documents, {counter['characters']:,} characters): sentencepiece can learn at most {m.group(2)} "
            f"pieces from it. Set tokenizer.vocab_size <= {m.group(2)} or give the data stage more text."
        )
    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        return UserInputError(
            f"tokenizer.vocab_size: {vocab_size} is too small: the special and byte tokens plus the "
            f"{m.group(2)} characters this corpus needs at tokenizer.character_coverage do not fit. Raise "
            f"tokenizer.vocab_size above {int(m.group(2)) + 300} or lower tokenizer.character_coverage."
        )
    return TokenizerError(f"sentencepiece training failed: {msg.strip()}")
