"""memext: extend the memory of language models beyond their attention window, and measure it."""

__version__ = "0.1.0"

from memext.checkpoint import load
from memext.config import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig
from memext.model import build_model
from memext.nn.transformer import LongLM, State

__all__ = [
    "Config",
    "DataConfig",
    "EvalConfig",
    "LongLM",
    "ModelConfig",
    "State",
    "TrainConfig",
    "__version__",
    "build_model",
    "load",
]
