"""Training (docs chapters 3, 7 and 9): the loop and what it needs.

    config.py       TrainConfig: every number a run depends on, with strict TOML / flag overrides
    schedulers.py   the LR schedules, as pure functions of the step
    muon.py         Muon for the hidden matrices, AdamW for the rest
    adamw8bit.py    AdamW8bit: AdamW with both moments stored blockwise in 8 bits
    flops.py        the one count of parameters and FLOPs, and the memory estimator
    loss.py         the loss, once: summed token cross-entropy, and the held-out mean of it
    preference_loss.py  DPO (cDPO), IPO, hinge, SimPO, ORPO, Bradley-Terry: pure functions
    preference.py   preference pairs in the loop: response log-probs, the reference, reward head
    checkpoint.py   ckpt.pt: atomic, with every RNG state, for exact resume
    log.py          the summary line, progress bar, tensorboard, MFU, samples
    loop.py         `train(cfg)`: the loop itself, top to bottom
    distributed.py  the process group, FSDP2 sharding, the sharded checkpoint ckpt/ (DCP)
    consolidate.py  `run.py consolidate`: a sharded ckpt/ to model.safetensors (+ adapter)
    plot.py         a dependency-free PNG line chart for the curves in docs/
"""
