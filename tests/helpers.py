"""Shared test helpers: tiny configs, and Hugging Face reference models with fresh random weights."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from dsv3 import ModelConfig

# Triton kernels run on a CPU only under Triton's interpreter
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton kernels on CPU need TRITON_INTERPRET=1 (and Triton)")


def tiny_config(**overrides) -> ModelConfig:
    """A few-layer config with every V3 feature on: q-LoRA, groups, bias, YaRN, one dense layer."""
    base = dict(
        vocab_size=256, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96, first_k_dense=1,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_factor=4.0,
        original_max_position_embeddings=16, max_position_embeddings=64, num_mtp_layers=0,
    )
    base.update(overrides)
    return ModelConfig(**base)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Fresh random weights everywhere (norm weights around 1, routing biases of both signs)."""
    g = torch.Generator().manual_seed(seed)
    weights = module.state_dict().keys()  # not the derived, non-persistent buffers (RoPE's frequencies and tables)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or name not in weights:
                continue
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                t.copy_(1.0 + 0.2 * noise)
            elif "bias" in name:
                t.copy_(0.3 * noise)  # routing bias: negative values included
            else:
                t.copy_(0.08 * noise)


def hf_reference(cfg: ModelConfig, seed: int):
    """transformers' DeepseekV3ForCausalLM for cfg, fp32, eager attention, random weights."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_cfg = cfg.to_hf_config(torch_dtype="float32")
    hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type", "torch_dtype", "rope_scaling")}
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_cfg, attn_implementation="eager")).float().eval()
    randomize_(model, seed)
    return model


def decode_logits(model, prompt, steps):
    """Greedy decode of one sequence: on CPU the eager step, on CUDA the compiled, graph-captured step
    (a compile that falls back to eager is an error here, not a warning); the logits of every step,
    [steps, V]."""
    from dsv3.inference import Generator

    device = model.head.weight.device
    gen = Generator(model, cuda_graphs=device.type == "cuda", compile=device.type == "cuda")
    out = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of .* failed")
        cache = gen.reserve(1, len(prompt) + steps + 2)
        _, _, logits = gen.prefill([prompt])
        for i in range(steps):
            token = logits.argmax(-1, keepdim=True)
            kv_len = gen.kv_len(len(prompt) + i + 1)
            logits = gen.decode_runner(kv_len, token, cache.lengths.unsqueeze(1)).clone()
            cache.lengths += 1
            out.append(logits.reshape(-1, logits.shape[-1])[-1])
    return torch.stack(out)


def tiny_model(seed=0):
    """The tiny config's Transformer with fresh random weights, in eval mode."""
    import dsv3

    torch.manual_seed(seed)
    model = dsv3.Transformer(tiny_config()).eval()
    randomize_(model, seed)
    return model


def assert_switch_keeps_decode(monkeypatch, module, switch: str, tol: float = 0.05, through=None) -> None:
    """A compiled, captured BF16 decode of the tiny model on the GPU with module.<switch> on against off:
    logits within tol of their scale (fusion, summation order and rounding points differ).  through:
    (a module, the name of a function in it) that the decode with the switch on must call, so that the
    comparison is not of one path with itself."""
    model = tiny_model().cuda().to(torch.bfloat16)
    monkeypatch.setattr(module, switch, False)
    want = decode_logits(model, [3, 5, 7], 4)
    torch._dynamo.reset()
    monkeypatch.setattr(module, switch, True)
    calls = []
    if through is not None:
        owner, name = through
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = decode_logits(model, [3, 5, 7], 4)
    assert (got - want).abs().max().item() <= tol * want.abs().max().item(), switch
    assert through is None or calls, f"{switch} on: {through[1]} was never called"


def exactly_quantising_rows(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    """[m, k] fp32 rows whose 1x128 tiles quantise to e4m3 exactly: e4m3 values times a power of two per
    tile, each tile holding +-448 (so its scale is that power of two, plain or pow2).  Triton's
    interpreter does not round fp32 -> e4m3 to nearest; on such rows no rounding happens, so only a wrong
    tile, scale or promotion makes an interpreted FP8 kernel differ from its twin."""
    blocks = -(-k // 128)
    q = (torch.randn(m, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    scales = torch.exp2(torch.randint(-12, 0, (m, blocks), generator=g).float())
    for kb in range(blocks):
        q[:, kb * 128] = 448.0 * torch.sign(torch.randn(m, generator=g))
    return q * scales.repeat_interleave(128, dim=1)[:, :k]
