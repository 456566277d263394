"""The experiments' tests use the main suite's fixtures (the official-tiny checkpoint and a pipeline on it)."""

from tests.conftest import official_tiny, tiny_pipe  # noqa: F401
