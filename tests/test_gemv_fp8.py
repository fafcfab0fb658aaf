"""The FP8 few-row linear (dsv3/inference/gemv_fp8.py) against its twin, the FP8 layers' own path
`ops.gemm(*ops.quant_rows(x), w, w_s)` on the reference backend: under Triton's CPU interpreter (run with
`TRITON_INTERPRET=1` where Triton is installed, else skipped) at ragged shapes, both dot forms and both
scale kinds; on the GPU in BF16 at the bench config's shapes and through a compiled, captured decode.

Tolerance 1e-5 relative in fp32: the same e4m3 bytes and scales on both sides, only the order of the
fp32 sums differs.
"""

import pytest
import torch
from helpers import exactly_quantising_rows, interpreted

from dsv3.checkpoint.fp8 import quantize_weight
from dsv3.fp8 import ops
from dsv3.fp8.reference import ceil128, dequant_blocks
from dsv3.inference import gemv_fp8
from dsv3.inference.gemv_fp8 import Fp8GemvTiles, small_m_linear_fp8, small_m_linear_fp8_pair, use_small_m_linear_fp8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def operands(m, n, k, seed=0, device="cpu"):
    """x [M, K] with rows of very different sizes; an e4m3 weight padded to [Np, Kp], its 128x128 scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]
    w = torch.randn(n, k, generator=g) / k ** 0.5
    q, s = quantize_weight(w)
    q = torch.nn.functional.pad(q.view(torch.uint8), (0, ceil128(k) - k, 0, ceil128(n) - n)).view(torch.float8_e4m3fn)
    return x.to(device), q.to(device), s.float().to(device)


def twin(x, q, s, n, pow2):
    """What FP8InferenceLinear computes without the kernel (the reference backend)."""
    return ops.gemm(*ops.quant_rows(x, pow2, "reference"), q, s, x.dtype, "reference")[:, :n]


def test_rule_takes_cuda_only():
    x, q, s = operands(1, 40, 200)
    assert gemv_fp8.FP8_GEMV and not use_small_m_linear_fp8(x, q, s)  # on by default (H200 run 26), never on a CPU


def test_tiles_are_checked():
    x, q, s = operands(1, 40, 200)
    with pytest.raises(ValueError, match="block_n"):
        small_m_linear_fp8(x, q, s, 40, tiles=Fp8GemvTiles(block_n=48))
    with pytest.raises(ValueError, match="split_k"):
        small_m_linear_fp8(x, q, s, 40, tiles=Fp8GemvTiles(split_k=0))


# (groups, split_k): one block a step; two a step over 3-4 blocks (a ragged last step); split-K with the
# last split past Kp (4 blocks in 3 splits of 2); split-K with two-block steps
STEPS = [(1, 1), (2, 1), (1, 3), (2, 2)]


@interpreted
@pytest.mark.parametrize("mma", [False, True])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 40, 200), (3, 200, 384), (8, 128, 500)])
@pytest.mark.parametrize("groups,split_k", STEPS)
@pytest.mark.parametrize("prequant", [False, True])
def test_interpreted_kernel_equals_the_fp8_layers_path(m, n, k, pow2, mma, groups, split_k, prequant):
    pytest.importorskip("triton")
    _, q, s = operands(m, n, k)
    x = exactly_quantising_rows(m, k, torch.Generator().manual_seed(0))
    tiles = Fp8GemvTiles(mma=mma, block_n=16 if mma else 8, groups=groups, split_k=split_k, prequant=prequant)
    got = small_m_linear_fp8(x, q, s, n, pow2=pow2, tiles=tiles)
    assert got.shape == (m, n) and got.dtype == x.dtype
    assert rel(got, twin(x, q, s, n, pow2)) < 1e-5


@interpreted
@pytest.mark.parametrize("mma", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 40, 200), (3, 200, 384), (8, 128, 500)])
@pytest.mark.parametrize("groups,split_k", STEPS)
@pytest.mark.parametrize("block_dots", [False, True])
def test_interpreted_weight_only_kernel_equals_the_dequantised_linear(m, n, k, mma, groups, split_k, block_dots):
    """W8A16: x as it is, times the e4m3 weight dequantised block by block (fp32 under the interpreter); on the
    tensor cores one dot per step or (block_dots) per block."""
    pytest.importorskip("triton")
    if block_dots and not mma:
        pytest.skip("block_dots is a tensor-core form")
    x, q, s = operands(m, n, k)
    tiles = Fp8GemvTiles(mma=mma, block_n=16 if mma else 8, groups=groups, split_k=split_k, weight_only=True,
                         block_dots=block_dots)
    got = small_m_linear_fp8(x, q, s, n, tiles=tiles)
    assert rel(got, x @ dequant_blocks(q, s)[:n, :k].T) < 1e-5


def test_weight_only_excludes_prequant():
    x, q, s = operands(1, 40, 200)
    with pytest.raises(ValueError, match="weight_only"):
        small_m_linear_fp8(x, q, s, 40, tiles=Fp8GemvTiles(weight_only=True, prequant=True))
    with pytest.raises(ValueError, match="block_dots"):
        small_m_linear_fp8(x, q, s, 40, tiles=Fp8GemvTiles(block_dots=True))


def fp8_linear(q, s, n, k):
    """An FP8InferenceLinear holding the padded e4m3 weight q and its scales (out n, in k)."""
    from dsv3.fp8.inference import FP8InferenceLinear

    lin = FP8InferenceLinear(k, n)
    lin.weight.copy_(q)
    lin.weight_scale_inv.copy_(s)
    return lin


@interpreted
@pytest.mark.parametrize("mode", ["in_kernel", "prequant", "weight_only", "weight_only_block_dots"])
@pytest.mark.parametrize("mma", [False, True])
@pytest.mark.parametrize("m,n1,n2,k", [(1, 40, 200, 200), (3, 128, 72, 384)])
def test_interpreted_pair_equals_two_single_launches(m, n1, n2, k, mma, mode):
    """wq_a + wkv_a in one launch: each output equals its single-launch kernel's (which equals its twin above)."""
    pytest.importorskip("triton")
    if mode.endswith("block_dots") and not mma:
        pytest.skip("block_dots is a tensor-core form")
    (_, q1, s1), (_, q2, s2) = operands(m, n1, k, seed=1), operands(m, n2, k, seed=2)
    first, second = fp8_linear(q1, s1, n1, k), fp8_linear(q2, s2, n2, k)
    x = exactly_quantising_rows(m, k, torch.Generator().manual_seed(0))
    tiles = Fp8GemvTiles(mma=mma, block_n=16 if mma else 8, groups=2, prequant=mode == "prequant",
                         weight_only=mode.startswith("weight_only"), block_dots=mode.endswith("block_dots"))
    y1, y2 = small_m_linear_fp8_pair(x, first, second, tiles)
    assert y1.shape == (m, n1) and y2.shape == (m, n2)
    assert rel(y1, small_m_linear_fp8(x, q1, s1, n1, tiles=tiles)) < 1e-6
    assert rel(y2, small_m_linear_fp8(x, q2, s2, n2, tiles=tiles)) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [Fp8GemvTiles(), Fp8GemvTiles(groups=2, split_k=4), Fp8GemvTiles(prequant=True),
                                   Fp8GemvTiles(mma=False, weight_only=True),
                                   Fp8GemvTiles(warps=2, weight_only=True, block_dots=True)],
                         ids=["default", "split4", "prequant", "weight_only", "weight_only_block_dots"])
