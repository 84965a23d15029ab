"""Text to token ids and back (docs chapter 3): the SentencePiece tokenizer LLaMA models ship,
training one for a model built from scratch, and the byte-level BPE of SmolLM2, Llama 3 and most
real models since.

    spm_proto.py       SentencePiece's model file (a protobuf), read and written by hand
    sentencepiece.py   `Tokenizer`: encode / decode, added pieces, and `train_tokenizer`
    pretokenize.py     pre-tokenizer regexes (llama.cpp's table, tokenizer.json's steps)
    bpe.py             `BPETokenizer`: byte-level BPE, encode / decode, special tokens
    bpe_files.py       BPE from tokenizer.json and GGUF metadata; tokenizer.json written back
"""
