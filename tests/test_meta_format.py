"""Meta's consolidated layout: round trip, the FFN-width formula, interleaved q/k,
model-parallel shards."""

import json

import pytest
import torch
from tiny import write_hf_checkpoint

from minillm import Llama
from minillm.config import ModelConfig
from minillm.formats.meta import meta_hidden_dim, meta_params, save_meta

GQA = ModelConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=200, vocab_size=113,
                  max_seq_len=64)


def test_meta_round_trip_logits_equal(tmp_path):
    write_hf_checkpoint(tmp_path / "hf", GQA, seed=1, fmt="safetensors")
    model = Llama.from_pretrained(tmp_path / "hf")
    save_meta(model, tmp_path / "meta")
    again = Llama.from_pretrained(tmp_path / "meta")
    idx = torch.randint(0, GQA.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], again(idx)[0])
    # the file holds Meta names, and q rows in interleaved order: row 1 of
    # head 0 is HF row head_dim/2
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert "layers.1.feed_forward.w3.weight" in sd and "tok_embeddings.weight" in sd
    D = GQA.head_dim
    assert torch.equal(sd["layers.0.attention.wq.weight"][1],
                       model.layers[0].self_attn.q_proj.weight[D // 2])
    assert torch.equal(sd["layers.0.attention.wk.weight"][2],
                       model.layers[0].self_attn.k_proj.weight[1])


@pytest.mark.parametrize("dim,hidden", [(3200, 8640), (4096, 11008), (5120, 13824), (96, 200),
                                        (256, 688), (64, 96), (4096, 14336)])
def test_params_reproduce_hidden_dim(dim, hidden):
    cfg = ModelConfig(dim=dim, n_heads=dim // 32, hidden_dim=hidden)
    p = meta_params(cfg)
    assert meta_hidden_dim(p["dim"], p["multiple_of"], p.get("ffn_dim_multiplier")) == hidden
    # Meta's own numbers: 7B uses multiple_of 256 and no multiplier
    if (dim, hidden) == (4096, 11008):
        assert p["multiple_of"] == 256 and "ffn_dim_multiplier" not in p


def test_model_parallel_shards_are_concatenated(tmp_path):
    write_hf_checkpoint(tmp_path / "hf", GQA, seed=2, fmt="bin")
    model = Llama.from_pretrained(tmp_path / "hf")
    save_meta(model, tmp_path / "meta")
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    row_parallel = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")
    halves = [{}, {}]
    for k, t in sd.items():
        if t.dim() == 1:
            halves[0][k] = halves[1][k] = t
        else:
            for i, part in enumerate(t.chunk(2, dim=1 if k.endswith(row_parallel) else 0)):
                halves[i][k] = part.clone()
    torch.save(halves[0], tmp_path / "meta" / "consolidated.00.pth")
    torch.save(halves[1], tmp_path / "meta" / "consolidated.01.pth")
    again = Llama.from_pretrained(tmp_path / "meta")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_meta_bad_params(tmp_path):
    write_hf_checkpoint(tmp_path / "hf", GQA, fmt="bin")
    save_meta(Llama.from_pretrained(tmp_path / "hf"), tmp_path / "meta")
    p = json.loads((tmp_path / "meta" / "params.json").read_text())
    p["multiple_of"] = 64
    (tmp_path / "meta" / "params.json").write_text(json.dumps(p))
    with pytest.raises(ValueError, match="params.json: dim/multiple_of/ffn_dim_multiplier give "
                                         "hidden 256"):
        Llama.from_pretrained(tmp_path / "meta")
