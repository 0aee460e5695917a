"""llmforge's engine serves GPTQ checkpoints: torch's int4 CPU kernel against the unpacking reference, the
kernel choice per layer, and ``load_engine`` over a GPTQ directory in both ``serve.quantized`` modes.

The checkpoints here are written by llmforge's round-to-nearest backend: the same GPTQ layout gptqmodel
writes (tests/quantize/test_stage.py checks that equivalence), without gptqmodel's minute of start-up.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch

from llmforge.infer import Engine, Request, SamplingParams, load_engine
from llmforge.quantize.layout import dequantize, pack, rtn_pack
from llmforge.quantize.load import load_gptq, load_model
from llmforge.quantize.qlinear import GPTQLinear, int4_unsupported_reason, trivial_group_size
from llmforge.quantize.rtn import RTNBackend
from llmforge.quantize.spec import QuantSpec


def _layer(out_f=48, in_f=256, bits=4, gs=64, sym=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    t = rtn_pack(w, bits, gs, sym)
    return t["qweight"], t["qzeros"], t["scales"], t["g_idx"]


@pytest.mark.parametrize("gs", [32, 64, 128, 256])
@pytest.mark.parametrize("sym", [True, False])
def test_int4_kernel_equals_the_dequantized_matmul(gs, sym):
    parts = _layer(gs=gs, sym=sym)
    bias = torch.randn(48)
    lin = GPTQLinear(*parts, bits=4, bias=bias)
    assert lin.kernel == "int4" and not hasattr(lin, "qweight")  # only the kernel's packing is held
    w = dequantize(*parts, bits=4)
    x = torch.randn(2, 5, 256)
    ref = x @ w.t() + bias
    y = lin(x)
    assert y.shape == (2, 5, 48)
    assert torch.allclose(y, ref, rtol=0, atol=1e-4 * float(ref.abs().max())), float((y - ref).abs().max())
    assert torch.allclose(lin.weight_fp(), w, rtol=0, atol=1e-6 * float(w.abs().max()))
    yb = lin(x.bfloat16()).float()  # bf16 activations: same kernel, bf16 rounding
    assert float((yb - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_layers_the_kernel_cannot_take_fall_back_to_unpacking():
    q, z, s, g = _layer()
    perm = g[torch.randperm(g.numel(), generator=torch.Generator().manual_seed(1))]  # act-order g_idx
    assert trivial_group_size(g) == 64 and trivial_group_size(perm) is None
    cases = {
        "act-order": (q, z, s, perm, 4),
        "8-bit": (*_layer(bits=8)[:3], g, 8),
        "group size": (*_layer(gs=16)[:3], _layer(gs=16)[3], 4),
        "multiple of 16": (*_layer(out_f=40)[:3], g, 4),
    }
    for why, (qw, qz, sc, gi, bits) in cases.items():
        reason = int4_unsupported_reason(bits, gi, int(sc.shape[1]), "cpu")
        assert reason is not None and why in reason, (why, reason)
        auto = GPTQLinear(qw, qz, sc, gi, bits=bits)
        assert auto.kernel == "unpack", why
        x = torch.randn(3, 256)
        assert torch.allclose(auto(x), x @ dequantize(qw, qz, sc, gi, bits).t(), atol=1e-5), why
        with pytest.raises(ValueError, match="int4 kernel unavailable"):
            GPTQLinear(qw, qz, sc, gi, bits=bits, kernel="int4")
    # an act-order layer is the same weight as its unpermuted twin only through g_idx; prove unpack honours it
    w_perm = dequantize(q, z, s, perm, 4)
    assert not torch.equal(w_perm, dequantize(q, z, s, g, 4))
    assert pack is not None


@pytest.fixture(scope="module")
def gptq_dir(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gptq") / "model"
    out.mkdir()
    RTNBackend().quantize(tiny_model, out, QuantSpec(bits=4, group_size=64), [])
    for f in tiny_model.iterdir():  # tokenizer, chat template, generation config
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def _weights_bytes(model) -> int:
    return sum(
        t.numel() * t.element_size()
        for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    )


def test_packed_model_holds_a_quarter_of_the_memory_and_gives_the_same_logits(gptq_dir):
    deq = load_gptq(gptq_dir)
    packed = load_model(gptq_dir, quantized="packed")
    kernels = {m.kernel for m in packed.modules() if isinstance(m, GPTQLinear)}
    assert kernels == {"int4"}  # every projection of this shape fits torch's kernel
    n_quantized = sum(isinstance(m, GPTQLinear) for m in packed.modules())
    assert n_quantized == 2 * 7
    ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = deq(ids), packed(ids)
    assert torch.allclose(a, b, rtol=0, atol=1e-4 * float(a.abs().max())), float((a - b).abs().max())
    # the projections' share: 4 bits + scales/zeros per group instead of 32 bits
    proj = sum(
        m.weight.numel() * 4 for m in deq.modules() if isinstance(m, torch.nn.Linear) and m is not deq.lm_head
    )
    saved = _weights_bytes(deq) - _weights_bytes(packed)
    assert saved > 0.8 * proj, (saved, proj)
    with pytest.raises(ValueError, match="dequantize"):
        load_model(gptq_dir, quantized="int3")


@pytest.mark.parametrize("quantized", ["dequantize", "packed"])
def test_engine_serves_a_gptq_checkpoint(gptq_dir, quantized):
    from llmforge.model import load_pretrained

    # the fp loader refuses a quantized checkpoint; the engine routes it through llmforge.quantize.load
    with pytest.raises(Exception, match="quantized"):
        load_pretrained(gptq_dir)
    prompt = [1, 5, 9, 14, 20, 7, 3]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    (ref,) = Engine(load_gptq(gptq_dir), max_batch=2).run([Request("r", prompt, params)])

    engine = load_engine(gptq_dir, device="cpu", quantized=quantized)

    async def go():
        await engine.start()
        try:
            events = [ev async for ev in engine.generate(prompt, params, "x")]
        finally:
            await engine.shutdown()
        return events

    events = asyncio.run(go())
    assert events[-1].finish_reason == "length"
    assert [t for ev in events for t in ev.token_ids] == ref.token_ids
    with pytest.raises(ValueError, match="quantized="):
        load_engine(gptq_dir, quantized="fast")
