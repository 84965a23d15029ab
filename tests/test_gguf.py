"""GGUF export/import: exact bytes of the header, typed metadata, tensor layout, q/k permutation,
the SentencePiece round trip, and a reader that fails cleanly on truncated or corrupted files."""

import os
import random
import struct
import time

import numpy as np
import pytest
import sentencepiece as spm
import torch
from tiny import tiny_tokenizer

from minillm.config import ModelConfig
from minillm.formats.ggml_quants import (
    GGML_BF16,
    GGML_F16,
    GGML_F32,
    GGML_Q4_0,
    GGML_Q8_0,
    dequantize,
    quantize,
)
from minillm.formats.gguf_layout import ARRAY, BOOL, FLOAT32, INT32, STRING, UINT32, expected_shapes
from minillm.formats.gguf_reader import load_gguf_model, read_gguf, sentencepiece_model_from_gguf
from minillm.names import gguf_to_ours, hf_to_interleaved, interleaved_to_hf
from minillm.ship.gguf_writer import write_gguf

TEXTS = ["def f(x):\n\treturn x  +  1\n", "héllo → 世界", "  two  spaces\n\n\nand\ttabs\t\t",
         "a\nb", "\nabc", ""]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=384)


def make_config(tok, **kw) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                vocab_size=tok.vocab_size, max_seq_len=128, norm_eps=1e-5, rope_theta=500000.0)
    return ModelConfig(**{**base, **kw})


def random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.5 for k, s in expected_shapes(cfg).items()}


@pytest.fixture(scope="module")
def model(tok):
    cfg = make_config(tok)
    return cfg, random_state(cfg)


@pytest.fixture(scope="module")
def files(tok, model, tmp_path_factory):
    cfg, sd = model
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for outtype in ["f32", "f16", "bf16", "q8_0", "q4_0"]:
        out[outtype] = d / f"m-{outtype}.gguf"
        write_gguf(out[outtype], cfg, iter(sd.items()), tok, outtype, progress=False)
    return out


def file_layout(cfg: ModelConfig, key: str, w: torch.Tensor) -> torch.Tensor:
    """What the file must hold for a weight: q/k rows permuted to interleaved RoPE pairs."""
    if key.endswith("q_proj.weight"):
        return hf_to_interleaved(w, cfg.n_heads)
    if key.endswith("k_proj.weight"):
        return hf_to_interleaved(w, cfg.n_kv_heads)
    return w


def pstr(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


# --------------------------------------------------------------------------------------------------
# header, metadata, layout


def test_header_bytes(files, model):
    cfg, _ = model
    raw = files["f32"].read_bytes()
    n_tensors = 2 + 9 * cfg.n_layers + 1  # token_embd, blocks, output_norm, output
    # general.* + llama.* keys, tokenizer keys (no pad id in our tokenizer), then minillm.writer
    n_kv = 14 + 11 + 1
    assert raw[:24] == (b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", n_tensors)
                        + struct.pack("<Q", n_kv))
    first_kv = pstr("general.architecture") + struct.pack("<I", 8) + pstr("llama")
    assert raw[24 : 24 + len(first_kv)] == first_kv
    assert raw[24 + len(first_kv) :].startswith(pstr("general.name") + struct.pack("<I", 8)
                                                + pstr("minillm"))


def test_metadata_types_and_values(files, model, tok):
    cfg, _ = model
    file_types = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}
    for outtype, path in files.items():
        g = read_gguf(path)
        assert g.metadata["general.file_type"] == file_types[outtype]
        assert g.value_types["general.file_type"] == (UINT32, None)
    g = read_gguf(files["f32"])
    expected = {
        "general.architecture": (STRING, "llama"),
        "general.quantization_version": (UINT32, 2),
        "llama.context_length": (UINT32, 128),
        "llama.embedding_length": (UINT32, 64),
        "llama.block_count": (UINT32, 2),
        "llama.feed_forward_length": (UINT32, 96),
        "llama.rope.dimension_count": (UINT32, 16),
        "llama.attention.head_count": (UINT32, 4),
        "llama.attention.head_count_kv": (UINT32, 2),
        "llama.attention.layer_norm_rms_epsilon": (FLOAT32, float(np.float32(1e-5))),
        "llama.rope.freq_base": (FLOAT32, 500000.0),
        "tokenizer.ggml.model": (STRING, "llama"),
        "tokenizer.ggml.pre": (STRING, "default"),
        "tokenizer.ggml.bos_token_id": (UINT32, 1),
        "tokenizer.ggml.eos_token_id": (UINT32, 2),
        "tokenizer.ggml.unknown_token_id": (UINT32, 0),
        "tokenizer.ggml.add_bos_token": (BOOL, True),
        "tokenizer.ggml.add_eos_token": (BOOL, False),
    }
    for key, (vtype, value) in expected.items():
        assert g.value_types[key] == (vtype, None), key
        assert g.metadata[key] == value, key
    assert "general.alignment" not in g.metadata and g.alignment == 32
    assert g.value_types["tokenizer.ggml.tokens"] == (ARRAY, STRING)
    assert g.value_types["tokenizer.ggml.scores"] == (ARRAY, FLOAT32)
    assert g.value_types["tokenizer.ggml.token_type"] == (ARRAY, INT32)


