"""YaRN frequencies and interleaved RoPE against independent references."""

import torch

from dsv3 import ModelConfig
from dsv3.model.rope import apply_rope, rope_frequencies


def test_yarn_frequencies_match_transformers_for_671b():
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig.from_preset("671b")
    hf_cfg = DeepseekV3Config(**{k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype", "rope_scaling")})
    ref, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    ours, scale = rope_frequencies(cfg)
    torch.testing.assert_close(ours, ref)
    assert scale == ref_scale == 1.0
    base = 1.0 / 10000 ** (torch.arange(0, 64, 2) / 64)
    torch.testing.assert_close(ours[:11], base[:11])  # pairs <= 10 kept (spec: low = 10)
    torch.testing.assert_close(ours[23:], base[23:] / 40)  # pairs >= 23 interpolated (high = 23)


def test_interleaved_rope_is_complex_rotation_of_adjacent_pairs():
    """DeepSeek's official form: view_as_complex on (x[2i], x[2i+1]) times e^{i pos f}."""
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    f = torch.rand(4, dtype=torch.float64)
    angles = torch.arange(5, dtype=torch.float64)[:, None] * f
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (4, 2)).contiguous()) * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)
    out = apply_rope(x.float(), angles.cos().float(), angles.sin().float())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
