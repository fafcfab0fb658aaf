"""The few-row linear (dsv3/inference/gemv.py) against its twin, F.linear: under Triton's CPU interpreter
(run with `TRITON_INTERPRET=1` where Triton is installed, else skipped) at odd shapes, and (GPU) in BF16
at the bench config's decode shapes, under torch.compile and in a captured CUDA graph.

Tolerances: fp32 against fp32, 1e-5 (summation order only).  BF16 against BF16 F.linear, 1e-2 relative
(each side rounds its output once, ~2e-3; the interpreter truncates instead of rounding).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import decode_logits, interpreted, tiny_model

from dsv3.inference.gemv import (
    GemvTiles,
    decode_linear,
    small_m_linear,
    small_m_linear_pair,
    small_m_linear_pair_norm,
    use_small_m_linear,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def operands(m, n, k, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    return x.to(device, dtype), w.to(device, dtype)


def test_rule_takes_cuda_bf16_and_few_rows_only():
    x, w = operands(1, 8, 16, dtype=torch.bfloat16)
    assert not use_small_m_linear(x, w)  # CPU: F.linear


def test_pair_rule_stops_at_big_weights(monkeypatch):
    from dsv3.inference import gemv

    monkeypatch.setattr(gemv, "use_small_m_linear", lambda x, w: True)
    x = torch.randn(1, 2048)
    small, big = torch.empty(1536, 2048), torch.empty(8192, 2048)  # wq_a-sized; the dense MLP's w1
    assert gemv.use_pair(x, small, small[:576])
    assert not gemv.use_pair(x, big, big)


@pytest.mark.parametrize("tiles", [GemvTiles(block_n=24), GemvTiles(block_k=0), GemvTiles(split_k=0)])
def test_bad_tiles_are_an_error(tiles):
    with pytest.raises(ValueError, match="GemvTiles"):
        small_m_linear(*operands(1, 8, 16), tiles)


# ------------------------------------------------------------------------------------------ interpreter

# the four kinds of kernel, at tiles small enough that the shapes below leave ragged last tiles of N
# and K (and, split 3 ways, a last split past K)
VARIANTS = {
    "fma": GemvTiles(block_n=16, block_k=32),
    "fma split-K": GemvTiles(block_n=8, block_k=16, split_k=3),
    "mma": GemvTiles(mma=True, block_n=16, block_k=32),
    "mma split-K": GemvTiles(mma=True, block_n=16, block_k=16, split_k=3),
}
ODD_SHAPES = [(40, 72), (33, 200), (16, 64)]  # (N, K); the last divides every tile


@interpreted
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n,k", ODD_SHAPES)
@pytest.mark.parametrize("m", [1, 3])
def test_interpreted_kernel_equals_linear(m, n, k, variant):
    pytest.importorskip("triton")
    tiles = VARIANTS[variant]
    x, w = operands(m, n, k)
    got = small_m_linear(x, w, tiles)
    assert got.shape == (m, n) and rel(got, F.linear(x, w)) < 1e-5
    if tiles.mma:  # Triton 3.6's interpreter multiplies bf16 tl.dot operands as raw uint16 bits
        return
    xb, wb = x.bfloat16(), w.bfloat16()
    got = small_m_linear(xb, wb, tiles)
    assert got.dtype == torch.bfloat16 and rel(got, F.linear(xb, wb)) < 1e-2


@interpreted
@pytest.mark.parametrize("variant", ["fma", "fma split-K"])
def test_interpreted_float_out_is_the_rounded_output_in_fp32(variant):
    """float_out stores the values the BF16 output holds, widened: the head's logits without a cast launch.
    FMA kernels only: the interpreter's bf16 tl.dot is broken (the tensor-core path: the GPU test)."""
    pytest.importorskip("triton")
    tiles = VARIANTS[variant]
    x, w = operands(3, 33, 200)
    xb, wb = x.bfloat16(), w.bfloat16()
    got = small_m_linear(xb, wb, tiles, float_out=True)
    assert got.dtype == torch.float32 and torch.equal(got, small_m_linear(xb, wb, tiles).float())


def test_decode_linear_float_out_falls_back_to_a_cast_on_cpu():
    lin = torch.nn.Linear(16, 8, bias=False).bfloat16()
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    got = decode_linear(lin, x, float_out=True)
    assert got.dtype == torch.float32 and torch.equal(got, lin(x).float())


@interpreted
@pytest.mark.parametrize("variant", ["fma", "mma"])
@pytest.mark.parametrize("m", [1, 3])
def test_interpreted_pair_equals_two_linears(m, variant):
    """One launch for two weights of one input: ragged N in both, the second's tiles after the first's."""
    pytest.importorskip("triton")
    tiles = VARIANTS[variant]
    x, w1 = operands(m, 40, 72)
    _, w2 = operands(m, 24, 72, seed=1)
    y1, y2 = small_m_linear_pair(x, w1, w2, tiles)
    assert rel(y1, F.linear(x, w1)) < 1e-5 and rel(y2, F.linear(x, w2)) < 1e-5


