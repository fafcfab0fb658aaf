"""YaRN frequencies and interleaved RoPE against independent references."""

import torch
from helpers import tiny_config

from dsv3 import ModelConfig, Transformer
from dsv3.model.rope import RotaryEmbedding, apply_rope, rope_frequencies


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


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_lookup_reads_forward_from_the_tables():
    """The tables hold forward's cos/sin at every position below max_position_embeddings P; lookup reads
    them, a negative position from the end, outside [-P, P) the first or last row."""
    rope = RotaryEmbedding(ModelConfig.from_preset("bench"))  # YaRN, rope 64, P = 4096
    p = rope.cfg.max_position_embeddings
    assert rope.cos_table.shape == rope.sin_table.shape == (p, rope.cfg.qk_rope_head_dim // 2)
    positions = torch.tensor([[0, 1, 2], [7, 4000, p - 1]])
    for got, want in zip(rope.lookup(positions), rope(positions)):
        assert got.shape == want.shape == (2, 3, 32) and rel_max(got, want) <= 1e-6
    for got, want in zip(rope.lookup(torch.arange(p)), rope(torch.arange(p))):
        assert rel_max(got, want) <= 1e-6
    outside, rows = torch.tensor([-1, p, p + 9, -p, -p - 3]), torch.tensor([p - 1, p - 1, p - 1, 0, 0])
    for got, table in zip(rope.lookup(outside), (rope.cos_table, rope.sin_table)):
        assert torch.equal(got, table[rows])


def test_cast_keeps_frequencies_and_tables_fp32():
    """model.to(bfloat16) leaves RoPE in fp32, as DeepSeek's reference keeps it: bf16 frequencies put the
    angles at position 4000 up to 1.7 radians off.  Device moves still apply."""
    cfg = ModelConfig.from_preset("bench")
    rope, cast = RotaryEmbedding(cfg), RotaryEmbedding(cfg).to(torch.bfloat16)
    names = ("inv_freq", "cos_table", "sin_table")
    for name in names:
        assert getattr(cast, name).dtype == torch.float32 and torch.equal(getattr(cast, name), getattr(rope, name))
    positions = torch.tensor([[5, 4000]])
    for got, want in zip(cast.lookup(positions), rope.lookup(positions)):
        assert torch.equal(got, want)
    assert (4000 * rope.inv_freq.bfloat16().float() - 4000 * rope.inv_freq).abs().max() > 1  # what it would cost
    moved = RotaryEmbedding(cfg).to("meta", torch.bfloat16)
    assert all(getattr(moved, n).device.type == "meta" and getattr(moved, n).dtype == torch.float32 for n in names)
    model = Transformer(tiny_config()).to(torch.bfloat16)
    assert model.head.weight.dtype == torch.bfloat16
    assert all(getattr(model.rope, n).dtype == torch.float32 for n in names)
    positions = torch.tensor([[0, 9, 63]])
    for got, want in zip(model.rope.lookup(positions), Transformer(tiny_config()).rope.lookup(positions)):
        assert torch.equal(got, want)


def test_tables_rebuilt_after_meta_construction():
    """A model built on the meta device and loaded (from_pretrained's path) gets the tables back."""
    with torch.device("meta"):
        model = Transformer(tiny_config())
    assert model.rope.cos_table.is_meta
    model.rope.reset_parameters("cpu")
    fresh = RotaryEmbedding(tiny_config())
    for name in ("inv_freq", "cos_table", "sin_table"):
        assert torch.equal(getattr(model.rope, name), getattr(fresh, name))
