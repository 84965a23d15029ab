"""minillm.util.strict: the one type check behind both config loaders (ModelConfig.from_dict for
minillm_config.json, and TrainConfig's TOML / JSON / flag overrides)."""

import pytest

from minillm.config import ModelConfig
from minillm.training.config import FinetuneConfig, TrainConfig, apply_overrides
from minillm.util.strict import check_value, field_types


def test_field_types_resolve_the_annotation_strings():
    types = field_types(ModelConfig)
    assert (types["dim"], types["norm_eps"], types["tie_embeddings"]) == (int, float, bool)
    assert types["n_kv_heads"] == int | None  # the string "int | None" under postponed annotations
    assert field_types(FinetuneConfig)["lora_targets"] == list[str]


@pytest.mark.parametrize("value, tp, expected", [
    (3, int, 3), (2.5, float, 2.5), (3, float, 3.0), (True, bool, True), ("q", str, "q"),
    (None, int | None, None), (4, int | None, 4),
    (["q_proj", "v_proj"], list[str], ["q_proj", "v_proj"]),
])
def test_values_of_the_annotated_type_pass(value, tp, expected):
    out = check_value("k", value, tp, "src")
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("value, tp, message", [
    (True, int, "src: k must be int, found bool True"),
    (3.0, int, "src: k must be int, found float 3.0"),
    ("3", int, "src: k must be int, found str '3'"),
    (1, bool, "src: k must be bool, found int 1"),
    (None, int, "src: k must be int, found NoneType None"),
    ("4", int | None, "src: k must be int, found str '4'"),
    ("q_proj", list[str], "src: k must be a list of str, found 'q_proj'"),
    (["q_proj", 3], list[str], r"src: k must be a list of str, found \['q_proj', 3\]"),
])
def test_other_values_raise_naming_source_and_key(value, tp, message):
    with pytest.raises(TypeError, match=f"^{message}$"):
        check_value("k", value, tp, "src")


def test_both_loaders_give_the_same_error_and_widening():
    with pytest.raises(TypeError, match=r"^x\.json: dim must be int, found str '128'$"):
        ModelConfig.from_dict({"dim": "128"}, source="x.json")
    with pytest.raises(TypeError, match=r"^run\.toml: model\.dim must be int, found str '128'$"):
        apply_overrides(TrainConfig(), {"model.dim": "128"}, "run.toml")
    # tie_embeddings spelled out: a TrainConfig starts from the tied tiny
    # preset, a model file from untied
    from_json = ModelConfig.from_dict({"norm_eps": 1, "rope_theta": 500000, "tie_embeddings": True},
                                      source="x.json")
    from_toml = apply_overrides(TrainConfig(),
                                {"model.norm_eps": 1, "model.rope_theta": 500000}, "t").model
    assert from_json == from_toml and type(from_json.rope_theta) is float
