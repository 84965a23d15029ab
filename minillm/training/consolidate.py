"""From a sharded checkpoint to the plain files every loader reads, in one command:

    python3 run.py consolidate out/7b-lora              # out/7b-lora/ckpt/ -> out/7b-lora/
    python3 run.py consolidate out/7b-lora --out out/7b-lora-step400

Under FSDP, training writes out_dir/ckpt/ at each checkpoint step (training/distributed.py: DCP,
one shard per rank) and the consolidated export only after its last step. This reads ckpt/ in one
process, with no process group and whatever world size wrote it (DCP reassembles every tensor from
its shards), and writes what the end of that run writes (loop.export_model): model.safetensors +
minillm_config.json + tokenizer.model, and for LoRA / DoRA also the adapter alone in PEFT's layout
(adapter/), with the frozen base rebuilt from init_from as a resume rebuilds it. So a run killed
before its end still gives a model that generate.py, export.py and load_pretrained read.

Memory: one whole copy of the model, on the CPU.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from minillm.config import ModelConfig
from minillm.data.templates import TEMPLATE_RECORD
from minillm.model import Llama
from minillm.training.config import TrainConfig, apply_overrides, flatten
from minillm.training.distributed import CKPT_DIR, TRAIN_STATE, read_train_state
from minillm.training.loop import build_model, export_model, model_skeleton
from minillm.util.cli import ArgumentParser, run_cli
from minillm.util.device import DTYPES
from minillm.util.fileio import atomic_write_bytes, claim_directory


def load_sharded_model(ckpt: Path) -> tuple[Llama, TrainConfig, dict]:
    """The model of a ckpt/ directory as one plain module on the CPU, with its run's config and
    train_state.json. Full training: the skeleton of the saved config, every tensor read from the
    shards. Adapters: the run's model rebuilt (base from init_from, fresh adapters), then the
    trained tensors read from the shards."""
    meta = read_train_state(ckpt)
    where = str(ckpt / TRAIN_STATE)
    cfg = apply_overrides(TrainConfig(), flatten(meta["config"]), where)
    config = ModelConfig.from_dict(meta["model_config"], source=where)
    dtype = DTYPES[meta["dtype"]]
    if cfg.finetune.method == "full":
        model = model_skeleton(cfg, config, dtype).to_empty(device="cpu")  # a tied lm_head stays
    else:
        model = build_model(cfg, torch.device("cpu"), dtype)
        if model.config != config:
            raise ValueError(f"{where}: init_from {cfg.init_from} now builds {model.config}, "
                             f"the checkpoint was trained on {config}")
    trained = {k for k, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    state = {k: t for k, t in model.state_dict().items() if k in trained}
    with warnings.catch_warnings():  # DCP's note that no process group means one process
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=str(ckpt))  # in place, into the model's tensors
    model.init_rope(torch.device("cpu"))
    return model.eval(), cfg, meta


def consolidate(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the export of run_dir/ckpt/ to `out` (default: run_dir itself); returns `out`."""
    run_dir = Path(run_dir)
    model, cfg, meta = load_sharded_model(run_dir / CKPT_DIR)
    out = Path(out) if out is not None else run_dir
    # minillm's own directory only: the run's, or a new (or empty) one for the consolidated files
    same = out.resolve() == run_dir.resolve()
    claim_directory(out, "training run" if same else "consolidated model",
                    legacy=("train_config.json", "ckpt.pt") if same else ())
    template = run_dir / TEMPLATE_RECORD  # the chat template the adapter carries to export
    if template.is_file() and template.resolve() != (out / TEMPLATE_RECORD).resolve():
        atomic_write_bytes(out / TEMPLATE_RECORD, template.read_bytes())
    tokenizer = Path(meta["tokenizer"])
    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer}: the tokenizer the run trained with is gone "
                                f"(named in {run_dir / CKPT_DIR / TRAIN_STATE})")
    export_model(out, model, cfg, tokenizer, meta["step"])
    print(f"step {meta['step']} of {run_dir / CKPT_DIR} ({meta['world_size']} shards) -> "
          f"{out / 'model.safetensors'}" + (f" and {out / 'adapter'}"
                                           if cfg.finetune.method != "full" else ""))
    return out


def main(argv=None):
    parser = ArgumentParser(description="Write the model (and LoRA adapter) of a sharded FSDP "
                                        "checkpoint, OUT_DIR/ckpt/, as plain files.")
    parser.add_argument("run_dir", help="a training out_dir holding ckpt/ (train_state.json, "
                                        ".metadata, one .distcp per rank)")
    parser.add_argument("--out", default=None,
                        help="where to write model.safetensors, minillm_config.json, "
                             "tokenizer.model (and adapter/); default: RUN_DIR itself")
    args = parser.parse_args(argv)
    consolidate(args.run_dir, args.out)


if __name__ == "__main__":
    sys.exit(run_cli(main))
