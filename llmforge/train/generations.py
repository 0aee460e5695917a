"""Teacher answers for black-box distillation, saved as an SFT dataset with its lineage.

Black-box KD (sequence-level KD, Kim & Rush 2016) trains the student with plain SFT on what the teacher
*says* rather than on its logits, so the teacher can be anything that answers chat prompts: a local
checkpoint (llmforge's own generation) or any OpenAI-compatible endpoint (vLLM, TGI, llama.cpp's server, a
hosted API). This module does the asking and the saving; the ``distill`` stage then runs SFT on the result.

* ``read_prompts`` — chat prompts from SFT-format files: a conversation that ends with a user turn is a
  prompt as it is; any other is cut before its last assistant turn.
* ``answer_locally`` — greedy (``sft.answer``) or seeded sampled answers from a ``Llama`` teacher, rendered
  with the project's chat template and stopped at its stop ids.
* ``answer_with_endpoint`` — ``POST {endpoint}/chat/completions`` per prompt with ``httpx``. One request per
  prompt, no retries: a failure is an error naming the endpoint (a retry loop against a broken or
  rate-limiting server only multiplies the damage; re-running the stage asks again).
* ``write_generations`` — ``generations.jsonl`` (``{"messages": [...prompt, {"role": "assistant", ...}]}``
  rows, readable by ``sft_data``) and its sidecar ``generations.lineage.json`` (teacher, endpoint and model,
  settings, prompt files with their hashes, counts), both atomically. ``generations_fingerprint`` of the same
  facts lets the stage reuse an existing set instead of paying for the answers again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..console import get_logger
from ..errors import StageInputError, UserInputError

log = get_logger(__name__)

Conversation = list[dict[str, str]]

GENERATIONS_FILE = "generations.jsonl"
LINEAGE_FILE = "generations.lineage.json"


@dataclass
class PromptStats:
    rows_read: int = 0
    prompts: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"no_user_turn": 0})


def prompt_of(conv: Conversation) -> Conversation | None:
    """The conversation as a prompt: whole if it already ends with a user turn, else cut before its last
    assistant turn; None when that does not end with a user turn (nothing for the teacher to answer)."""
    assistant = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    ends_with_user = bool(conv) and conv[-1]["role"] == "user"
    prompt = list(conv) if ends_with_user or not assistant else conv[: assistant[-1]]
    if not prompt or prompt[-1]["role"] != "user":
        return None
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def read_prompts(files: Sequence[Path], stats: PromptStats | None = None) -> list[Conversation]:
    """Every prompt of ``files`` (SFT-format JSONL/Parquet; see ``prompt_of``), in file order.

    Schema errors (a missing field, an unknown role, invalid UTF-8) are ``StageInputError`` naming the file
    and line, exactly as for SFT data; a conversation with nothing to answer is a counted skip.
    """
    from .sft_data import conversation_from_row, iter_rows, list_sft_files

    stats = stats if stats is not None else PromptStats()
    out: list[Conversation] = []
    for path in list_sft_files(files):
        for where, row in iter_rows(path):
            stats.rows_read += 1
            prompt = prompt_of(conversation_from_row(row, where))
            if prompt is None:
                stats.skipped["no_user_turn"] += 1
                continue
            out.append(prompt)
    stats.prompts = len(out)
    return out


# ------------------------------------------------------------------------------------------------------
# where answers come from
# ------------------------------------------------------------------------------------------------------


def answer_locally(
    teacher,
    tokenizer,
    prompts: Sequence[Conversation],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """The teacher checkpoint's answers: greedy at temperature 0 (the SFT report's ``answer``), else
    sampled with a per-prompt seed (``seed + i``), so a re-run gives the same set."""
    import torch

    from ..model.generation import generate
    from .sft import answer

    if temperature == 0:
        return answer(teacher, tokenizer, list(prompts), max_new_tokens, "cpu")
    was_training = teacher.training
    teacher.eval()
    stop = list(tokenizer.info.stop_ids) or None
    limit = teacher.config.max_position_embeddings
    outs = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = tokenizer.encode_chat(p, add_generation_prompt=True)[0]
            if len(ids) + max_new_tokens > limit:
                ids = ids[-(limit - max_new_tokens) :]
            new = generate(
                teacher, [ids], max_new_tokens, temperature=temperature, seed=seed + i, eos_token_ids=stop
            )[0]
            new = [t for t in new if not stop or t not in stop]
            outs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    teacher.train(was_training)
    return outs


def _endpoint_url(endpoint: str) -> str:
    base = endpoint.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise UserInputError(
            f"distill.generations.endpoint: {endpoint!r} is not an http(s) URL; use e.g. http://host:8000/v1"
        )
    return base + "/chat/completions"


def api_key_from_env(name: str | None) -> str | None:
    """The API key held in the environment variable ``name`` (None when no variable is named)."""
    if name is None:
        return None
    value = os.environ.get(name)
    if not value:
        raise UserInputError(
            f"distill.generations.api_key_env: the environment variable {name} is not set (or empty); "
            "export it, or remove api_key_env for an endpoint without authentication"
        )
    return value


def answer_with_endpoint(
    prompts: Sequence[Conversation],
    *,
    endpoint: str,
    model: str | None,
    api_key: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    timeout_s: float = 60.0,
    seed: int | None = None,
    client=None,
) -> list[str]:
    """One ``POST {endpoint}/chat/completions`` per prompt (OpenAI's request shape); the answers' text.

    Raises ``StageInputError`` naming the endpoint on a connection failure or timeout, a non-200 status
    (with the start of the server's message), or a body that is not an OpenAI chat completion. No retries.
    ``client`` is an ``httpx.Client`` to use instead of a fresh one (tests).
    """
    from ..errors import require

    httpx = require("httpx", extra="serve", purpose="Asking an OpenAI-compatible endpoint for answers")
    if not model:
        raise UserInputError(
            "distill.generations.model: name the model to ask the endpoint for (the `model` field of an "
            "OpenAI chat request, e.g. the name vLLM serves)"
        )
    url = _endpoint_url(endpoint)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    own = client is None
    client = client or httpx.Client(timeout=timeout_s)
    outs: list[str] = []
    try:
        for i, messages in enumerate(prompts):
            body: dict[str, Any] = {
                "model": model,
                "messages": messages,
                "max_tokens": max_new_tokens,
                "temperature": temperature,
            }
            if seed is not None and temperature > 0:
                body["seed"] = seed + i
            try:
                r = client.post(url, json=body, headers=headers, timeout=timeout_s)
            except httpx.TimeoutException:
                raise StageInputError(
                    f"{url}: no answer within {timeout_s:g}s (prompt {i}); raise "
                    "distill.generations.timeout_s or check the server"
                ) from None
            except httpx.HTTPError as err:
                raise StageInputError(
                    f"{url}: cannot reach the endpoint ({type(err).__name__}: {err}); check "
                    "distill.generations.endpoint and that the server is running"
                ) from None
            if r.status_code != 200:
                raise StageInputError(
                    f"{url}: HTTP {r.status_code} for prompt {i}: {r.text[:300].strip() or '(empty body)'}"
                    + ("; check distill.generations.api_key_env" if r.status_code in (401, 403) else "")
                )
            outs.append(_completion_text(r, url, i))
    finally:
        if own:
            client.close()
    return outs


def _completion_text(response, url: str, i: int) -> str:
    try:
        data = response.json()
    except ValueError:
        raise StageInputError(
            f"{url}: the answer to prompt {i} is not JSON ({response.text[:120]!r}); is this an "
            "OpenAI-compatible /v1 endpoint?"
        ) from None
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise StageInputError(
            f"{url}: the answer to prompt {i} is not an OpenAI chat completion (no choices[0].message.content; "
            f"got {json.dumps(data)[:160]})"
        ) from None
    if content is None:
        return ""
    if not isinstance(content, str):
        raise StageInputError(
            f"{url}: choices[0].message.content of prompt {i} is {type(content).__name__}, not text"
        )
    return content.strip()


# ------------------------------------------------------------------------------------------------------
# the dataset and its lineage
# ------------------------------------------------------------------------------------------------------


def generations_fingerprint(
    teacher: dict[str, Any], settings: dict[str, Any], prompt_files: Sequence[Path]
) -> str:
    """Hash of everything that decides the answers: the teacher, the settings, the prompt files' content."""
    from ..utils.hashing import sha256_file

    files = [{"file": str(p), "sha256": sha256_file(p)} for p in prompt_files]
    obj = {"teacher": teacher, "settings": settings, "prompts": files}
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def up_to_date(out_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The lineage of an existing generations set with this fingerprint, or None."""
    lineage, data = out_dir / LINEAGE_FILE, out_dir / GENERATIONS_FILE
    if not (lineage.is_file() and data.is_file()):
        return None
    try:
        raw = json.loads(lineage.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if raw.get("fingerprint") == fingerprint else None


def write_generations(
    out_dir: Path,
    prompts: Sequence[Conversation],
    answers: Sequence[str],
    *,
    fingerprint: str,
    teacher: dict[str, Any],
    settings: dict[str, Any],
    prompt_files: Sequence[Path],
    prompt_stats: PromptStats,
) -> dict[str, Any]:
    """Write the SFT set and its lineage (data first, lineage last: no lineage means no finished set)."""
    from .. import __version__
    from ..utils.atomic import write_json, write_text

    rows, empty = [], 0
    for p, a in zip(prompts, answers, strict=True):
        if not a.strip():
            empty += 1  # an empty answer teaches nothing (and SFT data would skip it anyway)
            continue
        rows.append(json.dumps({"messages": [*p, {"role": "assistant", "content": a}]}, ensure_ascii=False))
    if not rows:
        raise StageInputError(
            f"the teacher gave an empty answer to every one of {len(prompts)} prompts; check the teacher "
            "(and distill.generations.max_new_tokens)"
        )
    (out_dir / LINEAGE_FILE).unlink(missing_ok=True)
    write_text(out_dir / GENERATIONS_FILE, "\n".join(rows) + "\n")
    lineage = {
        "fingerprint": fingerprint,
        "teacher": teacher,
        "settings": settings,
        "prompt_files": [str(p) for p in prompt_files],
        "rows_read": prompt_stats.rows_read,
        "prompts": len(prompts),
        "skipped_prompts": prompt_stats.skipped,
        "empty_answers": empty,
        "count": len(rows),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "llmforge_version": __version__,
    }
    write_json(out_dir / LINEAGE_FILE, lineage)
    log.info("teacher answers: %d rows in %s (%d empty answers left out)", len(rows), out_dir, empty)
    return lineage
