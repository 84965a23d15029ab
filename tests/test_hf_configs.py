"""The config.json files that exist load into the exact ModelConfig; untrusted sizes and values get
one clear error naming the file and the key (HF config.json and GGUF metadata through
config.check_model_values); broken weight files are named without torch's advice to unpickle them.

Fixtures: tests/fixtures/configs/ (README.md there says where each file comes from).
"""

import json
import math
import struct
import warnings
from pathlib import Path

import pytest
import torch
from reference_llama import reference_forward
from tiny import random_hf_state, tiny_tokenizer, write_hf_checkpoint

from minillm import Llama
from minillm.config import ModelConfig
from minillm.util.fileio import read_json_object

FIXTURES = Path(__file__).parent / "fixtures" / "configs"
TINY_T5 = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=96,
               max_seq_len=128, norm_eps=1e-5, rope_theta=50000.0)
EXPECTED = {
    "openllama_3b_v1.json": ModelConfig.from_name("openllama-3b"),
    "openllama_7b_v1.json": ModelConfig.from_name("openllama-7b"),
    "openllama_13b_v1.json": ModelConfig.from_name("openllama-13b"),
    "openllama_3b_v2.json": ModelConfig.from_name("openllama-3b"),
    "openllama_7b_v2.json": ModelConfig.from_name("openllama-7b"),
    "transformers4_to_dict.json": ModelConfig.from_name("openllama-3b"),
    "llama2_7b_hf.json": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                                     hidden_dim=11008, vocab_size=32000, max_seq_len=4096,
                                     norm_eps=1e-5, rope_theta=10000.0),
    "tinyllama_1.1b.json": ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                                       hidden_dim=5632, vocab_size=32000, max_seq_len=2048,
                                       norm_eps=1e-5, rope_theta=10000.0),
    "transformers5_save_pretrained.json": ModelConfig(**TINY_T5),
    "transformers5_to_dict.json": ModelConfig(**TINY_T5),
    "transformers5_save_pretrained_tied.json": ModelConfig(**TINY_T5, tie_embeddings=True),
}


def load_dict(d: dict, tmp_path: Path) -> ModelConfig:
    (tmp_path / "config.json").write_text(json.dumps(d))
    return ModelConfig.from_hf_config(tmp_path / "config.json")


def t5_config() -> dict:
    return json.loads((FIXTURES / "transformers5_save_pretrained.json").read_text())


