"""OmniGen2: unified image generation (text-to-image, editing, in-context) and understanding."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names

__version__ = "0.1.0"

# The public names and the modules defining them, imported on first use: `import omnigen2.cli` (and so
# `omnigen2 --help`) stays free of torch, diffusers and transformers.
_LAZY = {
    "ChatOutput": ".pipelines.pipeline_chat",
    "OmniGen2ChatPipeline": ".pipelines.pipeline_chat",
    "OmniGen2Pipeline": ".pipelines.pipeline_omnigen2",
    "OmniGen2PipelineOutput": ".pipelines.pipeline_omnigen2",
    "OmniGen2Transformer2DModel": ".models.transformer_omnigen2",
}

if TYPE_CHECKING:
    from .models.transformer_omnigen2 import OmniGen2Transformer2DModel
    from .pipelines.pipeline_chat import ChatOutput, OmniGen2ChatPipeline
    from .pipelines.pipeline_omnigen2 import OmniGen2Pipeline, OmniGen2PipelineOutput


__getattr__, __dir__ = lazy_names(__name__, _LAZY)


__all__ = [
    "ChatOutput",
    "OmniGen2ChatPipeline",
    "OmniGen2Pipeline",
    "OmniGen2PipelineOutput",
    "OmniGen2Transformer2DModel",
    "__version__",
]
