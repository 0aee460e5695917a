"""Scale-out on CPU (gloo): 2 processes x batch B train exactly like 1 process x batch 2B.

Runs the real path: the stage body sees `launcher: torchrun`, re-launches itself under torchrun with the
per-rank entry point `llmforge.train.launch`, and returns rank 0's result.
"""

import pytest
import torch
from safetensors.torch import load_file

from llmforge.errors import StageInputError
from llmforge.train.metrics import read_metrics
from llmforge.train.stage import run_pretrain

from .helpers import make_project

STEPS = {"max_steps": 4, "eval_every": 2, "save_every": 2}


def _curve(run_dir):
    rows = read_metrics(run_dir)
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    ctx, _ = make_project(tmp_path_factory.mktemp("single"), pretrain={**STEPS, "batch_size": 4})
    return ctx, run_pretrain(ctx)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_double_batch(tmp_path, single, strategy):
    ctx1, res1 = single
    ctx2, _ = make_project(
        tmp_path,
        pretrain={**STEPS, "batch_size": 2, "launcher": "torchrun", "nproc": 2, "strategy": strategy},
    )
    res2 = run_pretrain(ctx2)
    assert res2.metrics["world_size"] == 2
    assert res2.metrics["tokens"] == res1.metrics["tokens"]
    (loss1, val1), (loss2, val2) = _curve(ctx1.out_dir), _curve(ctx2.out_dir)
    assert len(loss1) == 4 and len(val1) == 2
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    assert val2 == pytest.approx(val1, rel=1e-5)
    w1 = load_file(ctx1.out_dir / "model" / "model.safetensors")
    w2 = load_file(res2.outputs["model"] / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_rank_failure_becomes_a_clean_error(tmp_path):
    # every rank fails the same way; the parent re-raises the rank's error class with its message
    ctx, _ = make_project(tmp_path, pretrain={"batch_size": 1000, "launcher": "torchrun", "nproc": 2})
    with pytest.raises(StageInputError, match=r"lower pretrain\.batch_size"):
        run_pretrain(ctx)
