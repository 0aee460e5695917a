"""Runtime-only knobs are marked once in the schema, and every fingerprint reads that one mark."""

from __future__ import annotations

import yaml

from llmforge import pipeline
from llmforge.manifest import Manifest, load
from llmforge.manifest.base import Section, is_runtime_only
from llmforge.utils.hashing import HashCache


def _fingerprint(tmp_path, name, **pretrain):
    root = tmp_path / name
    root.mkdir()
    (root / "llmforge.yaml").write_text(yaml.safe_dump({"project": {"name": "p"}, "pretrain": pretrain}))
    loaded = load(root / "llmforge.yaml")
    pipe = pipeline.Pipeline()
    return pipeline.fingerprint(pipe, loaded, pipe.get("pretrain"), HashCache()).digest


def test_runtime_only_knobs_do_not_change_the_stage_fingerprint(tmp_path):
    base = _fingerprint(tmp_path, "a", lr=1e-3)
    assert _fingerprint(tmp_path, "b", lr=1e-3, log_every=3, save_every=7, eval_every=5, keep_last=9) == base
    assert _fingerprint(tmp_path, "c", lr=1e-3, wandb={"enabled": True}, launcher="torchrun") == base
    assert _fingerprint(tmp_path, "d", lr=2e-3) != base  # a knob that changes the result does
    assert _fingerprint(tmp_path, "e", lr=1e-3, nproc=2) != base  # the process count sets the global batch


def _walk(model: type[Section], prefix: str = ""):
    for name, info in model.model_fields.items():
        yield model, name, f"{prefix}{name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            yield from _walk(ann, f"{prefix}{name}.")


def test_semantic_dump_leaves_out_exactly_the_marked_fields_at_every_depth():
    m = Manifest()
    for section in Manifest.model_fields:
        obj = getattr(m, section)
        dumped = obj.semantic_dump()
        for owner, name, dotted in _walk(type(obj)):
            if owner is not type(obj):
                continue
            key = owner.model_fields[name].alias or name
            assert (key not in dumped) == is_runtime_only(owner, name), f"{section}.{dotted}"
    # nested sections are dumped through their own marks: the whole runtime-only `wandb` section goes, the
    # semantic `lora` section stays with its knobs
    assert "wandb" not in m.pretrain.semantic_dump()
    assert m.sft.semantic_dump()["lora"]["r"] == m.sft.lora.r


def test_every_stage_section_marks_enabled_runtime_only():
    for section in ("crawl", "data", "tokenizer", "pretrain", "sft", "distill", "quantize", "serve"):
        assert "enabled" not in getattr(Manifest(), section).semantic_dump(), section
