"""Subprocess entry for the resume tests: ``python -m tests.train._pretrain_worker PROJECT PRETRAIN_JSON [BLOCK]``.

Runs the pretrain stage body of a test project. With ``BLOCK=N`` the process stops making progress after N
optimizer steps (it sleeps inside the loss function) so the test can SIGKILL it mid-run.
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)

import llmforge.train.pretrain as pretrain  # noqa: E402
from tests.train.helpers import make_project  # noqa: E402


def main() -> None:
    project, section = Path(sys.argv[1]), json.loads(sys.argv[2])
    block = int(sys.argv[3]) if len(sys.argv) > 3 else None
    if block is not None:
        real, calls = pretrain.causal_lm_loss, [0]

        def blocking(model, batch):
            if calls[0] == block:
                while True:  # wait to be killed
                    time.sleep(1)
            calls[0] += 1
            return real(model, batch)

        pretrain.causal_lm_loss = blocking
    ctx, _ = make_project(project, pretrain=section)
    from llmforge.train.stage import run_pretrain

    result = run_pretrain(ctx)
    print(json.dumps(result.metrics))


if __name__ == "__main__":
    main()