def norm_twin(x, delta, nw, eps=1e-6):
    """The model's residual add and RMSNorm (RMSNorm.forward), in x's dtype."""
    from dsv3.model.layers import RMSNorm

    norm = RMSNorm(x.shape[-1], eps)
    norm.weight.data = nw
    r = x if delta is None else x + delta
    return r, norm(r)


@interpreted
@pytest.mark.parametrize("variant", ["fma", "mma"])
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("m", [1, 3])
def test_interpreted_pair_with_norm_equals_add_norm_and_two_linears(m, with_delta, variant):
    """Residual add + RMSNorm in the pair's loads: ragged N and K, the rows' scales far apart (the
    norm's scale is per row), the residual written once."""
    pytest.importorskip("triton")
    tiles = VARIANTS[variant]
    x, w1 = operands(m, 40, 72)
    x = x * torch.arange(1, m + 1).unsqueeze(1) * 3
    _, w2 = operands(m, 24, 72, seed=1)
    delta = torch.randn(m, 72) if with_delta else None
    nw = 1 + 0.1 * torch.randn(72)
    eps = 0.5  # a few % of the rows' mean square (9 to 81): a dropped eps fails the 1e-5 below
    y1, y2, r = small_m_linear_pair_norm(x, delta, nw, eps, w1, w2, tiles)
    r_want, h = norm_twin(x, delta, nw, eps)
    assert torch.equal(r, r_want)
    assert rel(y1, F.linear(h, w1)) < 1e-5 and rel(y2, F.linear(h, w2)) < 1e-5
    if tiles.mma:  # the interpreter's bf16 tl.dot (above)
        return
    xb, db, nb, w1b, w2b = (t.bfloat16() if t is not None else None for t in (x, delta, nw, w1, w2))
    y1, y2, r = small_m_linear_pair_norm(xb, db, nb, eps, w1b, w2b, tiles)
    r_want, h = norm_twin(xb, db, nb, eps)
    assert torch.equal(r, r_want) and rel(y1, F.linear(h, w1b)) < 1e-2 and rel(y2, F.linear(h, w2b)) < 1e-2


def test_pair_refuses_split_k():
    x, w = operands(1, 8, 16)
    with pytest.raises(ValueError, match="split-K"):
        small_m_linear_pair(x, w, w, GemvTiles(split_k=2))


# ------------------------------------------------------------------------------------------ GPU only

# (N, K) of the bench config's decode projections: wq_a, wq_b, wkv_a, wo, the shared expert's w1/w3 and
# w2, the dense layer's w1/w3 and w2, the head; and an odd one (ragged N and K, K not a multiple of 8)
BENCH_SHAPES = [(1536, 2048), (3072, 1536), (576, 2048), (2048, 2048), (1024, 2048), (2048, 1024), (8192, 2048),
                (2048, 8192), (32768, 2048), (1000, 1003)]
GPU_VARIANTS = {"default": GemvTiles(), "fma split-K": GemvTiles(split_k=4),
                "mma": GemvTiles(mma=True, block_n=16, block_k=256),
                "mma split-K": GemvTiles(mma=True, block_n=32, block_k=128, split_k=4)}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
