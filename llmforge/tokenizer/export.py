"""sentencepiece model → Hugging Face tokenizer directory, built by hand from the model proto.

Why by hand and not through ``transformers.LlamaTokenizer``: transformers is a dev dependency only, and the
conversion is short once the sentencepiece model is trained with the settings that make it exact
(``byte_fallback=True``, ``add_dummy_prefix=False``, identity normalisation, whitespace kept; see
DEPENDENCIES.md). With those settings the only normalisation sentencepiece does is ``" " → "▁"``, so the fast
tokenizer is:

* normalizer: ``Replace(" ", "▁")`` — no ``Prepend("▁")`` because there is no dummy prefix;
* no pre-tokenizer: sentencepiece never splits before applying merges, and splitting on ``▁`` would forbid the
  whitespace-only pieces (code indentation) that training is allowed to learn;
* model: ``BPE`` with merges recovered from the piece scores (or ``Unigram`` with the scores), byte fallback on;
* user-defined symbols (BOS/EOS/PAD, chat tokens, newline) as added tokens that are matched in raw text before
  the model runs — exactly what sentencepiece's user-defined symbols do;
* decoder: ``▁ → " "``, byte fallback, fuse.

``verify_parity`` re-checks this on every export and raises ``TokenizerError`` on any disagreement.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..console import get_logger
from ..errors import TokenizerError
from ..utils.atomic import write_bytes, write_json, write_text
from ..utils.hashing import sha256_file
from .samples import generate_samples, markup_for

log = get_logger(__name__)

# sentencepiece ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# The newline is a user-defined symbol so it stays a single token (not byte fallback) and never merges
# with its neighbours: documents keep their line structure at one token per "\n".
NEWLINE = "\n"
META_FILE = "llmforge_tokenizer.json"
META_FORMAT = "llmforge.tokenizer.v1"
# Files that make up the tokenizer; later stages copy exactly these into every checkpoint directory.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    META_FILE,
)


def load_model_proto(data: bytes):
    """Parse a sentencepiece ``ModelProto`` (needs ``protobuf``, part of the ``train`` extra)."""
    from ..errors import require

    require(
        "google.protobuf", extra="train", purpose="Exporting a sentencepiece tokenizer", package="protobuf"
    )
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as err:  # protobuf raises DecodeError, a plain Exception subclass
        raise TokenizerError(f"not a sentencepiece model file: {err}") from None
    return proto


def _check_proto(proto) -> None:
    ns = proto.normalizer_spec
    problems = []
    if not proto.trainer_spec.byte_fallback:
        problems.append("byte_fallback is off")
    if ns.add_dummy_prefix:
        problems.append("add_dummy_prefix is on")
    if ns.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if ns.name not in ("identity", "") or (ns.precompiled_charsmap and ns.name != "identity"):
        problems.append(f"normalization rule is {ns.name!r}, not 'identity'")
    if problems:
        raise TokenizerError(
            "this sentencepiece model cannot be exported exactly to a fast tokenizer ("
            + "; ".join(problems)
            + "). Train it with llmforge (`tokenizer.from` unset) or bring a Hugging Face directory that already "
            "has a tokenizer.json."
        )


def build_fast_tokenizer(model_bytes: bytes, *, special: Iterable[str] = ()):
    """A ``tokenizers.Tokenizer`` that encodes and decodes exactly like the given sentencepiece model.

    ``special`` names the user-defined symbols that are *special* for Hugging Face (skipped by
    ``decode(skip_special_tokens=True)``): BOS/EOS/PAD and the chat tokens. Other user-defined symbols (the
    newline) are plain added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = load_model_proto(model_bytes)
    _check_proto(proto)
    special = set(special)
    pieces = list(proto.pieces)
    unk_id = next((i for i, p in enumerate(pieces) if p.type == UNKNOWN), None)
    if unk_id is None:
        raise TokenizerError("the sentencepiece model has no <unk> piece")
    unk = pieces[unk_id].piece

    if proto.trainer_spec.model_type == 2:  # BPE
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        normal = {p.piece: i for i, p in enumerate(pieces) if p.type == NORMAL}
        # sentencepiece BPE merges the adjacent pair whose *result* has the best score. Ranking every
        # two-way split of each piece by that piece's score reproduces it as an ordered merge list.
        order = sorted(normal, key=lambda s: (-pieces[normal[s]].score, normal[s]))
        merges: list[tuple[str, str]] = []
        for piece in order:
            splits = [
                (piece[:k], piece[k:])
                for k in range(1, len(piece))
                if piece[:k] in normal and piece[k:] in normal
            ]
            splits.sort(key=lambda lr: (normal[lr[0]], normal[lr[1]]))
            merges.extend(splits)
        model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    elif proto.trainer_spec.model_type == 1:  # Unigram
        # Non-normal pieces must never win the Viterbi search on literal text such as "<0x41>" or "<s>"
        # (sentencepiece does not match them there), so they get a score far below any real piece.
        floor = min((p.score for p in pieces if p.type == NORMAL), default=0.0) - 1000.0
        vocab_scores = [(p.piece, p.score if p.type == NORMAL else floor) for p in pieces]
        model = models.Unigram(vocab_scores, unk_id=unk_id, byte_fallback=True)
    else:
        raise TokenizerError(f"unsupported sentencepiece model type {proto.trainer_spec.model_type}")

    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    added = []
    for i, p in enumerate(pieces):
        if p.type == USER_DEFINED:
            added.append((i, AddedToken(p.piece, special=p.piece in special, normalized=False)))
        elif p.type == CONTROL:
            # Control pieces are never produced by encoding text; registering them keeps decode in step with
            # sentencepiece (which drops them) when skip_special_tokens=True.
            added.append((i, AddedToken(p.piece, special=True, normalized=False)))
    # add_tokens assigns ids of pieces already in the vocabulary, so the ids stay the sentencepiece ones.
    tok.add_tokens([t for _, t in added if not t.special])
    tok.add_special_tokens([t for _, t in added if t.special])
    for i, t in added:
        got = tok.token_to_id(t.content)
        if got != i:  # pragma: no cover - would mean tokenizers changed how it assigns added ids
            raise TokenizerError(f"added token {t.content!r} got id {got}, expected {i}")
    return tok


