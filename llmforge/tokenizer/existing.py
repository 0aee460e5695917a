"""``tokenizer.from``: bring an existing Hugging Face tokenizer directory instead of training one.

Used when fine-tuning an existing model: its tokenizer must be used unchanged (the model's embeddings are
indexed by its ids), so nothing is retrained or re-numbered. It goes through the same checks as an export:

* ``tokenizer.json`` loads; when a ``tokenizer.model`` sits beside it, both encode the generated samples
  identically;
* text round-trips (decode(encode(x)) == x) on the generated samples;
* EOS exists, and the chat template (the manifest's, else the directory's own, else llmforge's ChatML when
  the vocabulary has the ChatML tokens) renders.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..console import get_logger
from ..errors import TokenizerError, UserInputError
from ..utils.atomic import atomic_dir, write_json
from ..utils.hashing import sha256_file
from .chat import default_chat_template
from .export import META_FILE, META_FORMAT, build_fast_tokenizer, verify_parity
from .info import read_chat_template, read_json, token_str
from .samples import generate_samples, markup_for

log = get_logger(__name__)

_KNOB = "tokenizer.from"


def import_tokenizer(
    src: Path,
    out_dir: Path,
    *,
    overrides: dict[str, str],
    chat_tokens: list[str],
    chat_template: str | None,
    n_check: int = 600,
) -> None:
    """Check the tokenizer in ``src`` and write it (ids unchanged) as a llmforge tokenizer directory.

    ``overrides`` are the special tokens the manifest sets explicitly (``bos``/``eos``/``pad``/``unk``); the
    others come from the directory's own configuration.
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer

    if not src.is_dir():
        raise UserInputError(
            f"{_KNOB}: {src} is not a directory (give a Hugging Face tokenizer or model folder)"
        )
    tj, tm = src / "tokenizer.json", src / "tokenizer.model"
    config = read_json(src / "tokenizer_config.json", knob=_KNOB)
    smap = read_json(src / "special_tokens_map.json", knob=_KNOB)
    if tj.exists():
        try:
            fast = Tokenizer.from_file(str(tj))
        except Exception as err:  # tokenizers raises a plain Exception on malformed files
            raise UserInputError(f"{_KNOB}: {tj} does not load ({err})") from None
    elif tm.exists():
        fast = build_fast_tokenizer(tm.read_bytes())
    else:
        raise UserInputError(f"{_KNOB}: {src} has neither tokenizer.json nor tokenizer.model")

    vocab = fast.get_vocab(with_added_tokens=True)
    present_chat = [t for t in chat_tokens if t in vocab]
    samples = generate_samples(n_check, seed=4321, markup=markup_for(present_chat))
    if tm.exists():
        sp = spm.SentencePieceProcessor(model_file=str(tm))
        # Literal special-token strings are matched differently by design (control symbols); leave them out.
        added = [t.content for t in fast.get_added_tokens_decoder().values()]
        plain = [s for s in samples if not any(t in s for t in added)]
        verify_parity(sp, fast, plain, what=f"{_KNOB}: {src}")
    bad = []
    for text, enc in zip(samples, fast.encode_batch_fast(samples, add_special_tokens=False), strict=True):
        # "▁" is the space marker of sentencepiece-style tokenizers and decodes to " " by design.
        if "\u2581" not in text and fast.decode(enc.ids, skip_special_tokens=False) != text:
            bad.append(text)
    if bad:
        raise TokenizerError(
            f"{_KNOB}: the tokenizer in {src} does not decode its own encodings back to the same text on "
            f"{len(bad)} of {len(samples)} sample strings (first: {bad[0]!r}); llmforge needs a lossless "
            "tokenizer (byte fallback or byte-level BPE)."
        )

    def special(name: str) -> str | None:
        if name in overrides:
            return overrides[name]
        return token_str(config.get(f"{name}_token")) or token_str(smap.get(f"{name}_token"))

    specials = {n: special(n) for n in ("bos", "eos", "pad", "unk")}
    for name, tok in specials.items():
        if tok is not None and tok not in vocab:
            raise UserInputError(
                f"tokenizer.special_tokens.{name}: {tok!r} is not in the vocabulary of {src}; set it to a token "
                "the tokenizer has"
            )
    if specials["eos"] is None:
        raise UserInputError(f"tokenizer.special_tokens.eos: {src} names no EOS token; set it explicitly")
    if specials["pad"] is None:
        # Padding positions are masked out everywhere, so reusing EOS is safe and keeps the vocabulary intact.
        specials["pad"] = specials["eos"]
        log.info("%s has no pad token; using EOS %r for padding", src, specials["eos"])

    template = chat_template or read_chat_template(src, config)
    if template is None:
        if len(chat_tokens) >= 2 and chat_tokens[0] in vocab and chat_tokens[1] in vocab:
            template = default_chat_template(chat_tokens[0], chat_tokens[1])
        else:
            raise UserInputError(
                f"tokenizer.chat_template: the tokenizer in {src} has no chat template and lacks the chat tokens "
                f"{chat_tokens} for llmforge's default one; set tokenizer.chat_template (the model's own template) "
                "or tokenizer.chat_tokens to chat tokens the tokenizer has."
            )

    with atomic_dir(out_dir) as tmp:
        if tj.exists():  # byte-for-byte, so the hash matches the one the model was trained with
            shutil.copyfile(tj, tmp / "tokenizer.json")
        else:
            (tmp / "tokenizer.json").write_text(fast.to_str(pretty=True), encoding="utf-8")
        if tm.exists():
            shutil.copyfile(tm, tmp / "tokenizer.model")
        new_config = {k: v for k, v in config.items() if k != "chat_template"}
        if not new_config:
            new_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for name, tok in specials.items():
            if tok is not None:
                new_config[f"{name}_token"] = tok
        new_config["chat_template"] = template
        write_json(tmp / "tokenizer_config.json", new_config)
        write_json(
            tmp / "special_tokens_map.json",
            {f"{n}_token": t for n, t in specials.items() if t is not None}
            | {"additional_special_tokens": [t for t in present_chat if t not in specials.values()]},
        )
        gen = read_json(src / "generation_config.json", knob=_KNOB)
        eos_ids = gen.get("eos_token_id")
        eos_ids = list(eos_ids) if isinstance(eos_ids, list) else ([eos_ids] if eos_ids is not None else [])
        for tok in (specials["eos"], present_chat[-1] if len(present_chat) >= 2 else None):
            if tok is not None and vocab[tok] not in eos_ids:
                eos_ids.append(vocab[tok])
        gen_out = {
            k: v for k, v in gen.items() if k in ("bos_token_id", "pad_token_id", "decoder_start_token_id")
        }
        gen_out["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
        if specials["bos"] is not None:
            gen_out["bos_token_id"] = vocab[specials["bos"]]
        gen_out["pad_token_id"] = vocab[specials["pad"]]
        write_json(tmp / "generation_config.json", gen_out)
        write_json(
            tmp / META_FILE,
            {
                "format": META_FORMAT,
                "vocab_size": fast.get_vocab_size(with_added_tokens=True),
                **{f"{n}_token": t for n, t in specials.items()},
                "chat_tokens": present_chat,
                "end_of_turn_token": present_chat[-1] if len(present_chat) >= 2 else None,
                "tokenizer_json_sha256": sha256_file(tmp / "tokenizer.json"),
                "source": {"from": str(src)},
            },
        )
    log.info("imported tokenizer from %s (%d ids, %d strings checked)", src, len(vocab), len(samples))