def test_tokenizer_metadata_matches_sentencepiece(files, tok):
    g = read_gguf(files["q8_0"])
    sp = tok.sp
    n = sp.GetPieceSize()
    assert g.metadata["tokenizer.ggml.tokens"] == [sp.IdToPiece(i) for i in range(n)]
    assert g.metadata["tokenizer.ggml.scores"].tolist() == [sp.GetScore(i) for i in range(n)]
    types = g.metadata["tokenizer.ggml.token_type"].tolist()
    assert types[:3] == [2, 3, 3]  # <unk> UNKNOWN, <s> </s> CONTROL
    pieces = g.metadata["tokenizer.ggml.tokens"]
    # user-defined, written NORMAL as llama.cpp's converter does
    assert types[pieces.index("\n")] == 1
    assert types[pieces.index("<0x0A>")] == 6  # byte fallback pieces
    assert "▁" in pieces and all(t == 1 for t, p in zip(types, pieces, strict=True)
                                 if p.startswith("▁"))
    assert types.count(6) == 256


def test_tensor_infos_offsets_and_dims(files, model):
    cfg, _ = model
    for path in files.values():
        g = read_gguf(path)
        assert g.data_start % 32 == 0
        assert all(t.offset % 32 == 0 for t in g.tensors.values())
        assert os.path.getsize(path) == g.data_start + sum((t.nbytes + 31) // 32 * 32
                                                           for t in g.tensors.values())
    # dims are stored innermost first: find token_embd's info in the raw bytes and decode it by hand
    raw = files["f32"].read_bytes()
    at = raw.index(pstr("token_embd.weight")) + len(pstr("token_embd.weight"))
    n_dims, d0, d1, ggml_type, offset = struct.unpack("<IQQIQ", raw[at : at + 32])
    assert (n_dims, d0, d1, ggml_type, offset) == (2, cfg.dim, cfg.vocab_size, GGML_F32, 0)
    at = raw.index(pstr("blk.0.ffn_down.weight")) + len(pstr("blk.0.ffn_down.weight"))
    assert struct.unpack("<IQQI", raw[at : at + 24]) == (2, cfg.hidden_dim, cfg.dim, GGML_F32)


def test_types_per_outtype(files, tok):
    expect = {"f32": GGML_F32, "f16": GGML_F16, "bf16": GGML_BF16, "q8_0": GGML_Q8_0,
              "q4_0": GGML_Q4_0}
    for outtype, path in files.items():
        g = read_gguf(path)
        for name, t in g.tensors.items():
            want = GGML_F32 if len(t.shape) == 1 else expect[outtype]
            if outtype == "q4_0" and name == "output.weight":
                want = GGML_Q8_0  # our stand-in for llama-quantize's Q6_K output
            assert t.ggml_type == want, (outtype, name)


# --------------------------------------------------------------------------------------------------
# tensor data


def test_f32_round_trip_exact(files, model):
    cfg, sd = model
    cfg2, sd2, _ = load_gguf_model(files["f32"])
    assert cfg2 == cfg
    assert sd2.keys() == sd.keys()
    for k in sd:
        assert torch.equal(sd2[k], sd[k]), k
    # on disk q/k are in the interleaved layout
    g = read_gguf(files["f32"])
    assert torch.equal(g.tensor("blk.1.attn_k.weight"),
                       hf_to_interleaved(sd["layers.1.self_attn.k_proj.weight"], 2))
    assert torch.equal(g.tensor("blk.0.attn_q.weight"),
                       hf_to_interleaved(sd["layers.0.self_attn.q_proj.weight"], 4))


