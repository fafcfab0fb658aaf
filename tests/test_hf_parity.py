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
