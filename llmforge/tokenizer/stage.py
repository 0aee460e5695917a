"""The ``tokenizer`` stage: train (or import) the tokenizer, export it, and tokenize the corpus into shards.

Outputs (under ``runs/tokenizer/``):

* ``tokenizer/`` — a Hugging Face tokenizer directory (``tokenizer.model``, ``tokenizer.json``,
  ``tokenizer_config.json`` with the chat template, ``special_tokens_map.json``, ``generation_config.json``,
  ``llmforge_tokenizer.json``), verified against sentencepiece before it is written;
* ``shards/`` — token shards for pretraining (``shards.py``), absent only when ``tokenizer.from`` is set and
  there is no corpus.

The validation documents of the shards are held out of tokenizer training, so the compression reported on
them is a true held-out number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..console import get_logger
from ..errors import UserInputError
from ..stage import StageContext, StageResult
from ..utils.atomic import atomic_dir, write_bytes
from .chat import check_template, default_chat_template
from .corpus import ReadStats, iter_split_documents, list_corpus_files

log = get_logger(__name__)

# Documents kept aside for the compression report (held-out and training); enough for stable numbers,
# small enough to be cheap.
EVAL_DOCS = 2000
EVAL_CHARS = 4 << 20


def resolve_chat_template(ctx: StageContext) -> str | None:
    """The manifest's chat template: inline Jinja, or a path to a ``.jinja`` file; else None."""
    cfg = ctx.manifest.tokenizer
    tpl = cfg.chat_template
    if tpl is None:
        return None
    if tpl.strip().endswith(".jinja") and "{" not in tpl:
        path = ctx.resolve(tpl.strip())
        if not path.exists():
            raise UserInputError(f"tokenizer.chat_template: template file {path} not found")
        return path.read_text(encoding="utf-8")
    return tpl


def _default_template(chat_tokens: list[str]) -> str:
    if len(chat_tokens) < 2:
        raise UserInputError(
            "tokenizer.chat_template: the default ChatML template needs two chat tokens (start and end of turn) "
            f"in tokenizer.chat_tokens (got {chat_tokens}); set both, or give your own tokenizer.chat_template"
        )
    return default_chat_template(chat_tokens[0], chat_tokens[1])


class _Sampler:
    """Keeps the first documents of each split for evaluation while training streams past them."""

    def __init__(self) -> None:
        self.docs: dict[bool, list[str]] = {True: [], False: []}
        self.chars = {True: 0, False: 0}

    def offer(self, text: str, is_val: bool) -> None:
        if len(self.docs[is_val]) < EVAL_DOCS and self.chars[is_val] < EVAL_CHARS:
            self.docs[is_val].append(text)
            self.chars[is_val] += len(text)

    def full(self) -> bool:
        return all(len(d) >= EVAL_DOCS or self.chars[k] >= EVAL_CHARS for k, d in self.docs.items())


