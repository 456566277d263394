from .image_processor import OmniGen2ImageProcessor
from .pipeline_chat import ChatOutput, OmniGen2ChatPipeline, ReflectionRound
from .pipeline_omnigen2 import SYSTEM_PROMPT, OmniGen2Pipeline, OmniGen2PipelineOutput

__all__ = [
    "SYSTEM_PROMPT",
    "ChatOutput",
    "OmniGen2ChatPipeline",
    "OmniGen2ImageProcessor",
    "OmniGen2Pipeline",
    "OmniGen2PipelineOutput",
    "ReflectionRound",
]
