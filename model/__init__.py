"""The hybrid liquid-spiking-Mamba language model. Never imports ``stability``."""

from model.config import ModelConfig
from model.hybrid import BlockAux, HybridLM, HybridOutput

__all__ = ["BlockAux", "HybridLM", "HybridOutput", "ModelConfig"]
