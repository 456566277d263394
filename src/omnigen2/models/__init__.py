from .attention import BACKENDS, attention
from .transformer_omnigen2 import PRESETS, OmniGen2Transformer2DModel, SequenceLayout, get_freqs_cis

__all__ = ["BACKENDS", "PRESETS", "OmniGen2Transformer2DModel", "SequenceLayout", "attention", "get_freqs_cis"]
