"""GGUF doctor: is this GGUF a faithful conversion of that HF checkpoint? It names the fault if not.

    python3 run.py doctor model.gguf --against path/to/hf_dir      (= python -m minillm.ship.doctor)

Works on any Llama GGUF (ours, or one llama.cpp's `convert_hf_to_gguf.py` wrote). Five checks, each
comparing the file with the HF directory it claims to come from:

1. tokenizer   the GGUF's vocabulary (pieces, scores, types → the SentencePiece model llama.cpp
               applies) tokenizes probe texts (tabs, runs of spaces, newlines, unicode, code) into
               the same ids as the HF tokenizer.model; special token ids agree.
2. metadata    vocab size, layers, widths, heads / KV heads, RMSNorm eps, RoPE theta and dimensions,
               context length: each equal to HF's config (floats compared after rounding to
               float32).
3. q/k layout  llama.cpp wants q/k rows in interleaved RoPE pairs: HF's weight permuted once
               (names.hf_to_interleaved, k with the KV head count). Each attn_q / attn_k is compared
               with HF's weight permuted 0, 1 and 2 times (and, for k, with the query head count, a
               GQA bug): the closest candidate names the layout the converter produced.
4. tensors     every tensor, dequantized, against HF's weight: relative RMS error ‖W' − W‖ / ‖W‖
               within what its ggml type allows. A tensor far off is matched against every HF weight
               of its shape, so a swapped tensor is named with the weight it really holds.
5. logits      the model llama.cpp would run (loaded from the GGUF) and the HF model on the probes:
               mean KL(p_HF ‖ p_GGUF) per token and top-1 agreement.

Each check prints its lines; the report ends with one verdict line: `VERDICT: OK ...` or
`VERDICT: FAULT: <the first fault found, in the order above> (+N more)`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minillm.config import ModelConfig
from minillm.formats.ggml_quants import GGML_BF16, GGML_F16, GGML_F32, GGML_TYPES, type_name
from minillm.formats.gguf_reader import GGUFFile, read_gguf, sentencepiece_model_from_gguf
from minillm.formats.load import load_pretrained, load_tokenizer
from minillm.model import Llama
from minillm.names import hf_to_interleaved, interleaved_to_hf, is_rope_rotated, ours_to_gguf
from minillm.tokenizer.bpe_files import from_gguf_metadata
from minillm.tokenizer.sentencepiece import Tokenizer
from minillm.util.cli import ArgumentParser, run_cli

PROBES = [
    "def fibonacci(n):\n\tif n < 2:\n\t\treturn n\n\treturn fibonacci(n - 1) + fibonacci(n - 2)\n",
    "x  =  1    # four spaces\n        indented by eight",
    "Héllo wörld — naïve café, 世界, emoji 🙂, tabs\t\there",
    "The capital of France is Paris. The capital of Italy is",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
]
# another HF weight this close (relative error) is the one a wrong tensor really holds
SWAP_MATCH = 0.5


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    def ok(self, msg: str):
        self.lines.append(f"  ok     {msg}")

    def fault(self, msg: str):
        self.lines.append(f"  FAULT  {msg}")
        self.faults.append(msg)

    def verdict(self, summary: str) -> str:
        if not self.faults:
            return f"VERDICT: OK: {summary}"
        more = f" (+{len(self.faults) - 1} more)" if len(self.faults) > 1 else ""
        return f"VERDICT: FAULT: {self.faults[0]}{more}"


# --------------------------------------------------------------------------------------------------
# 1-2. tokenizer and metadata


def check_tokenizer(g: GGUFFile, hf_tok, r: Report):
    """The GGUF's vocabulary against HF's tokenizer (tokenizer.model, or tokenizer.json for a
    byte-level BPE model): pieces, special ids and the probes' ids."""
    try:
        if g.metadata.get("tokenizer.ggml.model") == "gpt2":
            tok = from_gguf_metadata(g.metadata, str(g.path))
        else:
            tok = Tokenizer(model_bytes=sentencepiece_model_from_gguf(g))
    except ValueError as e:
        r.fault(f"tokenizer: the GGUF's vocabulary cannot be read ({e})")
        return None
    if tok.vocab_size != hf_tok.vocab_size:
        r.fault(f"tokenizer: {tok.vocab_size} tokens in the GGUF, "
                f"{hf_tok.vocab_size} in HF's tokenizer")
    pieces = g.metadata["tokenizer.ggml.tokens"]
    differ = [i for i in range(min(len(pieces), hf_tok.vocab_size))
              if pieces[i] != hf_tok.id_to_piece(i)]
    if differ:
        i = differ[0]
        r.fault(f"tokenizer: {len(differ)} pieces differ from HF's, first id {i}: {pieces[i]!r} vs "
                f"{hf_tok.id_to_piece(i)!r} (a different tokenizer)")
    for name, want in (("bos", hf_tok.bos_id), ("eos", hf_tok.eos_id), ("unknown", hf_tok.unk_id)):
        got = g.metadata.get(f"tokenizer.ggml.{name}_token_id")
        if got is not None and int(got) != want:
            r.fault(f"tokenizer: tokenizer.ggml.{name}_token_id is {int(got)}, "
                    f"HF's {name} id is {want}")
    bad = [(text, tok.encode(text), hf_tok.encode(text)) for text in PROBES
           if tok.encode(text) != hf_tok.encode(text)]
    if bad:
        text, got, want = bad[0]
        at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                  min(len(got), len(want)))
        r.fault(f"tokenizer: {len(bad)}/{len(PROBES)} probe texts tokenize differently, "
                f"e.g. {text[:30]!r}: id {at} is {got[at:at + 1]} vs HF {want[at:at + 1]}")
    elif not differ:
        r.ok(f"tokenizer: {tok.vocab_size} pieces equal HF's; {len(PROBES)} probes give HF's ids")
    return tok


