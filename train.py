r"""Train a Llama from scratch (or continue one):
`python train.py [config.toml] [--section.key value ...]`.

    python train.py                           # tiny model on the Python stdlib, CPU, < 10 min
    python train.py configs/small-125m.toml   # 125M on a GPU (bf16, torch.compile)
    python train.py configs/tiny.toml --schedule.max_lr 1e-3 --batch_size=32 --out_dir out/try
    python train.py --resume                  # continue out/tiny/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node 8 train.py configs/1b.toml   # data parallel (DDP)
    torchrun --standalone --nproc_per_node 8 train.py configs/1b.toml --distributed fsdp  # sharded
    python train.py --init_from out/tiny --finetune.method lora --data.format instruct \
        --data.corpus alpaca.jsonl --data.packing true \
        --out_dir out/tiny-lora               # LoRA on instructions

Every field of minillm/training/config.py:TrainConfig is a flag (`--help` lists them with their
defaults); the loop itself is minillm/training/loop.py:train. The output folder holds ckpt.pt
(resume state), train_config.json (the resolved config), tb/ (tensorboard) and an inference export
that `python generate.py --checkpoint out/tiny` reads.

out_dir (and data.cache_dir) must be new, empty, or minillm's own (a `.minillm` marker): a directory
holding anything else is refused, and nothing in it is touched. One run at a time writes into an
out_dir; a second gets one line naming the first's pid. A run directory may be moved or copied and
still resumes.
"""

import argparse
import sys

import torch.distributed as dist

from minillm.training.config import add_config_flags, load_config
from minillm.training.loop import train
from minillm.util.cli import ArgumentParser, run_cli


def main(argv=None):
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None,
                        help="TOML file of overrides (configs/*.toml) or a saved train_config.json")
    parser.add_argument("--config", dest="config_flag", default=None, metavar="PATH",
                        help="the same file, given as a flag "
                             "(python train.py --config configs/lora-tiny.toml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/ckpt.pt, or OUT_DIR/ckpt/ under fsdp "
                             "(model, optimizer, step and RNG states)")
    add_config_flags(parser)
    args = vars(parser.parse_args(argv))
    config_path, config_flag, resume = (args.pop("config"), args.pop("config_flag"),
                                        args.pop("resume"))
    args.pop("debug")  # read by run_cli
    if config_path and config_flag:
        parser.error(f"two config files given: {config_path} and --config {config_flag}")
    config_path = config_path or config_flag
    cfg = load_config(config_path, args)  # what is left in args: the --section.key overrides given
    try:
        train(cfg, resume=resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_cli(main))
