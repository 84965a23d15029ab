"""What a training run reports: the summary line, the progress bar, tensorboard scalars, MFU, and
the val loss with a short sample after each eval (`Logger`, used by training.train from rank 0)."""

from __future__ import annotations

import math
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from minillm.generate.sampling import SamplingConfig
from minillm.generate.text import generate_text
from minillm.model import Llama
from minillm.training.config import TrainConfig
from minillm.training.flops import (
    H100_BF16_PEAK_FLOPS,
    model_flops_per_token,
    model_params,
    parameter_summary,
)
from minillm.util.device import CPU_BF16_MIN_WIDTH, native_bf16_matmul


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024



class Logger:
    """What a run reports, from rank 0: the model summary, the tqdm bar (loss, tokens/s),
    tensorboard scalars in out_dir/tb (train every log.interval steps: loss, lr, grad norm,
    tokens/s, peak memory, MFU; val at each eval) and, after each eval, the val loss with a short
    sample. On other ranks it is silent.

    MFU = tokens/s × FLOPs/token / peak, FLOPs/token from flops.py (6N for full training,
    4N + 6N_adapter under LoRA/QLoRA, + attention); peak is log.peak_flops, or an H100's bf16 peak
    on CUDA (none on CPU)."""

    def __init__(self, cfg: TrainConfig, data, model: Llama, device: torch.device,
                 dtype: torch.dtype, world_size: int, start_step: int, master: bool):
        self.cfg, self.data, self.device, self.master = cfg, data, device, master
        self.flops_per_token = model_flops_per_token(model, cfg.block_size)
        self.peak_flops = (cfg.log.peak_flops
                           or (H100_BF16_PEAK_FLOPS if device.type == "cuda" else 0.0))
        self.train_time, self.tokens, self.samples = 0.0, 0, []
        self.writer = None
        if master and cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(cfg.out_dir) / "tb"))
        self.bar = tqdm(initial=start_step, total=cfg.num_steps, desc="train", dynamic_ncols=True,
                        disable=not (master and cfg.log.progress_bar))
        if master:
            n, n_train = model_params(model)  # NF4 projections count their in·out weights
            print(f"model: {n / 1e6:.2f}M parameters "
                  f"({n_train / 1e6:.2f}M trained, {cfg.finetune.method}), "
                  f"{self.flops_per_token / 1e6:.1f} MFLOPs/token | {data.describe()} | "
                  f"device {device}, {precision(cfg.dtype, dtype, device)}, "
                  f"{world_size} rank(s)")
            if cfg.finetune.method != "full":
                print(parameter_summary(model))  # the line PEFT prints, to compare with a peft run

    def step(self, step: int, loss: float, lr: float, grad_norm: float, n_tokens: int,
             seconds: float, metrics: dict | None = None):
        """metrics: a preference run's TRL-named means (rewards/accuracies, …): the bar shows the
        pair accuracy and the margin, tensorboard all of them as train/<name>."""
        self.train_time += seconds
        self.tokens += n_tokens
        tokens_per_s = n_tokens / seconds
        metrics = metrics or {}
        extra = {}
        if "rewards/accuracies" in metrics:
            extra = dict(acc=f"{metrics['rewards/accuracies']:.2f}",
                         margin=f"{metrics['rewards/margins']:.3f}")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", **extra, tok_s=f"{tokens_per_s:,.0f}",
                             refresh=False)
        if self.writer is None or step % self.cfg.log.interval != 0:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/grad_norm", grad_norm, step)
        self.writer.add_scalar("perf/tokens_per_s", tokens_per_s, step)
        self.writer.add_scalar("perf/peak_memory_gib", peak_memory_bytes(self.device) / 2**30, step)
        if self.peak_flops:
            mfu = tokens_per_s * self.flops_per_token / self.peak_flops
            self.writer.add_scalar("perf/mfu", mfu, step)

    def eval(self, step: int, val_loss: float, model: Llama):
        """Print the val loss after `step` steps and, if eval.sample_tokens > 0, a sample from the
        model. A sharded model's forward is a collective, so under FSDP every rank decodes the
        sample (the same tokens: the same gathered weights and seed) and rank 0 prints it."""
        e = self.cfg.eval
        sharded = self.cfg.distributed == "fsdp"
        if e.sample_tokens > 0 and (self.master or sharded):
            text = self.sample(model, self.data.prompt(e.sample_prompt))
        if not self.master:
            return
        msg = f"step {step}: val loss {val_loss:.4f} (perplexity {math.exp(min(val_loss, 50)):.1f})"
        extra = self.data.val_metrics  # a preference run's held-out rewards/*, logps/*
        if extra:
            msg = (f"step {step}: val loss {val_loss:.4f} | pair accuracy "
                   f"{extra['rewards/accuracies']:.3f}, margin {extra['rewards/margins']:.4f}, "
                   f"rewards {extra['rewards/chosen']:.4f} / {extra['rewards/rejected']:.4f}")
        if not math.isnan(self.data.baseline):
            msg += f" | unigram baseline {self.data.baseline:.4f}"
        if e.sample_tokens > 0:
            self.samples.append(text)
            msg += f"\n----- sample -----\n{text}\n------------------"
        tqdm.write(msg)
        if self.writer is not None:
            self.writer.add_scalar("val/loss", val_loss, step)
            self.writer.add_scalar("val/perplexity", math.exp(min(val_loss, 50)), step)
            for name, value in extra.items():
                self.writer.add_scalar(f"eval/{name}", value, step)

    def sample(self, model: Llama, prompt: str) -> str:
        """The prompt and a short sampled continuation (generate/text.py). A prompt too long for the
        context keeps its last tokens, leaving room for at least half the context of new ones."""
        e, tok = self.cfg.eval, self.data.tokenizer
        keep = model.config.max_seq_len - min(e.sample_tokens, model.config.max_seq_len // 2)
        ids = tok.encode(prompt)[-keep:]
        cfg = SamplingConfig(max_new_tokens=e.sample_tokens, temperature=e.temperature,
                             top_k=e.top_k or None, seed=self.cfg.seed)
        return tok.decode(ids) + generate_text(model, tok, ids, cfg, continues_prompt=True)

    def tokens_per_s(self) -> float:
        return self.tokens / self.train_time if self.train_time > 0 else 0.0  # eval time left out

    def close(self, val_loss: float | None = None):
        """Close the bar and the tensorboard file; after a finished run, print its last line."""
        self.bar.close()
        if self.master and val_loss is not None:
            vs = ("" if math.isnan(self.data.baseline)
                  else f" vs unigram baseline {self.data.baseline:.4f} nats/token")
            print(f"done: {self.cfg.num_steps} steps, val loss {val_loss:.4f}{vs}, "
                  f"{self.tokens_per_s():,.0f} tokens/s, "
                  f"peak memory {peak_memory_bytes(self.device) / 2**30:.2f} GiB; "
                  f"checkpoint in {self.cfg.out_dir}")
        if self.writer is not None:
            self.writer.close()


def precision(setting: str, dtype: torch.dtype, device: torch.device) -> str:
    """What the run computes in, and why when "auto" chose it: "float32", "bfloat16 autocast
    (auto: this CPU multiplies bfloat16 in hardware)"."""
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float32:
        narrow = setting == "auto" and device.type == "cpu" and native_bf16_matmul()
        why = (f" (auto: this CPU multiplies bfloat16 in hardware, but a model narrower than "
               f"{CPU_BF16_MIN_WIDTH} runs faster in float32)")
        return name + why if narrow else name
    if setting != "auto":
        return f"{name} autocast"
    why = "this CPU multiplies bfloat16 in hardware" if device.type == "cpu" else "a bf16 GPU"
    return f"{name} autocast (auto: {why})"