# --------------------------------------------------------------------------------------------------
# the files that exist


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_configs_map_to_the_exact_model_config(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of these files is known: not even a warning
        cfg = ModelConfig.from_hf_config(FIXTURES / name)
    # every field: dims, heads, kv heads, eps, theta, vocab, positions, tying
    assert cfg == EXPECTED[name]


def test_tinyllama_is_gqa_with_four_kv_heads():
    cfg = ModelConfig.from_hf_config(FIXTURES / "tinyllama_1.1b.json")
    shape = (cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    assert shape == (22, 2048, 5632, 32, 4, 64)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.vocab_size) == (10000.0, 1e-5, 32000)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_checkpoint_saved_by_transformers5_loads_and_matches_reference(tmp_path, tied):
    # config.json exactly as transformers 5.24 `save_pretrained` wrote it; the weights are
    # ours, under the key set it wrote (20 tensors when tied: no lm_head.weight, 21 otherwise),
    # with its side files beside
    from safetensors.torch import save_file

    name = "transformers5_save_pretrained" + ("_tied" if tied else "")
    (tmp_path / "config.json").write_bytes((FIXTURES / f"{name}.json").read_bytes())
    (tmp_path / "generation_config.json").write_bytes(
        (FIXTURES / "transformers5_generation_config.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "LlamaTokenizer",
        "added_tokens_decoder": {"0": {"content": "<unk>", "special": True}}}))
    expected = EXPECTED[f"{name}.json"]
    state = random_hf_state(expected, seed=5, inv_freq=False)
    assert ("lm_head.weight" in state) is not tied and len(state) == (20 if tied else 21)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = Llama.from_pretrained(tmp_path)
    assert model.config == expected
    idx = torch.randint(0, expected.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(idx)
    torch.testing.assert_close(logits, reference_forward(state, expected.to_hf_config(), idx),
                               atol=1e-5, rtol=0)


def test_side_files_are_never_read(tmp_path):
    # generation_config.json / tokenizer_config.json are the tokenizer's and generate()'s business:
    # even broken ones beside a good checkpoint change nothing
    write_hf_checkpoint(tmp_path, ModelConfig(**TINY_T5), fmt="safetensors")
    (tmp_path / "generation_config.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_bytes(b"\xff\xfe garbage")
    assert Llama.from_pretrained(tmp_path).config == ModelConfig(**TINY_T5)


def test_bin_with_tied_lm_head_copy(tmp_path):
    # torch.save keeps both names of a tied tensor, so older .bin files of tied
    # models hold lm_head.weight
    cfg = ModelConfig(**TINY_T5, tie_embeddings=True)
    state = write_hf_checkpoint(tmp_path, cfg, fmt="bin")
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = Llama.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.embed_tokens.weight
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: holds an lm_head.weight that "
                                         r"differs from the embedding, but the config ties them"):
        Llama.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------
# keys: bookkeeping ignored, unknown warned, maths-changing refused


def test_unknown_key_gets_one_warning_naming_it(tmp_path):
    d = t5_config() | {"my_new_knob": 3}
    with pytest.warns(UserWarning) as record:
        cfg = load_dict(d, tmp_path)
    assert cfg == ModelConfig(**TINY_T5)
    assert [str(w.message) for w in record] == [
        f"{tmp_path / 'config.json'}: ignoring unknown config key 'my_new_knob' (not a Llama "
        "setting minillm knows)"]


def test_pretraining_tp_is_bookkeeping(tmp_path):
    # transformers 4.31–4.4x computed each projection in pretraining_tp slices: the same linear map
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_dict(t5_config() | {"pretraining_tp": 4}, tmp_path) == ModelConfig(**TINY_T5)


def test_old_defaults_and_null_kv_heads(tmp_path):
    # OpenLLaMA v1 files have no rope_theta and no num_key_value_heads: LlamaConfig's defaults apply
    d = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 160, "num_key_value_heads": None}
    cfg = load_dict(d, tmp_path)
    assert ((cfg.n_kv_heads, cfg.vocab_size, cfg.max_seq_len, cfg.norm_eps, cfg.rope_theta,
             cfg.tie_embeddings) == (4, 32000, 2048, 1e-6, 10000.0, False))


@pytest.mark.parametrize("key,value,message", [
    ("mlp_bias", True, r"config key 'mlp_bias' = true is not supported"),
    ("hidden_act", "gelu", r"config key 'hidden_act' = \"gelu\" is not supported"),
    ("model_type", "mistral", r"config key 'model_type' = \"mistral\" is not supported"),
    ("sliding_window", 4096, r"config key 'sliding_window' = 4096 is not supported"),
    ("pruned_heads", {"0": [1]}, r"config key 'pruned_heads' = \{\"0\": \[1\]\} is not supported"),
    ("attention_dropout", 0.1, r"config key 'attention_dropout' = 0.1 is not supported"),
    ("layer_types", ["full_attention", "sliding_attention"],
     r"config key 'layer_types' = .* is not supported"),
    ("rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0},
     r"config key rope_parameters.low_freq_factor must be a finite number > 0, found None"),
    ("quantization_config", {"quant_method": "gptq"},
     r"config key 'quantization_config': quantized checkpoints"),
])
def test_keys_that_change_the_maths_are_refused(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=r"config.json: " + message):
        load_dict(t5_config() | {key: value}, tmp_path)


@pytest.mark.parametrize("key,spec,kind", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "linear"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "dynamic"),
    ("rope_scaling", {"factor": 2.0}, "unnamed"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}, "yarn"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 10000.0}, "longrope"),
])
def test_rope_scaling_is_not_supported(tmp_path, key, spec, kind):
    with pytest.raises(ValueError, match=rf"config.json: config key '{key}' = .*: RoPE scaling "
                                         rf"'{kind}' is not supported \(minillm implements "
                                         r"plain RoPE and 'llama3'\)"):
        load_dict(t5_config() | {key: spec}, tmp_path)


