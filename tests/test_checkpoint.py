"""Loading OpenLLaMA-layout directories in every weight format, minillm's own
format, and bad input."""

import json

import pytest
import torch
from reference_llama import reference_forward
from tiny import tiny_tokenizer, write_hf_checkpoint

from minillm import Llama
from minillm.config import ModelConfig
from minillm.finetune.nf4_linear import nf4_hook
from minillm.formats.load import load_pretrained
from minillm.formats.native import save_model

MHA = ModelConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=160, vocab_size=97, max_seq_len=64)
GQA = ModelConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=3, hidden_dim=200, vocab_size=113,
                  max_seq_len=64)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.mark.parametrize("fmt", ["bin", "bin-sharded", "safetensors", "safetensors-sharded"])
@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
def test_load_each_format_matches_reference(tmp_path, fmt, cfg):
    state = write_hf_checkpoint(tmp_path, cfg, seed=3, fmt=fmt)
    model = Llama.from_pretrained(tmp_path)
    idx = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model(idx)
    torch.testing.assert_close(logits, reference_forward(state, cfg.to_hf_config(), idx), atol=1e-5,
                               rtol=0)
    assert not model.training


def test_load_bf16_shards_to_bf16_keeps_bits(tmp_path):
    state = write_hf_checkpoint(tmp_path, MHA, fmt="bin-sharded", dtype=torch.bfloat16)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.layers[1].mlp.up_proj.weight,
                       state["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])


def test_minillm_format_round_trip(tmp_path, tokenizer):
    write_hf_checkpoint(tmp_path / "hf", GQA, fmt="safetensors")
    model = Llama.from_pretrained(tmp_path / "hf")
    save_model(model, tmp_path / "ours", tokenizer_path=tokenizer.path)
    again = Llama.from_pretrained(tmp_path / "ours")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == tokenizer.model_bytes()
    assert not list((tmp_path / "ours").glob("*.tmp*"))


def test_tied_embeddings_round_trip(tmp_path):
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=50, max_seq_len=16,
                      tie_embeddings=True)
    torch.manual_seed(0)
    save_model(Llama(cfg), tmp_path)
    m = Llama.from_pretrained(tmp_path)
    assert m.lm_head.weight is m.embed_tokens.weight


# --------------------------------------------------------------------------------------------------
# bad input: one clear error naming the file and the key


def test_missing_directory(tmp_path):
    from minillm.formats.load import load_tokenizer

    with pytest.raises(FileNotFoundError, match="nope: checkpoint path does not exist"):
        Llama.from_pretrained(tmp_path / "nope")
    # generate.py reads the tokenizer first: the missing path, not a missing
    # tokenizer.model, is the error
    with pytest.raises(FileNotFoundError, match=r"nope: checkpoint path does not exist$"):
        load_tokenizer(tmp_path / "nope")


def test_directory_without_weights(tmp_path):
    write_hf_checkpoint(tmp_path, MHA, fmt="bin")
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no weights found; expected one of "
                                                "model.safetensors.index.json"):
        Llama.from_pretrained(tmp_path)


def test_missing_weight_key(tmp_path):
    state = write_hf_checkpoint(tmp_path, MHA, fmt="bin")
    del state["model.layers.1.mlp.down_proj.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: missing weights: "
                                         r"'model.layers.1.mlp.down_proj.weight'"):
        Llama.from_pretrained(tmp_path)


def test_unexpected_weight_key(tmp_path):
    state = write_hf_checkpoint(tmp_path, MHA, fmt="safetensors")
    from safetensors.torch import save_file

    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors: unexpected weight "
                                         r"'layers.0.self_attn.q_proj.bias'"):
        Llama.from_pretrained(tmp_path)


def test_shape_mismatch(tmp_path):
    write_hf_checkpoint(tmp_path, MHA, fmt="bin")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"pytorch_model.bin: weight "
                                         r"'layers.0.mlp.gate_proj.weight' has shape "
                                         r"\(160, 64\), expected \(128, 64\)"):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("fmt,name", [("bin-sharded", "pytorch_model-00002-of-00003.bin"),
                                      ("safetensors-sharded", "model-00002-of-00003.safetensors")])
def test_truncated_shard(tmp_path, fmt, name):
    write_hf_checkpoint(tmp_path, MHA, fmt=fmt)
    p = tmp_path / name
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ValueError, match=name):
        Llama.from_pretrained(tmp_path)


