"""Unit tests of the data stage's pure pieces: input discovery, robust readers, our datatrove steps."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from datatrove.data import Document

from llmforge.data import readers
from llmforge.data.readers import FileDamaged, InputFile, InputReader, InputSource, Skip
from llmforge.errors import UserInputError

PROSE = (
    "The river rises quickly after rain in the hills, even when the town stays dry. Walkers follow the bank "
    "to the old mill, where the water turns the wheel slowly and the heron waits by the weir."
)


def _items(gen) -> tuple[list[dict], list[str], str | None]:
    docs, skips, damage = [], [], None
    try:
        for item in gen:
            if isinstance(item, Skip):
                skips.append(item.reason)
            else:
                docs.append(item)
    except FileDamaged as err:
        damage = err.reason
    return docs, skips, damage


def write_warc(path: Path, records: list[tuple[str, str, bytes]]) -> None:
    """records: (url, content type, payload)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=True)
        for url, ctype, payload in records:
            http = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
            w.write_record(
                w.create_warc_record(
                    url, "response", payload=io.BytesIO(payload), length=len(payload), http_headers=http
                )
            )


# --------------------------------------------------------------------------------------------------------
# text checks


def test_looks_binary() -> None:
    assert not readers.looks_binary(PROSE)
    assert not readers.looks_binary("tabs\tand\nnewlines\r\n are text")
    assert readers.looks_binary("abc\x00def")
    assert readers.looks_binary("".join(chr(i % 31 + 1) for i in range(200)))
    assert readers.looks_binary("text " * 10 + "\ufffd" * 5)


def test_check_text_reasons() -> None:
    assert readers._check_text(PROSE) == PROSE
    assert readers._check_text(None) == Skip("missing_text")
    assert readers._check_text(42) == Skip("non_string_text")
    assert readers._check_text("   \n") == Skip("empty_text")
    assert readers._check_text(b"\xff\xfe\x00") == Skip("binary_text")
    assert readers._check_text(PROSE.encode()) == PROSE


# --------------------------------------------------------------------------------------------------------
# per-format readers


