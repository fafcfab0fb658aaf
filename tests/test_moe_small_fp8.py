"""FP8 routed experts for a few tokens (dsv3/inference/moe_small_fp8.py) against their twin in torch
(`small_batch_experts_fp8_reference`: reference.quant_rows and reference.gemm per slot): each kernel
under Triton's CPU interpreter (`TRITON_INTERPRET=1` where Triton is installed, else skipped) on inputs
that quantise exactly (the interpreter's e4m3 cast does not round to nearest, tests/helpers.py),
and the pair on the GPU, alone and inside a compiled, captured decode step.
"""

import pytest
import torch
from helpers import exactly_quantising_rows, interpreted

from dsv3.checkpoint.fp8 import quantize_weight
from dsv3.fp8 import reference as ref
from dsv3.fp8.reference import ceil128
from dsv3.inference import moe_small_fp8
from dsv3.inference.moe_small_fp8 import (
    Fp8ExpertTiles,
    down_fp8,
    gate_up_fp8,
    small_batch_experts_fp8,
    small_batch_experts_fp8_reference,
    use_small_batch_fp8,
)

E, D, I, N, K = 6, 200, 256, 2, 3  # D ragged (padded to 256 inside), N*K = E


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def fp8_stack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, R, C] fp32 -> e4m3 [E, ceil128(R), ceil128(C)] zero padded, 128x128 scales, as FP8InferenceExperts holds them."""
    qs = [quantize_weight(x) for x in w]
    r, c = w.shape[1:]
    q = torch.stack([torch.nn.functional.pad(q.view(torch.uint8), (0, ceil128(c) - c, 0, ceil128(r) - r)) for q, _ in qs])
    return q.view(torch.float8_e4m3fn), torch.stack([s.float() for _, s in qs])


def operands(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w13, w13_s = fp8_stack(torch.randn(E, 2 * I, D, generator=g) / D ** 0.5)
    w2, w2_s = fp8_stack(torch.randn(E, D, I, generator=g) / I ** 0.5)
    indices = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    gates = torch.rand(N, K, generator=g)
    return [t.to(device) for t in (w13, w13_s, w2, w2_s, indices, gates)]


def test_rule_takes_cuda_only():
    assert moe_small_fp8.FP8_SMALL_EXPERTS and not use_small_batch_fp8(1, 8, 32, torch.zeros(1, 8))  # on (run 26)


@interpreted
@pytest.mark.parametrize("prequant", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("pow2", [False, True])
def test_interpreted_gate_up_equals_the_twin(pow2, groups, prequant):
    pytest.importorskip("triton")
    w13, w13_s, _, _, indices, _ = operands()
    x = exactly_quantising_rows(N, D, torch.Generator().manual_seed(1))
    xq, xs = ref.quant_rows(x, pow2)
    want = []
    for slot, e in enumerate(indices.reshape(-1).tolist()):
        t = slot // K
        gu = ref.gemm(xq[t:t + 1], xs[t:t + 1], w13[e], w13_s[e])
        want.append(torch.nn.functional.silu(gu[:, :I]) * gu[:, I:])
    got = gate_up_fp8(x, indices, w13, w13_s, pow2, Fp8ExpertTiles(up_block_i=32, up_groups=groups, prequant=prequant))
    assert got.shape == (N * K, I) and rel(got, torch.cat(want)) < 1e-5


@interpreted
@pytest.mark.parametrize("prequant", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("pow2", [False, True])
def test_interpreted_down_equals_the_twin(pow2, groups, prequant):
    pytest.importorskip("triton")
    _, _, w2, w2_s, indices, gates = operands()
    h = exactly_quantising_rows(N * K, I, torch.Generator().manual_seed(2))
    x = torch.zeros(N, D)
    want = small_batch_experts_fp8_reference(x, indices, gates, None, None, w2, w2_s, D, pow2, h=h)
    got = down_fp8(h, indices, gates, w2, w2_s, D, torch.float32, pow2, Fp8ExpertTiles(down_block_d=4, down_groups=groups, prequant=prequant))
    assert got.shape == (N, D) and rel(got, want) < 1e-5


@interpreted
@pytest.mark.parametrize("groups", [1, 2])
def test_interpreted_weight_only_equals_the_dequantised_twin(groups):
    """W8A16: x and h unquantised against the weights dequantised block by block (fp32 under the interpreter)."""
    pytest.importorskip("triton")
    w13, w13_s, w2, w2_s, indices, gates = operands()
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(3))
    tiles = Fp8ExpertTiles(up_block_i=32, up_groups=groups, down_block_d=4, down_groups=groups, weight_only=True)
    h = gate_up_fp8(x, indices, w13, w13_s, False, tiles)
    want = small_batch_experts_fp8_reference(x, indices, gates, w13, w13_s, w2, w2_s, D, False, weight_only=True)
    got = down_fp8(h, indices, gates, w2, w2_s, D, torch.float32, False, tiles)
    assert rel(got, want) < 1e-5
    with pytest.raises(ValueError, match="weight_only"):
        gate_up_fp8(x, indices, w13, w13_s, False, Fp8ExpertTiles(weight_only=True, prequant=True))


def fp8_modules(device="cpu"):
    """FP8InferenceExperts over operands() and a shared expert of one routed expert's size as three
    FP8InferenceLinears (w1, w3 [I, D], w2 [D, I]), with their e4m3 weights and scales."""
    from dsv3.fp8.inference import FP8InferenceExperts, FP8InferenceLinear

    w13, w13_s, w2, w2_s, indices, gates = operands(device=device)
    experts = FP8InferenceExperts(E, D, I, device=device)
    for name, t in (("w13", w13), ("w13_scale_inv", w13_s), ("w2", w2), ("w2_scale_inv", w2_s)):
        getattr(experts, name).copy_(t)
    g = torch.Generator().manual_seed(5)
    lins = []
    for n_in, n_out in ((D, I), (D, I), (I, D)):
        lin = FP8InferenceLinear(n_in, n_out, device=device)
        q, sc = fp8_stack(torch.randn(1, n_out, n_in, generator=g) / n_in ** 0.5)
        lin.weight.copy_(q[0])
        lin.weight_scale_inv.copy_(sc[0])
        lins.append(lin)
    return experts, tuple(lins), indices, gates


@interpreted
@pytest.mark.parametrize("tiles", [Fp8ExpertTiles(up_block_i=32, down_block_d=4, prequant=True),
                                   Fp8ExpertTiles(up_block_i=32, down_block_d=4, up_groups=2, weight_only=True)],
                         ids=["prequant", "weight_only"])
def test_interpreted_shared_expert_rides_as_a_slot(tiles):
    """The shared expert as one more slot per token (gate 1) equals the twin's routed sum plus the shared MLP
    by the same maths (x and h quantised by torch, or unquantised: exact under the interpreter)."""
    pytest.importorskip("triton")
    experts, lins, indices, gates = fp8_modules()
    x = exactly_quantising_rows(N, D, torch.Generator().manual_seed(4))
    got = small_batch_experts_fp8(x, indices, gates, experts, tiles, shared=lins)
    weights = tuple(t for lin in lins for t in (lin.weight, lin.weight_scale_inv))
    want = small_batch_experts_fp8_reference(x, indices, gates, experts.w13, experts.w13_scale_inv, experts.w2,
                                             experts.w2_scale_inv, D, False, weight_only=tiles.weight_only,
                                             shared=weights)
    alone = small_batch_experts_fp8_reference(x, indices, gates, experts.w13, experts.w13_scale_inv, experts.w2,
                                              experts.w2_scale_inv, D, False, weight_only=tiles.weight_only)
    assert rel(got, want) < 1e-5 and rel(alone, want) > 0.1  # the shared expert adds as much as the routed ones


def test_fusable_shared_fp8_checks_the_shapes():
    experts, lins, _, _ = fp8_modules()
    mlp = type("MLP", (), {"w1": lins[0], "w3": lins[1], "w2": lins[2]})
    assert moe_small_fp8.fusable_shared_fp8(mlp, experts) == lins
    from dsv3.fp8.inference import FP8InferenceLinear

    mlp.w2 = FP8InferenceLinear(I, 2 * D)  # twice the rows of one expert's w2
    assert moe_small_fp8.fusable_shared_fp8(mlp, experts) is None
    mlp.w2 = torch.nn.Linear(I, D)  # not FP8
    assert moe_small_fp8.fusable_shared_fp8(mlp, experts) is None
    assert moe_small_fp8.fusable_shared_fp8(None, experts) is None


@pytest.mark.gpu
@pytest.mark.parametrize("with_shared", [False, True], ids=["routed", "shared"])
@pytest.mark.parametrize("tiles", [Fp8ExpertTiles(), Fp8ExpertTiles(prequant=True), Fp8ExpertTiles(weight_only=True)],
                         ids=["in_kernel", "prequant", "weight_only"])
def test_gpu_experts_equal_the_twin(tiles, with_shared):
    """BF16 x: within BF16's output rounding and the rare e4m3 step of an h element that lies at a rounding
    boundary (the kernel's silu and torch's differ in the last fp32 bit); with the shared expert as a slot."""
    experts, lins, indices, gates = fp8_modules(device="cuda")
    shared = lins if with_shared else None
    x = torch.randn(N, D, device="cuda").bfloat16()
    got = small_batch_experts_fp8(x, indices, gates, experts, tiles, shared=shared)
    want = small_batch_experts_fp8_reference(
        x, indices, gates, experts.w13, experts.w13_scale_inv, experts.w2, experts.w2_scale_inv, D, False,
        weight_only=tiles.weight_only,
        shared=shared and tuple(t for lin in lins for t in (lin.weight, lin.weight_scale_inv)))
    assert got.dtype == torch.bfloat16 and rel(got, want) < 1e-2
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: small_batch_experts_fp8(a, indices, gates, experts, tiles, shared=shared),
                             fullgraph=True)
    assert rel(compiled(x), got) < 1e-3


@pytest.mark.gpu
def test_gpu_decode_of_an_fp8_checkpoint_through_the_expert_kernels(tmp_path, monkeypatch):
    """A decode step of an FP8 checkpoint with FP8_SMALL_EXPERTS on (compiled, captured) against the step through
    the grouped training kernels (eager): BF16 logits within 5 % of their largest."""
    from dsv3 import ModelConfig, Transformer
    from dsv3.fp8 import load_fp8_for_inference
    from dsv3.inference import Generator

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny").replace(moe_intermediate_size=128, num_layers=2)
    Transformer(cfg).save_pretrained(tmp_path, fp8=True)
    model = load_fp8_for_inference(tmp_path, device="cuda", dtype=torch.bfloat16)
    traced, kernel = {}, moe_small_fp8.small_batch_experts_fp8
    monkeypatch.setattr(moe_small_fp8, "small_batch_experts_fp8",  # records whether the shared expert rode along
                        lambda *a, **k: traced.setdefault("shared", k.get("shared") is not None) in (True, False)
                        and kernel(*a, **k))
    prompts, logits = [[3, 5, 7, 9, 11, 13, 2]], {}
    for on in (False, True):
        monkeypatch.setattr(moe_small_fp8, "FP8_SMALL_EXPERTS", on)
        torch._dynamo.reset()
        gen = Generator(model, cuda_graphs=on)
        with torch.no_grad():
            cache = gen.reserve(1, len(prompts[0]) + 8)
            gen.prefill(prompts)
            tokens, positions = torch.tensor([[5]], device="cuda"), cache.lengths.unsqueeze(1).clone()
            step = gen.decode_runner if on else gen.decode_step
            logits[on] = step(gen.kv_len(len(prompts[0]) + 1), tokens, positions).clone()
        if on:
            assert gen.decode_runner.enabled and gen.compiled, "capture or compile fell back"
    assert traced, "the FP8 expert kernels were never taken"
    assert traced["shared"], "the shared expert did not ride in the kernels as a slot"
    assert (logits[True] - logits[False]).abs().max().item() <= 0.05 * logits[False].abs().max().item()
