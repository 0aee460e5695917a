"""`llmforge init`: scaffold a project folder from ``llmforge/templates/<name>/``.

A template is a folder holding at least ``llmforge.yaml``; the manifest's first comment line
(``# <name>: <one-line description>``) is what ``llmforge init --list`` shows. ``{{project_name}}`` in any
text file is replaced with the new folder's name.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .errors import UserInputError

TEMPLATES_DIR = Path(__file__).parent / "templates"
_PLACEHOLDER = "{{project_name}}"
_SKIP = {"__pycache__", "runs", ".DS_Store"}
_BINARY_SUFFIXES = {".gz", ".zst", ".parquet", ".bin", ".npy", ".model", ".safetensors", ".warc", ".arrow"}


def available() -> dict[str, str]:
    """Template name → one-line description, sorted with the CPU demo first."""
    out = {}
    for d in sorted(TEMPLATES_DIR.iterdir()):
        m = d / "llmforge.yaml"
        if d.is_dir() and m.exists():
            first = m.read_text(encoding="utf-8").splitlines()[0] if m.stat().st_size else ""
            desc = first.lstrip("#").strip()
            desc = desc.split(":", 1)[1].strip() if desc.lower().startswith(d.name.lower() + ":") else desc
            out[d.name] = desc
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "tiny", kv[0])))


def project_name_for(directory: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(directory).absolute().name).strip("-._")
    return name or "my-llm"


def render(text: str, project_name: str) -> str:
    return text.replace(_PLACEHOLDER, project_name)


def scaffold(template: str, directory: str | Path, *, force: bool = False) -> list[Path]:
    """Copy template files into ``directory``; refuse a non-empty folder unless ``force``."""
    templates = available()
    if template not in templates:
        raise UserInputError(
            f"--template: unknown template {template!r}; available: {', '.join(templates)} (`llmforge init --list`)"
        )
    src = TEMPLATES_DIR / template
    dst = Path(directory)
    if dst.exists() and not dst.is_dir():
        raise UserInputError(f"{dst}: exists and is not a folder")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise UserInputError(
            f"{dst}: folder is not empty; choose a new folder or pass --force to write the template into it "
            "(template files are overwritten, other files are kept)"
        )
    name = project_name_for(dst)
    written: list[Path] = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part in _SKIP for part in rel.parts) or path.is_dir():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in _BINARY_SUFFIXES:
            shutil.copyfile(path, target)
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                shutil.copyfile(path, target)
            else:
                target.write_text(render(text, name), encoding="utf-8")
        written.append(target)
    return written