LLAMA32_SCALING = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192.0}


def test_llama32_config_loads_with_its_rope_scaling():
    # Llama-3.2-1B's config.json as transformers 4.45 wrote it: every key (head_dim, mlp_bias, …)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = ModelConfig.from_hf_config(FIXTURES / "llama3.2_1b.json")
    assert cfg == ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                              vocab_size=128256, max_seq_len=131072, norm_eps=1e-5,
                              rope_theta=500000.0, tie_embeddings=True, head_dim=64,
                              rope_scaling=LLAMA32_SCALING)


def test_transformers_5_rope_parameters_and_qwen2(tmp_path):
    # 5.x: rope_parameters with rope_theta inside; an explicit head_dim; Qwen2's biases on q/k/v
    d = t5_config() | {"head_dim": 24, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, **LLAMA32_SCALING}}
    cfg = load_dict(d, tmp_path)
    assert (cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) == (24, 500000.0, LLAMA32_SCALING)
    qwen = t5_config() | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                          "use_sliding_window": False, "sliding_window": 4096,
                          "max_window_layers": 28, "layer_types": ["full_attention"] * 2}
    cfg = load_dict(qwen, tmp_path)
    assert (cfg.attention_bias, cfg.attention_out_bias) == (True, False)
    again = ModelConfig.from_hf_dict(cfg.to_hf_config())
    assert again == cfg and cfg.to_hf_config()["model_type"] == "qwen2"
    llama = load_dict(d | {"attention_bias": True}, tmp_path)
    assert (llama.attention_bias, llama.attention_out_bias) == (True, True)
    assert ModelConfig.from_hf_dict(llama.to_hf_config()) == llama


def test_early_2023_conversion_loads(tmp_path):
    # the first LLaMA conversions (transformers 4.27.0.dev0) spelled the class
    # LLaMAForCausalLM and wrote max_sequence_length, which transformers ignores
    # (max_position_embeddings then defaults to 2048)
    d = {"architectures": ["LLaMAForCausalLM"], "bos_token_id": 0, "eos_token_id": 1,
         "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 160,
         "initializer_range": 0.02, "max_sequence_length": 2048, "model_type": "llama",
         "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": -1,
         "rms_norm_eps": 1e-06, "torch_dtype": "float16", "transformers_version": "4.27.0.dev0",
         "use_cache": True, "vocab_size": 32000}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_dict(d, tmp_path)
    assert cfg == ModelConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=160, vocab_size=32000,
                              max_seq_len=2048, norm_eps=1e-6, rope_theta=10000.0)


def test_partial_rotary_is_refused(tmp_path):
    d = t5_config()
    d["rope_parameters"]["partial_rotary_factor"] = 0.5
    with pytest.raises(ValueError, match=r"config key 'rope_parameters.partial_rotary_factor' = "
                                         r"0.5 is not "):
        load_dict(d, tmp_path)


def test_rope_theta_from_either_key(tmp_path):
    d = t5_config()
    d["rope_theta"] = 50000  # the old top-level key too, agreeing (an int in JSON is fine)
    assert load_dict(d, tmp_path).rope_theta == 50000.0
    del d["rope_parameters"]
    d["rope_theta"] = 250000.0
    assert load_dict(d, tmp_path).rope_theta == 250000.0
    d["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
    with pytest.raises(ValueError, match=r"config.json: rope_theta = 250000.0 and "
                                         r"rope_parameters.rope_theta = 1000000.0 disagree"):
        load_dict(d, tmp_path)


# --------------------------------------------------------------------------------------------------
# untrusted values and sizes


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "0", "-1e-5"])
@pytest.mark.parametrize("where", ["rms_norm_eps", "rope_theta", "rope_parameters.rope_theta"])
def test_bad_eps_and_theta_named_by_key(tmp_path, where, bad):
    text = (FIXTURES / "transformers5_save_pretrained.json").read_text()
    if where == "rms_norm_eps":
        text = text.replace('"rms_norm_eps": 1e-05', f'"rms_norm_eps": {bad}')
    elif where == "rope_parameters.rope_theta":
        text = text.replace('"rope_theta": 50000.0', f'"rope_theta": {bad}')
    else:
        text = text.replace('"rope_parameters": {\n    "rope_theta": 50000.0,\n',
                            f'"rope_theta": {bad},\n'
                            '  "rope_parameters": {\n')
    (tmp_path / "config.json").write_text(text)
    shown = {"NaN": "nan", "Infinity": "inf", "0": "0", "-1e-5": "-1e-05"}[bad]
    with pytest.raises(ValueError, match=rf"config.json: {where} must be a finite number > 0, "
                                         rf"found {shown}$"):
        ModelConfig.from_hf_config(tmp_path / "config.json")


