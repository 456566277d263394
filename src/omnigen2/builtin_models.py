"""Models shipped inside the package, addressed as ``builtin:NAME``."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent / "builtin"


def available() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if (p / "model_index.json").is_file()) if ROOT.is_dir() else []


def path(name: str) -> Path:
    p = ROOT / name
    if not (p / "model_index.json").is_file():
        names = ", ".join(available()) or "none in this installation"
        raise ValueError(f"no builtin model named {name!r} (available: {names})")
    return p
