"""llmforge.train — one explicit training loop that every objective plugs into.

Modules (one concept each):

* ``loop``       — ``train(model, Objective(name, loss_fn, train_data, val_data), cfg, ...)``: AdamW, schedules,
  accumulation, clipping, autocast, compile, DDP/FSDP2, NaN policy, validation, metrics, checkpoints, resume;
* ``schedule``   — warmup + cosine / linear / WSD / constant LR multipliers;
* ``data``       — ``llmforge.shards.v1`` reader: packed, rank-strided, resumable batches;
* ``pretrain``   — the next-token cross-entropy objective;
* ``checkpoint`` — atomic, keep-last-K, self-describing checkpoint directories (+ ``trainer_state.pt``);
* ``metrics``    — ``metrics.jsonl`` (+ TensorBoard / W&B), peak-FLOPs table for MFU;
* ``dist``       — process-group setup from torchrun's environment;
* ``launch``     — torchrun command, Slurm script, re-launch of a stage and the per-rank entry point;
* ``stage``      — ``run_pretrain(ctx)``, the `pretrain` stage body.

Nothing here is imported by ``llmforge --help``: torch loads only when a training command runs.
"""
