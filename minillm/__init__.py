"""minillm: a readable Llama you can train, fine-tune, quantize and ship.

The public face: what a user's script imports, from here, so that files can move inside the package
without breaking anyone. Each name lives in the file its docstring names (`help(minillm.Llama)`).

    from minillm import Llama, load_pretrained, load_tokenizer, generate_text, SamplingConfig

    model = load_pretrained("open_llama_3b_v2", dtype=torch.bfloat16, device="cuda")
    tok = load_tokenizer("open_llama_3b_v2")
    print(generate_text(model, tok, "Q: What is the largest animal?\\nA:",
                        SamplingConfig(temperature=0)))
"""

from minillm.config import ModelConfig
from minillm.finetune.adapters import (
    apply_lora,
    lora_disabled,
    mark_only_lora_trainable,
    merge_lora,
)
from minillm.finetune.int8_linear import Int8Linear, int8_hook
from minillm.finetune.nf4_linear import NF4Linear, nf4_hook
from minillm.finetune.peft_io import load_adapter, save_adapter
from minillm.formats.load import load_pretrained, load_tokenizer
from minillm.generate.sampling import SamplingConfig
from minillm.generate.text import generate_text
from minillm.kernels.int8 import dequantize_int8, quantize_int8
from minillm.model import Llama
from minillm.ship.convert import ExportConfig, export
from minillm.tokenizer.sentencepiece import Tokenizer, train_tokenizer
from minillm.training.adamw8bit import AdamW8bit
from minillm.training.config import TrainConfig, load_config
from minillm.training.loop import train

__all__ = [
    "AdamW8bit", "ExportConfig", "Int8Linear", "Llama", "ModelConfig", "NF4Linear",
    "SamplingConfig", "Tokenizer", "TrainConfig", "apply_lora", "dequantize_int8", "export",
    "generate_text", "int8_hook", "load_adapter", "load_config", "load_pretrained",
    "load_tokenizer", "lora_disabled", "mark_only_lora_trainable", "merge_lora", "nf4_hook",
    "quantize_int8", "save_adapter", "train", "train_tokenizer",
]
