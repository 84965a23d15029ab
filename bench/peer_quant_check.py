"""Peer check: minillm's K-quant / llama-quantize mixes against llama.cpp itself, tensor for
tensor, byte for byte.

    # needs llama-cpp-python in that venv
    /work/peers/venv/bin/python bench/peer_quant_check.py
    # also rewrite the tests' golden fixtures
    /work/peers/venv/bin/python bench/peer_quant_check.py --fixtures

Not part of the test suite (llama-cpp-python is never a minillm dependency). Steps:
1. a random tiny Llama (8 layers, so use_more_bits picks layers 0, 3, 6, 7; rows of 256 values in
   the attention and ffn_gate/up, rows of 320 in ffn_down, so the Q4_K -> Q5_0 / Q6_K -> Q8_0
   fallbacks fire), with awkward rows planted in token_embd (zeros, a constant, an outlier, tiny
   values, negatives only);
2. minillm writes it as f32 GGUF; llama.cpp's `llama_model_quantize` (the code `llama-quantize`
   runs) quantizes that file to each file type; minillm writes the same file type from the same
   weights;
3. the two files are compared: general.file_type, each tensor's ggml type, and its bytes (differing
   blocks are counted per tensor); then llama.cpp loads and runs minillm's file and minillm runs
   llama.cpp's file, and their last-position logits are compared.
Also: the awkward rows of tests/kquant_reference.py go through `ggml_quantize_chunk` of the
libggml-base that llama-cpp-python bundles (the call llama_model_quantize makes per tensor) for
every new type.
With --fixtures it writes tests/data/llama_cpp_mix_types.json (the types llama.cpp chose) and
tests/data/llama_cpp_kquant_golden.json (those rows and llama.cpp's bytes for them).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import llama_cpp  # noqa: E402
from tiny import tiny_tokenizer  # noqa: E402

from minillm.config import ModelConfig  # noqa: E402
from minillm.formats.ggml_quants import GGML_TYPES, type_name  # noqa: E402
from minillm.formats.gguf_reader import read_gguf  # noqa: E402
from minillm.model import Llama  # noqa: E402
from minillm.ship.gguf_writer import write_gguf  # noqa: E402
from minillm.ship.quant_mix import FILE_TYPES  # noqa: E402

MIXES = ["q4_k_m", "q5_k_m", "q6_k", "q4_k_s", "q5_k_s", "q4_1", "q5_0", "q5_1"]
GOLDEN_TYPES = (3, 6, 7, 12, 13, 14)  # Q4_1 Q5_0 Q5_1 Q4_K Q5_K Q6_K


def ggml_quantize_chunk(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """(rows, n) float32 -> (rows, row bytes) uint8 through the libggml-base llama-cpp-python
    bundles."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(next(lib_dir.glob("libggml-base.so*"))))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    x = np.ascontiguousarray(x, dtype=np.float32)
    row_bytes = x.shape[1] // GGML_TYPES[ggml_type][1] * GGML_TYPES[ggml_type][2]
    out = np.zeros((x.shape[0], row_bytes), np.uint8)
    lib.ggml_quantize_chunk(ggml_type, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                            None)
    return out


def golden_rows() -> dict:
    from kquant_reference import awkward_blocks

    from minillm.formats.ggml_quants import quantize

    g = torch.Generator().manual_seed(12)
    x = torch.cat([awkward_blocks(), torch.randn(2, 256, generator=g) * 0.02]).numpy()
    out = {type_name(t): ggml_quantize_chunk(x, t) for t in GOLDEN_TYPES}
    for t in GOLDEN_TYPES:
        same = (quantize(torch.from_numpy(x), t).numpy() == out[type_name(t)]).all(axis=1)
        print(f"ggml_quantize_chunk {type_name(t)}: {int(same.sum())}/{len(same)} rows identical "
              f"to minillm's")
    return {"source": f"ggml_quantize_chunk (as llama_model_quantize calls it) from the "
                      f"libggml-base of llama-cpp-python {llama_cpp.__version__}, "
                      f"built from source on x86-64",
            "inputs": "rows 0-11: tests/kquant_reference.py awkward_blocks(); "
                      "rows 12-13: 0.02 * randn",
            "f32_hex": [r.tobytes().hex() for r in x],
            "llama_cpp_hex": {k: [r.tobytes().hex() for r in v] for k, v in out.items()}}