def test_jsonl_skips_bad_lines_and_keeps_the_rest(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_bytes(
        json.dumps({"id": "ok1", "text": PROSE, "url": "u"}).encode()
        + b"\n"
        + b'{"id": "bad", "text": "caf\xe9 \xff"}\n'  # invalid UTF-8
        + b"{not json\n"
        + json.dumps({"id": "bin", "text": "\x00\x01\x02" * 50}).encode()
        + b"\n"
        + json.dumps({"id": "num", "text": 7}).encode()
        + b"\n"
        + json.dumps({"id": "missing"}).encode()
        + b"\n"
        + b"[1, 2]\n\n"
        + json.dumps({"body": PROSE}).encode()
        + b"\n"
    )
    docs, skips, damage = _items(readers.read_jsonl(InputFile(str(p), "jsonl", "t")))
    assert [d["id"] for d in docs] == ["ok1"] and docs[0]["metadata"] == {"url": "u"}
    assert damage is None
    assert sorted(skips) == sorted(
        [
            "invalid_utf8",
            "invalid_json",
            "binary_text",
            "non_string_text",
            "missing_text",
            "invalid_json",
            "missing_text",
        ]
    )
    # a custom text key reads the last line; ids default to file/line
    docs, _, _ = _items(readers.read_jsonl(InputFile(str(p), "jsonl", "t", text_key="body")))
    assert [d["id"] for d in docs] == ["a.jsonl/8"]


def test_truncated_gzip_keeps_documents_before_the_cut(tmp_path: Path) -> None:
    rows = b"".join(json.dumps({"id": f"d{i}", "text": f"{PROSE} {i}"}).encode() + b"\n" for i in range(400))
    data = gzip.compress(rows)
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    docs, _, damage = _items(readers.read_jsonl(InputFile(str(p), "jsonl", "t")))
    assert damage == "truncated_or_corrupt_gzip"
    assert 0 < len(docs) < 400
    assert [d["id"] for d in docs] == [f"d{i}" for i in range(len(docs))]


def test_text_files(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n\n" + PROSE, encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait \xff")
    (tmp_path / "empty.txt").write_bytes(b"")
    docs, _, _ = _items(readers.read_text(InputFile(str(tmp_path / "a.md"), "text", "t")))
    assert docs[0]["id"] == "a.md" and docs[0]["text"].startswith("# Title")
    assert _items(readers.read_text(InputFile(str(tmp_path / "bad.txt"), "text", "t")))[1] == ["invalid_utf8"]
    assert _items(readers.read_text(InputFile(str(tmp_path / "empty.txt"), "text", "t")))[1] == ["empty_text"]


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"content": [PROSE, "", None], "doc": ["p1", "p2", "p3"]})
    pq.write_table(table, tmp_path / "a.parquet")
    docs, skips, damage = _items(
        readers.read_parquet(InputFile(str(tmp_path / "a.parquet"), "parquet", "t", "content", "doc"))
    )
    assert [d["id"] for d in docs] == ["p1"] and skips == ["empty_text", "missing_text"] and damage is None
    # binary column: undecodable bytes are skipped
    pq.write_table(pa.table({"text": [b"\xff\xfe\x00\x01", PROSE.encode()]}), tmp_path / "b.parquet")
    docs, skips, _ = _items(readers.read_parquet(InputFile(str(tmp_path / "b.parquet"), "parquet", "t")))
    assert len(docs) == 1 and skips == ["binary_text"]
    (tmp_path / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    assert (
        _items(readers.read_parquet(InputFile(str(tmp_path / "c.parquet"), "parquet", "t")))[2]
        == "corrupt_parquet"
    )
    assert (
        _items(readers.read_parquet(InputFile(str(tmp_path / "a.parquet"), "parquet", "t")))[2]
        == "missing_text_column"
    )


def test_warc_html_records_and_truncation(tmp_path: Path) -> None:
    html = f"<html><body><article><p>{PROSE}</p></article></body></html>".encode()
    latin = (
        "<html><head><meta charset='iso-8859-1'></head><body><p>Caf\xe9 cr\xe8me</p></body></html>".encode(
            "latin-1"
        )
    )
    records = [
        ("https://a.example/1", "text/html; charset=utf-8", html),
        ("https://a.example/logo.png", "image/png", b"\x89PNG"),
    ]
    records += [("https://a.example/2", "text/html", latin)] + [
        (f"https://a.example/p{i}", "text/html", html) for i in range(30)
    ]
    p = tmp_path / "a.warc.gz"
    write_warc(p, records)
    docs, skips, damage = _items(readers.read_warc(InputFile(str(p), "warc", "t")))
    assert damage is None and skips == ["not_html"] and len(docs) == 32
    assert docs[0]["metadata"]["url"] == "https://a.example/1" and docs[0]["metadata"]["format"] == "html"
    assert "Café crème" in docs[1]["text"]  # decoded with the page's declared charset
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    docs, _, damage = _items(readers.read_warc(InputFile(str(cut), "warc", "t")))
    assert damage == "truncated_or_corrupt_warc" and 5 < len(docs) < 32
    junk = tmp_path / "junk.warc"
    junk.write_bytes(b"this is not a warc file at all\n" * 10)
    assert _items(readers.read_warc(InputFile(str(junk), "warc", "t")))[2] == "truncated_or_corrupt_warc"


# --------------------------------------------------------------------------------------------------------
# discovery and the reader step


def test_discover_inputs(tmp_path: Path) -> None:
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for name in (
        "a.jsonl",
        "b.jsonl.gz",
        "c.warc.gz",
        "d.parquet",
        "e.txt",
        "sub/f.md",
        "g.csv",
        ".hidden.txt",
    ):
        (d / name).write_bytes(b"x")
    files, notes = readers.discover_inputs([InputSource(d, "data.inputs[0].path")])
    assert [(Path(f.path).name, f.format) for f in files] == [
        ("a.jsonl", "jsonl"),
        ("b.jsonl.gz", "jsonl"),
        ("c.warc.gz", "warc"),
        ("d.parquet", "parquet"),
        ("e.txt", "text"),
        ("f.md", "text"),
    ]
    assert any("g.csv" in n for n in notes)
    # a glob, a forced format, and the same file twice is read once
    files, _ = readers.discover_inputs(
        [
            InputSource(d / "*.jsonl*", "data.inputs[0].path"),
            InputSource(d / "g.csv", "data.inputs[1].path", "text"),
            InputSource(d / "a.jsonl", "data.inputs[2].path"),
        ]
    )
    assert [Path(f.path).name for f in files] == ["a.jsonl", "b.jsonl.gz", "g.csv"]
    with pytest.raises(UserInputError, match=r"data.inputs\[3\].path: .*does not exist"):
        readers.discover_inputs([InputSource(tmp_path / "nope", "data.inputs[3].path")])
    with pytest.raises(UserInputError, match="matches no files"):
        readers.discover_inputs([InputSource(tmp_path / "*.warc", "data.inputs[0].path")])


def test_input_reader_shards_and_counts(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.jsonl"
        p.write_text(json.dumps({"id": f"d{i}", "text": PROSE}) + "\n" + '{"text": 5}\n', encoding="utf-8")
        paths.append(InputFile(str(p), "jsonl", "data.inputs[0]"))
    step = InputReader(paths)
    docs = list(step.run(None, rank=0, world_size=2))
    assert [d.id for d in docs] == ["d0", "d2"]  # files[rank::world_size]
    assert docs[0].metadata["source"] == "data.inputs[0]" and docs[0].metadata["format"] == "text"
    s = step.stats.stats
    assert (
        s["input_files"].total == 2 and s["documents"].total == 2 and s["skipped_non_string_text"].total == 2
    )


# --------------------------------------------------------------------------------------------------------
# our steps


def test_language_id_keeps_english_drops_french() -> None:
    from llmforge.data.steps import LanguageID

    step = LanguageID(["en"], 0.65)
    en = Document(text=PROSE, id="en")
    fr = Document(
        text="Le marché du samedi attire les familles de tout le village depuis des générations.", id="fr"
    )
    assert (
        step.filter(en) is True and en.metadata["language"] == "en" and en.metadata["language_score"] > 0.65
    )
    assert step.filter(fr) == (False, "language_fr")
    import pickle

    assert pickle.loads(pickle.dumps(step))._model is None  # the fastText model is not shipped to workers


def test_pii_step_redacts_counts_and_drops() -> None:
    from llmforge.data.steps import PIIScrub

    step = PIIScrub({"email": "redact", "phone": "redact", "secret": "drop-document", "ipv4": "keep"})
    docs = [
        Document(text=f"{PROSE} Write to ada.lovelace@example.org or call +44 20 7946 0958.", id="a"),
        Document(text=f"{PROSE} key AKIAIOSFODNN7EXAMPLQ in the config", id="b"),
        Document(text=PROSE, id="c"),
    ]
    out = list(step.run(iter(docs)))
    assert [d.id for d in out] == ["a", "c"]
    assert "<EMAIL>" in out[0].text and "<PHONE>" in out[0].text and "example.org" not in out[0].text
    s = step.stats.stats
    assert s["pii_email"].total == 1 and s["pii_phone"].total == 1 and s["dropped_contains_secret"].total == 1


def test_measured_counts_docs_bytes_and_drops() -> None:
    from datatrove.pipeline.filters import LambdaFilter

    from llmforge.data.steps import Measured

    step = Measured(LambdaFilter(lambda d: "keep" in d.text), "lambda")
    docs = [Document(text="keep é", id="1"), Document(text="drop", id="2")]
    assert [d.id for d in step.run(iter(docs))] == ["1"]
    s = step.stats.stats
    assert (s["docs_in"].total, s["docs_out"].total, s["bytes_in"].total, s["bytes_out"].total) == (
        2,
        1,
        11,
        7,
    )
    assert step.stats.name == "lambda" and s["dropped"].total == 1
