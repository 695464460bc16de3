"""falcontune.models: config.json parsing (HF / RW), quantize configs, known model names."""
from __future__ import annotations

import json

import pytest

from falcontune import models
from falcontune.models import (ConfigError, FalconConfig, QuantizeConfig, UnknownModelError,
                               config_to_hf_dict, get_known_model, parse_config,
                               parse_quantize_config)

@pytest.fixture
def shared_configs(shared_data):
    """The real 7B / 40B configs (conftest's shared_data skips, or fails under CI, if absent)."""
    return {name: json.loads((shared_data / "falcon" / name).read_text())
            for name in ("config-7b.json", "config-40b.json")}


# --------------------------------------------------------------------------------------------
# the shared real configs


def test_shared_7b_config_has_one_kv_head(shared_configs):
    d = shared_configs["config-7b.json"]
    assert d["num_kv_heads"] == 71 and d["multi_query"] is True  # the famous trap
    c = parse_config(d, "config-7b.json")
    assert (c.vocab_size, c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (65024, 4544, 71, 32)
    assert c.num_kv_heads == 1
    assert c.qkv_layout == "multi_query"
    assert c.head_dim == 64
    assert c.qkv_out == 4544 + 2 * 64 == 4672
    assert c.ffn_hidden_size == 4 * 4544
    assert c.parallel_attn and not c.new_decoder_architecture and not c.alibi and not c.bias
    assert c.num_ln_in_parallel_attn == 1
    assert c.layer_norm_names == ("input_layernorm",)
    assert c.rotary and c.rope_theta == 10000.0 and c.layer_norm_epsilon == 1e-5
    assert c.tie_word_embeddings and c.eos_token_id == 11 and c.bos_token_id == 11
    assert c.max_position_embeddings == 2048
    assert c.linear_shapes == {
        "self_attention.query_key_value": (4544, 4672),
        "self_attention.dense": (4544, 4544),
        "mlp.dense_h_to_4h": (4544, 18176),
        "mlp.dense_4h_to_h": (18176, 4544),
    }


def test_shared_40b_config(shared_configs):
    c = parse_config(shared_configs["config-40b.json"], "config-40b.json")
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (8192, 128, 60)
    assert c.num_kv_heads == 8
    assert c.qkv_layout == "grouped"
    assert c.qkv_out == (2 * 8 + 128) * 64 == 9216
    assert c.num_ln_in_parallel_attn == 2
    assert c.layer_norm_names == ("ln_attn", "ln_mlp")


def test_known_base_configs_match_shared_files(shared_configs):
    for model, fname in (("falcon-7b", "config-7b.json"), ("falcon-40b", "config-40b.json")):
        shared = shared_configs[fname]
        assert get_known_model(model).config == parse_config(shared, fname)
        base = get_known_model(model).config_dict()
        for key, value in base.items():
            if key in shared:
                assert shared[key] == value, (model, key)


# --------------------------------------------------------------------------------------------
# RW style


RW_7B = {"model_type": "RefinedWebModel", "alibi": False, "bias": False, "hidden_size": 4544,
         "multi_query": True, "n_head": 71, "n_layer": 32, "parallel_attn": True,
         "vocab_size": 65024, "bos_token_id": 11, "eos_token_id": 11, "layer_norm_epsilon": 1e-5,
         "apply_residual_connection_post_layernorm": False}
RW_40B = {"model_type": "RefinedWeb", "alibi": False, "bias": False, "hidden_size": 8192,
          "n_head": 128, "n_head_kv": 8, "n_layer": 60, "parallel_attn": True,
          "vocab_size": 65024, "bos_token_id": 11, "eos_token_id": 11}
RW_1B = {"model_type": "RefinedWebModel", "alibi": True, "bias": True, "hidden_size": 2048,
         "multi_query": False, "n_head": 32, "n_layer": 24, "parallel_attn": False,
         "vocab_size": 50304, "bos_token_id": 1, "eos_token_id": 2}


def test_rw_refinedwebmodel_7b_equals_hf_7b():
    c = parse_config(RW_7B, "rw.json")
    assert c.num_kv_heads == 1 and c.qkv_layout == "multi_query"
    assert c == get_known_model("falcon-7b").config


def test_rw_refinedweb_40b_implies_new_decoder():
    c = parse_config(RW_40B, "rw40.json")
    assert c.new_decoder_architecture and c.qkv_layout == "grouped" and c.num_kv_heads == 8
    assert c.layer_norm_names == ("ln_attn", "ln_mlp")
    assert c == get_known_model("falcon-40b").config


def test_rw_1b_interleaved_alibi_sequential():
    c = parse_config(RW_1B, "rw1b.json")
    assert c.qkv_layout == "interleaved" and c.num_kv_heads == 32 and c.qkv_out == 3 * 2048
    assert c.alibi and not c.rotary and c.bias and not c.parallel_attn
    assert c.layer_norm_names == ("input_layernorm", "post_attention_layernorm")
    assert c == get_known_model("falcon-rw-1b").config


def test_rw_refinedwebmodel_ignores_n_head_kv_when_multi_query():
    c = parse_config({**RW_7B, "n_head_kv": 71})
    assert c.num_kv_heads == 1


def test_n_embed_alias_and_conflicts():
    d = {k: v for k, v in RW_7B.items() if k != "hidden_size"}
    assert parse_config({**d, "n_embed": 4544}).hidden_size == 4544
    with pytest.raises(ConfigError, match=r"my\.json.*conflicting.*n_head"):
        parse_config({**RW_7B, "num_attention_heads": 64}, "my.json")


def test_hf_style_without_model_type_and_kv_default():
    c = parse_config({"vocab_size": 100, "hidden_size": 64, "num_attention_heads": 4,
                      "num_hidden_layers": 1, "multi_query": False})
    assert c.num_kv_heads == 4 and c.qkv_layout == "interleaved"
    c = parse_config({"vocab_size": 100, "hidden_size": 64, "num_attention_heads": 4,
                      "num_hidden_layers": 1, "new_decoder_architecture": True})
    assert c.num_kv_heads == 4 and c.qkv_layout == "grouped" and c.qkv_out == 3 * 64


def test_new_decoder_with_one_layer_norm():
    c = parse_config({**models.FALCON_40B_CONFIG, "num_ln_in_parallel_attn": 1})
    assert c.layer_norm_names == ("input_layernorm",)


def test_transformers5_rope_parameters_and_eos_list():
    d = {"vocab_size": 100, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
         "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "eos_token_id": [7, 8]}
    c = parse_config(d)
    assert c.rope_theta == 500.0 and c.eos_token_id == 7
    with pytest.raises(ConfigError, match="rope_parameters"):
        parse_config({**d, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})


# --------------------------------------------------------------------------------------------
# validation errors name the file and the field

BASE = {"model_type": "falcon", "vocab_size": 256, "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_kv_heads": 4, "multi_query": True}


@pytest.mark.parametrize("change, pattern", [
    ({"hidden_size": 66}, r"hidden_size.*66.*divisible.*num_attention_heads"),
    ({"new_decoder_architecture": True, "num_kv_heads": 3}, r"num_attention_heads.*divisible.*num_kv_heads' = 3"),
    ({"num_attention_heads": 0}, r"num_attention_heads.*positive integer"),
    ({"num_hidden_layers": 2.5}, r"num_hidden_layers.*positive integer"),
    ({"vocab_size": "256"}, r"vocab_size.*positive integer"),
    ({"hidden_size": True}, r"hidden_size.*positive integer"),
    ({"model_type": "llama"}, r"model_type.*llama.*not a Falcon"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, r"rope_scaling"),
    ({"num_ln_in_parallel_attn": 2}, r"num_ln_in_parallel_attn.*new_decoder_architecture"),
    ({"num_ln_in_parallel_attn": 3, "new_decoder_architecture": True}, r"num_ln_in_parallel_attn.*1 or 2"),
    ({"multi_query": False, "num_kv_heads": 2}, r"interleaved.*num_kv_heads"),
    ({"hidden_size": 60, "num_attention_heads": 4}, r"even head_dim"),
    ({"eos_token_id": 256}, r"eos_token_id"),
    ({"multi_query": "yes"}, r"multi_query.*true or false"),
    ({"layer_norm_epsilon": -1.0}, r"layer_norm_epsilon"),
    ({"apply_residual_connection_post_layernorm": True}, r"apply_residual_connection_post_layernorm"),
    ({"activation": "relu"}, r"activation"),
])
def test_config_errors_name_file_and_field(change, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        parse_config({**BASE, **change}, "/some/dir/config.json")
    assert "/some/dir/config.json" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_field_and_not_an_object():
    d = dict(BASE)
    del d["hidden_size"]
    with pytest.raises(ConfigError, match=r"x\.json: missing required field 'hidden_size'"):
        parse_config(d, "x.json")
    with pytest.raises(ConfigError, match=r"x\.json: expected a JSON object"):
        parse_config([1, 2], "x.json")  # type: ignore[arg-type]


def test_alibi_allows_odd_head_dim():
    c = parse_config({**BASE, "hidden_size": 60, "alibi": True, "multi_query": False})
    assert c.head_dim == 15


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="multi_query needs exactly 1 kv head"):
        FalconConfig(vocab_size=20, hidden_size=64, num_attention_heads=4, num_kv_heads=4,
                     num_hidden_layers=1)
    c = FalconConfig(vocab_size=20, hidden_size=64, num_attention_heads=4, num_kv_heads=1,
                     num_hidden_layers=1)
    assert c.ffn_hidden_size == 256 and c.num_ln_in_parallel_attn == 1


# --------------------------------------------------------------------------------------------
# config_to_hf_dict


def _all_configs() -> list[FalconConfig]:
    from falcontune import testing
    out = [spec.config for spec in models.KNOWN_MODELS.values()]
    out += [testing.preset_config(p) for p in testing.PRESETS]
    out.append(parse_config({**BASE, "rope_theta": 500.0, "ffn_hidden_size": 96,
                             "tie_word_embeddings": False, "bos_token_id": None}))
    return out


def test_config_to_hf_dict_round_trip():
    for c in _all_configs():
        d = config_to_hf_dict(c)
        assert d["model_type"] == "falcon" and d["architectures"] == ["FalconForCausalLM"]
        d2 = json.loads(json.dumps(d))
        assert parse_config(d2) == c


def test_config_to_hf_dict_writes_7b_kv_like_the_real_file():
    d = config_to_hf_dict(get_known_model("falcon-7b").config)
    assert d["num_kv_heads"] == 71 and d["multi_query"] is True


def test_transformers_falcon_config_loads_same_model():
    tf = pytest.importorskip("transformers.models.falcon.configuration_falcon")
    for c in _all_configs():
        t = tf.FalconConfig(**config_to_hf_dict(c))
        kv = t.num_kv_heads if (t.new_decoder_architecture or not t.multi_query) else 1
        assert (t.vocab_size, t.hidden_size, t.num_attention_heads, t.num_hidden_layers, kv) == (
            c.vocab_size, c.hidden_size, c.num_attention_heads, c.num_hidden_layers, c.num_kv_heads)
        assert (t.new_decoder_architecture, t.multi_query, t.parallel_attn, t.alibi, t.bias) == (
            c.new_decoder_architecture, c.multi_query, c.parallel_attn, c.alibi, c.bias)
        assert t.ffn_hidden_size == c.ffn_hidden_size
        assert t.layer_norm_epsilon == c.layer_norm_epsilon
        assert t.tie_word_embeddings == c.tie_word_embeddings
        n_ln = t.num_ln_in_parallel_attn
        if n_ln is None and t.new_decoder_architecture:
            n_ln = 2
        assert (n_ln or 1) == c.num_ln_in_parallel_attn
        theta = getattr(t, "rope_theta", None)
        if theta is None:
            theta = t.rope_parameters["rope_theta"]
        assert theta == c.rope_theta


# --------------------------------------------------------------------------------------------
# quantize configs


def test_parse_autogptq_quantize_config():
    d = {"bits": 4, "group_size": 64, "damp_percent": 0.01, "desc_act": False, "sym": True,
         "true_sequential": True, "model_name_or_path": None,
         "model_file_base_name": "gptq_model-4bit-64g"}
    q = parse_quantize_config(d)
    assert q == QuantizeConfig(bits=4, group_size=64, desc_act=False, sym=True,
                               checkpoint_format="gptq", model_file_base_name="gptq_model-4bit-64g")
    assert q.zero_offset == 1
    assert q.weights_file_name == "gptq_model-4bit-64g.safetensors"


def test_parse_transformers_quantization_config_block():
    cfg = {"model_type": "falcon", "quantization_config": {
        "quant_method": "gptq", "bits": 3, "group_size": 128, "desc_act": True, "sym": False,
        "checkpoint_format": "gptq_v2", "damp_percent": 0.1, "use_exllama": True}}
    q = parse_quantize_config(cfg, "config.json")
    assert (q.bits, q.group_size, q.desc_act, q.sym, q.checkpoint_format) == (3, 128, True, False, "gptq_v2")
    assert q.zero_offset == 0
    q2 = parse_quantize_config(cfg["quantization_config"])
    assert q2 == q


def test_quantize_config_format_alias_and_defaults():
    q = parse_quantize_config({"bits": 8, "group_size": -1, "format": "gptq_v2", "desc_act": None})
    assert q.checkpoint_format == "gptq_v2" and not q.desc_act and q.sym
    assert q.weights_file_name == "gptq_model-8bit--1g.safetensors"


@pytest.mark.parametrize("d, pattern", [
    ({"bits": 5, "group_size": 64}, r"unsupported 'bits' = 5 \(supported: 2, 3, 4, 8\)"),
    ({"bits": 16, "group_size": 64}, r"unsupported 'bits' = 16"),
    ({"bits": 4, "group_size": 0}, r"group_size"),
    ({"bits": 4, "group_size": -2}, r"group_size"),
    ({"group_size": 64}, r"missing required field 'bits'"),
    ({"bits": 4}, r"missing required field 'group_size'"),
    ({"bits": 4, "group_size": 64, "quant_method": "awq"}, r"quant_method.*awq"),
    ({"bits": 4, "group_size": 64, "checkpoint_format": "marlin"}, r"checkpoint_format.*marlin"),
    ({"bits": 4, "group_size": 64, "is_marlin_format": True}, r"Marlin"),
    ({"bits": 4, "group_size": 64, "desc_act": "no"}, r"desc_act"),
])
def test_quantize_config_errors(d, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        parse_quantize_config(d, "/m/quantize_config.json")
    assert "/m/quantize_config.json" in str(e.value)


def test_quantize_config_to_dict_round_trip():
    for q in (QuantizeConfig(4, 64, False, True, "gptq", "gptq_model-4bit-64g"),
              QuantizeConfig(3, -1, True, False, "gptq_v2", None)):
        d = json.loads(json.dumps(models.quantize_config_to_dict(q)))
        assert parse_quantize_config(d) == q
        assert ("checkpoint_format" in d) == (q.checkpoint_format == "gptq_v2")


# --------------------------------------------------------------------------------------------
# known models


def test_known_model_names_and_specs():
    assert set(models.KNOWN_MODELS) == {
        "falcon-7b-instruct-4bit", "falcon-40b-instruct-4bit", "falcon-7b", "falcon-7b-instruct",
        "falcon-40b", "falcon-40b-instruct", "falcon-rw-1b", "falcon-rw-7b"}
    s7 = get_known_model("falcon-7b-instruct-4bit")
    assert s7.quantized and s7.repo_id == "TheBloke/falcon-7b-instruct-GPTQ"
    assert (s7.quantize_config.bits, s7.quantize_config.group_size, s7.quantize_config.desc_act) == (4, 64, False)
    assert s7.weights_name == "gptq_model-4bit-64g.safetensors"
    assert s7.config.num_kv_heads == 1
    s40 = get_known_model("falcon-40b-instruct-4bit")
    assert (s40.quantize_config.bits, s40.quantize_config.group_size, s40.quantize_config.desc_act) == (4, -1, True)
    assert s40.weights_name == "gptq_model-4bit--1g.safetensors"
    assert s40.config.num_kv_heads == 8
    for name, spec in models.KNOWN_MODELS.items():
        assert spec.name == name
        assert isinstance(spec.config, FalconConfig)
        assert spec.quantized == (spec.quantize_config is not None)
    rw7 = get_known_model("falcon-rw-7b").config
    assert (rw7.hidden_size, rw7.num_attention_heads, rw7.num_hidden_layers, rw7.qkv_layout) == (
        4096, 64, 36, "interleaved")


def test_config_dict_is_a_copy():
    spec = get_known_model("falcon-7b")
    d = spec.config_dict()
    d["hidden_size"] = 1
    assert spec.config.hidden_size == 4544


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModelError) as e:
        get_known_model("falcon-13b")
    msg = str(e.value)
    assert "falcon-13b" in msg
    for name in models.KNOWN_MODELS:
        assert name in msg
    assert isinstance(e.value, ValueError)
