"""The ``align`` stage: resolve the policy, optionally run rejection sampling, then one method.

    policy = align.from, or the newest enabled upstream model (sft's, by default)
    [align.rejection_sampling.enabled]  best-of-N → an SFT set and a preference set (with lineage)
    align.method: dpo   → dpo.run   (pairs: align.dpo.data, else rejection sampling's, else reward.data)
                  grpo  → grpo.run
                  ppo   → ppo.run
                  none  → rejection sampling only (its files are the stage's outputs)

Both pipelines of the field fit: GPT style (sft → reward → method: ppo) and Llama style (reward →
rejection sampling → method: dpo), plus GRPO with verifiable rewards. The method modules are imported only
when chosen, so a DPO run never imports the RL code and vice versa.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import console
from ..errors import UserInputError
from ..stage import StageContext, StageResult

log = console.get_logger(__name__)

METHODS = ("dpo", "grpo", "ppo", "none")


def _method_module(method: str):
    if method == "dpo":
        from . import dpo

        return dpo
    if method == "grpo":
        from . import grpo

        return grpo
    if method == "ppo":
        from . import ppo

        return ppo
    raise UserInputError(f"align.method: {method!r} is not one of {', '.join(METHODS)}")


def run_align(ctx: StageContext) -> StageResult:
    """Stage ``align`` (see the module docstring); the summary names the method and the policy source."""
    from ..train.recipe import resolve_model

    cfg = ctx.manifest.align
    # The reward stage's `model` is a scorer (LlamaForSequenceClassification), never a policy: the resolver
    # picks the newest upstream *policy*, so it looks at the stages before reward.
    policy_ctx = dataclasses.replace(ctx, upstream={k: v for k, v in ctx.upstream.items() if k != "reward"})
    policy = resolve_model(policy_ctx, cfg.from_, "align.from")
    _check_causal_lm(policy.path)
    rejection: Any = None
    if cfg.rejection_sampling.enabled:
        from . import rejection as rs

        log.info("align: rejection sampling from %s", policy.describe(ctx))
        rejection = rs.run(ctx, policy)
    elif cfg.method == "none":
        raise UserInputError(
            "align.method: none runs only rejection sampling, which is off; set "
            "align.rejection_sampling.enabled: true, choose a method (dpo, grpo, ppo), or disable the align stage"
        )

    if cfg.method == "none":
        result = StageResult(metrics={"method": "none"})
    elif cfg.method == "dpo":
        from . import dpo

        result = dpo.run(ctx, policy, pairs_file=rejection.pairs_file if rejection is not None else None)
    else:
        result = _method_module(cfg.method).run(ctx, policy)

    result.metrics.setdefault("method", cfg.method)
    result.metrics["policy"] = str(policy.path)
    result.metrics["policy_source"] = policy.source
    labels = {label for label, _ in result.summary}
    head = []
    if "method" not in labels:
        head.append(("method", cfg.method))
    if not labels & {"policy", "started from"}:
        head.append(("policy", policy.describe(ctx)))
    result.summary[:0] = head
    if rejection is not None:
        result.outputs.setdefault("sft_data", rejection.sft_file)
        result.outputs.setdefault("pairs", rejection.pairs_file)
        for k, v in (rejection.metrics or {}).items():
            result.metrics[f"rejection_{k}"] = v
        kept = (rejection.metrics or {}).get("prompts") or (rejection.metrics or {}).get("pairs")
        result.summary.append(
            (
                "rejection sampling",
                f"{kept if kept is not None else '?'} prompts → {_rel(ctx, rejection.pairs_file)}",
            )
        )
    return result


def _check_causal_lm(path) -> None:
    import json

    from ..errors import StageInputError

    try:
        arch = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return  # the model loader reports unreadable configs with its own message
    if "LlamaForSequenceClassification" in arch:
        raise StageInputError(
            f"align.from: {path} is a reward model (LlamaForSequenceClassification), not a policy; point "
            "align.from at a causal LM such as runs/sft/model (the reward model is read from the reward stage)"
        )


def _rel(ctx: StageContext, p) -> str:
    try:
        return str(p.relative_to(ctx.project_dir))
    except (ValueError, AttributeError):
        return str(p)