@pytest.mark.parametrize("m", [1, 2, 8])
@pytest.mark.parametrize("n,k", [(1536, 2048), (576, 2048), (3072, 1536), (2048, 2048), (8192, 2048), (2048, 8192)])
def test_gpu_kernel_equals_the_fp8_layers_path(m, n, k, tiles, monkeypatch):
    """BF16 x at the bench config's FP8 decode shapes (wq_a, wkv_a, wq_b, wo, the dense MLP): within BF16's
    output rounding of the training kernels' path (cuBLAS / Triton block-wise GEMM), or for weight_only of x
    times the dequantised weight; compiled, the same."""
    x, q, s = operands(m, n, k, device="cuda")
    x = x.bfloat16()
    monkeypatch.setattr(gemv_fp8, "FP8_GEMV", True)
    assert use_small_m_linear_fp8(x, q, s)
    got = small_m_linear_fp8(x, q, s, n, tiles=tiles)
    if tiles.weight_only:
        want = x.float() @ dequant_blocks(q, s)[:n, :k].T
    else:
        want = ops.gemm(*ops.quant_rows(x, False, ops.default_backend(x.device)), q, s, torch.bfloat16,
                        ops.default_backend(x.device))[:, :n]
    assert rel(got, want) < 1e-2
    if tiles != Fp8GemvTiles():
        return
    torch._dynamo.reset()  # one lambda's code object over 18 cases would pass dynamo's recompile limit (8)
    compiled = torch.compile(lambda a: small_m_linear_fp8(a, q, s, n), fullgraph=True)
    assert rel(compiled(x), got) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [Fp8GemvTiles(), Fp8GemvTiles(prequant=True), Fp8GemvTiles(weight_only=True),
                                   Fp8GemvTiles(weight_only=True, block_dots=True)],
                         ids=["default", "prequant", "weight_only", "weight_only_block_dots"])
