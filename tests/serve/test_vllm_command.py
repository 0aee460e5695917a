"""How `VLLMEngine` launches vLLM (no vLLM needed): the command line, the environment, the refusals."""

from __future__ import annotations

import json
import shutil

import pytest

from llmforge.serve.vllm_engine import VLLMEngine


def _arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_command_line_on_cpu(model_dir, tmp_path):
    e = VLLMEngine(model_dir, model_name="demo", max_batch=12, device="cpu", python="/x/python", port=5555,
                   kvcache_space_gib=2, reserved_cpus=0, extra_args=["--seed", "3"])  # fmt: skip
    tpl = tmp_path / "t.jinja"
    cmd = e.command(tpl)
    assert cmd[:3] == ["/x/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert _arg(cmd, "--model") == str(model_dir)
    assert _arg(cmd, "--served-model-name") == "demo"
    assert _arg(cmd, "--host") == "127.0.0.1" and _arg(cmd, "--port") == "5555"
    assert _arg(cmd, "--max-model-len") == "256"  # the checkpoint's max_position_embeddings
    assert _arg(cmd, "--max-num-seqs") == "12"
    assert _arg(cmd, "--chat-template") == str(tpl)
    assert _arg(cmd, "--dtype") == "float32"  # as the local engine resolves auto on CPU
    assert "--enforce-eager" in cmd and "--tensor-parallel-size" not in cmd
    assert cmd[-2:] == ["--seed", "3"]
    env = e.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_command_line_on_gpu_with_lora(model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"r": 12, "lora_alpha": 24, "peft_type": "LORA", "target_modules": ["q_proj"]})
    )
    e = VLLMEngine(
        model_dir, model_name="demo", device="cuda", tensor_parallel_size=2, adapter=adapter, port=1
    )
    cmd = e.command(None)
    assert _arg(cmd, "--tensor-parallel-size") == "2" and _arg(cmd, "--dtype") == "bfloat16"
    assert "--enable-lora" in cmd and _arg(cmd, "--max-lora-rank") == "16"
    assert _arg(cmd, "--lora-modules") == f"demo={adapter}"  # requests name the adapter...
    assert _arg(cmd, "--served-model-name") == "demo-base"  # ...and the base model has its own name
    assert "--chat-template" not in cmd
    assert "VLLM_CPU_KVCACHE_SPACE" not in e.environment() or e.environment()["VLLM_CPU_KVCACHE_SPACE"] != "1"


def test_chat_template_comes_from_the_tokenizer_config(model_dir, tokenizer):
    e = VLLMEngine(model_dir)
    assert e.tokenizer.info.chat_template == tokenizer.info.chat_template
    assert e.tokenizer.info.chat_template


def test_refusals(model_dir, tmp_path, monkeypatch):
    from llmforge.errors import CheckpointError, ModelError
    from llmforge.serve import vllm_engine

    with pytest.raises(CheckpointError, match=r"config\.json"):
        VLLMEngine(tmp_path)
    with pytest.raises(CheckpointError, match="max_position_embeddings"):
        VLLMEngine(model_dir, max_model_len=10_000)
    q = tmp_path / "q"
    shutil.copytree(model_dir, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (q / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(vllm_engine, "cpu_has_avx512", lambda: False)
    with pytest.raises(ModelError, match="AVX-512"):
        VLLMEngine(q, device="cpu")._check_servable()
    VLLMEngine(q, device="cuda")._check_servable()  # vLLM serves GPTQ on GPU
    monkeypatch.setattr(vllm_engine, "cpu_has_avx512", lambda: True)
    VLLMEngine(q, device="cpu")._check_servable()


def test_start_failure_shows_the_log_tail(model_dir, tmp_path):
    import asyncio
    import sys

    from llmforge.infer import EngineError

    fake = tmp_path / "python"
    fake.write_text(
        f"#!{sys.executable}\nimport sys\nprint('vllm: error: unrecognized arguments: --frob')\nsys.exit(2)\n"
    )
    fake.chmod(0o755)
    e = VLLMEngine(model_dir, python=str(fake), device="cpu")
    with pytest.raises(EngineError, match=r"(?s)exited with code 2.*unrecognized arguments: --frob"):
        asyncio.run(e.start())
    assert not e.healthy()