@pytest.mark.parametrize("key,value", [("num_hidden_layers", 2**31), ("vocab_size", 2**40),
                                       ("hidden_size", 0), ("intermediate_size", -1),
                                       ("num_attention_heads", 4.0)])
def test_absurd_sizes_named_by_key(tmp_path, key, value):
    with pytest.raises(ValueError, match=rf"config.json: {key} must be a positive int "
                                         rf"\(at most \d+\), found {value!r}$"):
        load_dict(t5_config() | {key: value}, tmp_path)


def test_huge_context_length_allocates_no_huge_rope_table(tmp_path):
    cfg = ModelConfig(**{**TINY_T5, "max_seq_len": 2**31})
    state = write_hf_checkpoint(tmp_path, cfg, fmt="safetensors")
    assert json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"] == 2**31
    model = Llama.from_pretrained(tmp_path)
    # nothing built at load
    assert model.config.max_seq_len == 2**31 and model.rope_cos.numel() == 0
    idx = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = model(idx)
    # grown to the length run
    assert model.rope_cos.shape == model.rope_sin.shape == (9, cfg.head_dim)
    torch.testing.assert_close(logits, reference_forward(state, cfg.to_hf_config(), idx), atol=1e-5,
                               rtol=0)
    model.setup_caches(batch_size=1, max_seq_len=16)
    assert model.rope_cos.shape == (16, cfg.head_dim)


def test_meta_params_json_bad_values_named(tmp_path):
    from minillm.formats.meta import save_meta

    torch.manual_seed(0)
    save_meta(Llama(ModelConfig(**TINY_T5)), tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps(params | {"norm_eps": math.nan}))
    with pytest.raises(ValueError, match=r"params.json: norm_eps must be a finite number > 0, "
                                         r"found nan$"):
        Llama.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from minillm.formats.gguf_layout import expected_shapes
    from minillm.ship.gguf_writer import write_gguf

    d = tmp_path_factory.mktemp("gguf")
    tok = tiny_tokenizer(d / "tokenizer.model", vocab_size=384)
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=96,
                      vocab_size=tok.vocab_size, max_seq_len=2**31, norm_eps=1e-5,
                      rope_theta=10000.0)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.3 for k, s in expected_shapes(cfg).items()}
    write_gguf(d / "m.gguf", cfg, iter(state.items()), tok, "f32", progress=False)
    return d / "m.gguf"


def test_gguf_huge_context_length_loads_small(gguf_file):
    model = Llama.from_pretrained(gguf_file)
    assert model.config.max_seq_len == 2**31 and model.rope_cos.numel() == 0
    with torch.no_grad():
        logits, _ = model(torch.tensor([[1, 5, 9, 2]]))
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()
    assert model.rope_cos.shape == (4, model.config.head_dim)