def test_corrupt_bin_is_not_unpickled(tmp_path):
    write_hf_checkpoint(tmp_path, MHA, fmt="bin")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: holds more than tensors, which "
                                         r"minillm does not load \(Unsupported global: GLOBAL "
                                         r".*print was not an allowed global") as e:
        Llama.from_pretrained(tmp_path)
    assert "weights_only" not in str(e.value)  # never the advice to unpickle arbitrary code


def test_index_names_missing_file(tmp_path):
    write_hf_checkpoint(tmp_path, MHA, fmt="bin-sharded")
    (tmp_path / "pytorch_model-00003-of-00003.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin.index.json: names shard "
                                                r"'pytorch_model-00003-of-00003.bin'"):
        Llama.from_pretrained(tmp_path)


def test_index_lacks_key(tmp_path):
    write_hf_checkpoint(tmp_path, MHA, fmt="safetensors-sharded")
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["model.norm.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match=r"index.json: index lacks weight 'model.norm.weight'"):
        Llama.from_pretrained(tmp_path)


def test_config_key_that_changes_the_maths(tmp_path):
    write_hf_checkpoint(tmp_path, MHA, fmt="bin")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["sliding_window"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: config key 'sliding_window' = 4096 is "
                                         r"not supported"):
        Llama.from_pretrained(tmp_path)


def test_unsupported_config_value(tmp_path):
    write_hf_checkpoint(tmp_path, MHA, fmt="bin")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: config key 'rope_scaling'"):
        Llama.from_pretrained(tmp_path)


def test_minillm_config_unknown_key(tmp_path):
    torch.manual_seed(0)
    save_model(Llama(MHA), tmp_path)
    d = json.loads((tmp_path / "minillm_config.json").read_text())
    d["n_expert"] = 8
    (tmp_path / "minillm_config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"minillm_config.json: unknown config key 'n_expert'"):
        Llama.from_pretrained(tmp_path)


def test_quantize_on_load_nf4_matches_rounded_dense_model(tmp_path, monkeypatch):
    from minillm.finetune.nf4_linear import NF4Linear
    from minillm.kernels.nf4 import dequantize_nf4_ref, quantize_nf4_ref

    # the kernels are checked against their references in test_nf4_kernels.py; here the
    # loader is under test, so run the references (what a CPU-only machine runs) instead of
    # the slow Triton interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    write_hf_checkpoint(tmp_path, GQA, seed=4, fmt="bin-sharded")
    q = load_pretrained(tmp_path, linear_hook=nf4_hook(compute_dtype=torch.float32))
    dense = load_pretrained(tmp_path)
    swapped = [n for n, m in q.named_modules() if isinstance(m, NF4Linear)]
    # every block projection; embeddings, norms, lm_head stay dense
    assert len(swapped) == 7 * GQA.n_layers
    assert isinstance(q.lm_head, torch.nn.Linear) and not isinstance(q.lm_head, NF4Linear)
    with torch.no_grad():
        for name, m in dense.named_modules():
            if name in swapped:
                w = m.weight
                m.weight.copy_(dequantize_nf4_ref(*quantize_nf4_ref(w), w.shape,
                                                  dtype=torch.float32))
        idx = torch.randint(0, GQA.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(q(idx)[0], dense(idx)[0], atol=1e-5, rtol=0)


def test_shard_groups_exact():
    from minillm.formats.hf import shard_groups

    assert shard_groups([("a", 3), ("b", 3), ("c", 10), ("d", 1)], 6) == [["a", "b"], ["c"], ["d"]]


def test_save_hf_multi_shard_round_trip(tmp_path):
    from minillm.formats.hf import save_hf

    torch.manual_seed(0)
    model = Llama(GQA)
    save_hf(model, tmp_path, shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = Llama.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_json_files_get_one_clear_error(tmp_path):
    # one reader for config.json, minillm_config.json, params.json and adapter_config.json
    from minillm.util.fileio import read_json_object

    with pytest.raises(FileNotFoundError, match=r"missing.json: adapter config not found"):
        read_json_object(tmp_path / "missing.json", "adapter config")
    (tmp_path / "bad.json").write_text("{'a': 1}")
    with pytest.raises(ValueError, match=r"bad.json: invalid JSON at column 2 \(Expecting "
                                         r"property name"):
        read_json_object(tmp_path / "bad.json")
    (tmp_path / "params.json").write_text("[4096]")
    with pytest.raises(ValueError, match=r"params.json: expected a JSON object in the Meta params "
                                         r"file, found list"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "ok.json").write_text('{"dim": 64}')
    assert read_json_object(tmp_path / "ok.json") == {"dim": 64}
