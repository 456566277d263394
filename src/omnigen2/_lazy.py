"""Public names imported on first use: a package's ``__init__`` lists them with their modules, so importing
the package (and the CLI, and light submodules) stays free of torch, diffusers and transformers."""

from __future__ import annotations

import importlib
import sys


def lazy_names(package: str, table: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for ``package`` whose names in ``table`` (name -> relative module) load
    from their module on first access."""
    namespace = vars(sys.modules[package])

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name], package), name)
        namespace[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *table})

    return __getattr__, __dir__