def check_metadata(g: GGUFFile, cfg: ModelConfig, r: Report):
    m = g.metadata
    want = {
        "llama.block_count": cfg.n_layers,
        "llama.embedding_length": cfg.dim,
        "llama.feed_forward_length": cfg.hidden_dim,
        "llama.attention.head_count": cfg.n_heads,
        "llama.attention.head_count_kv": cfg.n_kv_heads,
        "llama.rope.dimension_count": cfg.head_dim,
        "llama.context_length": cfg.max_seq_len,
        "llama.attention.layer_norm_rms_epsilon": float(np.float32(cfg.norm_eps)),
        "llama.rope.freq_base": float(np.float32(cfg.rope_theta)),
    }
    if m.get("general.architecture") != "llama":
        r.fault(f"metadata: general.architecture is {m.get('general.architecture')!r}, "
                "expected 'llama'")
    n_tokens = len(m.get("tokenizer.ggml.tokens", []))
    if n_tokens != cfg.vocab_size:
        r.fault(f"metadata: vocab size {n_tokens} (tokenizer.ggml.tokens), "
                f"HF's vocab_size is {cfg.vocab_size}")
    wrong = 0
    for key, value in want.items():
        got = m.get(key)
        if key == "llama.rope.dimension_count" and got is None:
            continue  # optional: llama.cpp defaults it to the head dimension
        if got is None or float(got) != float(value):
            wrong += 1
            r.fault(f"metadata: {key} is {got!r}, HF's config gives {value:g}")
    if not wrong and n_tokens == cfg.vocab_size:
        r.ok(f"metadata: {len(want) + 1} hyper-parameters equal HF's (eps {cfg.norm_eps:g}, "
             f"rope theta {cfg.rope_theta:g}, {cfg.n_heads}/{cfg.n_kv_heads} heads)")


# --------------------------------------------------------------------------------------------------
# 3-4. q/k layout and every tensor


