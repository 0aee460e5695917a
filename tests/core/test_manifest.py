"""Manifest schema, overrides and error messages."""

from __future__ import annotations

import typing

import pytest

from llmforge import manifest
from llmforge.errors import ManifestError, UserInputError
from llmforge.manifest.base import Section


def write(tmp_path, text: str):
    p = tmp_path / "llmforge.yaml"
    p.write_text(text)
    return p


def errors_of(path, overrides=()):
    with pytest.raises(ManifestError) as exc:
        manifest.load(path, list(overrides))
    return exc.value.problems


def _all_models():
    seen, todo = set(), [manifest.Manifest]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for f in m.model_fields.values():
            for arg in [f.annotation, *typing.get_args(f.annotation)]:
                for a in [arg, *typing.get_args(arg)]:
                    if isinstance(a, type) and issubclass(a, Section):
                        todo.append(a)
    return seen


def test_every_field_is_documented_and_strict():
    models = _all_models()
    assert len(models) > 15
    for m in models:
        assert m.model_config.get("extra") == "forbid", m
        for name, f in m.model_fields.items():
            assert f.description and len(f.description) >= 8, f"{m.__name__}.{name} has no description"


def test_all_sections_present_in_pipeline_order():
    assert manifest.SECTIONS == (
        "project",
        "crawl",
        "data",
        "tokenizer",
        "model",
        "pretrain",
        "sft",
        "reward",
        "align",
        "distill",
        "quantize",
        "serve",
    )


def test_minimal_manifest_gets_defaults(tmp_path):
    loaded = manifest.load(write(tmp_path, "project:\n  name: x\n"))
    assert loaded.manifest.pretrain.lr == 3e-4
    assert loaded.runs_dir == tmp_path / "runs"
    assert loaded.resolve("corpus") == tmp_path / "corpus"


def test_typo_names_key_line_and_suggestion(tmp_path):
    p = write(tmp_path, "project:\n  name: x\npretrain:\n  max_step: 5\n")
    (msg,) = errors_of(p)
    assert msg.startswith("llmforge.yaml:4: pretrain.max_step: unknown key; did you mean `max_steps`?")
    assert "allowed:" in msg


def test_unknown_section(tmp_path):
    (msg,) = errors_of(write(tmp_path, "project:\n  name: x\npretrian:\n  lr: 1\n"))
    assert "pretrian: unknown key; did you mean `pretrain`?" in msg


def test_wrong_type_and_range(tmp_path):
    p = write(tmp_path, "pretrain:\n  lr: -1\n  max_steps: many\n")
    problems = errors_of(p)
    assert any(
        m.startswith("llmforge.yaml:2: pretrain.lr: input should be greater than 0 (got -1)")
        for m in problems
    )
    assert any("pretrain.max_steps" in m and "'many'" in m for m in problems)


def test_literal_lists_allowed_values(tmp_path):
    (msg,) = errors_of(write(tmp_path, "pretrain:\n  schedule: cosin\n"))
    assert "pretrain.schedule" in msg and "'cosine'" in msg and "'wsd'" in msg


def test_cross_field_checks(tmp_path):
    (msg,) = errors_of(write(tmp_path, "pretrain:\n  max_steps: 10\n  warmup_steps: 10\n"))
    assert "pretrain" in msg and "warmup_steps (10) must be smaller than max_steps (10)" in msg
    (msg,) = errors_of(write(tmp_path, "tokenizer:\n  vocab_size: 100\n"))
    assert "tokenizer" in msg and "vocab_size 100 is too small" in msg
    (msg,) = errors_of(write(tmp_path, "model:\n  num_attention_heads: 6\n  num_key_value_heads: 4\n"))
    assert "must be divisible by num_key_value_heads" in msg
    (msg,) = errors_of(write(tmp_path, "crawl:\n  enabled: true\n"))
    assert "seeds" in msg


def test_broken_yaml_names_line(tmp_path):
    (msg,) = errors_of(write(tmp_path, "project:\n  name: [x\n"))
    assert "llmforge.yaml:3" in msg and "invalid YAML" in msg


def test_empty_and_non_mapping(tmp_path):
    (msg,) = errors_of(write(tmp_path, ""))
    assert "empty" in msg
    (msg,) = errors_of(write(tmp_path, "- a\n- b\n"))
    assert "mapping" in msg
    (msg,) = errors_of(write(tmp_path, "project: 3\n"))
    assert msg.startswith("llmforge.yaml:1: project:")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserInputError, match="manifest not found"):
        manifest.load(tmp_path / "llmforge.yaml")
    with pytest.raises(UserInputError, match="is a directory"):
        manifest.load(tmp_path)