def random_model(cfg: ModelConfig) -> Llama:
    torch.manual_seed(0)
    model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                # heavier tails
                p.copy_(0.02 * torch.randn_like(p) + 0.002 * torch.randn_like(p).pow(3))
        e = model.embed_tokens.weight  # (V, dim): rows are 256-value super-blocks
        e[0] = 0.0  # all-zero super-block
        e[1] = 0.37  # constant
        e[2, 5] = 3.0  # one outlier
        e[3] = torch.rand(cfg.dim) * 1e-20  # tiny: fp16 scales underflow
        e[4] = -torch.rand(cfg.dim)  # negative only
        e[5] = torch.round(torch.randn(cfg.dim) * 4) / 4  # coarse grid: exact ties
    return model


def llama_cpp_quantize(src: Path, dst: Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}, ftype {ftype}) returned {rc}")


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False,
                          logits_all=True)
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1], dtype=np.float32)


def minillm_logits(path: Path, ids: list[int]) -> np.ndarray:
    model = Llama.from_pretrained(path)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0, -1].float().numpy()


def compare(ours: Path, theirs: Path) -> dict:
    a, b = read_gguf(ours), read_gguf(theirs)
    out = {"file_type": (a.metadata["general.file_type"], b.metadata["general.file_type"]),
           "tensors": {}}
    for name, tb in b.tensors.items():
        ta = a.tensors[name]
        ra, rb = a.raw(name), b.raw(name)
        _, block, size = GGML_TYPES[tb.ggml_type]
        diff_blocks = None
        if ta.ggml_type == tb.ggml_type:
            diff_blocks = int((ra.reshape(-1, size) != rb.reshape(-1, size)).any(axis=1).sum())
        out["tensors"][name] = {"ours": type_name(ta.ggml_type),
                                "llama.cpp": type_name(tb.ggml_type),
                                "blocks": rb.size // size, "differing_blocks": diff_blocks}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", action="store_true", help="rewrite tests/data/llama_cpp_*.json")
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="peer-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(work / "tokenizer.model")
    cfg = ModelConfig(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, hidden_dim=320,
                      vocab_size=tok.vocab_size, max_seq_len=64)
    model = random_model(cfg)
    state = dict(model.state_dict())
    f32 = work / "f32.gguf"
    write_gguf(f32, cfg, state.items(), tok, "f32", progress=False)
    ids = [1, 15, 200, 31, 7, 99, 250, 3]
    report, types, file_types = {}, {}, {}
    all_equal = True
    for mix in MIXES:
        theirs, ours = work / f"llama-{mix}.gguf", work / f"minillm-{mix}.gguf"
        llama_cpp_quantize(f32, theirs, FILE_TYPES[mix].ftype)
        write_gguf(ours, cfg, state.items(), tok, mix, progress=False)
        r = compare(ours, theirs)
        bad_types = {n: (t["ours"], t["llama.cpp"]) for n, t in r["tensors"].items()
                     if t["ours"] != t["llama.cpp"]}
        diff = {n: f"{t['differing_blocks']}/{t['blocks']}" for n, t in r["tensors"].items()
                if t["differing_blocks"]}
        same = r["file_type"][0] == r["file_type"][1] and not bad_types and not diff
        all_equal &= same
        l_ours = llama_cpp_logits(ours, ids)  # llama.cpp runs minillm's file
        l_theirs = llama_cpp_logits(theirs, ids)
        m_theirs = minillm_logits(theirs, ids)  # minillm runs llama.cpp's file
        scale = float(np.abs(l_theirs).max())
        report[mix] = {
            "file_type (ours, llama.cpp)": r["file_type"], "type mismatches": bad_types,
            "byte-differing blocks": diff,
            "llama.cpp logits on our file vs its own, max |diff|":
                float(np.abs(l_ours - l_theirs).max()),
            "minillm logits on llama.cpp's file vs llama.cpp's, max |diff| / max |logit|":
                float(np.abs(m_theirs - l_theirs).max()) / scale,
        }
        print(f"{mix}: {'IDENTICAL' if same else 'DIFFERENT'} {json.dumps(report[mix])}",
              flush=True)
        types[mix] = {n: t["llama.cpp"] for n, t in r["tensors"].items()}
        file_types[mix] = r["file_type"][1]
    print("ALL IDENTICAL" if all_equal else "SOME DIFFERENCES (see above)")
    golden = golden_rows()
    if args.fixtures:
        data = ROOT / "tests" / "data"
        data.mkdir(exist_ok=True)
        config = {k: v for k, v in asdict(cfg).items()
                  if k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size",
                           "max_seq_len")}
        (data / "llama_cpp_mix_types.json").write_text(json.dumps(
            {"source": f"llama-cpp-python {llama_cpp.__version__} llama_model_quantize",
             "config": config, "file_type": file_types, "types": types}, indent=1) + "\n")
        (data / "llama_cpp_kquant_golden.json").write_text(json.dumps(golden, indent=1) + "\n")
        print(f"wrote fixtures in {data}")


if __name__ == "__main__":
    main()
