"""The pipelines: text-to-image / editing / in-context (``OmniGen2Pipeline``) and chat (``OmniGen2ChatPipeline``).

Names are imported on first use, as in the package root, so importing a submodule (e.g. ``reflection``) does
not pull in diffusers and transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

_LAZY = {
    "OmniGen2ImageProcessor": ".image_processor",
    "ChatOutput": ".pipeline_chat",
    "OmniGen2ChatPipeline": ".pipeline_chat",
    "ReflectionRound": ".pipeline_chat",
    "SYSTEM_PROMPT": ".pipeline_omnigen2",
    "OmniGen2Pipeline": ".pipeline_omnigen2",
    "OmniGen2PipelineOutput": ".pipeline_omnigen2",
    "PROMPTED": ".reflection",
    "ReflectionProtocol": ".reflection",
}

if TYPE_CHECKING:
    from .image_processor import OmniGen2ImageProcessor
    from .pipeline_chat import ChatOutput, OmniGen2ChatPipeline, ReflectionRound
    from .pipeline_omnigen2 import SYSTEM_PROMPT, OmniGen2Pipeline, OmniGen2PipelineOutput
    from .reflection import PROMPTED, ReflectionProtocol


__getattr__, __dir__ = lazy_names(__name__, _LAZY)


__all__ = [
    "PROMPTED",
    "SYSTEM_PROMPT",
    "ChatOutput",
    "OmniGen2ChatPipeline",
    "OmniGen2ImageProcessor",
    "OmniGen2Pipeline",
    "OmniGen2PipelineOutput",
    "ReflectionProtocol",
    "ReflectionRound",
]