def run_tokenizer(ctx: StageContext) -> StageResult:
    """Stage body (see module docstring)."""
    from .evaluate import evaluate
    from .existing import import_tokenizer
    from .export import export_sentencepiece
    from .info import load_tokenizer
    from .shards import tokenize_corpus
    from .train import train_sentencepiece

    cfg = ctx.manifest.tokenizer
    sh = cfg.shards
    out_tok = ctx.out_dir / "tokenizer"
    out_shards = ctx.out_dir / "shards"
    corpus: Path | None = None
    if ctx.has_input("data", "corpus") or cfg.from_ is None:
        corpus = ctx.input("data", "corpus")  # raises "run `data` first" when it is missing
    files = list_corpus_files(corpus) if corpus is not None else []
    base = corpus if corpus is None or corpus.is_dir() else corpus.parent
    template = resolve_chat_template(ctx)
    if template is not None:  # fail before minutes of training, not after
        check_template(template)

    read = ReadStats()
    sampler = _Sampler()
    specials = cfg.special_tokens
    metrics: dict[str, Any] = {}
    if cfg.from_ is None:
        if not cfg.byte_fallback:
            raise UserInputError(
                "tokenizer.byte_fallback: must be true for a trained tokenizer: without it unseen characters "
                "become <unk>, text does not round-trip and the Hugging Face export is not exact"
            )
        if not files:
            raise UserInputError(
                f"{corpus}: the corpus folder has no *.jsonl.gz files to train the tokenizer on; re-run the data "
                "stage (`llmforge run data --force data`)"
            )
        template = template or _default_template(list(cfg.chat_tokens))

        def train_texts():
            for text, is_val in iter_split_documents(
                files, base, seed=sh.seed, val_fraction=sh.val_fraction, stats=read
            ):
                sampler.offer(text, is_val)
                if not is_val:  # held-out documents never reach training
                    yield text

        model, tstats = train_sentencepiece(
            train_texts(),
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            split_digits=cfg.split_digits,
            input_sentence_size=cfg.input_sentence_size,
            max_sentence_length=cfg.max_sentence_length,
            num_threads=cfg.num_threads,
            unk=specials.unk,
            bos=specials.bos,
            eos=specials.eos,
            pad=specials.pad,
            chat_tokens=list(cfg.chat_tokens),
            seed=sh.seed,
        )
        metrics.update(
            {
                "train_lines": tstats.lines,
                "train_characters": tstats.characters,
                "train_seconds": tstats.seconds,
            }
        )
        with atomic_dir(out_tok) as tmp:
            write_bytes(tmp / "tokenizer.model", model)
            export_sentencepiece(
                tmp / "tokenizer.model",
                tmp,
                bos=specials.bos,
                eos=specials.eos,
                pad=specials.pad,
                unk=specials.unk,
                chat_tokens=list(cfg.chat_tokens),
                chat_template=template,
                source={"trained": True, "model_type": cfg.model_type, "vocab_size": cfg.vocab_size},
            )
    else:
        src = ctx.resolve(cfg.from_)
        overrides = {k: getattr(specials, k) for k in specials.model_fields_set}
        import_tokenizer(
            src, out_tok, overrides=overrides, chat_tokens=list(cfg.chat_tokens), chat_template=template
        )
        for text, is_val in iter_split_documents(
            files, base, seed=sh.seed, val_fraction=sh.val_fraction, stats=read
        ):
            sampler.offer(text, is_val)
            if sampler.full():
                break

    tok = load_tokenizer(out_tok)
    info = tok.info
    facts = check_template(info.chat_template or "", fast=tok.fast, variables=info.template_variables())
    if not facts["generation_markers"]:
        log.warning(
            "the chat template has no {%% generation %%} markers: assistant-only loss masks "
            "(return_assistant_tokens_mask) will be empty; SFT needs them"
        )

    outputs = {"tokenizer": out_tok}
    summary = [("tokenizer", str(out_tok)), ("vocab size", f"{info.vocab_size:,}")]
    metrics.update(
        {
            "vocab_size": info.vocab_size,
            "bos_id": info.bos_id,
            "eos_id": info.eos_id,
            "pad_id": info.pad_id,
            "chat_token_ids": info.chat_token_ids,
            "tokenizer_sha256": info.sha256,
        }
    )
    if files:
        stats = tokenize_corpus(corpus, out_tok, out_shards, **sh.model_dump())
        outputs["shards"] = out_shards
        for split, s in stats.splits.items():
            metrics[f"{split}_tokens"] = s.num_tokens
            metrics[f"{split}_documents"] = s.num_documents
            summary.append((f"{split} tokens", f"{s.num_tokens:,} in {s.num_documents:,} documents"))
        metrics["shard_dtype"] = stats.dtype
        metrics["tokens_per_second"] = round(stats.tokens_per_second)
        read.merge(stats.read)
        if stats.parts_reused and not stats.skipped:
            summary.append(("resumed", f"{stats.parts_reused} of {stats.input_files} corpus files reused"))
        skipped = read.bad_lines + len(set(read.truncated_files))
        if skipped:
            summary.append(
                (
                    "skipped input",
                    f"{read.bad_lines} bad lines, {len(set(read.truncated_files))} truncated files",
                )
            )
        metrics["bad_lines"] = read.bad_lines
        metrics["truncated_files"] = sorted(set(read.truncated_files))
    else:
        log.info("no corpus: the imported tokenizer is exported without token shards")

    ev = evaluate(tok.fast, sampler.docs[True], sampler.docs[False])
    metrics["eval"] = ev
    head = ev["heldout"] if ev["heldout"]["tokens"] else ev["train"]
    for key in ("bytes_per_token", "tokens_per_word", "byte_fallback_fraction"):
        metrics[key] = head[key]
    if head["tokens"]:
        which = "held-out" if head is ev["heldout"] else "training"
        summary.append(
            (
                f"compression ({which})",
                f"{head['bytes_per_token']} bytes/token, {head['tokens_per_word']} tokens/word, "
                f"{100 * head['byte_fallback_fraction']:.3f}% byte fallback",
            )
        )
    tables = []
    if ctx.options.get("eval"):
        cols = ["text", "documents", "tokens", "bytes/token", "tokens/word", "byte fallback"]
        rows = [
            [
                name,
                e["documents"],
                e["tokens"],
                e["bytes_per_token"],
                e["tokens_per_word"],
                e["byte_fallback_fraction"],
            ]
            for name, e in (("held-out", ev["heldout"]), ("training", ev["train"]))
        ]
        tables.append({"title": "Tokenizer evaluation", "columns": cols, "rows": rows})
    return StageResult(outputs=outputs, metrics=metrics, summary=summary, tables=tables)
