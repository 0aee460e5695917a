"""Fixtures: a small generated corpus and tokenizers trained from it in-process (no downloads)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from llmforge.tokenizer.samples import generate_samples

PROSE = [
    "language",
    "models",
    "learn",
    "to",
    "predict",
    "the",
    "next",
    "token",
    "from",
    "a",
    "large",
    "corpus",
    "of",
    "text",
    "gathered",
    "from",
    "the",
    "web",
    "the",
    "tokenizer",
    "splits",
    "text",
    "into",
    "pieces",
    "and",
    "every",
    "later",
    "stage",
    "must",
    "use",
    "exactly",
    "the",
    "same",
    "pieces",
    "training",
    "data",
    "is",
    "filtered",
    "deduplicated",
    "and",
    "scrubbed",
    "of",
    "personal",
    "information",
    "before",
    "tokenization",
]
CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "class Model:\n    def __init__(self, dim):\n        self.dim = dim\n",
    "import numpy as np\nx = np.arange(12).reshape(3, 4)\n",
]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Documents mixing prose, code, CJK, emoji and the hostile sample families."""
    rng = random.Random(seed)
    extra = generate_samples(n, seed=seed + 1)
    docs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            paras = [
                " ".join(rng.choice(PROSE) for _ in range(rng.randint(8, 60)))
                for _ in range(rng.randint(1, 3))
            ]
            docs.append("\n\n".join(p.capitalize() + "." for p in paras))
        elif kind == 1:
            docs.append("".join(rng.choice(CODE) for _ in range(rng.randint(1, 4))))
        elif kind == 2:
            docs.append("中文文本测试，" * rng.randint(1, 5) + " emoji 😀🚀 " + rng.choice(PROSE))
        else:
            docs.append(extra[i] or "x")
    return docs


def write_corpus(folder: Path, docs: list[str], n_files: int = 3) -> Path:
    """datatrove-JsonlWriter-like output: ``NNNNN.jsonl.gz`` files of {"text", "id"} lines."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // n_files)
    for f in range(n_files):
        with gzip.open(folder / f"{f:05d}.jsonl.gz", "wt", encoding="utf-8") as fh:
            for j, text in enumerate(docs[f * per : (f + 1) * per]):
                fh.write(json.dumps({"text": text, "id": f"{f}-{j}", "metadata": {}}) + "\n")
    return folder


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return make_docs(900)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, docs) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus", docs, n_files=4)


def train_and_export(
    out: Path, docs: list[str], *, model_type: str = "bpe", vocab_size: int = 1200, **kw
) -> Path:
    from llmforge.tokenizer.chat import default_chat_template
    from llmforge.tokenizer.export import export_sentencepiece
    from llmforge.tokenizer.train import train_sentencepiece

    chat = kw.pop("chat_tokens", ["<|im_start|>", "<|im_end|>"])
    model, _ = train_sentencepiece(docs, model_type=model_type, vocab_size=vocab_size, chat_tokens=chat, **kw)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model)
    export_sentencepiece(
        out / "tokenizer.model",
        out,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        chat_tokens=chat,
        chat_template=default_chat_template(chat[0], chat[1]),
        source={"test": True},
    )
    return out


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, docs) -> Path:
    """A BPE tokenizer (vocab 1200) trained on the generated corpus and exported."""
    return train_and_export(tmp_path_factory.mktemp("tok") / "bpe", docs)


@pytest.fixture(scope="session")
def hf_tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def write_manifest(root: Path, tokenizer: dict | None = None) -> Path:
    """A minimal llmforge.yaml with a tokenizer section; returns the loaded manifest."""
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    data = {"project": {"name": "t"}, "tokenizer": {"enabled": True, **(tokenizer or {})}}
    path = root / "llmforge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def make_ctx(root: Path, tokenizer: dict | None = None, corpus: Path | None = None, **options):
    from llmforge import manifest
    from llmforge.stage import StageContext

    loaded = manifest.load(write_manifest(root, tokenizer))
    out = loaded.runs_dir / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    upstream = {"data": {"corpus": corpus}} if corpus is not None else {}
    return StageContext(name="tokenizer", loaded=loaded, out_dir=out, upstream=upstream, options=options)
