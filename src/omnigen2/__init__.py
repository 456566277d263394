"""OmniGen2: unified image generation (text-to-image, editing, in-context) and understanding."""

from .models import OmniGen2Transformer2DModel
from .pipelines import ChatOutput, OmniGen2ChatPipeline, OmniGen2Pipeline, OmniGen2PipelineOutput

__version__ = "0.1.0"
__all__ = [
    "ChatOutput",
    "OmniGen2ChatPipeline",
    "OmniGen2Pipeline",
    "OmniGen2PipelineOutput",
    "OmniGen2Transformer2DModel",
    "__version__",
]
