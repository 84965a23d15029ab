"""Preference tuning: the losses against their equations, the chunked response log-probs against a
plain log-softmax, TRL's record formats and truncation, the [chosen; rejected] batch, the embedded
pairs, and the loop (step 0 of DPO is ln 2, precomputed references, exact resume, the reward
model, DDP). A 2-layer dim-32 model and a 384-piece tokenizer: seconds per run."""

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tiny import tiny_tokenizer, write_hf_checkpoint

from minillm.config import ModelConfig
from minillm.data.preference import (
    collate_pairs,
    load_preference_data,
    read_pairs,
    stdlib_pairs,
    tokenize_pair,
)
from minillm.data.templates import format_prompt
from minillm.tokenizer.sentencepiece import Tokenizer
from minillm.training import preference_loss as pl
from minillm.training.config import TrainConfig, apply_overrides
from minillm.training.loop import train
from minillm.training.preference import last_position, response_logps

LN2 = math.log(2)


# --------------------------------------------------------------------------------------------------
# the losses, against the equations written out in float64


def _logps(seed=0, B=5):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(4, B, generator=g, dtype=torch.float64) * 20  # policy c, r; ref c, r
    n = torch.randint(1, 12, (2, B), generator=g).double()
    return *lp, *n


def test_dpo_family_equations():
    lc, lr, rc, rr, nc, nr = _logps()
    beta, eps = 0.3, 0.1
    d = (lc - rc) - (lr - rr)
    s = lambda z: 1 / (1 + torch.exp(-z))  # noqa: E731
    losses, cr, rj = pl.dpo_loss(lc, lr, rc, rr, beta)
    assert torch.allclose(losses, -torch.log(s(beta * d)), atol=1e-12)
    assert torch.allclose(cr, beta * (lc - rc)) and torch.allclose(rj, beta * (lr - rr))
    smooth = pl.dpo_loss(lc, lr, rc, rr, beta, eps)[0]
    ref = -(1 - eps) * torch.log(s(beta * d)) - eps * torch.log(s(-beta * d))
    assert torch.allclose(smooth, ref, atol=1e-12)
    ipo = pl.ipo_loss(lc, lr, rc, rr, nc, nr, beta)[0]
    assert torch.allclose(ipo, ((lc - rc) / nc - (lr - rr) / nr - 1 / (2 * beta)) ** 2)
    hinge = pl.hinge_loss(lc, lr, rc, rr, beta)[0]
    assert torch.allclose(hinge, torch.clamp(1 - beta * d, min=0))
    # policy = reference: every pair's DPO loss is ln 2, the rewards 0
    same = pl.dpo_loss(lc, lr, lc, lr, 0.1)
    assert torch.equal(same[0], torch.full_like(lc, LN2)) and not same[1].any()


def test_reference_free_equations():
    lc, lr, _, _, nc, nr = _logps(1)
    simpo, cr, _ = pl.simpo_loss(lc / 10, lr / 10, nc, nr, beta=2.0, gamma=0.5)
    z = 2.0 * (lc / 10 / nc - lr / 10 / nr) - 0.5
    assert torch.allclose(simpo, torch.log1p(torch.exp(-z)), atol=1e-12)
    assert torch.allclose(cr, 2.0 * lc / 10 / nc)
    orpo = pl.orpo_loss(lc, lr, nc, nr, beta=0.2)[0]
    pc, pr = torch.exp(lc / nc), torch.exp(lr / nr)
    log_or = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
    assert torch.allclose(orpo, -0.2 * F.logsigmoid(log_or), atol=1e-10)
    bt = pl.bradley_terry_loss(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0]))[0]
    assert torch.allclose(bt, torch.tensor([math.log1p(math.exp(-1.5)), math.log1p(math.e)]))