def test_not_utf8(tmp_path):
    p = tmp_path / "llmforge.yaml"
    p.write_bytes(b"project:\n  name: \xff\xfe\n")
    (msg,) = errors_of(p)
    assert "not UTF-8" in msg


def test_overrides_are_yaml_typed(tmp_path):
    p = write(tmp_path, "project:\n  name: x\n")
    lm = manifest.load(
        p,
        [
            "pretrain.max_steps=50",
            "pretrain.warmup_steps=5",
            "pretrain.lr=1e-3",
            "data.language.languages=[en, de]",
            "serve.api_key_env=null",
            "pretrain.enabled=false",
        ],
    )
    m = lm.manifest
    assert m.pretrain.max_steps == 50 and m.pretrain.lr == 1e-3
    assert m.data.language.languages == ["en", "de"]
    assert m.serve.api_key_env is None and m.pretrain.enabled is False


def test_override_errors(tmp_path):
    p = write(tmp_path, "project:\n  name: x\n")
    (msg,) = errors_of(p, ["pretrain.lr=-1"])
    assert msg.startswith("command-line override: pretrain.lr:")
    (msg,) = errors_of(p, ["pretrain.nope=1"])
    assert "pretrain.nope: unknown key" in msg
    (msg,) = errors_of(p, ["pretrain.max_steps=50"])  # default warmup (100) no longer fits
    assert msg.startswith("llmforge.yaml (with command-line overrides): pretrain: warmup_steps (100)")
    with pytest.raises(UserInputError, match="expected KEY=VALUE"):
        manifest.load(p, ["pretrain.lr"])
    with pytest.raises(UserInputError, match="not a section"):
        manifest.load(p, ["project.name.x=1"])


def test_alias_from_key(tmp_path):
    lm = manifest.load(write(tmp_path, "tokenizer:\n  from: ../tok\nmodel:\n  from: ckpt\n"))
    assert str(lm.manifest.tokenizer.from_) == "../tok"
    assert lm.section_dump("model")["from"] == "ckpt"


def test_explain_covers_every_leaf():
    rows = manifest.explain()
    keys = {r[0] for r in rows}
    assert {
        "pretrain.lr",
        "data.pii.email",
        "data.dedup.minhash.ngram_size",
        "tokenizer.from",
        "serve.port",
    } <= keys
    assert all(r[3] for r in rows)
    lr = next(r for r in rows if r[0] == "pretrain.lr")
    assert lr[2] == "0.0003"
    assert {r[0] for r in manifest.explain("crawl")} >= {"crawl.seeds", "crawl.user_agent"}
    with pytest.raises(UserInputError, match="unknown section"):
        manifest.explain("nope")


# -- overrides into list items; duplicate YAML keys ------------------------------------------------------------

LIST_BASE = """\
project:
  name: t
data:
  enabled: true
  inputs:
    - path: a
    - path: b
"""


def test_override_reaches_into_a_list_item(tmp_path):
    loaded = manifest.load(write(tmp_path, LIST_BASE), ["data.inputs.1.format=jsonl", "data.inputs.0.path=c"])
    assert [(i.path, i.format) for i in loaded.manifest.data.inputs] == [("c", "auto"), ("b", "jsonl")]


def test_override_list_index_out_of_range_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match=r"data\.inputs has 2 items"):
        manifest.load(write(tmp_path, LIST_BASE), ["data.inputs.2.path=c"])


def test_override_error_in_list_item_points_at_the_override(tmp_path):
    with pytest.raises(ManifestError) as exc:
        manifest.load(write(tmp_path, LIST_BASE), ["data.inputs.1.format=nope"])
    assert exc.value.problems[0].startswith("command-line override: data.inputs.1.format:")


def test_duplicate_section_is_an_error_not_silently_dropped(tmp_path):
    text = LIST_BASE + "pretrain:\n  lr: -1\ntokenizer:\n  vocab_size: 512\npretrain:\n  max_steps: 50\n"
    with pytest.raises(ManifestError) as exc:
        manifest.load(write(tmp_path, text))
    msg = str(exc.value)
    assert "llmforge.yaml:12: pretrain: duplicate key" in msg and "line 8" in msg


def test_duplicate_nested_key_is_an_error(tmp_path):
    text = LIST_BASE + "pretrain:\n  max_steps: 50\n  max_steps: 60\n"
    with pytest.raises(ManifestError, match=r"llmforge.yaml:10: pretrain.max_steps: duplicate key"):
        manifest.load(write(tmp_path, text))


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    text = LIST_BASE + "x_defaults: &d\n  max_steps: 50\npretrain:\n  <<: *d\n  warmup_steps: 5\n"
    with pytest.raises(ManifestError) as exc:  # x_defaults is an unknown section, but no duplicate complaint
        manifest.load(write(tmp_path, text))
    assert "duplicate" not in str(exc.value)
