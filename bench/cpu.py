"""CPU benchmark: minillm's training step, prefill and decode, next to transformers and llama.cpp,
with the memory-bandwidth roofline of decode. One Markdown table.

    python bench/cpu.py                                # minillm only, the three shapes below
    python bench/cpu.py --peer                         # + transformers and llama.cpp, same weights
    python bench/cpu.py --peer transformers --shapes tiny,97M --iters 3 --compile
    python bench/cpu.py --peer --threads 1 --cpu-time  # on a machine shared with other jobs
    python bench/cpu.py --real --peer-python PY        # LoRA on SmolLM2-135M (bench/cpu_real.py)

Every implementation holds the same random weights and is timed in the same process, interleaved:
each trial runs every implementation once, in turn, so that the load of a shared CPU falls on all of
them alike. The best of `--iters` trials is reported (other jobs can only ever slow a run down); the
first trial is a warm-up and is not counted.

    train    tokens/s of one optimizer step: forward + backward + grad clip + AdamW (fused, as
             minillm's loop and transformers' Trainer use it on CPU), batch B×T of random tokens
    prefill  tokens/s of one forward over a 128-token prompt into the KV cache
    decode   tokens/s of greedy batch-1 decoding after that prompt, the argmax included
    roofline decode's upper bound: bytes read per token (every weight but the embedding table, of
             which one row is read) / the copy bandwidth measured here (read + write of a 256 MiB
             buffer)

Peers (bench-only, imported under --peer, never dependencies of minillm):
- transformers' LlamaForCausalLM loaded with minillm's state dict; prefill is its forward, decode is
  `generate` (greedy, its default dynamic cache) minus that prefill, what a user of `generate` gets.
- llama.cpp through llama-cpp-python, on the GGUF f32 that minillm's own exporter writes from the
  same weights (with a synthetic SentencePiece vocabulary of the model's size): `eval` of the
  prompt, then of one token at a time, taking the argmax of its logits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/peers.py

from minillm.config import ModelConfig  # noqa: E402
from minillm.generate.decode import decode_one_token, prefill  # noqa: E402
from minillm.model import Llama  # noqa: E402
from minillm.training.loop import configure_optimizer, forward_backward  # noqa: E402

# name → (model, training batch B, training length T). "97M" is the reference shape.
SHAPES = {
    "tiny": (ModelConfig.from_name("tiny"), 16, 128),  # the main job, python3 run.py train
    "33M": (ModelConfig(dim=512, n_layers=8, n_heads=8, hidden_dim=1408, vocab_size=8000,
                        max_seq_len=512), 4, 256),
    "97M": (ModelConfig(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, vocab_size=8000,
                        max_seq_len=512), 4, 256),
}
PROMPT, NEW_TOKENS = 128, 32
clock = time.perf_counter  # --cpu-time: time.process_time


def copy_bandwidth(nbytes: int = 256 * 2**20, reps: int = 10) -> float:
    """Bytes/s moved by a large tensor copy (read + write), the best of three runs."""
    a = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes * reps / best


def decode_bytes(model: Llama) -> int:
    """Weight bytes read per decoded token: every parameter except the embedding table (one row of
    it is read), unless the table is also lm_head (tied)."""
    skip = set() if model.config.tie_embeddings else {"embed_tokens.weight"}
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in skip)


def synthetic_tokenizer(vocab_size: int):
    """A SentencePiece model with exactly vocab_size pieces (<unk>, <s>, </s>, 256 bytes, then
    filler pieces): llama.cpp needs a vocabulary as large as the embedding, and its content does not
    change speed."""
    from minillm.tokenizer.sentencepiece import Tokenizer
    from minillm.tokenizer.spm_proto import BYTE_PIECE, NORMAL_PIECE, bpe_model_proto

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [BYTE_PIECE] * 256
    pieces += [f"▁p{i}" for i in range(vocab_size - len(pieces))]
    types += [NORMAL_PIECE] * (vocab_size - len(types))
    scores = [0.0] * len(pieces[:259]) + [-float(i) for i in range(vocab_size - 259)]
    ids = {"unknown": 0, "bos": 1, "eos": 2, "padding": -1}
    return Tokenizer(model_bytes=bpe_model_proto(pieces, scores, types, ids, add_dummy_prefix=True))


# --------------------------------------------------------------------------------------------------
# the implementations: each times train(), prefill() and decode() and returns tokens/s


class Minillm:
    name = "minillm"

    def __init__(self, model: Llama, B: int, T: int, compiled_decode: bool = False):
        self.model, self.B, self.T = model, B, T
        self.opt = configure_optimizer(model, 0.1, 1e-4, (0.9, 0.95), 1e-8, fused=True)
        x = torch.randint(0, model.config.vocab_size, (B, T + 1),
                          generator=torch.Generator().manual_seed(0))
        self.batch = [(x[:, :-1].contiguous(), x[:, 1:].contiguous())]  # (B, T), (B, T)
        # default mode: "reduce-overhead" means CUDA graphs, which a CPU does not have
        self.decode_fn = (torch.compile(decode_one_token, fullgraph=True) if compiled_decode
                          else decode_one_token)
        if compiled_decode:
            self.name = "minillm compiled"

    def train(self) -> float:
        self.model.train()
        t0 = clock()
        forward_backward(self.model, self.batch, self.B * self.T)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return self.B * self.T / (clock() - t0)

    @torch.inference_mode()  # as generate/ decodes
    def generate(self, prompt: torch.Tensor) -> tuple[float, float]:
        """(prefill tok/s, decode tok/s); the KV cache is allocated once, stale slots are masked."""
        self.model.eval()
        if self.model.layers[0].self_attn.kv_cache is None:
            self.model.setup_caches(1, PROMPT + NEW_TOKENS)
        t0 = clock()
        tok = prefill(self.model, prompt, torch.arange(PROMPT)).argmax(-1, keepdim=True)  # (1, 1)
        t1 = clock()
        for pos in range(PROMPT, PROMPT + NEW_TOKENS):
            tok = self.decode_fn(self.model, tok, torch.tensor([pos])).argmax(-1, keepdim=True)
        t2 = clock()
        return PROMPT / (t1 - t0), NEW_TOKENS / (t2 - t1)


class Transformers:
    def __init__(self, model: Llama, B: int, T: int):
        import peers

        from minillm.names import ours_to_hf

        self.name = peers.versions("transformers")
        self.hf = peers.hf_llama(model.config, torch.device("cpu"), torch.float32)
        self.hf.load_state_dict({ours_to_hf(k): v for k, v in model.state_dict().items()})
        self.opt = torch.optim.AdamW(self.hf.parameters(), lr=1e-4, weight_decay=0.1,
                                     betas=(0.9, 0.95), fused=True)
        self.x = torch.randint(0, model.config.vocab_size, (B, T),
                               generator=torch.Generator().manual_seed(0))

    def train(self) -> float:
        self.hf.train()
        t0 = clock()
        self.hf(input_ids=self.x, labels=self.x).loss.backward()  # labels are shifted inside
        torch.nn.utils.clip_grad_norm_(self.hf.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return self.x.numel() / (clock() - t0)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor) -> tuple[float, float]:
        self.hf.eval()
        mask = torch.ones_like(prompt)
        t0 = clock()
        self.hf(prompt, attention_mask=mask)
        t1 = clock()
        self.hf.generate(prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS + 1,
                         min_new_tokens=NEW_TOKENS + 1, do_sample=False, pad_token_id=0)
        t2 = clock()
        return PROMPT / (t1 - t0), NEW_TOKENS / max(t2 - t1 - (t1 - t0), 1e-9)


class LlamaCpp:
    def __init__(self, model: Llama, threads: int, tmp: Path):
        import numpy as np
        import peers

        from minillm.ship.gguf_writer import write_gguf

        (llama_cpp,) = peers._require("llama_cpp")
        self.name, self.np = f"llama.cpp f32 (llama-cpp-python {llama_cpp.__version__})", np
        path = tmp / f"{id(model)}.gguf"
        write_gguf(path, model.config, model.state_dict().items(),
                   synthetic_tokenizer(model.config.vocab_size), "f32", progress=False)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT + NEW_TOKENS + 8,
                                   n_batch=PROMPT, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)

    def train(self) -> None:
        return None  # llama.cpp does not train

    def last_logits(self):
        """The last evaluated token's logits (V,), read in place: without logits_all,
        llama-cpp-python keeps no copy of them in `scores`."""
        return self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def generate(self, prompt: torch.Tensor) -> tuple[float, float]:
        self.llm.reset()
        t0 = clock()
        self.llm.eval(prompt[0].tolist())
        tok = int(self.np.argmax(self.last_logits()))
        t1 = clock()
        for _ in range(NEW_TOKENS):
            self.llm.eval([tok])
            tok = int(self.np.argmax(self.last_logits()))
        t2 = clock()
        return PROMPT / (t1 - t0), NEW_TOKENS / (t2 - t1)


# --------------------------------------------------------------------------------------------------


def bench_shape(name: str, args, tmp: Path) -> list[str]:
    cfg, B, T = SHAPES[name]
    torch.manual_seed(0)
    model = Llama(cfg)
    impls = [Minillm(model, B, T)]
    if args.compile:
        impls.append(Minillm(model, B, T, compiled_decode=True))  # same model: only decode differs
    if "transformers" in args.peer:
        impls.append(Transformers(model, B, T))
    if "llama.cpp" in args.peer:
        impls.append(LlamaCpp(model, args.threads, tmp))
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT),
                           generator=torch.Generator().manual_seed(1))
    best = {impl.name: [0.0, 0.0, 0.0] for impl in impls}  # train, prefill, decode tok/s
    for trial in range(args.iters + 1):  # trial 0 warms up (and compiles)
        for impl in impls:
            train = impl.train() if not impl.name.startswith("minillm compiled") else None
            pf, dc = impl.generate(prompt)
            if trial > 0:
                b = best[impl.name]
                b[:] = [max(b[0], train or 0.0), max(b[1], pf), max(b[2], dc)]
    roofline = args.bandwidth / decode_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    cell = lambda v: f"{v:,.0f}" if v >= 100 else (f"{v:.1f}" if v > 0 else "–")
    label = f"{name} ({params / 1e6:.1f}M)"
    rows = [f"| {label} | train tok/s ({B}×{T}) | "
            + " | ".join(cell(best[i.name][0]) for i in impls) + " | – |",
            f"| {label} | prefill tok/s ({PROMPT}) | "
            + " | ".join(cell(best[i.name][1]) for i in impls) + " | – |",
            f"| {label} | decode tok/s (batch 1) | "
            + " | ".join(cell(best[i.name][2]) for i in impls) + f" | {roofline:.1f} |"]
    for impl in impls:  # free the KV caches and peers before the next shape
        if isinstance(impl, Minillm):
            impl.model.clear_caches()
    return [" | ".join(i.name for i in impls)] + rows


def main():
    if "--real" in sys.argv[1:]:  # the LoRA step on a real model: bench/cpu_real.py
        from cpu_real import main as real_main
        return real_main([a for a in sys.argv[1:] if a != "--real"])
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,33M,97M", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--peer", nargs="?", const="transformers,llama.cpp", default="",
                   help="also time these peers (comma list; bare --peer: transformers,llama.cpp)")
    p.add_argument("--compile", action="store_true",
                   help="add a row for torch.compile(decode_one_token)")
    p.add_argument("--iters", type=int, default=3,
                   help="timed trials per implementation (after a warm-up)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="threads for torch and llama.cpp (default: torch's, all cores)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by this process's CPU time (with --threads 1): robust to the "
                        "preemption of a shared machine, which wall time is not")
    args = p.parse_args()
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; expected some of {list(SHAPES)}")
    bad_peers = [s for s in args.peer.split(",") if s and s not in ("transformers", "llama.cpp")]
    if bad_peers:
        p.error(f"unknown peer(s) {bad_peers}; expected transformers and/or llama.cpp")
    if args.cpu_time and args.threads != 1:
        p.error(f"--cpu-time needs --threads 1 (CPU time sums over threads), "
                f"found --threads {args.threads}")
    global clock
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    args.bandwidth = copy_bandwidth()
    print(f"CPU, {args.threads} threads, torch {torch.__version__}; copy bandwidth "
          f"{args.bandwidth / 1e9:.1f} GB/s; fp32; best of {args.iters} interleaved trials"
          f"{' (CPU time)' if args.cpu_time else ''}", flush=True)
    header = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes.split(","):
            names, *rows = bench_shape(name, args, Path(tmp))
            if header != names:
                header = names
                print(f"\n| model | work | {names} | roofline |")
                print("|---|---|" + "---|" * (names.count(" | ") + 2))
            print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