@pytest.mark.parametrize("outtype,convert", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_types_exact(files, model, outtype, convert):
    _, sd = model
    _, sd2, _ = load_gguf_model(files[outtype])
    for k in sd:
        want = sd[k] if sd[k].dim() == 1 else sd[k].to(convert).float()
        assert torch.equal(sd2[k], want), k


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_quantized_bytes_and_values(files, model, outtype):
    cfg, sd = model
    g = read_gguf(files[outtype])
    _, sd2, _ = load_gguf_model(files[outtype])
    for name, t in g.tensors.items():
        key = gguf_to_ours(name)
        w = file_layout(cfg, key, sd[key])
        if t.ggml_type in (GGML_Q8_0, GGML_Q4_0):
            assert np.array_equal(g.raw(name), quantize(w, t.ggml_type).numpy().reshape(-1)), name
    # dequantized values are the reference formulas' values: check one block by hand
    raw = g.raw("blk.0.ffn_up.weight")
    d = float(np.frombuffer(raw[:2].tobytes(), dtype=np.float16)[0])
    if outtype == "q8_0":
        q = np.frombuffer(raw[2:34].tobytes(), dtype=np.int8).astype(np.float32)
    else:
        b = raw[2:18]
        q = np.concatenate([b & 0x0F, b >> 4]).astype(np.float32) - 8
    assert sd2["layers.0.mlp.up_proj.weight"][0, :32].tolist() == (q * np.float32(d)).tolist()
    err = (sd2["layers.0.mlp.up_proj.weight"]
           - sd["layers.0.mlp.up_proj.weight"]).abs().max().item()
    assert err < (0.02 if outtype == "q8_0" else 0.3)


def test_f16_fallback_for_rows_not_multiple_of_block(tok, tmp_path, capsys):
    cfg = make_config(tok, n_layers=1, hidden_dim=80)  # ffn_down rows have 80 values
    sd = random_state(cfg, seed=1)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, sd.items(), tok, "q4_0", progress=False)
    assert "blk.0.ffn_down.weight rows have 80 values" in capsys.readouterr().err
    g = read_gguf(path)
    assert g.tensors["blk.0.ffn_down.weight"].ggml_type == GGML_F16
    # rows of dim=64 quantize normally
    assert g.tensors["blk.0.ffn_up.weight"].ggml_type == GGML_Q4_0
    _, sd2, _ = load_gguf_model(path)
    assert torch.equal(sd2["layers.0.mlp.down_proj.weight"],
                       sd["layers.0.mlp.down_proj.weight"].half().float())


def test_tied_embeddings_and_any_order_callable_stream(tok, tmp_path):
    cfg = make_config(tok, n_layers=1, tie_embeddings=True)
    sd = random_state(cfg, seed=2)
    items = list(reversed(list(sd.items()))) + [("lm_head.weight", sd["embed_tokens.weight"])]
    path = tmp_path / "tied.gguf"
    write_gguf(path, cfg, lambda: iter(items), tok, "q4_0", progress=False)
    g = read_gguf(path)
    assert "output.weight" not in g.tensors
    assert g.tensors["token_embd.weight"].ggml_type == GGML_Q8_0  # it produces the logits
    cfg2, sd2, _ = load_gguf_model(path)
    assert cfg2.tie_embeddings and "lm_head.weight" not in sd2
    assert torch.equal(sd2["layers.0.self_attn.q_proj.weight"],
                       _q4_round_trip(sd["layers.0.self_attn.q_proj.weight"], cfg.n_heads))


def _q4_round_trip(w_hf, n_heads):
    w = hf_to_interleaved(w_hf, n_heads)
    return interleaved_to_hf(dequantize(quantize(w, GGML_Q4_0), GGML_Q4_0,
                                        w.shape[1]).reshape(w.shape), n_heads)


# --------------------------------------------------------------------------------------------------
# RoPE: rotate-half on HF weights == interleaved RoPE on the permuted weights in the file


def rope_rotate_half(x, pos, theta):  # x (T, H, Dh)
    Dh = x.shape[-1]
    ang = pos[:, None] * theta ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)  # (T, Dh/2)
    cos, sin = (torch.cat([ang.cos(), ang.cos()], -1)[:, None],
                torch.cat([ang.sin(), ang.sin()], -1)[:, None])
    x1, x2 = x[..., : Dh // 2], x[..., Dh // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def rope_interleaved(x, pos, theta):  # pairs (2i, 2i+1), as llama.cpp's LLAMA rope type
    T, H, Dh = x.shape
    ang = pos[:, None] * theta ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)  # (T, Dh/2)
    xc = torch.view_as_complex(x.reshape(T, H, Dh // 2, 2).contiguous())  # (T, H, Dh/2)
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)[:, None]).reshape(
        T, H, Dh)