def _patch_gguf_value(path: Path, key: str, fmt: str, value, out: Path) -> Path:
    """Overwrite the value of metadata `key` (its type tag is checked, then the bytes replaced)."""
    data = bytearray(path.read_bytes())
    name = struct.pack("<Q", len(key)) + key.encode()
    at = data.index(name) + len(name) + 4  # past the name and the uint32 value type
    data[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("key,fmt,value,shown", [
    ("llama.attention.layer_norm_rms_epsilon", "<f", math.nan, "nan"),
    ("llama.attention.layer_norm_rms_epsilon", "<f", 0.0, "0.0"),
    ("llama.rope.freq_base", "<f", -10000.0, "-10000.0"),
    ("llama.rope.freq_base", "<f", math.inf, "inf"),
    ("llama.block_count", "<I", 2**31, "2147483648"),
    ("llama.embedding_length", "<I", 0, "0"),
])
def test_gguf_bad_metadata_named_by_key(gguf_file, tmp_path, key, fmt, value, shown):
    bad = _patch_gguf_value(gguf_file, key, fmt, value, tmp_path / "bad.gguf")
    with pytest.raises(ValueError, match=rf"bad.gguf: {key} must be .*, found {shown}$"):
        Llama.from_pretrained(bad)


def test_gguf_rope_scaling_is_refused(tmp_path):
    from minillm.formats.gguf_layout import expected_shapes
    from minillm.ship.gguf_writer import write_gguf

    tok = tiny_tokenizer(tmp_path / "tokenizer.model", vocab_size=384)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=48, vocab_size=tok.vocab_size,
                      max_seq_len=64)
    state = {k: torch.zeros(s) for k, s in expected_shapes(cfg).items()}
    write_gguf(tmp_path / "m.gguf", cfg, iter(state.items()), tok, "f32", progress=False,
               chat_template="yarn")
    # the one extra STRING key the writer can add has a name exactly as long
    # as llama.cpp's scaling key
    data = (tmp_path / "m.gguf").read_bytes().replace(b"tokenizer.chat_template",
                                                      b"llama.rope.scaling.type")
    (tmp_path / "scaled.gguf").write_bytes(data)
    with pytest.raises(ValueError, match=r"scaled.gguf: llama.rope.scaling.type = 'yarn': RoPE "
                                         r"scaling is not "):
        Llama.from_pretrained(tmp_path / "scaled.gguf")


# --------------------------------------------------------------------------------------------------
# broken files: one line naming the file


def test_deeply_nested_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match=r"config.json: invalid JSON \(nested too deeply "
                                         r"to parse\)$"):
        Llama.from_pretrained(tmp_path)


def test_json_that_is_not_utf8_names_the_file(tmp_path):
    # 0xe9 after 32 bytes
    (tmp_path / "config.json").write_bytes(b'{"hidden_size": 64, "name": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"config.json:1: not UTF-8 text \(byte 0xe9 at "
                                         r"offset 32\)$"):
        read_json_object(tmp_path / "config.json")


@pytest.mark.parametrize("content,found", [
    (b"\x00\x01garbage bytes that are not a zip",
     r"its 34 bytes start with b'\\x00\\x01garbage bytes '"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n",
     r"a Git LFS pointer, not the weights \(run `git lfs pull`\)"),
])
def test_bin_that_is_not_a_zip(tmp_path, content, found):
    write_hf_checkpoint(tmp_path, ModelConfig(**TINY_T5), fmt="bin")
    (tmp_path / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(ValueError, match=r"pytorch_model.bin: not a PyTorch zip checkpoint "
                                         r"\(expected a zip archive starting with b'PK\\x03\\x04', "
                                         rf"as torch.save writes\): {found}$") as e:
        Llama.from_pretrained(tmp_path)
    assert "weights_only" not in str(e.value)


def test_legacy_torch_bin_still_loads(tmp_path):
    cfg = ModelConfig(**TINY_T5)
    state = write_hf_checkpoint(tmp_path, cfg, fmt="bin")
    # torch < 1.6 format
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    idx = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        logits, _ = Llama.from_pretrained(tmp_path)(idx)
    torch.testing.assert_close(logits, reference_forward(state, cfg.to_hf_config(), idx), atol=1e-5,
                               rtol=0)


def test_missing_weight_names_the_file_and_its_name_there(tmp_path):
    from safetensors.torch import save_file

    state = write_hf_checkpoint(tmp_path, ModelConfig(**TINY_T5), fmt="safetensors")
    del state["model.norm.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError,
                       match=r"model.safetensors: missing weights: 'model.norm.weight'$"):
        Llama.from_pretrained(tmp_path)


def test_index_shard_names_stay_in_the_directory(tmp_path):
    write_hf_checkpoint(tmp_path, ModelConfig(**TINY_T5), fmt="safetensors-sharded")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../model-00001-of-00003.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index.json: shard name "
                                         r"'../model-00001-of-00003.safetensors' is not a "
                                         r"file name in "):
        Llama.from_pretrained(tmp_path)
