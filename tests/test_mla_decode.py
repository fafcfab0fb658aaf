"""The absorbed-MLA decode kernels (dsv3/inference/mla_decode.py) against their twin,
`attention.absorbed_attention`: on CPU under Triton's interpreter in fp32 (run with
`TRITON_INTERPRET=1` where Triton is installed, else skipped; the interpreter multiplies bf16 tl.dot
operands as raw bit patterns, so BF16 is tested on the GPU only), and (GPU) in BF16, compiled and
captured, and inside a decode step.

Tolerances: fp32, 1e-5 of the output's scale (summation order, and the online softmax's rescaling).
BF16 against the fp32 twin, 2e-2 relative (q_latent and p are rounded to BF16 as in the twin, at
other points).
"""

import pytest
import torch
from helpers import (
    assert_switch_keeps_decode,
    decode_logits,
    interpreted,
    randomize_,
    tiny_config,
    tiny_model,
)

from dsv3 import ModelConfig
from dsv3.inference import mla_decode as mla_kernels
from dsv3.inference.attention import absorbed_attention
from dsv3.inference.cache import causal_mask
from dsv3.inference.mla_decode import MLATiles, mla_decode, use_mla_decode
from dsv3.model.attention import MLA
from dsv3.model.rope import RotaryEmbedding, apply_rope


def random_mla(cfg: ModelConfig, seed: int = 0) -> MLA:
    torch.manual_seed(seed)
    attn = MLA(cfg).eval()
    randomize_(attn, seed)
    return attn


def operands(attn: MLA, positions: torch.Tensor, s: int, seed: int = 0, dtype=torch.float32, device="cpu"):
    """Queries at `positions` [B, T] over a cache view of s slots (inside a longer buffer, as
    LatentCache.read gives it); visible = the causal mask."""
    g = torch.Generator().manual_seed(seed)
    b, t = positions.shape
    h, c = attn.n_heads, attn.cfg.kv_lora_rank
    q_nope = torch.randn(b, t, h, attn.nope, generator=g)
    q_pe = torch.randn(b, t, h, attn.rope, generator=g)
    buffer = torch.randn(b, s + 7, c + attn.rope, generator=g)
    q_nope, q_pe, buffer = (x.to(device, dtype) for x in (q_nope, q_pe, buffer))
    return q_nope, q_pe, buffer[:, :s], causal_mask(positions.to(device), s)


def rotary(attn: MLA, device) -> RotaryEmbedding:
    """The model's rope: the kernels take its tables, the twin their rows at the positions (`lookup`), as a
    decode step does."""
    return RotaryEmbedding(attn.cfg).to(device)


def kernels(attn: MLA, q_nope, q_pe, kv, positions, tiles: MLATiles = MLATiles()) -> torch.Tensor:
    """The kernels on q_pe not yet rotated (they rotate it)."""
    rope = rotary(attn, positions.device)
    return mla_decode(q_nope, q_pe, kv, positions, rope.cos_table, rope.sin_table, attn.wkv_b.weight, attn.dv,
                      attn.softmax_scale, tiles)


def twin(attn: MLA, q_nope, q_pe, kv, positions, visible) -> torch.Tensor:
    cos, sin = rotary(attn, positions.device).lookup(positions)
    return absorbed_attention(attn, q_nope, apply_rope(q_pe, cos, sin), kv, visible)


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_rule_is_cuda_bf16_only():
    attn = random_mla(tiny_config())
    q_nope, _, kv, _ = operands(attn, torch.tensor([[3]]), 5)
    assert not use_mla_decode(q_nope, kv, attn.wkv_b)
    assert not use_mla_decode(q_nope.bfloat16(), kv.bfloat16(), attn.wkv_b)


def test_tiles_are_checked():
    attn = random_mla(tiny_config())
    q_nope, q_pe, kv, visible = operands(attn, torch.tensor([[3]]), 5)
    with pytest.raises(ValueError, match="multiple of block_s"):
        kernels(attn, q_nope, q_pe, kv, torch.tensor([[3]]), MLATiles(split_s=16, block_s=32))


def test_tables_are_checked():
    """The kernels index the [P, rope / 2] tables by position: the rows at the positions (the old per-row
    form), tables of another rope width or transposed ones are refused."""
    attn = random_mla(tiny_config())
    positions = torch.tensor([[3]])
    q_nope, q_pe, kv, _ = operands(attn, positions, 5)
    rope = rotary(attn, "cpu")
    cos, sin = rope.cos_table, rope.sin_table
    for tables in (rope.lookup(positions), (cos[:, :-1], sin[:, :-1]), (cos.t().contiguous().t(), sin)):
        with pytest.raises(ValueError, match=r"cos_table and sin_table \[P, rope / 2\]"):
            mla_decode(q_nope, q_pe, kv, positions, *tables, attn.wkv_b.weight, attn.dv, attn.softmax_scale)


# ------------------------------------------------------------------------------------------ interpreter

