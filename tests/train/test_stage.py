import json
import math

import pytest
import torch

from llmforge.errors import StageInputError, UserInputError
from llmforge.model import load_pretrained
from llmforge.train.checkpoint import list_checkpoints
from llmforge.train.launch import build_torchrun_command, slurm_script
from llmforge.train.stage import run_pretrain

from .helpers import make_project


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ctx, _ = make_project(
        tmp_path_factory.mktemp("proj"), pretrain={"max_steps": 8, "save_every": 4, "eval_every": 4}
    )
    return ctx, run_pretrain(ctx)


def test_outputs_metrics_and_summary(trained):
    ctx, res = trained
    final = ctx.out_dir / "model"
    assert res.outputs == {"model": final}
    m = res.metrics
    assert m["steps"] == 8 and m["tokens"] == 8 * 4 * 16 and m["skipped_steps"] == 0
    assert m["params"] > 0 and m["tokens_per_s"] > 0
    assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
    assert m["train_loss"] < math.log(64)
    labels = [label for label, _ in res.summary]
    assert {"model", "steps", "train loss", "val loss / ppl", "throughput", "final model"} <= set(labels)
    assert [s for s, _ in list_checkpoints(ctx.out_dir / "checkpoints")] == [4, 8]
    assert (ctx.out_dir / "metrics.jsonl").exists()


def test_checkpoints_are_self_describing_hf_dirs(trained):
    from transformers import LlamaForCausalLM

    ctx, _ = trained
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    for d in [ctx.out_dir / "model", ctx.out_dir / "checkpoints" / "step_000004"]:
        for f in [
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]:
            assert (d / f).is_file(), f"{d}/{f}"
        hf = LlamaForCausalLM.from_pretrained(d).eval()
        ours = load_pretrained(d)
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-5)
    assert not (ctx.out_dir / "model" / "trainer_state.pt").exists()
    gen = json.loads((ctx.out_dir / "model" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2


def test_continue_from_model_from(tmp_path, trained):
    ctx0, _ = trained
    src = ctx0.out_dir / "model"
    # one step at a negligible LR: the result must be the source weights, not a fresh init
    ctx, _ = make_project(
        tmp_path,
        pretrain={"max_steps": 1, "warmup_steps": 0, "lr": 1e-12, "weight_decay": 0.0},
        model={"from": str(src)},
    )
    res = run_pretrain(ctx)
    before, after = load_pretrained(src).state_dict(), load_pretrained(res.outputs["model"]).state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-9, msg=k)


def test_input_errors(tmp_path):
    ctx, _ = make_project(tmp_path / "a", pretrain={"seq_len": 100})
    with pytest.raises(UserInputError, match=r"pretrain\.seq_len"):
        run_pretrain(ctx)
    ctx, _ = make_project(tmp_path / "b")
    ctx.upstream = {}
    with pytest.raises(StageInputError, match="llmforge run tokenizer"):
        run_pretrain(ctx)


def test_torchrun_command_and_slurm_script(tmp_path):
    cmd = build_torchrun_command("ctx.json", nproc=4)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert cmd[-4:] == ["4", "-m", "llmforge.train.launch", "ctx.json"]
    multi = build_torchrun_command("ctx.json", nproc=8, nnodes=2, rdzv_endpoint="node0:29500", rdzv_id="j1")
    assert "--rdzv-endpoint" in multi and "node0:29500" in multi and "--standalone" not in multi

    ctx, loaded = make_project(
        tmp_path,
        pretrain={"nnodes": 2, "nproc": 8, "slurm": {"partition": "gpu", "setup": ["module load cuda"]}},
    )
    script = slurm_script(loaded, upstream=ctx.upstream)
    assert script.startswith("#!/bin/bash")
    for needle in [
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "module load cuda",
        "--rdzv-backend c10d",
        '--rdzv-endpoint "$head_node:29500"',
        "-m llmforge.train.launch",
    ]:
        assert needle in script, needle
    body = script.split("<<'LLMFORGE_CONTEXT'\n")[1].split("\nLLMFORGE_CONTEXT")[0]
    context = json.loads(body)
    assert context["stage"] == "pretrain" and context["upstream"]["tokenizer"]["shards"].endswith("shards")