def tolerance(ggml_type: int) -> float:
    """The relative RMS error a correct conversion stays under for this ggml type (a loose bound:
    float types by their mantissa, block quants by their bits per weight b as 2^-(b - 2.5))."""
    if ggml_type in (GGML_F32, GGML_F16, GGML_BF16):
        return {GGML_F32: 1e-6, GGML_F16: 1e-3, GGML_BF16: 8e-3}[ggml_type]
    _, block, nbytes = GGML_TYPES[ggml_type]
    return 2.0 ** -(8 * nbytes / block - 2.5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def qk_layout(key: str, w_file: torch.Tensor, w_hf: torch.Tensor,
              cfg: ModelConfig) -> tuple[str, float]:
    """(name of the closest candidate layout, its relative error) for one attn_q / attn_k."""
    heads = cfg.n_heads if ".q_proj." in key else cfg.n_kv_heads
    once = hf_to_interleaved(w_hf, heads)
    candidates = {"permuted once (correct)": once, "unpermuted (HF's rotate-half rows)": w_hf,
                  "permuted twice": hf_to_interleaved(once, heads)}
    if (heads != cfg.n_heads and w_hf.shape[0] % cfg.n_heads == 0
            and (w_hf.shape[0] // cfg.n_heads) % 2 == 0):
        candidates[f"permuted with the query head count {cfg.n_heads} instead of {heads}"] = \
            hf_to_interleaved(w_hf, cfg.n_heads)
    errs = {name: rel_err(w_file, c) for name, c in candidates.items()}
    best = min(errs, key=errs.get)
    return best, errs[best]


def check_tensors(g: GGUFFile, hf: dict[str, torch.Tensor], cfg: ModelConfig, r: Report):
    expected = {ours_to_gguf(k): k for k in hf
                if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    if "lm_head.weight" in hf:
        expected.setdefault("output.weight", "lm_head.weight")  # a tied model may still store it
    missing = [n for n in expected
               if n not in g.tensors and not (n == "output.weight" and cfg.tie_embeddings)]
    extra = [n for n in g.tensors if n not in expected]
    if missing:
        r.fault(f"tensors: {len(missing)} missing from the GGUF, e.g. {missing[:3]}")
    if extra:
        r.fault(f"tensors: {len(extra)} not in HF's checkpoint, e.g. {extra[:3]}")
    layouts: dict[str, list[str]] = {}
    faults: list[str] = []
    worst: tuple[float, str] = (0.0, "")
    compared = 0
    for name, info in g.tensors.items():
        if name not in expected:
            continue
        key = expected[name]
        ref = hf[key].float()
        if info.shape != tuple(ref.shape):
            faults.append(f"tensors: {name} has shape {info.shape}, "
                          f"HF's {key} has {tuple(ref.shape)}")
            continue
        try:
            w = g.tensor(name)
        except ValueError as e:  # a NaN / inf block scale or value: named by the reader
            faults.append(f"tensors: {e}")
            continue
        if is_rope_rotated(key):
            layout, _ = qk_layout(key, w, ref, cfg)
            layouts.setdefault(layout, []).append(name)
            if not layout.startswith("permuted once"):
                continue  # reported once, as a layout fault, below
            w = interleaved_to_hf(w, cfg.n_heads if ".q_proj." in key
                                  else cfg.n_kv_heads)
        err, tol = rel_err(w, ref), tolerance(info.ggml_type)
        compared += 1
        worst = max(worst, (err / tol, name))
        if not err <= tol:  # NaN fails every comparison: it must fail this one too
            faults.append(f"tensors: {name} ({type_name(info.ggml_type)}) differs from HF's {key}: "
                          f"relative error {err:.3g}, {type_name(info.ggml_type)} allows {tol:.2g}"
                          f"{_holds_instead(w, key, hf)}")
    for layout, names in layouts.items():
        if not layout.startswith("permuted once"):
            r.fault(f"q/k layout: {len(names)} of the attn_q/attn_k tensors are {layout}, "
                    f"e.g. {names[0]}; llama.cpp needs HF's q/k rows permuted once into "
                    "interleaved RoPE pairs")
    if len(layouts) == 1 and next(iter(layouts)).startswith("permuted once"):
        r.ok(f"q/k layout: all {len(layouts['permuted once (correct)'])} attn_q/attn_k "
             "permuted once, as llama.cpp expects")
    for f in faults:
        r.fault(f)
    if not faults and not missing and not extra:
        r.ok(f"tensors: {compared} compared, all within their type's error (worst: {worst[1]} at "
             f"{worst[0]:.2f} of its allowance)")


def _holds_instead(w: torch.Tensor, key: str, hf: dict[str, torch.Tensor]) -> str:
    """', it holds HF's <other key>' when another HF weight of this shape matches far better."""
    others = [(rel_err(w, t.float()), k) for k, t in hf.items()
              if k != key and tuple(t.shape) == tuple(w.shape)]
    if not others:
        return ""
    err, other = min(others)
    return (f"; it holds HF's {other} (error {err:.2g}): a swapped tensor" if err < SWAP_MATCH
            else "")


# --------------------------------------------------------------------------------------------------
# 5. logits


@torch.no_grad()
def compare_logits(reference: Llama, candidate: Llama,
                   token_ids: list[list[int]]) -> tuple[float, float]:
    """(mean KL(p_ref ‖ p_cand) per token in nats, top-1 agreement) over the token sequences."""
    kls, agree, n = 0.0, 0, 0
    for ids in token_ids:
        x = torch.tensor([ids])
        lp_ref = F.log_softmax(reference(x)[0].float(), dim=-1)  # (T, V)
        lp_cand = F.log_softmax(candidate(x)[0].float(), dim=-1)
        kls += float((lp_ref.exp() * (lp_ref - lp_cand)).sum())
        agree += int((lp_ref.argmax(-1) == lp_cand.argmax(-1)).sum())
        n += len(ids)
    return kls / n, agree / n


def check_logits(path: Path, hf_model: Llama, hf_tok: Tokenizer, kl_allowed: float,
                 r: Report) -> str:
    try:
        model = load_pretrained(path, dtype=torch.float32).eval()
    except ValueError as e:
        r.fault(f"logits: minillm cannot load the GGUF as a Llama ({e})")
        return ""
    ids = [hf_tok.encode(t)[: hf_model.config.max_seq_len] for t in PROBES]
    kl, top1 = compare_logits(hf_model, model, ids)
    msg = (f"logits: KL(HF ‖ GGUF) {kl:.3g} nats/token, top-1 agreement {top1:.1%} "
           f"over {sum(map(len, ids))} tokens")
    if not kl <= kl_allowed:  # a NaN KL is a fault, not a pass
        r.fault(msg + f" (a correct file of this type stays under {kl_allowed:g})")
    else:
        r.ok(msg)
    return f"KL {kl:.3g}, top-1 {top1:.1%}"


# --------------------------------------------------------------------------------------------------


def check_gguf(path: str | os.PathLike, hf_dir: str | os.PathLike, out=print) -> Report:
    """Run the five checks, print the report (ending with the verdict line) through `out`,
    return it."""
    path, hf_dir = Path(path), Path(hf_dir)
    g = read_gguf(path)  # a structurally broken file raises here, naming the offset
    if g.metadata.get("general.type") == "adapter":
        r = Report()
        out(f"GGUF doctor: {path} against {hf_dir}")
        r.fault(f"{path.name} is a LoRA adapter GGUF (general.type = adapter, adapter.type = "
                f"{g.metadata.get('adapter.type')!r}), not a model: llama.cpp applies it with "
                f"--lora on a base GGUF; check that base GGUF instead, or the merged model "
                f"(python3 run.py export --checkpoint BASE --adapter DIR)")
        for line in r.lines:
            out(line)
        out(r.verdict(""))
        return r
    hf_model = load_pretrained(hf_dir, dtype=None).eval()
    hf_tok = load_tokenizer(hf_dir)
    cfg = hf_model.config
    hf_state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    r = Report()
    out(f"GGUF doctor: {path} against {hf_dir}")
    check_tokenizer(g, hf_tok, r)
    check_metadata(g, cfg, r)
    check_tensors(g, hf_state, cfg, r)
    types = {t.ggml_type for t in g.tensors.values() if len(t.shape) > 1}
    kl_allowed = 2e-3 if types <= {GGML_F32, GGML_F16, GGML_BF16} else 0.1
    summary = check_logits(path, hf_model.float(), hf_tok, kl_allowed, r)
    for line in r.lines:
        out(line)
    out(r.verdict(f"{path.name} is a faithful conversion of {hf_dir.name} ({summary})"))
    return r


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", metavar="FILE.gguf",
                   help="the GGUF file to check (ours, or llama.cpp's converter's)")
    p.add_argument("--against", required=True,
                   help="the HF checkpoint directory it was converted from")
    args = p.parse_args(argv)
    return 1 if check_gguf(args.gguf, args.against).faults else 0  # scripts can test the verdict


if __name__ == "__main__":
    sys.exit(run_cli(main))