def attention_scores(x, wq, wk, cfg, rope):
    T = x.shape[0]
    pos = torch.arange(T, dtype=torch.float64)
    q = rope((x @ wq.T).view(T, cfg.n_heads, cfg.head_dim), pos, cfg.rope_theta)  # (T, H, Dh)
    k = rope((x @ wk.T).view(T, cfg.n_kv_heads, cfg.head_dim), pos, cfg.rope_theta)  # (T, Hkv, Dh)
    k = k.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)  # (T, H, Dh)
    return torch.einsum("thd,shd->hts", q, k)  # (H, T, T)


def test_qk_permutation_preserves_rope_attention(files, model):
    cfg, sd = model
    g = read_gguf(files["f32"])
    x = torch.randn(7, cfg.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    hf = attention_scores(x, sd["layers.1.self_attn.q_proj.weight"].double(),
                          sd["layers.1.self_attn.k_proj.weight"].double(), cfg, rope_rotate_half)
    gg = attention_scores(x, g.tensor("blk.1.attn_q.weight").double(),
                          g.tensor("blk.1.attn_k.weight").double(), cfg, rope_interleaved)
    assert (gg - hf).abs().max() < 1e-10 * hf.abs().max()
    # without the permutation the scores differ: the test can tell
    wrong = attention_scores(x, sd["layers.1.self_attn.q_proj.weight"].double(),
                             sd["layers.1.self_attn.k_proj.weight"].double(), cfg, rope_interleaved)
    assert (wrong - hf).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# tokenizer rebuilt from metadata


def test_rebuilt_tokenizer_encodes_like_original(files, tok):
    _, _, model_bytes = load_gguf_model(files["q4_0"])
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    assert sp.GetPieceSize() == tok.vocab_size
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()) == (1, 2, 0, -1)
    for text in TEXTS:
        assert sp.EncodeAsIds(text) == tok.sp.EncodeAsIds(text), text
        assert sp.DecodeIds(sp.EncodeAsIds(text)) == text
    assert sentencepiece_model_from_gguf(read_gguf(files["f32"])) == model_bytes


# --------------------------------------------------------------------------------------------------
# errors and atomic writes


def test_bad_outtype_and_mismatches(tok, model, tmp_path):
    cfg, sd = model
    path = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match="unknown GGUF outtype 'q3_k'"):
        write_gguf(path, cfg, sd.items(), tok, "q3_k", progress=False)
    with pytest.raises(ValueError, match="384 pieces but the model's embedding has 400 rows"):
        write_gguf(path, make_config(tok, vocab_size=400), sd.items(), tok, "f32", progress=False)
    bad = dict(sd, **{"layers.0.mlp.up_proj.weight": torch.zeros(96, 65)})
    with pytest.raises(ValueError, match=r"up_proj.weight' has shape \(96, 65\), expected "
                                         r"\(96, 64\)"):
        write_gguf(path, cfg, bad.items(), tok, "f32", progress=False)
    with pytest.raises(ValueError, match="tensors never arrived"):
        write_gguf(path, cfg, list(sd.items())[:-1], tok, "f32", progress=False)
    with pytest.raises(ValueError, match="'rotary.inv_freq' is not a weight"):
        write_gguf(path, cfg, [("rotary.inv_freq", torch.ones(8))], tok, "f32", progress=False)
    assert list(tmp_path.iterdir()) == []  # no output and no temporary file after any failure


def test_failed_write_leaves_old_file_and_no_temp(tok, model, tmp_path):
    cfg, sd = model
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, sd.items(), tok, "f32", progress=False)  # an earlier export of ours
    old = path.read_bytes()

    def exploding():
        for i, item in enumerate(sd.items()):
            if i == 5:
                raise RuntimeError("disk on fire")
            yield item

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_gguf(path, cfg, exploding(), tok, "q8_0", progress=False)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    blocker = tmp_path / "not_a_dir"
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        write_gguf(blocker / "m.gguf", cfg, sd.items(), tok, "f32", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "not_a_dir"]


def test_reader_rejects_garbage(tmp_path, files):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="too small for a GGUF header"):
        read_gguf(p)
    p.write_bytes(b"GGML" + bytes(40))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(p)
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 2, 0, 0))
    with pytest.raises(ValueError, match="GGUF version 2"):
        read_gguf(p)
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60) + bytes(16))
    with pytest.raises(ValueError, match="impossible in a 40-byte file"):
        read_gguf(p)
    # a string array claiming 2^40 elements must fail before allocating anything
    kv = pstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**40) + bytes(64)
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv)
    with pytest.raises(ValueError, match="claims 1099511627776 strings"):
        read_gguf(p)


