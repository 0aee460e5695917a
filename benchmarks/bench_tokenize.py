"""Corpus → token shards: llmforge's ``tokenize_corpus`` vs datatrove's ``DocumentTokenizer``.

Same generated corpus (a few MB of ``*.jsonl.gz``, prose + code + CJK/emoji), same ``tokenizer.json`` (a
sentencepiece BPE tokenizer trained and exported by llmforge), same number of worker processes, documents
framed by EOS in both. datatrove runs through its ``LocalPipelineExecutor`` (one task per corpus file) with
document shuffling off, which is the cheaper configuration for it and the closest to llmforge's output.

    python benchmarks/bench_tokenize.py [--mb 8] [--files 4] [--workers 2] [--repeat 2]

Prints wall time and tokens/s for each and the speed ratio. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from llmforge.tokenizer.samples import WORDS

CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "class Model:\n    def __init__(self, dim):\n        self.dim = dim\n",
]


def _lexicon(rng: random.Random, n: int = 5000) -> list[str]:
    # Pseudo-words from syllables, so a vocabulary of a few thousand pieces has something to learn.
    syl = [
        "ka",
        "to",
        "ri",
        "men",
        "sa",
        "lo",
        "tran",
        "for",
        "ing",
        "ed",
        "er",
        "pre",
        "con",
        "ta",
        "ble",
        "ly",
    ]
    return WORDS + ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def make_corpus(folder: Path, megabytes: float, n_files: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    words = _lexicon(rng)
    weights = [1.0 / (i + 1) for i in range(len(words))]  # Zipf-like word frequencies
    folder.mkdir(parents=True)
    target = int(megabytes * 1e6)
    per_file = target // n_files
    n_docs = 0
    for f in range(n_files):
        size = 0
        with gzip.open(folder / f"{f:05d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as fh:
            while size < per_file:
                kind = rng.random()
                if kind < 0.7:
                    text = "\n\n".join(
                        " ".join(rng.choices(words, weights, k=rng.randint(20, 120))).capitalize() + "."
                        for _ in range(rng.randint(1, 6))
                    )
                elif kind < 0.9:
                    text = "".join(rng.choice(CODE) for _ in range(rng.randint(2, 12)))
                else:
                    text = "中文文本，测试分词。" * rng.randint(2, 30) + " 😀🚀"
                fh.write(json.dumps({"text": text, "id": str(n_docs)}, ensure_ascii=False) + "\n")
                size += len(text.encode("utf-8"))
                n_docs += 1
    return n_docs


def train_tokenizer(corpus: Path, out: Path) -> None:
    from llmforge.tokenizer.chat import default_chat_template
    from llmforge.tokenizer.corpus import ReadStats, iter_texts, list_corpus_files
    from llmforge.tokenizer.export import export_sentencepiece
    from llmforge.tokenizer.train import train_sentencepiece

    stats = ReadStats()
    texts = [t for f in list_corpus_files(corpus)[:1] for t in iter_texts(f, stats)]
    model, _ = train_sentencepiece(texts, vocab_size=4000, input_sentence_size=200_000)
    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(model)
    export_sentencepiece(
        out / "tokenizer.model",
        out,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        chat_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=default_chat_template(),
        source={"benchmark": True},
    )


def run_llmforge(corpus: Path, tok: Path, out: Path, workers: int) -> tuple[float, int]:
    from llmforge.tokenizer.shards import tokenize_corpus

    t0 = time.perf_counter()
    stats = tokenize_corpus(corpus, tok, out, val_fraction=0.0, workers=workers, shard_tokens=50_000_000)
    return time.perf_counter() - t0, stats.num_tokens


def run_datatrove(corpus: Path, tok: Path, out: Path, workers: int, n_files: int) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    t0 = time.perf_counter()
    LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(corpus), glob_pattern="*.jsonl.gz"),
            DocumentTokenizer(
                str(out / "tokens"),
                tokenizer_name_or_path=str(tok / "tokenizer.json"),
                eos_token="</s>",
                shuffle_documents=False,
                save_final_metadata=False,
            ),
        ],
        tasks=n_files,
        workers=workers,
        logging_dir=str(out / "logs"),
        skip_completed=False,
    ).run()
    seconds = time.perf_counter() - t0
    n_tokens = 0
    for f in (out / "tokens").rglob("*.ds"):
        n_tokens += f.stat().st_size // 2  # uint16 tokens (vocab < 65536)
    return seconds, n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0, help="corpus size in MB of text")
    ap.add_argument("--files", type=int, default=4, help="corpus files (= datatrove tasks)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes for both")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each; the best time counts")
    args = ap.parse_args()

    from loguru import logger

    logger.remove()  # datatrove logs every step at INFO; keep the benchmark output readable
    logger.add(sys.stderr, level="WARNING")

    root = Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    try:
        corpus = root / "corpus"
        n_docs = make_corpus(corpus, args.mb, args.files)
        tok = root / "tok"
        train_tokenizer(corpus, tok)
        best: dict[str, tuple[float, int]] = {}
        for r in range(args.repeat):
            for name in ("llmforge", "datatrove"):
                out = root / f"{name}-{r}"
                if name == "llmforge":
                    res = run_llmforge(corpus, tok, out, args.workers)
                else:
                    res = run_datatrove(corpus, tok, out, args.workers, args.files)
                if name not in best or res[0] < best[name][0]:
                    best[name] = res
                shutil.rmtree(out, ignore_errors=True)
        lines = [
            f"corpus: {args.mb:.1f} MB text, {n_docs:,} documents, {args.files} files; workers={args.workers}"
        ]
        for name, (secs, toks) in best.items():
            lines.append(f"{name:10s} {secs:7.2f} s  {toks:>12,} tokens  {toks / secs / 1e6:6.2f} M tokens/s")
        ratio = best["datatrove"][0] / best["llmforge"][0]
        lines.append(f"llmforge is {ratio:.2f}x the speed of datatrove DocumentTokenizer")
        if best["llmforge"][1] != best["datatrove"][1]:
            lines.append(f"WARNING: token counts differ ({best['llmforge'][1]} vs {best['datatrove'][1]})")
        sys.stdout.write("\n".join(lines) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
