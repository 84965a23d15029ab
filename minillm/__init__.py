"""minillm: a readable Llama you can train, fine-tune, quantize and ship."""

from minillm.config import ModelConfig
from minillm.model import Llama

__all__ = ["Llama", "ModelConfig"]
