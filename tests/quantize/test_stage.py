"""The quantize stage end to end on a tiny trained Llama: GPTQ through gptqmodel, the layout it writes, the
evaluation against round-to-nearest, reloading through llmforge, gptqmodel and transformers + optimum, and every
bad input failing before any work with no output left behind.

Tolerances (float32 everywhere on our side):
* llmforge's dequantized weights vs gptqmodel's own ``dequantize_weight``: gptqmodel computes
  ``scale * (q - zero)`` in float16, so they agree to float16 rounding, ``2**-10`` of the largest weight;
* logits of llmforge's model vs transformers + optimum on the same checkpoint: transformers runs gptqmodel's CPU
  kernel (torch's ``_weight_int4pack_mm_for_cpu``) with bfloat16 activations, so the two differ by bfloat16
  rounding (measured 0.044 on logits of magnitude ~5): bound at a tenth of the quantization's own effect on the
  logits (measured 0.51) and 0.1 absolute;
* quantized vs unquantized logits: the 4-bit model's logits stay within 10% of the logits' range and its argmax
  agrees on at least 90% of positions (a loader bug — a wrong shift, a missing ``+1`` on zeros — fails both).
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from llmforge.errors import MissingDependencyError, StageError, StageInputError, UserInputError
from llmforge.quantize.load import is_gptq_checkpoint, load_gptq, load_model
from llmforge.quantize.stage import run_quantize

from .conftest import make_project

pytest.importorskip("gptqmodel")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_model):
    ctx, _ = make_project(tmp_path_factory.mktemp("qproj"), tiny_model)
    result = run_quantize(ctx)
    return ctx, result


def _ids(n=4, t=48):
    return torch.randint(3, 64, (n, t), generator=torch.Generator().manual_seed(5))


def test_output_is_the_standard_gptq_layout(quantized, tiny_model):
    from safetensors.torch import load_file

    ctx, result = quantized
    out = result.outputs["model"]
    assert out == ctx.out_dir / "model" and is_gptq_checkpoint(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (
        "gptq",
        4,
        64,
        True,
        False,
    )
    t = load_file(str(out / "model.safetensors"))
    p = "model.layers.1.mlp.down_proj"  # [out 64, in 128]
    assert t[p + ".qweight"].dtype == torch.int32 and tuple(t[p + ".qweight"].shape) == (128 * 4 // 32, 64)
    assert tuple(t[p + ".qzeros"].shape) == (2, 64 * 4 // 32)
    assert t[p + ".scales"].dtype == torch.float16 and tuple(t[p + ".scales"].shape) == (2, 64)
    assert t[p + ".g_idx"].tolist() == [i // 64 for i in range(128)]
    assert p + ".weight" not in t and "model.embed_tokens.weight" in t
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_model / name).read_bytes(), name
    assert sorted(p.name for p in ctx.out_dir.iterdir()) == ["model"]  # no temporary folders left


def test_metrics_table_and_gptq_beats_rtn(quantized):
    _, result = quantized
    m = result.metrics
    ppl = m["perplexity"]
    assert set(ppl) == {"original", "gptq", "rtn"}
    assert ppl["gptq"] <= ppl["rtn"], ppl
    assert m["gptq_beats_rtn"] is True
    assert ppl["original"] <= ppl["gptq"] * 1.01
    assert m["calibration"]["source"] == "data" and m["calibration"]["samples"] == 32
    assert m["calibration"]["seq_len"] == 32 and len(m["calibration"]["ids_sha256"]) == 64
    assert m["size_bytes"]["gptq"] == m["size_bytes"]["rtn"] < m["size_bytes"]["original"] / 3
    (table,) = result.tables
    assert [r[0] for r in table["rows"]] == ["original", "GPTQ (gptqmodel)", "round-to-nearest"]
    assert m["table"] == table


def test_llmforge_dequantization_matches_gptqmodel_and_transformers(quantized, tiny_model):
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    out = quantized[1].outputs["model"]
    mine = load_gptq(out)
    hf = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=torch.float32)
    for i, layer in enumerate(hf.model.layers):
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.down_proj",
        ):
            q = layer.get_submodule(name)
            q.dequant_dtype = torch.int8  # its CPU default; unpacking shifts need an integer dtype
            ref = q.dequantize_weight().float().t()  # gptqmodel returns [in, out]
            w = mine.model.layers[i].get_submodule(name).weight.detach()
            assert torch.allclose(w, ref, rtol=0, atol=2**-10 * float(w.abs().max())), (i, name)
    fp = load_model(tiny_model, dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        a, b, base = mine(ids), hf(ids).logits.float(), fp(ids)
        # gptqmodel's CPU kernel (TorchAtenLinear) multiplies in bf16: measure what bf16 alone does to this model
        bf16_noise = float((load_model(tiny_model, dtype=torch.bfloat16)(ids).float() - base).abs().max())
    gap, effect = float((a - b).abs().max()), float((a - base).abs().max())
    assert gap < 2 * bf16_noise and gap < 0.25 * effect, (gap, bf16_noise, effect)


def test_quantized_logits_close_to_the_original(quantized, tiny_model):
    out = quantized[1].outputs["model"]
    fp = load_model(tiny_model, dtype=torch.float32)
    q = load_model(out)
    ids = _ids()
    with torch.no_grad():
        a, b = q(ids), fp(ids)
    span = float(b.max() - b.min())
    assert (a - b).abs().max() < 0.1 * span
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert not torch.equal(a, b)  # it really is the quantized model


# ---- bad input: a clear error before any work, no output directory -------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if a backend is asked to quantize: these errors must come before any work."""
    from llmforge.quantize import gptq, rtn

    def boom(*a, **k):
        raise AssertionError("quantization started before the input was checked")

    monkeypatch.setattr(gptq.GPTQModelBackend, "quantize", boom)
    monkeypatch.setattr(rtn.RTNBackend, "quantize", boom)


