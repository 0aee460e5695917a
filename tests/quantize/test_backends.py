"""Each backend directly: act-order and 3-bit GPTQ checkpoints (permuted ``g_idx``, bit-stream packing) read by
llmforge's loader exactly as gptqmodel dequantizes them; SFT calibration rendered with the chat template."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmforge.errors import StageInputError
from llmforge.quantize.calibration import from_sft, from_shards, sft_eval_windows
from llmforge.quantize.evaluate import perplexity
from llmforge.quantize.load import load_gptq, load_model
from llmforge.quantize.spec import QuantSpec
from tests.train.helpers import make_shards


def _calibration(tmp_path, n=32, seq_len=32):
    return from_shards(make_shards(tmp_path / "shards"), n, seq_len, seed=0).sequences


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(bits=4, group_size=32, desc_act=True), QuantSpec(bits=3, group_size=64, sym=False)],
    ids=["4bit-act-order", "3bit-asym"],
)
def test_gptq_checkpoint_dequantizes_as_gptqmodel_does(tmp_path, tiny_model, spec):
    pytest.importorskip("gptqmodel")
    from gptqmodel import GPTQModel

    from llmforge.quantize.gptq import GPTQModelBackend

    out = tmp_path / "q"
    out.mkdir()
    GPTQModelBackend().quantize(tiny_model, out, spec, _calibration(tmp_path))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (
        spec.bits,
        spec.group_size,
        spec.desc_act,
        spec.sym,
    )
    mine = load_gptq(out)
    # float16: the 3-bit torch kernel accepts no float32 model; only its dequantize_weight is used here
    ref = GPTQModel.load(str(out), device="cpu", dtype=torch.float16).model
    permuted = False
    for i, layer in enumerate(ref.model.layers):
        for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"):
            q = layer.get_submodule(name)
            permuted |= not torch.equal(q.g_idx.cpu(), torch.arange(q.g_idx.numel()) // spec.group_size)
            q.dequant_dtype = torch.int8
            want = q.dequantize_weight().float().t()
            got = mine.model.layers[i].get_submodule(name).weight.detach()
            assert torch.allclose(got, want, rtol=0, atol=2**-10 * float(got.abs().max())), (i, name)
    assert permuted == spec.desc_act  # act-order really permuted the groups


def test_sft_calibration_uses_the_chat_template(tmp_path, tiny_model):
    from llmforge.tokenizer.chat import default_chat_template
    from llmforge.tokenizer.info import load_tokenizer

    model = tmp_path / "m"
    import shutil

    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(
        json.dumps({**cfg, "chat_template": default_chat_template()})
    )
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"t{3 + i % 50} t{4 + i % 50}"},
                {"role": "assistant", "content": "t9 t10"},
            ]
        }
        for i in range(20)
    ]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cal = from_sft([data], model, samples=8, seq_len=16, seed=0, min_tokens=2)
    tok = load_tokenizer(model)
    rendered = {tuple(tok.encode_chat(r["messages"])[0][:16]) for r in rows}
    assert len(cal.sequences) == 8 and all(tuple(s) in rendered for s in cal.sequences)
    assert cal.info["source"] == "sft" and cal.info["samples"] == 8
    with pytest.raises(StageInputError, match="calibration_samples: 50 conversations asked"):
        from_sft([data], model, samples=50, seq_len=16, seed=0, min_tokens=2)

    # held-out conversations come from the other end of the same shuffle: none of them calibrated the model
    windows, masks, info = sft_eval_windows([data], model, max_tokens=10_000, seq_len=16, seed=0, reserved=8)
    order = np.random.default_rng(0).permutation(len(rows))
    calibrated, held_out = set(order[:8].tolist()), order[::-1][:12].tolist()
    assert not calibrated & set(held_out) and info["conversations"] == 12
    stream = [t for w in windows for t in w[:-1].tolist()] + windows[-1][-1:].tolist()
    rendered = [tok.encode_chat(rows[i]["messages"]) for i in held_out]
    expected = [t for ids, _ in rendered for t in ids]
    expected_mask = [bool(x) for _, m in rendered for x in m]
    assert all(len(w) == 17 for w in windows) and stream == expected[: len(stream)]
    assert len(expected) - len(stream) < 16  # only the tail that does not fill a window is left out
    # the masks mark the targets (window[1:]) that are the assistant's tokens
    got_mask = [bool(x) for m in masks for x in m]
    assert got_mask == expected_mask[1 : 1 + len(got_mask)] and 0 < sum(got_mask) < len(got_mask)
    assert info["tokens"] == sum(got_mask)
    m = load_model(model)
    full = perplexity(m, windows)
    assert perplexity(m, windows, masks=[np.ones(16, bool)] * len(windows)) == pytest.approx(full, rel=1e-6)
    only = perplexity(m, windows, masks=masks)
    assert only != pytest.approx(full, rel=1e-3)
    with pytest.raises(StageInputError, match="beyond the 20 used for calibration"):
        sft_eval_windows([data], model, max_tokens=10_000, seq_len=16, seed=0, reserved=20)


def test_data_calibration_windows_are_disjoint_train_tokens(tmp_path):
    cal = from_shards(make_shards(tmp_path / "s"), 16, 32, seed=3)
    again = from_shards(tmp_path / "s", 16, 32, seed=3)
    assert cal.sequences == again.sequences and cal.info["ids_sha256"] == again.info["ids_sha256"]
    assert all(len(s) == 32 for s in cal.sequences)
    assert len({tuple(s) for s in cal.sequences}) == 16
    assert np.asarray(cal.sequences).max() < 64