@pytest.mark.parametrize("n,k", BENCH_SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gpu_kernel_equals_linear_bf16(m, n, k, variant):
    x, w = operands(m, n, k, dtype=torch.bfloat16, device="cuda")
    assert use_small_m_linear(x, w)
    got = small_m_linear(x, w, GPU_VARIANTS[variant])
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert rel(got, F.linear(x, w)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
@pytest.mark.parametrize("m", [1, 2])
def test_gpu_float_out_is_the_rounded_output_in_fp32(m, variant):
    x, w = operands(m, 32768, 2048, dtype=torch.bfloat16, device="cuda")  # the head
    got = small_m_linear(x, w, GPU_VARIANTS[variant], float_out=True)
    assert got.dtype == torch.float32 and torch.equal(got, small_m_linear(x, w, GPU_VARIANTS[variant]).float())


@pytest.mark.gpu
@pytest.mark.parametrize("n1,n2,k", [(1536, 576, 2048), (1024, 1024, 2048), (8192, 8192, 2048), (40, 1000, 1003)])
@pytest.mark.parametrize("m", [1, 8])
def test_gpu_pair_equals_two_linears_bf16(m, n1, n2, k):
    x, w1 = operands(m, n1, k, dtype=torch.bfloat16, device="cuda")
    _, w2 = operands(m, n2, k, seed=1, dtype=torch.bfloat16, device="cuda")
    y1, y2 = small_m_linear_pair(x, w1, w2)
    assert rel(y1, F.linear(x, w1)) <= 1e-2 and rel(y2, F.linear(x, w2)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", ["norm", "default"])
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("m", [1, 2, 8])
def test_gpu_pair_with_norm_equals_add_norm_and_two_linears_bf16(m, with_delta, tiles):
    """wq_a + wkv_a of the bench config (and an odd shape) behind the fused residual add and RMSNorm, on
    the tiles decoding takes (NORM_TILES) and the tensor-core ones."""
    from dsv3.inference.gemv import NORM_TILES

    tiles = NORM_TILES if tiles == "norm" else GemvTiles()
    for n1, n2, k in ((1536, 576, 2048), (40, 1000, 1003)):
        x, w1 = operands(m, n1, k, dtype=torch.bfloat16, device="cuda")
        _, w2 = operands(m, n2, k, seed=1, dtype=torch.bfloat16, device="cuda")
        delta = torch.randn_like(x) if with_delta else None
        nw = (1 + 0.1 * torch.randn(k, device="cuda")).bfloat16()
        y1, y2, r = small_m_linear_pair_norm(x, delta, nw, 1e-6, w1, w2, tiles)
        r_want, h = norm_twin(x, delta, nw)
        assert torch.equal(r, r_want)
        assert rel(y1, F.linear(h, w1)) <= 1e-2 and rel(y2, F.linear(h, w2)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
def test_gpu_compiled_and_graph_captured_equal_eager(variant):
    """torch.compile(fullgraph=True) traces the op without a break; a CUDA graph of the compiled call
    replays it bit for bit; both agree with the eager op (inductor may fuse the partial sum)."""
    x, w = operands(2, 576, 2048, dtype=torch.bfloat16, device="cuda")
    tiles = GPU_VARIANTS[variant]
    eager = small_m_linear(x, w, tiles)
    compiled = torch.compile(lambda x, w: small_m_linear(x, w, tiles), fullgraph=True)
    once = compiled(x, w)
    assert rel(once, eager) <= 1e-3
    compiled(x, w)  # warm: nothing left to compile or autotune inside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = compiled(x, w)
    x.copy_(torch.randn_like(x))  # new inputs in the same buffers: the replay must read them
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, compiled(x, w))
    assert rel(captured, small_m_linear(x, w, tiles)) <= 1e-3


# ------------------------------------------------------------------------------------------ the decode switch


def test_decode_switch_routes_every_dense_projection_and_changes_nothing_else(monkeypatch):
    """With TRITON_GEMV on (the rule forced true on CPU, the kernels replaced by recording F.linears), a
    decode step sends wq_a + wkv_a and the dense and shared w1 + w3 through small_m_linear_pair, and
    wq_b, wo, the w2s and the head through small_m_linear (the shared experts run here, as the grouped
    path runs on CPU), and the logits stay those of the default path."""
    from dsv3.inference import forward, gemv

    model = tiny_model()
    want = decode_logits(model, [3, 5, 7], 3)
    monkeypatch.setattr(forward, "ATTN_NORM_IN_GEMV", False)  # its launch: test_fused_norms.py
    seen = []
    monkeypatch.setattr(gemv, "TRITON_GEMV", True)
    monkeypatch.setattr(gemv, "PAIR_GEMV", True)
    monkeypatch.setattr(gemv, "use_small_m_linear", lambda x, w: True)
    monkeypatch.setattr(gemv, "small_m_linear",
                        lambda x, w, float_out=False: seen.append(w) or F.linear(x, w).to(torch.float32 if float_out else x.dtype))
    paired = []
    monkeypatch.setattr(gemv, "small_m_linear_pair",
                        lambda x, w1, w2: paired.append((w1, w2)) or (F.linear(x, w1), F.linear(x, w2)))
    got = decode_logits(model, [3, 5, 7], 3)
    assert torch.equal(got, want)
    ids = {id(w) for w in seen}
    attn = model.layers[0].attn
    for w in (attn.wq_b.weight, attn.wo.weight, model.head.weight, model.layers[0].ffn.w2.weight,
              model.layers[1].ffn.shared.w2.weight):
        assert id(w) in ids
    pairs = {(id(a), id(b)) for a, b in paired}
    for a, b in ((attn.wq_a, attn.wkv_a), (model.layers[0].ffn.w1, model.layers[0].ffn.w3),
                 (model.layers[1].ffn.shared.w1, model.layers[1].ffn.shared.w3)):
        assert (id(a.weight), id(b.weight)) in pairs


@pytest.mark.gpu
def test_gpu_decode_with_triton_gemv_equals_default(monkeypatch):
    """The compiled, captured decode step with TRITON_GEMV on against the cuBLAS step (off): BF16
    logits within 5 % of their scale (fusion and summation order differ), on the tiny model's odd dims."""
    from dsv3.inference import gemv

    model = tiny_model().cuda().to(torch.bfloat16)
    monkeypatch.setattr(gemv, "TRITON_GEMV", False)
    want = decode_logits(model, [3, 5, 7], 4)
    for pair in (False, True):  # PAIR_GEMV: wq_a + wkv_a and w1 + w3 in one launch each
        torch._dynamo.reset()
        monkeypatch.setattr(gemv, "TRITON_GEMV", True)
        monkeypatch.setattr(gemv, "PAIR_GEMV", pair)
        got = decode_logits(model, [3, 5, 7], 4)
        assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item(), pair
