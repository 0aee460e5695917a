"""`llmforge train merge-lora`: a PEFT LoRA adapter + its base → one full Hugging Face checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserInputError


def merge_adapter(
    adapter: str | os.PathLike, out: str | os.PathLike, *, base: str | os.PathLike | None = None
) -> Path:
    """Load ``base`` (default: the adapter's ``base_model_name_or_path``) in fp32, fold the adapter in, and
    write ``out`` atomically with the base's tokenizer files. Outputs equal the adapted model's."""
    from ..model import load_pretrained, save_pretrained
    from ..model.lora import load_adapter, merge_lora, read_adapter_config
    from ..train.checkpoint import share_dir
    from ..utils.atomic import atomic_dir

    adapter, out = Path(adapter), Path(out)
    _, raw = read_adapter_config(adapter)
    base_dir = Path(base) if base is not None else Path(str(raw.get("base_model_name_or_path") or ""))
    if not (base_dir / "config.json").is_file():
        raise UserInputError(
            f"{adapter / 'adapter_config.json'}: base model {str(base_dir)!r} is not a local model folder; "
            "pass --base PATH"
        )
    if out.exists() and any(out.iterdir()):
        raise UserInputError(f"--out {out}: the folder exists and is not empty; choose another path")
    import torch

    model = load_pretrained(base_dir, device="cpu", dtype=torch.float32)
    load_adapter(model, adapter)
    merge_lora(model)
    gen = base_dir / "generation_config.json"
    generation_config = json.loads(gen.read_text()) if gen.is_file() else None
    tok_dir = base_dir if (base_dir / "tokenizer.json").is_file() else None
    with atomic_dir(out) as tmp:
        save_pretrained(model, tmp, tokenizer_dir=tok_dir, generation_config=generation_config)
        share_dir(tmp)
    return out