def _expect(tmp_path, model, exc, match, **section):
    ctx, _ = make_project(tmp_path / "p", model, **section)
    with pytest.raises(exc, match=match):
        run_quantize(ctx)
    assert not (ctx.out_dir / "model").exists()
    assert list(ctx.out_dir.iterdir()) == []


def test_not_a_causal_lm(tmp_path, tiny_model, no_work):
    bad = tmp_path / "reward"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    (bad / "config.json").write_text(json.dumps(cfg))
    _expect(tmp_path, bad, StageInputError, "not a causal language model")


def test_already_quantized(tmp_path, quantized, no_work):
    _expect(tmp_path, quantized[1].outputs["model"], StageInputError, "already quantized")


def test_group_size_and_bits_that_do_not_fit(tmp_path, tiny_model, no_work):
    _expect(tmp_path, tiny_model, UserInputError, r"quantize.group_size: 48 does not divide", group_size=48)


def test_too_few_calibration_samples(tmp_path, tiny_model, no_work):
    _expect(
        tmp_path,
        tiny_model,
        StageInputError,
        r"calibration_samples: 1000 sequences",
        calibration_samples=1000,
    )
    _expect(tmp_path, tiny_model, StageInputError, "singular", calibration_samples=2, calibration_seq_len=16)


def test_sequence_longer_than_the_context(tmp_path, tiny_model, no_work):
    _expect(tmp_path, tiny_model, UserInputError, "calibration_seq_len: 128 exceeds", calibration_seq_len=128)


def test_missing_backend(tmp_path, tiny_model, monkeypatch, no_work):
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # `import gptqmodel` now raises ImportError
    _expect(tmp_path, tiny_model, MissingDependencyError, r"pip install 'gptqmodel==7\.6\.0'")


def test_perplexity_threshold_fails_without_output(tmp_path, tiny_model):
    ctx, _ = make_project(tmp_path / "p", tiny_model, method="rtn", bits=2, max_ppl_increase=0.001)
    with pytest.raises(
        StageError, match=r"max_ppl_increase: 2-bit g64 sym raised held-out perplexity from \d"
    ):
        run_quantize(ctx)
    assert not (ctx.out_dir / "model").exists() and list(ctx.out_dir.iterdir()) == []


def test_rtn_method_writes_a_loadable_model(tmp_path, tiny_model):
    ctx, _ = make_project(tmp_path / "p", tiny_model, method="rtn", bits=8, group_size=32)
    result = run_quantize(ctx)
    assert set(result.metrics["perplexity"]) == {"original", "rtn"}
    assert result.metrics["ppl_increase"] < 0.01  # 8-bit RTN is nearly lossless
    q = load_model(result.outputs["model"])
    fp = load_model(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        assert (q(_ids()) - fp(_ids())).abs().max() < 0.05


def test_packed_layers_compute_what_the_dequantized_model_does(quantized):
    from llmforge.quantize.qlinear import GPTQLinear

    out = quantized[1].outputs["model"]
    full, packed = load_gptq(out), load_gptq(out, packed=True)
    assert isinstance(packed.model.layers[0].mlp.down_proj, GPTQLinear)
    fp_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    packed_bytes = sum(t.numel() * t.element_size() for t in [*packed.parameters(), *packed.buffers()])
    assert packed_bytes < fp_bytes
    with torch.no_grad():
        assert torch.allclose(packed(_ids()), full(_ids()), atol=1e-5)
