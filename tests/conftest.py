"""Shared test fixtures: the official-tiny reference checkpoint and a pipeline loaded from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fixtures_root() -> Path:
    """The folder holding official-tiny/: a copy of the shared reference fixtures ships in tests/fixtures (3 MB),
    so a fresh clone runs every parity test; OMNIGEN2_FIXTURES points elsewhere (e.g. ../shared/fixtures)."""
    root = Path(os.environ.get("OMNIGEN2_FIXTURES", REPO / "tests" / "fixtures"))
    if not (root / "official-tiny" / "checkpoint" / "model_index.json").is_file():
        raise RuntimeError(
            f"official-tiny fixtures not found under {root}; set OMNIGEN2_FIXTURES to the folder that holds "
            "official-tiny/ (the repository carries them as tests/fixtures/official-tiny)"
        )
    return root


@pytest.fixture(scope="session")
def official_tiny() -> Path:
    return fixtures_root() / "official-tiny"


@pytest.fixture(scope="session")
def tiny_pipe(official_tiny):
    from omnigen2 import OmniGen2Pipeline

    pipe = OmniGen2Pipeline.from_pretrained(official_tiny / "checkpoint")
    pipe.set_progress_bar_config(disable=True)
    return pipe
