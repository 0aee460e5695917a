"""Review: overrides into list items, duplicate YAML keys."""

from __future__ import annotations

import pytest

from llmforge import manifest
from llmforge.errors import ManifestError, UserInputError

BASE = """\
project:
  name: t
data:
  enabled: true
  inputs:
    - path: a
    - path: b
"""


def write(tmp_path, text: str):
    p = tmp_path / "llmforge.yaml"
    p.write_text(text)
    return p


def test_override_reaches_into_a_list_item(tmp_path):
    loaded = manifest.load(write(tmp_path, BASE), ["data.inputs.1.format=jsonl", "data.inputs.0.path=c"])
    assert [(i.path, i.format) for i in loaded.manifest.data.inputs] == [("c", "auto"), ("b", "jsonl")]


def test_override_list_index_out_of_range_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match=r"data\.inputs has 2 items"):
        manifest.load(write(tmp_path, BASE), ["data.inputs.2.path=c"])


def test_override_error_in_list_item_points_at_the_override(tmp_path):
    with pytest.raises(ManifestError) as exc:
        manifest.load(write(tmp_path, BASE), ["data.inputs.1.format=nope"])
    assert exc.value.problems[0].startswith("command-line override: data.inputs.1.format:")


def test_duplicate_section_is_an_error_not_silently_dropped(tmp_path):
    text = BASE + "pretrain:\n  lr: -1\ntokenizer:\n  vocab_size: 512\npretrain:\n  max_steps: 50\n"
    with pytest.raises(ManifestError) as exc:
        manifest.load(write(tmp_path, text))
    msg = str(exc.value)
    assert "llmforge.yaml:12: pretrain: duplicate key" in msg and "line 8" in msg


def test_duplicate_nested_key_is_an_error(tmp_path):
    text = BASE + "pretrain:\n  max_steps: 50\n  max_steps: 60\n"
    with pytest.raises(ManifestError, match=r"llmforge.yaml:10: pretrain.max_steps: duplicate key"):
        manifest.load(write(tmp_path, text))


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    text = BASE + "x_defaults: &d\n  max_steps: 50\npretrain:\n  <<: *d\n  warmup_steps: 5\n"
    with pytest.raises(ManifestError) as exc:  # x_defaults is an unknown section, but no duplicate complaint
        manifest.load(write(tmp_path, text))
    assert "duplicate" not in str(exc.value)
