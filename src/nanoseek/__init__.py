"""nanoseek: an open, frugal LLM stack — train, align, run and serve open-weight models."""

from nanoseek.loading import load, save
from nanoseek.model.config import ConfigError, DeepseekV3Config
from nanoseek.tokenizer import load_tokenizer
from nanoseek.weights.safetensors_io import WeightsError

__all__ = ["ConfigError", "DeepseekV3Config", "WeightsError", "load", "load_tokenizer", "save", "__version__"]
__version__ = "0.1.0"