SMALL_TILES = MLATiles(absorb_block_c=16, block_s=16, split_s=32, out_block_v=8)
CASES = [  # (positions [B, T], slots, tiles): one token; ragged rows over several splits; verify-like T = 2
    (torch.tensor([[5]]), 6, SMALL_TILES),
    (torch.tensor([[20, 21, 22], [37, 38, 39]]), 40, SMALL_TILES),
    # 70 and 71 lie past the tiny config's 64 positions: rotated by the tables' last row, as `lookup` reads it
    (torch.tensor([[9, 10], [0, 1], [70, 71]]), 72, MLATiles(block_s=16, split_s=16)),
]


@interpreted
@pytest.mark.parametrize("positions,slots,tiles", CASES)
def test_interpreted_kernels_equal_twin(positions, slots, tiles):
    pytest.importorskip("triton")
    attn = random_mla(tiny_config())  # 4 heads (< BLOCK_H), rope 8 (< 16), latent 32: every pad and mask
    q_nope, q_pe, kv, visible = operands(attn, positions, slots)
    with torch.no_grad():
        want = twin(attn, q_nope, q_pe, kv, positions, visible)
        got = kernels(attn, q_nope, q_pe, kv, positions, tiles)
    assert got.shape == want.shape and rel_max(got, want) <= 1e-5


@interpreted
def test_interpreted_bench_dims_default_tiles():
    pytest.importorskip("triton")
    attn = random_mla(ModelConfig.from_preset("bench"))  # 16 heads, nope 128, rope 64, latent 512, dv 128
    positions = torch.tensor([[300]])
    q_nope, q_pe, kv, visible = operands(attn, positions, 301)
    with torch.no_grad():
        want = twin(attn, q_nope, q_pe, kv, positions, visible)
        got = kernels(attn, q_nope, q_pe, kv, positions)
    assert rel_max(got, want) <= 1e-5


@interpreted
def test_interpreted_row_that_sees_nothing_gives_zeros():
    pytest.importorskip("triton")
    attn = random_mla(tiny_config())
    positions = torch.tensor([[4, -1]])  # the second query sees no slot
    q_nope, q_pe, kv, visible = operands(attn, positions, 6)
    with torch.no_grad():
        got = kernels(attn, q_nope, q_pe, kv, positions, SMALL_TILES)
        want = twin(attn, q_nope[:, :1], q_pe[:, :1], kv, positions[:, :1], visible[:, :1])
    assert torch.equal(got[0, 1], torch.zeros_like(got[0, 1]))
    assert rel_max(got[:, :1], want) <= 1e-5


@interpreted
def test_interpreted_decode_through_the_kernels_equals_default(monkeypatch):
    """MLA_KERNEL on and the rule forced true on CPU: every layer of an eager decode attends through
    the (interpreted) kernels, and the logits equal the default decode's (fp32)."""
    pytest.importorskip("triton")
    model = tiny_model()
    want = decode_logits(model, [3, 5, 7], 3)
    calls = []
    monkeypatch.setattr(mla_kernels, "MLA_KERNEL", True)
    monkeypatch.setattr(mla_kernels, "use_mla_decode", lambda q, kv, w: calls.append(q.shape) or True)
    got = decode_logits(model, [3, 5, 7], 3)
    assert len(calls) >= 3 * model.cfg.num_layers
    assert rel_max(got, want) <= 1e-5


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("positions,slots", [(torch.tensor([[127]]), 128), (torch.tensor([[700, 701]] * 4), 702),
                                             (torch.tensor([[i] for i in range(100, 164)]), 164)])
def test_gpu_kernels_equal_twin_bf16(positions, slots):
    attn = random_mla(ModelConfig.from_preset("bench")).cuda()
    q_nope, q_pe, kv, visible = operands(attn, positions, slots, device="cuda")
    with torch.no_grad():
        positions = positions.cuda()
        want = twin(attn, q_nope, q_pe, kv, positions, visible)  # fp32
        got = kernels(attn.to(torch.bfloat16), q_nope.bfloat16(), q_pe.bfloat16(), kv.bfloat16(), positions)
    assert got.dtype == torch.bfloat16 and rel_max(got, want) <= 2e-2


@pytest.mark.gpu
def test_gpu_compiled_and_graph_captured_equal_eager():
    attn = random_mla(ModelConfig.from_preset("bench")).cuda().to(torch.bfloat16)
    positions = torch.tensor([[200], [90]], device="cuda")
    q_nope, q_pe, kv, _ = operands(attn, positions, 201, dtype=torch.bfloat16, device="cuda")
    w, dv, scale = attn.wkv_b.weight, attn.dv, attn.softmax_scale
    rope = rotary(attn, "cuda")
    tables = rope.cos_table, rope.sin_table
    with torch.no_grad():  # as decoding runs: the op is inference-only (no backward)
        eager = mla_decode(q_nope, q_pe, kv, positions, *tables, w, dv, scale)
        compiled = torch.compile(lambda *a: mla_decode(*a, w, dv, scale), fullgraph=True)
        compiled(q_nope, q_pe, kv, positions, *tables)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = compiled(q_nope, q_pe, kv, positions, *tables)
        graph.replay()
    torch.cuda.synchronize()
    assert rel_max(captured, eager) <= 1e-3


@pytest.mark.gpu
def test_gpu_decode_with_mla_kernel_equals_default(monkeypatch):
    assert_switch_keeps_decode(monkeypatch, mla_kernels, "MLA_KERNEL")
