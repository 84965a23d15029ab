"""The real model: SmolLM2-135M-Instruct, llama.cpp's Q4_1 GGUF (tests/real_model.py), against
transformers on the same file (bench/make_smollm2_goldens.py; versions in the golden file).

Both dequantize Q4_1 to float32, so the logits agree to float32 rounding. The prompts' ids are
llama.cpp's (the tokenizer is the other half of this work; here the maths is tested alone).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from real_model import smollm2_gguf

from minillm.formats.load import load_pretrained
from minillm.generate.decode import generate_tokens
from minillm.generate.sampling import SamplingConfig

GOLDEN = json.loads((Path(__file__).parent / "data" / "smollm2_goldens.json").read_text())


@pytest.fixture(scope="module")
def smollm2():
    return load_pretrained(smollm2_gguf())


def test_the_file_is_the_pinned_one():
    from minillm.formats.download import sha256_file

    assert sha256_file(smollm2_gguf()) == GOLDEN["gguf_sha256"]


def test_config_from_the_gguf(smollm2):
    cfg = smollm2.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim,
            cfg.vocab_size, cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps,
            cfg.rope_scaling) == (30, 576, 9, 3, 64, 1536, 49152, True, 100000.0, 1e-5, None)


@pytest.mark.parametrize("i", range(len(GOLDEN["prompts"])))
def test_first_logits_match_transformers(smollm2, i):
    row = GOLDEN["prompts"][i]
    with torch.no_grad():
        last = smollm2(torch.tensor([row["ids"]]))[0][0, -1]  # (V,)
    assert last.topk(8).indices.tolist() == row["top_ids"][:8]
    torch.testing.assert_close(last[row["top_ids"]], torch.tensor(row["top_logits"]),
                               atol=2e-4, rtol=0)
    torch.testing.assert_close(last[GOLDEN["sample_ids"]], torch.tensor(row["sample_logits"]),
                               atol=2e-4, rtol=0)
    assert abs(last.logsumexp(-1).item() - row["logsumexp"]) < 2e-4


@pytest.mark.parametrize("i", [0, 2])  # "The capital of France is"; "What is 2+2?" in ChatML
def test_greedy_continuation_matches_transformers(smollm2, i):
    # transformers stops after its EOS (<|im_end|>, id 2, included); minillm is asked for as many
    # tokens with no EOS, and must give the same ones: " Paris.\n\n…", "The answer … is 4."
    row = GOLDEN["prompts"][i]
    want = row["greedy"][:16]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=len(want))
    assert list(generate_tokens(smollm2, row["ids"], cfg)) == want
    if i == 2:
        assert want[-1] == 2 and len(want) < 16  # the chat answer ends its turn


def test_its_own_template_renders_the_chat_prompt():
    # what `generate.py --checkpoint smollm2-135m-instruct --chat` renders for one user turn: the
    # ChatML text whose llama.cpp ids the goldens above answer ("... is 4.")
    from minillm.data.chat_template import load_chat_template, render_chat_template

    rendered = render_chat_template(load_chat_template(smollm2_gguf()),
                                    [{"role": "user", "content": "What is 2+2?"}], True,
                                    "<|im_start|>", "<|im_end|>")
    assert rendered == GOLDEN["prompts"][2]["text"]
