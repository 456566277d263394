"""Training the OmniGen2 diffusion transformer (full or LoRA) on the original data format."""

from .config import TrainConfig, config_from_dict, load_config
from .data import DataError, MixtureDataset
from .export import export
from .trainer import Trainer

__all__ = ["DataError", "MixtureDataset", "TrainConfig", "Trainer", "config_from_dict", "export", "load_config"]
