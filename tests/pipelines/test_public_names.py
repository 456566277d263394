"""``omnigen2.pipelines`` names its public objects lazily: a submodule such as ``reflection`` imports without
diffusers and transformers, and every public name is the object of its defining module."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import omnigen2.pipelines as pipelines


def test_reflection_module_imports_without_the_heavy_libraries():
    code = (
        "import sys\nimport omnigen2.pipelines.reflection\n"
        "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_public_names_are_their_modules_objects():
    assert sorted(pipelines.__all__) == sorted(pipelines._LAZY)
    for name, module in pipelines._LAZY.items():
        assert getattr(pipelines, name) is getattr(importlib.import_module(module, "omnigen2.pipelines"), name)
    with pytest.raises(AttributeError, match="no attribute 'OmniGen3Pipeline'"):
        pipelines.OmniGen3Pipeline  # noqa: B018
