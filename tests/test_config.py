"""ModelConfig: presets, HF config round trip, parameter counts and the softmax scale."""

import json

import pytest
import torch

from dsv3 import ModelConfig, Transformer


@pytest.mark.parametrize("preset", ["tiny", "small", "bench", "16b", "671b"])
def test_presets_round_trip_through_hf_config(preset, tmp_path):
    cfg = ModelConfig.from_preset(preset)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    assert ModelConfig.from_hf_config(tmp_path) == cfg


def test_bench_preset_is_the_benchmark_table():
    c = ModelConfig.from_preset("bench")
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.first_k_dense, c.intermediate_size) == (32768, 2048, 8, 1, 8192)
    assert (c.num_heads, c.moe_intermediate_size, c.q_lora_rank, c.kv_lora_rank) == (16, 1024, 1536, 512)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 64, 128)
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (32, 1, 8, 4, 2)
    assert c.routed_scaling_factor == 2.5 and c.scoring_func == "sigmoid" and c.use_expert_bias and not c.tie_word_embeddings
    counts = c.param_counts()
    assert round(counts["total"] / 1e9, 2) == 1.76  # "1.76 B parameters in all"
    assert round(counts["active_matmul"] / 1e9, 2) == 0.64  # "0.64 B active (head included, embedding excluded)"


def test_16b_is_v2_lite_shape():
    c = ModelConfig.from_preset("16b")
    assert c.scoring_func == "softmax" and c.q_lora_rank == 0 and not c.use_expert_bias
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok, c.num_layers) == (64, 2, 6, 27)
    assert abs(c.param_counts()["total"] / 1e9 - 15.7) < 0.1


def test_671b_counts_on_meta_device():
    cfg = ModelConfig.from_preset("671b")
    with torch.device("meta"):
        model = Transformer(cfg)
    n_all = sum(p.numel() for p in model.parameters())
    n_mtp = sum(p.numel() for p in model.mtp.parameters())
    counts = cfg.param_counts()
    assert n_all - n_mtp == counts["total"] - cfg.num_moe_layers * cfg.n_routed_experts  # buffers (biases) aside
    assert abs((n_all - n_mtp) / 1e9 - 671.0) < 0.1
    assert abs(counts["mtp_checkpoint"] / 1e9 - 685) < 1.0  # with the MTP layer's stored embedding/head copies
    assert abs(counts["active"] / 1e9 - 37.5) < 0.1
    assert counts["mtp"] == n_mtp + cfg.n_routed_experts  # + the MTP layer's routing bias


def test_softmax_scale_671b():
    assert abs(ModelConfig.from_preset("671b").softmax_scale - 0.135234) < 1e-6


def test_hf_config_variants_of_rope_keys():
    base = ModelConfig.from_preset("671b").to_hf_config()
    yarn = dict(base["rope_parameters"])
    for key in ("rope_scaling", "rope_parameters"):
        for type_key in ("type", "rope_type"):
            c = {k: v for k, v in base.items() if k not in ("rope_scaling", "rope_parameters")}
            rope = {k: v for k, v in yarn.items() if k not in ("type", "rope_type")}
            c[key] = {**rope, type_key: "yarn"}
            assert ModelConfig.from_hf_config(c) == ModelConfig.from_preset("671b")


def test_hf_config_with_moe_layer_freq_other_than_1_is_refused():
    c = ModelConfig.from_preset("671b").to_hf_config()
    assert ModelConfig.from_hf_config({**c, "moe_layer_freq": 1}) == ModelConfig.from_preset("671b")
    with pytest.raises(ValueError, match="moe_layer_freq 2"):
        ModelConfig.from_hf_config({**c, "moe_layer_freq": 2})


@pytest.mark.parametrize("change,message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_interleave": False}, "rope_interleave false"),
    ({"topk_method": "noaux_cx"}, "topk_method 'noaux_cx'"),
    ({"rope_parameters": {"rope_type": "yarn", "original_max_position_embeddings": 4096}}, "yarn has no factor"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                          "original_max_position_embeddings": 4096, "attention_factor": 1.3}}, "attention_factor 1.3"),
])
def test_hf_config_fields_that_change_the_model_are_refused(change, message):
    """Fields dsv3 does not implement would silently change the logits (transformers honours them)."""
    c = {k: v for k, v in ModelConfig.from_preset("671b").to_hf_config().items() if k != "rope_scaling"}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**c, **change})


def test_hf_config_attention_factor_that_yarn_gives_is_accepted_and_greedy_ignores_groups():
    c = ModelConfig.from_preset("671b").to_hf_config()
    rope = {**c["rope_parameters"], "attention_factor": 1.0}  # mscale == mscale_all_dim: 1
    assert ModelConfig.from_hf_config({**c, "rope_parameters": rope, "rope_scaling": rope}) == ModelConfig.from_preset("671b")
    v2 = ModelConfig.from_hf_config({**c, "topk_method": "greedy", "scoring_func": "softmax"})
    assert (v2.n_group, v2.topk_group, v2.use_expert_bias) == (1, 1, False)


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="n_group"):
        ModelConfig.from_preset("tiny").replace(n_group=3)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("huge")


def test_flops_per_token_formula():
    c = ModelConfig.from_preset("bench")
    t = 2048
    expected = 6 * c.active_matmul_params() + 3 * c.num_layers * t * c.num_heads * (192 + 128)
    assert c.flops_per_token(t) == expected
