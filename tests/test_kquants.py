"""Q4_K / Q5_K / Q6_K: the vectorized encoders of minillm/formats/kquants.py against the
block-at-a-time transcription of ggml's C in tests/kquant_reference.py, byte for byte, on random and
awkward super-blocks; decoding against the grid each block defines; and golden rows that llama.cpp's
own quantizer produced (tests/data/llama_cpp_kquant_golden.json, from the libggml-base of a
llama-cpp-python build; see the README's peer checks)."""

import json
from pathlib import Path

import kquant_reference as ref
import numpy as np
import pytest
import torch
from kquant_reference import awkward_blocks

from minillm.formats import kquants
from minillm.formats.ggml_quants import GGML_Q4_K, GGML_Q5_K, GGML_Q6_K, dequantize, quantize

CODECS = {
    "q4_k": (kquants.quantize_q4_k, kquants.dequantize_q4_k, ref.q4_k_block, 144),
    "q5_k": (kquants.quantize_q5_k, kquants.dequantize_q5_k, ref.q5_k_block, 176),
    "q6_k": (kquants.quantize_q6_k, kquants.dequantize_q6_k, ref.q6_k_block, 210),
}
GOLDEN = Path(__file__).parent / "data" / "llama_cpp_kquant_golden.json"


def reference_bytes(block_fn, x: torch.Tensor) -> bytes:
    # 0/0 inside the C-style fits is expected and discarded, as in C
    with np.errstate(all="ignore"):
        return b"".join(block_fn([ref.F(v) for v in row.tolist()]) for row in x)


@pytest.mark.parametrize("kind", sorted(CODECS))
def test_encoder_matches_reference_bytes(kind):
    quant, _, block_fn, size = CODECS[kind]
    g = torch.Generator().manual_seed(8)
    x = torch.cat([awkward_blocks(),
                   torch.randn(3, 256, generator=g) * torch.tensor([[0.02], [1.0], [3.0]])])
    got = quant(x)
    assert got.shape == (15, size) and got.dtype == torch.uint8
    expected = reference_bytes(block_fn, x)
    for i in range(x.shape[0]):  # name the first super-block that differs
        assert got[i].numpy().tobytes() == expected[i * size : (i + 1) * size], \
            f"{kind}: super-block {i} differs"


def test_all_zero_blocks_exact_bytes():
    z = torch.zeros(1, 256)
    assert kquants.quantize_q6_k(z).numpy().tobytes() == bytes(210)
    # Q4_K: scales and mins 0, d = dmin = fp16(0); every sub-block is flat so L = 0
    assert kquants.quantize_q4_k(z).numpy().tobytes() == bytes(144)
    assert kquants.quantize_q5_k(z).numpy().tobytes() == bytes(176)


def test_vectorized_chunks_and_dispatch(monkeypatch):
    """Chunking over super-blocks and the (R, K) dispatch give the same bytes
    as one call per row."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 768, generator=g)  # 3 rows of 3 super-blocks
    monkeypatch.setattr(kquants, "CHUNK", 2)
    for kind, gtype in (("q4_k", GGML_Q4_K), ("q5_k", GGML_Q5_K), ("q6_k", GGML_Q6_K)):
        quant, _, _, size = CODECS[kind]
        whole = quantize(x, gtype)
        assert whole.shape == (3, 3 * size)
        assert torch.equal(whole.reshape(-1, size), quant(x.reshape(-1, 256)))


@pytest.mark.parametrize("kind", sorted(CODECS))
def test_decode_is_the_nearest_grid_point(kind):
    """decode(encode(x)) is, value by value, the grid point d_j·q - m_j (q in the type's range)
    nearest to x, up to float32 rounding: the requantization step picks exactly that code."""
    quant, dequant, _, _ = CODECS[kind]
    g = torch.Generator().manual_seed(10)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-2, 1, 64)[:, None]
    y = dequant(quant(x))
    sub, nq = (16, 64) if kind == "q6_k" else (32, 16 if kind == "q4_k" else 32)
    # every sub-block's grid, read back from the decoded values of the codes 0..nq-1
    blocks = quant(x)
    grid = torch.stack([dequant(_with_codes(kind, blocks, q)) for q in range(nq)])  # (nq, 64, 256)
    nearest = (grid - x).abs().amin(0)  # (64, 256)
    err = (y - x).abs()
    assert bool((err <= nearest + 1e-6 * x.abs().amax(1, keepdim=True)).all())
    rel = ((y - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()
    assert rel < {"q4_k": 0.12, "q5_k": 0.06, "q6_k": 0.03}[kind]


def _with_codes(kind: str, blocks: torch.Tensor, q: int) -> torch.Tensor:
    """The blocks with every value's code set to q (scales kept)."""
    b = blocks.clone()
    if kind == "q4_k":
        b[:, 16:] = q | (q << 4)
    elif kind == "q5_k":
        b[:, 16:48] = 0xFF if q > 15 else 0
        b[:, 48:] = (q & 15) | ((q & 15) << 4)
    else:
        b[:, :128] = (q & 15) | ((q & 15) << 4)
        h = q >> 4
        b[:, 128:192] = h | (h << 2) | (h << 4) | (h << 6)
    return b


def test_dequantize_dispatch_shapes():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 512, generator=g)
    for gtype in (GGML_Q4_K, GGML_Q5_K, GGML_Q6_K):
        y = dequantize(quantize(x, gtype), gtype, 512)
        assert y.shape == (2, 512) and y.dtype == torch.float32


def test_llama_cpp_golden_blocks():
    """Rows of 256 values quantized by llama.cpp's own code (ggml_quantize_chunk, as
    llama_model_quantize calls it): our bytes must be identical for every type, the
    awkward rows included."""
    golden = json.loads(GOLDEN.read_text())
    x = torch.tensor(np.frombuffer(bytes.fromhex("".join(golden["f32_hex"])),
                                   dtype=np.float32).copy())
    x = x.reshape(len(golden["f32_hex"]), 256)
    # the fixture's inputs are this file's awkward blocks
    assert torch.equal(x[:12], awkward_blocks())
    types = {"Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q4_K": GGML_Q4_K, "Q5_K": GGML_Q5_K,
             "Q6_K": GGML_Q6_K}
    assert sorted(golden["llama_cpp_hex"]) == sorted(types)
    for name, expected in golden["llama_cpp_hex"].items():
        got = quantize(x, types[name])
        for i, row in enumerate(expected):
            assert got[i].numpy().tobytes().hex() == row, f"{name} row {i} differs from llama.cpp"