def test_response_logps_match_a_plain_log_softmax():
    torch.manual_seed(0)
    B, T, C, V = 3, 7, 16, 41  # awkward sizes; chunks of 2 rows split the 13 response tokens
    head = torch.nn.Linear(C, V, bias=False)
    h = torch.randn(B, T, C, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    y[0, :3] = y[1, 5:] = y[2, :] = -100
    y[2, 4] = 9  # one token in the last row
    got = response_logps(head, h, y, chunk_elements=2 * V)
    logp = torch.log_softmax(head(h).double(), -1)
    ref = (logp.gather(2, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)).sum(1)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    weights = torch.tensor([0.3, -1.0, 2.0])
    (gh,) = torch.autograd.grad((got * weights).sum(), h)
    (rh,) = torch.autograd.grad((ref * weights).sum(), h)
    assert torch.allclose(gh, rh.float(), atol=1e-5)
    assert last_position(y).tolist() == [6, 4, 4]


# --------------------------------------------------------------------------------------------------
# data


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return tiny_tokenizer(tmp_path_factory.mktemp("pref_tok") / "tok.model")


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_standard_and_conversational_records(tok, tmp_path):
    std = _jsonl(tmp_path / "std.jsonl", [dict(prompt="Which module defines `dumps`?",
                                               chosen="json", rejected="pickle", kind="module")])
    (p,) = read_pairs(std)
    assert (p.chosen, p.rejected, p.meta, p.conversational) == ("json", "pickle",
                                                                {"kind": "module"}, False)
    t = tokenize_pair(p, tok, "alpaca", 200)
    alpaca = format_prompt("alpaca", "Which module defines `dumps`?")
    assert t.prompt_ids == [tok.bos_id] + tok.encode(alpaca, bos=False)
    assert t.chosen_ids == tok.encode("json", bos=False, eos=True)
    conv = _jsonl(tmp_path / "conv.jsonl", [dict(
        prompt=[{"role": "user", "content": "Name a list method."}],
        chosen=[{"role": "assistant", "content": "append"}],
        rejected=[{"role": "assistant", "content": "dumps"}])])
    (c,) = read_pairs(conv)
    tc = tokenize_pair(c, tok, "vicuna", 200)
    assert tok.decode(tc.prompt_ids).endswith("USER: Name a list method. ASSISTANT:")
    assert tc.rejected_ids == tok.encode("dumps", bos=False, eos=True)


def test_implicit_prompts_are_extracted_as_trl_does(tmp_path):
    turn = [{"role": "user", "content": "What color is the sky?"}]
    path = _jsonl(tmp_path / "implicit.jsonl", [
        dict(chosen=turn + [{"role": "assistant", "content": "It is blue."}],
             rejected=turn + [{"role": "assistant", "content": "It is green."}]),
        dict(chosen="The sky is blue.", rejected="The sky is green.")])
    conv, std = read_pairs(path)
    assert (conv.prompt, conv.chosen, conv.rejected) == (turn, "It is blue.", "It is green.")
    assert (std.prompt, std.chosen, std.rejected) == ("The sky is", " blue.", " green.")


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "q", "chosen": "a"}', r"bad.jsonl:2: preference record is missing \['rejected'\]"),
    ('{"prompt": "q", "chosen": "a", "rejected": 3}', r"bad.jsonl:2: 'rejected' must be a string"),
    ('{"prompt": "q", "chosen": " ", "rejected": "b"}', r"bad.jsonl:2: 'chosen' is empty"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}',
     r"bad.jsonl:2: 'chosen' must be a non-empty list"),
    ('{"prompt": [{"role": "bot", "content": "q"}], "chosen": [], "rejected": []}',
     r"bad.jsonl:2: prompt\[0\]: unknown role 'bot'"),
    ('{"prompt": [{"role": "user", "content": "q"}], '
     '"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", '
     '"content": "b"}]}', r"bad.jsonl:2: 'chosen' must be one assistant message"),
])
def test_bad_records_name_the_line(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=expected):
        read_pairs(path)


def test_truncation_keeps_the_prompt_end_and_the_response_start(tok, tmp_path):
    long_prompt = " ".join(f"word{i}" for i in range(40))
    path = _jsonl(tmp_path / "p.jsonl", [dict(prompt=long_prompt, chosen="a b c d e f g h",
                                              rejected="x"), dict(prompt="q", chosen="a",
                                                                  rejected="b")] * 3)
    (p, _) = read_pairs(path)[:2]
    full = tokenize_pair(p, tok, "none", 10_000)
    t = tokenize_pair(p, tok, "none", 16, max_prompt_length=10)
    assert t.prompt_ids == [tok.bos_id] + full.prompt_ids[-9:]  # BOS + the prompt's end
    assert t.chosen_ids == full.chosen_ids[:6] and t.rejected_ids == full.rejected_ids
    assert t.truncated and tokenize_pair(p, tok, "none", len(full.prompt_ids)) is None
    data = load_preference_data(path, tok, "", 20, test_frac=0.4)
    assert (len(data.train) + len(data.test), data.n_dropped, data.template) == (3, 3, "none")


