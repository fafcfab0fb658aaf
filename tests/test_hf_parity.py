"""dsv3 against transformers' DeepseekV3ForCausalLM on the same weights, through our converter."""

import pytest
import torch
from helpers import hf_reference, tiny_config

import dsv3

CASES = {
    "qlora_yarn_groups_bias": dict(),
    "no_qlora_no_yarn": dict(q_lora_rank=0, rope_factor=1.0),
    "two_dense_single_group": dict(first_k_dense=2, n_group=1, topk_group=1, num_layers=4),
    "no_shared_experts": dict(n_shared_experts=0),  # transformers writes empty shared_experts.* tensors then
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    cfg = tiny_config(**CASES[case])
    hf = hf_reference(cfg, seed=hash(case) % 1000)
    hf.save_pretrained(tmp_path)
    model = dsv3.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.cfg.to_hf_config() == cfg.to_hf_config()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf(tokens).logits
        for attn in ("eager", "sdpa"):
            for experts in ("loop", "grouped"):
                out = model.set_impl(attn=attn, experts=experts)(tokens)
                assert (out - ref).abs().max().item() <= 1e-4, (attn, experts)


def test_negative_biases_change_routing_like_transformers(tmp_path):
    """Large negative biases make every biased score negative: 0.0-masking would pick dropped groups."""
    cfg = tiny_config()
    hf = hf_reference(cfg, seed=7)
    with torch.no_grad():
        for layer in hf.model.layers[cfg.first_k_dense:]:
            layer.mlp.gate.e_score_correction_bias.copy_(-5.0 + 0.5 * torch.randn(cfg.n_routed_experts))
    hf.save_pretrained(tmp_path)
    model = dsv3.from_pretrained(tmp_path, dtype=torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-4


def test_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    cfg = tiny_config()
    torch.manual_seed(3)
    model = dsv3.Transformer(cfg).float().eval()
    from helpers import randomize_

    randomize_(model, 3)
    model.save_pretrained(tmp_path)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab_size, (3, 20))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-4


# DeepSeek-V3's released config.json, written out here (not through our to_hf_config), shrunk in its
# sizes only: every release-only key (aux_loss_alpha, ep_size, seq_aux, rope_scaling "type", ...) stays
RELEASE_STYLE = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96, "kv_lora_rank": 32,
    "max_position_embeddings": 64, "moe_intermediate_size": 24, "moe_layer_freq": 1, "n_group": 4,
    "n_routed_experts": 8, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 4,
    "num_experts_per_tok": 3, "num_hidden_layers": 3, "num_key_value_heads": 4, "num_nextn_predict_layers": 1,
    "pretraining_tp": 1, "q_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 16, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 2, "topk_method": "noaux_tc", "torch_dtype": "float32",
    "use_cache": True, "v_head_dim": 16, "vocab_size": 256,
}


@pytest.mark.parametrize("rope", ["release", "mscale_0.707", "none"])
def test_a_release_style_config_saved_by_transformers_loads_and_matches(rope, tmp_path):
    """The parity tests above build transformers' config with our own converter; here it is written the
    way the release writes it, and the checkpoint is transformers' own save_pretrained."""
    from helpers import randomize_
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    c = dict(RELEASE_STYLE)
    if rope == "mscale_0.707":
        c["rope_scaling"] = dict(c["rope_scaling"], mscale=0.707, mscale_all_dim=0.707)
    elif rope == "none":
        c["rope_scaling"] = None
    hc = DeepseekV3Config(**c)
    hc._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(hc).float().eval()
    randomize_(hf, 1)
    hf.save_pretrained(tmp_path)
    model = dsv3.from_pretrained(tmp_path, dtype=torch.float32)
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4