def verify_parity(
    sp,
    fast,
    samples: Sequence[str],
    *,
    what: str = "exported tokenizer",
    max_report: int = 3,
) -> int:
    """Check that ``fast`` (tokenizers.Tokenizer) encodes and decodes ``samples`` exactly like ``sp``.

    Returns the number of strings checked; raises ``TokenizerError`` listing the first disagreements.
    """
    encs = fast.encode_batch_fast(list(samples), add_special_tokens=False)
    bad = []
    for text, enc in zip(samples, encs, strict=True):
        want = sp.encode(text)
        got = enc.ids
        if got != want:
            bad.append(f"encode {text!r}: sentencepiece {want[:12]}… fast {got[:12]}…")
        elif fast.decode(got, skip_special_tokens=False) != sp.decode(want):
            bad.append(f"decode {text!r}: {fast.decode(got)!r} != {sp.decode(want)!r}")
        if len(bad) >= max_report:
            break
    if bad:
        raise TokenizerError(
            f"{what}: the fast tokenizer disagrees with sentencepiece on {len(bad)}+ strings; refusing to "
            "export a tokenizer that would tokenize differently in training and serving:\n  "
            + "\n  ".join(bad)
        )
    return len(samples)


def write_hf_files(
    out_dir: Path,
    fast,
    *,
    bos: str | None,
    eos: str,
    pad: str | None,
    unk: str | None,
    chat_tokens: Sequence[str],
    chat_template: str,
    source: dict[str, Any],
    model_bytes: bytes | None = None,
    model_max_length: int | None = None,
) -> None:
    """Write the Hugging Face tokenizer files (+ generation ids and llmforge metadata) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if model_bytes is not None:
        write_bytes(out_dir / "tokenizer.model", model_bytes)
    write_text(out_dir / "tokenizer.json", fast.to_str(pretty=True))

    def tid(tok: str | None) -> int | None:
        return None if tok is None else fast.token_to_id(tok)

    chat_specials = [t for t in chat_tokens if t not in (bos, eos, pad, unk)]
    # unk is deliberately not declared to transformers: it would register "<unk>" as a special token matched
    # inside text, which sentencepiece does not do. With byte fallback the unk id is never produced anyway;
    # llmforge_tokenizer.json still records it.
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    specials = {k: v for k, v in specials.items() if v is not None}
    config: dict[str, Any] = {
        # The generic fast-tokenizer class loads tokenizer.json as-is; model-specific classes (LlamaTokenizer)
        # would rebuild normalisers and pre-tokenisers of their own and break the exactness checked above.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": chat_specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": model_max_length or 1_000_000_000_000_000_019_884_624_838_656,
        "chat_template": chat_template,
    }
    write_json(out_dir / "tokenizer_config.json", config)
    write_json(out_dir / "special_tokens_map.json", {**specials, "additional_special_tokens": chat_specials})

    eos_ids = [tid(eos)]
    # The end-of-turn chat token also ends generation: a chat model stops at <|im_end|>, not at </s>.
    end_turn = chat_tokens[-1] if chat_tokens else None
    if end_turn is not None and tid(end_turn) not in eos_ids:
        eos_ids.append(tid(end_turn))
    gen: dict[str, Any] = {"eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0]}
    if bos is not None:
        gen["bos_token_id"] = tid(bos)
    if pad is not None:
        gen["pad_token_id"] = tid(pad)
    write_json(out_dir / "generation_config.json", gen)

    meta = {
        "format": META_FORMAT,
        "vocab_size": fast.get_vocab_size(with_added_tokens=True),
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "chat_tokens": list(chat_tokens),
        "end_of_turn_token": end_turn,
        "tokenizer_json_sha256": sha256_file(out_dir / "tokenizer.json"),
        "source": source,
    }
    write_json(out_dir / META_FILE, meta)


def export_sentencepiece(
    model_path: Path,
    out_dir: Path,
    *,
    bos: str,
    eos: str,
    pad: str,
    unk: str,
    chat_tokens: Sequence[str],
    chat_template: str,
    source: dict[str, Any],
    n_check: int = 600,
) -> None:
    """Export a sentencepiece model trained by llmforge to a verified Hugging Face directory."""
    import sentencepiece as spm

    data = Path(model_path).read_bytes()
    fast = build_fast_tokenizer(data, special=[bos, eos, pad, *chat_tokens])
    sp = spm.SentencePieceProcessor(model_proto=data)
    verify_parity(sp, fast, generate_samples(n_check, seed=1234, markup=markup_for(chat_tokens)))
    write_hf_files(
        out_dir,
        fast,
        bos=bos,
        eos=eos,
        pad=pad,
        unk=unk,
        chat_tokens=chat_tokens,
        chat_template=chat_template,
        source=source,
        model_bytes=data,
    )
    log.debug(
        "exported tokenizer (%d pieces, %d parity strings checked) to %s",
        sp.get_piece_size(),
        n_check,
        out_dir,
    )


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files present in ``src`` to ``dst`` (for checkpoint directories)."""
    copied = []
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
