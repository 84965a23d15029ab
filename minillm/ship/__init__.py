"""Shipping (docs chapter 8): merge the adapter, convert, quantize, check.

    gguf_writer.py   a Llama + its tokenizer as a GGUF llama.cpp loads, streamed and atomic
    gguf_bpe.py      a byte-level BPE vocabulary as llama.cpp's gpt2 tokenizer keys
    quant_mix.py     llama-quantize's per-tensor type rules (Q4_K_M, Q5_K_M, ...)
    gguf_lora.py     a LoRA adapter alone as llama.cpp's LoRA GGUF
    convert.py       `export`: merge + write GGUF, HF or Meta (behind export.py)
    doctor.py        is this GGUF a faithful conversion of that checkpoint? Names the fault
"""
