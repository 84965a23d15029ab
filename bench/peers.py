"""The peers the README's GPU tables compare minillm with, measured by the benches in the same run.

    bench/generate_speed.py --peer   transformers' LlamaForCausalLM decoding (eager, its default
                                     cache)
    bench/finetune.py --peer         transformers + peft LoRA; + bitsandbytes NF4 for QLoRA
    bench/nf4.py --peer              bitsandbytes' quantize_4bit / matmul_4bit / dequantize_4bit

They are benchmark peers only: imported here, lazily, when a bench is asked for `--peer`, and never
a dependency of minillm (`pip install transformers peft bitsandbytes` beside it to run them). Each
peer gets the same model shape, random weights, dtype, batch, sequence length, LoRA rank and
targets, activation checkpointing and optimizer as the minillm row it sits next to.
"""

from __future__ import annotations

import time

import torch

from minillm.config import ModelConfig

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _require(*names: str):
    """Import the peer packages or say how to get them (one clear error, not a traceback deep in a
    bench)."""
    import importlib

    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as e:
            raise SystemExit(
                f"--peer needs {name!r} ({e}); install the peers beside minillm: "
                f"pip install {' '.join(names)}"
            ) from e
    return modules


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def versions(*names: str) -> str:
    """'transformers 5.17.0, peft 0.21.0' for the table captions."""
    return ", ".join(f"{m.__name__} {m.__version__}" for m in _require(*names))


def hf_llama(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """transformers' LlamaForCausalLM with our config's shape, random weights, on `device` in
    `dtype`."""
    (transformers,) = _require("transformers")
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_config())
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg).to(dtype)
    return model


def swap_in_bnb_nf4(model, compute_dtype: torch.dtype, double_quant: bool = True) -> None:
    """Replace every projection nn.Linear (not lm_head) by bitsandbytes' Linear4bit, NF4, blocksize
    64 — what `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))` builds, without a checkpoint on
    disk."""
    (bnb,) = _require("bitsandbytes")
    device = next(model.parameters()).device
    for name, linear in [(n, m) for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)]:
        if name.endswith("lm_head"):
            continue
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype,
            compress_statistics=double_quant, quant_type="nf4", device="meta",
        )  # fmt: skip
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data.to("cpu"), requires_grad=False, compress_statistics=double_quant,
            quant_type="nf4"
        )
        parent_name, _, child = name.rpartition(".")
        # .to(device) quantizes
        setattr(model.get_submodule(parent_name), child, layer.to(device))
        linear.weight = None


# --------------------------------------------------------------------------------------------------
# generate_speed: prefill and decode tokens/s


@torch.no_grad()
def hf_generate_speed(cfg: ModelConfig, device, dtype, prompt_len: int, new_tokens: int,
                      nf4: bool = False):
    """(prefill tok/s, decode tok/s) of transformers at batch 1, greedy, its default (dynamic) KV
    cache.

    prefill = one forward over the prompt; decode = (generate(prompt, new_tokens) - prefill) per
    token, which is what a user of `model.generate` gets. The third of three trials is reported.
    """
    model = hf_llama(cfg, device, dtype).eval()
    if nf4:
        swap_in_bnb_nf4(model, dtype)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)
    mask = torch.ones_like(prompt)
    result = None
    for _trial in range(3):
        _sync(device)
        t0 = time.perf_counter()
        model(prompt, attention_mask=mask)
        _sync(device)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(
            prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
        _sync(device)
        t_generate = time.perf_counter() - t0
        result = (prompt_len / t_prefill, (new_tokens - 1) / max(t_generate - t_prefill, 1e-9))
    del model
    return result


# --------------------------------------------------------------------------------------------------
# finetune: one LoRA / QLoRA / full step


def hf_finetune_model(cfg: ModelConfig, method: str, device, dtype, r: int):
    """transformers (+ peft, + bitsandbytes) set up as bench/finetune.py sets up minillm."""
    model = hf_llama(cfg, device, dtype)
    model.config.use_cache = False
    if method == "qlora":
        swap_in_bnb_nf4(model, dtype, double_quant=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method in ("lora", "qlora"):
        (peft,) = _require("peft")
        lora = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                               target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lora)
    return model.train()


def hf_step_time(model, device, vocab_size: int, seq: int, steps: int) -> float:
    """Median seconds per step (forward, backward, AdamW) after a warm-up step, batch 1."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    x = torch.randint(0, vocab_size, (1, seq), device=device)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss  # HF shifts the labels inside
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    rest = sorted(times[1:])
    return rest[len(rest) // 2]


# --------------------------------------------------------------------------------------------------
# nf4: the kernels against bitsandbytes'


def bnb_nf4_ops(w: torch.Tensor):
    """bitsandbytes' NF4 of weight w (blocksize 64, no double quantization, as our kernel table):
    returns (matmul(x), dequantize()) closures to time."""
    (bnb,) = _require("bitsandbytes")
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")

    def matmul(x):
        return bnb.matmul_4bit(x, packed.t(), quant_state=state)

    def dequantize():
        return bnb.functional.dequantize_4bit(packed, state, quant_type="nf4")

    return matmul, dequantize


def bnb_int8_matmul(w: torch.Tensor, threshold: float):
    """bitsandbytes' LLM.int8 of weight w, as Linear8bitLt holds it in inference (int8 weights,
    has_fp16_weights=False): returns matmul(x), the closure to time (bnb.matmul: MatMul8bitLt)."""
    (bnb,) = _require("bitsandbytes")
    state = bnb.MatmulLtState()
    state.has_fp16_weights, state.is_training, state.threshold = False, False, threshold
    state.CB, state.SCB, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))

    def matmul(x):
        return bnb.matmul(x, state.CB, state=state, threshold=threshold)

    return matmul