@pytest.mark.parametrize("m", [1, 8])
def test_gpu_pair_equals_two_single_launches(m, tiles):
    """wq_a + wkv_a of the bench config in one launch, BF16 x: each output as its single launch's, compiled too."""
    (_, q1, s1), (_, q2, s2) = operands(m, 1536, 2048, seed=1), operands(m, 576, 2048, seed=2)
    first, second = fp8_linear(q1, s1, 1536, 2048).cuda(), fp8_linear(q2, s2, 576, 2048).cuda()
    x = torch.randn(m, 2048, device="cuda").bfloat16()
    y1, y2 = small_m_linear_fp8_pair(x, first, second, tiles)
    assert rel(y1, small_m_linear_fp8(x, first.weight, first.weight_scale_inv, 1536, tiles=tiles)) < 1e-3
    assert rel(y2, small_m_linear_fp8(x, second.weight, second.weight_scale_inv, 576, tiles=tiles)) < 1e-3
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: small_m_linear_fp8_pair(a, first, second, tiles), fullgraph=True)
    assert rel(compiled(x)[1], y2) < 1e-3


@pytest.mark.gpu
def test_gpu_decode_of_an_fp8_checkpoint_through_the_kernel(tmp_path, monkeypatch):
    """An FP8 checkpoint's decode step with FP8_GEMV on (compiled, captured) against the same step through the
    training kernels with it off (eager): BF16 logits within 5 % of their largest."""
    from dsv3 import ModelConfig, Transformer
    from dsv3.fp8 import load_fp8_for_inference
    from dsv3.inference import Generator

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny").replace(moe_intermediate_size=128, num_layers=2)
    Transformer(cfg).save_pretrained(tmp_path, fp8=True)
    model = load_fp8_for_inference(tmp_path, device="cuda", dtype=torch.bfloat16)
    prompts = [[3, 5, 7, 9, 11, 13, 2], [4, 6, 8]]
    from dsv3.inference import gemv

    traced, kernel = {}, gemv.small_m_linear_fp8  # set once, not appended to: dynamo guards on what it mutates
    monkeypatch.setattr(gemv, "small_m_linear_fp8", lambda *a, **k: traced.setdefault("fp8", True) and kernel(*a, **k))
    logits = {}
    for on in (False, True):
        monkeypatch.setattr(gemv_fp8, "FP8_GEMV", on)
        torch._dynamo.reset()
        gen = Generator(model, cuda_graphs=on)
        width = max(map(len, prompts))
        with torch.no_grad():
            cache = gen.reserve(len(prompts), width + 8)
            gen.prefill(prompts)
            tokens, positions = torch.tensor([[5], [6]], device="cuda"), cache.lengths.unsqueeze(1).clone()
            step = gen.decode_runner if on else gen.decode_step
            logits[on] = step(gen.kv_len(width + 1), tokens, positions).clone()
        if on:
            assert gen.decode_runner.enabled and gen.compiled, "capture or compile fell back"
    assert traced, "the FP8 kernel was never taken"
    assert (logits[True] - logits[False]).abs().max().item() <= 0.05 * logits[False].abs().max().item()
