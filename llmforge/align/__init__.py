"""llmforge.align — the ``reward`` and ``align`` stages, each a recipe on ``llmforge.train``'s pieces.

* ``reward`` — the reward model (scalar head saved as ``LlamaForSequenceClassification``, Bradley–Terry loss),
  ``score`` / ``score_file`` for everything that needs a reward-model score; ``run_reward`` is the stage body.
* ``preference_data`` — preference rows (``prompt``/``messages``, ``chosen``, ``rejected``) → chat-template
  tokens → pair batches, with bad rows counted and reported.
* ``dpo`` — DPO, cDPO, IPO, SimPO, ORPO losses (pure functions) and the DPO recipe (``dpo.run``).
* ``stage`` — ``run_align``: resolve the policy, optional rejection sampling, then dpo / grpo / ppo.
* ``rewards``, ``rollout``, ``grpo``, ``ppo``, ``rejection`` — reward functions and the RL methods.

Nothing is imported here: ``llmforge --help`` must not import torch.
"""
