from .image_processor import OmniGen2ImageProcessor
from .pipeline_omnigen2 import SYSTEM_PROMPT, OmniGen2Pipeline, OmniGen2PipelineOutput

__all__ = ["SYSTEM_PROMPT", "OmniGen2ImageProcessor", "OmniGen2Pipeline", "OmniGen2PipelineOutput"]