def test_batch_is_chosen_then_rejected_with_only_response_targets(tok, tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [dict(prompt="alpha beta", chosen="gamma",
                                              rejected="delta epsilon zeta"),
                                         dict(prompt="eta", chosen="theta iota", rejected="kappa")])
    pairs = [tokenize_pair(p, tok, "none", 100) for p in read_pairs(path)]
    x, y = collate_pairs(pairs, pad_id=0)  # (4, T)
    for row, (t, resp) in enumerate([(pairs[0], pairs[0].chosen_ids),
                                     (pairs[1], pairs[1].chosen_ids),
                                     (pairs[0], pairs[0].rejected_ids),
                                     (pairs[1], pairs[1].rejected_ids)]):
        ids = t.prompt_ids + resp
        assert x[row, :len(ids) - 1].tolist() == ids[:-1]
        assert y[row][y[row] != -100].tolist() == resp  # targets: the response and its EOS only
        assert (y[row, :len(t.prompt_ids) - 1] == -100).all()


def test_stdlib_pairs_reject_a_plausible_wrong_answer():
    records = [dict(instruction="Which module defines `dumps`?", output="json", kind="module",
                    name="json.dumps"),
               dict(instruction="Which module defines `JSONDecoder`?", output="json.decoder",
                    kind="module", name="json.decoder.JSONDecoder"),
               dict(instruction="Which module defines `scanstring`?", output="json.scanner",
                    kind="module", name="json.scanner.py_scanstring"),
               dict(instruction="Write the signature of `textwrap.wrap`.",
                    output="wrap(text, width=70, **kwargs)", kind="signature",
                    name="textwrap.wrap"),
               dict(instruction="Write the signature of `json.dumps`.",
                    output="dumps(obj, *, skipkeys=False)", kind="signature", name="json.dumps"),
               dict(instruction="What does `json.dumps` do?", output="Serialize obj.",
                    kind="describe", name="json.dumps")]
    pairs = stdlib_pairs(records)
    assert [p["kind"] for p in pairs] == ["module"] * 3 + ["signature"] * 2
    by_prompt = {p["prompt"]: p for p in pairs}
    # a sibling module of json.decoder, never the right one
    assert by_prompt["Which module defines `JSONDecoder`?"]["rejected"] == "json.scanner"
    assert by_prompt["Write the signature of `textwrap.wrap`."]["rejected"] == \
        "wrap(obj, *, skipkeys=False)"  # the name, with another symbol's arguments
    assert all(p["chosen"] != p["rejected"] for p in pairs)


# --------------------------------------------------------------------------------------------------
# the loop


@pytest.fixture(scope="module")
def assets(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("pref_assets")
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=384, max_seq_len=64)
    write_hf_checkpoint(d / "base", cfg, fmt="safetensors", tokenizer=tok)
    modules, wrong = ["json", "textwrap", "string", "abc"], ["os", "sys", "re", "io"]
    rows = [dict(prompt=f"Which module defines `name{i}`?", chosen=modules[i % 4],
                 rejected=wrong[(i * 3) % 4]) for i in range(40)]
    return dict(base=str(d / "base"), pairs=str(_jsonl(d / "pairs.jsonl", rows)),
                cache=str(d / "cache"))


def pref_flat(assets, out_dir, **over) -> dict:
    flat = {"out_dir": str(out_dir), "init_from": assets["base"], "seed": 7,
            "data.format": "preference", "data.corpus": assets["pairs"],
            "data.cache_dir": assets["cache"], "data.val_frac": 0.2,
            "finetune.method": "lora", "finetune.lora_r": 4, "batch_size": 4, "block_size": 48,
            "schedule.total_steps": 6, "schedule.warmup_steps": 0, "schedule.max_lr": 2e-2,
            "dtype": "float32", "eval.interval": 3, "eval.iters": 2, "eval.sample_tokens": 0,
            "checkpoint.interval": 3, "log.progress_bar": False, "log.tensorboard": False}
    flat.update({k.replace("__", "."): v for k, v in over.items()})
    return flat