def test_truncated_and_corrupted_files_fail_cleanly(tok, tmp_path):
    cfg = make_config(tok, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64)
    src = tmp_path / "small.gguf"
    write_gguf(src, cfg, random_state(cfg, seed=3).items(), tok, "q8_0", progress=False)
    good = src.read_bytes()
    header_end = read_gguf(src).data_start
    rng = random.Random(0)
    cut_points = sorted(set(range(0, header_end, 37))
                        | {rng.randrange(header_end, len(good)) for _ in range(20)})
    flip_points = sorted(rng.sample(range(header_end), 200)
                         + rng.sample(range(header_end, len(good)), 20))
    p = tmp_path / "fuzz.gguf"
    outcomes = {"loaded": 0, "rejected": 0}

    def attempt(data: bytes):
        p.write_bytes(data)
        t0 = time.perf_counter()
        try:
            load_gguf_model(p)
            outcomes["loaded"] += 1
        except ValueError as e:
            assert str(p) in str(e)
            outcomes["rejected"] += 1
        assert time.perf_counter() - t0 < 2.0

    for cut in cut_points:
        attempt(good[:cut])
    for at in flip_points:
        attempt(good[:at] + bytes([good[at] ^ (1 << rng.randrange(8))]) + good[at + 1 :])
    assert outcomes["rejected"] >= len(cut_points) - 20  # every cut inside the header is rejected
    assert outcomes["loaded"] > 0  # flips inside tensor data or scores still load


def test_added_tokens_are_user_defined_and_chat_template_is_written(tok, tmp_path):
    """A non-whitespace USER_DEFINED piece (an added token) is written USER_DEFINED (4),
    whitespace ones NORMAL (1); the Jinja chat template is stored verbatim; the rebuilt
    tokenizer keeps the added token whole."""
    from minillm.data.templates import JINJA
    from minillm.tokenizer.sentencepiece import Tokenizer
    from minillm.tokenizer.spm_proto import bpe_model_proto, piece_types

    sp = tok.sp
    n = sp.GetPieceSize()
    pieces = [sp.IdToPiece(i) for i in range(n)] + ["<|im_start|>"]
    scores = [sp.GetScore(i) for i in range(n)] + [0.0]
    types = piece_types(tok.model_bytes(), "tok") + [4]
    ids = {"unknown": 0, "bos": 1, "eos": 2, "padding": -1}
    tok2 = Tokenizer(model_bytes=bpe_model_proto(pieces, scores, types, ids, add_dummy_prefix=True))
    cfg = make_config(tok2)
    path = tmp_path / "added.gguf"
    write_gguf(path, cfg, random_state(cfg).items(), tok2, "f32", progress=False,
               chat_template=JINJA["vicuna"])
    g = read_gguf(path)
    written = g.metadata["tokenizer.ggml.token_type"].tolist()
    assert (written[-1] == 4 and written[pieces.index("\n")] == 1
            and written[pieces.index("\t")] == 1)
    assert g.metadata["tokenizer.chat_template"] == JINJA["vicuna"]
    assert g.value_types["tokenizer.chat_template"] == (STRING, None)
    rebuilt = spm.SentencePieceProcessor()
    rebuilt.LoadFromSerializedProto(sentencepiece_model_from_gguf(g))
    assert rebuilt.EncodeAsIds("a<|im_start|>b") == tok2.sp.EncodeAsIds("a<|im_start|>b")
    assert n in rebuilt.EncodeAsIds("a<|im_start|>b")


def test_a_gguf_is_written_only_over_a_gguf_minillm_wrote(tok, model, tmp_path):
    cfg, sd = model
    user = tmp_path / "theirs.gguf"
    user.write_bytes(b"GGUF from llama.cpp, or a report someone named .gguf")
    with pytest.raises(FileExistsError, match="theirs.gguf: exists and is a file minillm did not "
                                              "write"):
        write_gguf(user, cfg, sd.items(), tok, "f32", progress=False)
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(FileExistsError, match="dir.gguf: exists and is a directory"):
        write_gguf(tmp_path / "dir.gguf", cfg, sd.items(), tok, "f32", progress=False)
    assert user.read_bytes().startswith(b"GGUF from") and (tmp_path / "dir.gguf").is_dir()
    ours = tmp_path / "ours.gguf"
    write_gguf(ours, cfg, sd.items(), tok, "f32", progress=False)
    assert read_gguf(ours).metadata["minillm.writer"] == "minillm"
    write_gguf(ours, cfg, sd.items(), tok, "q8_0", progress=False)  # replacing our own: fine
    assert read_gguf(ours).metadata["general.file_type"] == 7
