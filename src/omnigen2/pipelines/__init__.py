from .image_processor import OmniGen2ImageProcessor
from .pipeline_chat import ChatOutput, OmniGen2ChatPipeline, ReflectionRound
from .pipeline_omnigen2 import SYSTEM_PROMPT, OmniGen2Pipeline, OmniGen2PipelineOutput
from .reflection import PROMPTED, ReflectionProtocol

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
