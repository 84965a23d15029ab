"""Adapters and quantized layers, as module swaps over nn.Linear (docs chapter 5): model.py knows
nothing of them.

    lora.py          LoRALinear: x -> W0 x + (α/r)·B A x over a frozen base layer
    dora.py          DoRALinear: a learned magnitude per output row over the LoRA direction
    adapters.py      the swaps: apply_lora, which parameters train, merge_lora, lora_disabled
    peft_io.py       adapter directories in PEFT's exact layout, both ways
    new_tokens.py    growing the embedding and lm_head for added tokens
    double_quant.py  the NF4 scales stored in 8 bits (QLoRA's double quantization)
    nf4_linear.py    NF4Linear: a frozen 4-bit base layer (kernels/ does the arithmetic), and its
                     load hook
    int8_linear.py   Int8Linear: a frozen LLM.int8 base layer (8-bit weights and activations,
                     outlier columns in 16 bits), and its load hook
"""
