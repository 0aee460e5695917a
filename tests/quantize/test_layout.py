"""The GPTQ layout: packing by hand-computed words, round trips at every width, RTN's error bound, and the
shape checks that run before any work."""

from __future__ import annotations

import pytest
import torch

from llmforge.errors import StageInputError, UserInputError
from llmforge.manifest.quantize import QuantizeSection
from llmforge.quantize.layout import dequantize, pack, quant_params, rtn_pack, unpack
from llmforge.quantize.spec import default_group_size, read_config, resolve_spec

from .conftest import TINY


def test_pack_4bit_matches_hand_computed_words():
    codes = torch.arange(8).reshape(8, 1)  # one column, 8 rows -> one word, lowest nibble first
    assert pack(codes, 4, 0).item() == 0x76543210
    assert pack(torch.full((1, 8), 7), 4, 1).item() == 0x77777777  # symmetric 4-bit zeros stored as 8 - 1
    top = pack(torch.full((8, 1), 15), 4, 0).item()
    assert top == -1  # 0xFFFFFFFF as int32


def test_pack_3bit_is_a_little_endian_bit_stream():
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10] = 0b111  # bits 30..32: straddles words 0 and 1
    words = pack(codes, 3, 0).flatten().tolist()
    assert words == [-(2**31) + 2**30, 1, 0]  # bits 30, 31 of word 0 and bit 0 of word 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_unpack_round_trip(bits, dim):
    v = torch.randint(0, 2**bits, (64, 96), generator=torch.Generator().manual_seed(bits))
    w = pack(v, bits, dim)
    assert w.dtype == torch.int32
    assert w.shape[dim] == v.shape[dim] * bits // 32
    assert torch.equal(unpack(w, bits, dim), v)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_at_most_half_a_step(bits, sym):
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    t = rtn_pack(w, bits, 32, sym)
    back = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    scale, _ = quant_params(w, bits, 32, sym)
    step = scale.repeat_interleave(32, dim=1)
    assert back.shape == w.shape
    # half a step (reached at the clipped top of a symmetric grid), plus slack for the float16-rounded scale
    assert ((back - w).abs() <= step * (0.5 + 2 ** (bits - 1) * 2**-11) + 1e-6).all()
    assert t["scales"].dtype == torch.float16 and t["g_idx"].tolist() == [i // 32 for i in range(128)]


def test_rtn_is_exact_on_grid_values():
    scale = 0.5
    w = (torch.randint(-8, 8, (16, 64)).float() * scale).clamp(-4, 3.5)
    w[:, [0, 32]] = -4.0  # pin every group's range to [-8, 7] steps: scale 0.5, zero point 8
    w[:, [1, 33]] = 3.5
    t = rtn_pack(w, 4, 32, False)
    assert torch.equal(dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4), w)


def test_default_group_size():
    assert default_group_size([4096, 11008]) == 128
    assert default_group_size([64, 128]) == 64
    assert default_group_size([96, 160]) == 32
    assert default_group_size([7]) == -1


def _raw(**over):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY, **over}


def test_resolve_spec_defaults_and_errors():
    spec = resolve_spec(QuantizeSection(), _raw())
    assert (spec.bits, spec.group_size, spec.sym) == (4, 64, True)
    assert resolve_spec(QuantizeSection(group_size=-1), _raw()).group_size == -1
    with pytest.raises(
        UserInputError, match=r"quantize.group_size: 48 does not divide the input width 64 of "
    ):
        resolve_spec(QuantizeSection(group_size=48), _raw())
    with pytest.raises(UserInputError, match=r"quantize.bits: 3-bit .* width 48 of self_attn.q_proj"):
        resolve_spec(QuantizeSection(bits=3, group_size=16), _raw(hidden_size=48, num_attention_heads=4))


def test_read_config_rejects_non_causal_and_quantized(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(_raw(architectures=["LlamaForSequenceClassification"])))
    with pytest.raises(StageInputError, match="not a causal language model"):
        read_config(tmp_path, "quantize.from")
    (tmp_path / "config.json").write_text(
        json.dumps(_raw(quantization_config={"quant_method": "gptq", "bits": 4}))
    )
    with pytest.raises(StageInputError, match=r"already quantized \(gptq, 4 bits\)"):
        read_config(tmp_path, "quantize.from")