def pref_cfg(assets, out_dir, **over) -> TrainConfig:
    return apply_overrides(TrainConfig(), pref_flat(assets, out_dir, **over), "test")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_step_zero_is_ln2_and_the_pairs_separate(assets, tmp_path, method):
    r = train(pref_cfg(assets, tmp_path / method, finetune__method=method))
    assert r.losses[0] == pytest.approx(LN2, abs=1e-7)  # policy = reference
    assert r.val_losses[0] == pytest.approx(LN2, abs=1e-7)
    assert r.losses[5] < r.losses[0] - 0.02 and r.val_losses[6] < LN2


def test_every_loss_trains_and_reports_trl_metrics(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for loss in ("ipo", "hinge", "simpo", "orpo", "reward"):
        over = dict(preference__loss=loss, schedule__total_steps=4, eval__interval=0)
        if loss == "reward":
            over.update(log__tensorboard=True, log__interval=1)
        r = train(pref_cfg(assets, tmp_path / loss, **over))
        assert r.losses[3] < r.losses[0], loss
    tags = EventAccumulator(str(tmp_path / "reward" / "tb")).Reload().Tags()["scalars"]
    assert {"train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen",
            "eval/rewards/chosen", "eval/rewards/rejected"} <= set(tags)
    assert (tmp_path / "reward" / "reward_head.safetensors").is_file()


def test_precomputed_reference_resumes_exactly(assets, tmp_path):
    over = dict(finetune__method="full", preference__precompute_ref=True,
                data__cache_dir=str(tmp_path / "cache"))
    whole = train(pref_cfg(assets, tmp_path / "a", **over))
    tables = list((tmp_path / "cache").glob("ref_logps-*.pt"))
    assert len(tables) == 1 and whole.losses[0] == pytest.approx(LN2, abs=1e-6)
    stamp = tables[0].stat().st_mtime_ns
    train(pref_cfg(assets, tmp_path / "b", max_steps=3, **over))
    second = train(pref_cfg(assets, tmp_path / "b", **over), resume=True)
    assert second.losses == {k: v for k, v in whole.losses.items() if k >= 3}
    assert tables[0].stat().st_mtime_ns == stamp  # read, never rewritten
    frozen = train(pref_cfg(assets, tmp_path / "c", finetune__method="full"))
    assert all(abs(frozen.losses[k] - v) < 1e-5 for k, v in whole.losses.items())


def test_config_rules():
    with pytest.raises(ValueError, match="preference.loss must be one of"):
        apply_overrides(TrainConfig(), {"preference.loss": "kto"}, "test")
    with pytest.raises(ValueError, match="data.packing must be false"):
        apply_overrides(TrainConfig(), {"data.format": "preference", "init_from": "x",
                                        "data.packing": True}, "test")
    with pytest.raises(ValueError, match="init_from must be a checkpoint directory"):
        apply_overrides(TrainConfig(), {"data.format": "preference"}, "test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, flat: dict, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        r = train(apply_overrides(TrainConfig(), flat, "test"))
        torch.save(dict(losses=r.losses, val=r.val_losses), out.format(rank=rank))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_two_ranks_match_one_process(assets, tmp_path):
    over = dict(schedule__total_steps=3, eval__interval=0, checkpoint__export=False)
    single = train(pref_cfg(assets, tmp_path / "single", **over))
    out = str(tmp_path / "rank{rank}.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), pref_flat(assets, tmp_path / "ddp", **over), out),
             nprocs=2)
    r0, r1 = (torch.load(out.format(rank=r), weights_only=True) for r in (0, 1))
    assert r0["losses"] == r1["losses"]
    assert all(abs(r0["losses"][k] - v) < 1e-5 for k, v in single.losses.items())
    assert abs(r0["val"][3] - single.val_losses[3]) < 1e-5
