"""The small-batch routed experts (dsv3/inference/moe_small.py): the twin against the model's MoE on CPU
in fp32; the Triton kernels (slot-major and expert-major) against the twin under Triton's CPU interpreter
(run with `TRITON_INTERPRET=1` where Triton is installed, else skipped); and (GPU) the kernels in BF16,
under torch.compile and in a captured CUDA graph, and moe_forward taking the slot-major path.
The expert-major kernels use tl.dot, whose bf16 operands Triton 3.6's interpreter multiplies as raw bit
patterns: under the interpreter they are tested in fp32 only, in BF16 on the GPU.

Tolerances: fp32 against fp32, 1e-5 (summation order only).  BF16 outputs against the fp32 twin, 1e-2
relative (one bf16 rounding of the output is ~2e-3, the expert-major h's as many again; the interpreter
truncates instead of rounding).
"""

from dataclasses import replace

import pytest
import torch
from helpers import interpreted, randomize_, tiny_config

import dsv3
from dsv3.inference import Generator
from dsv3.inference.moe import moe_forward
from dsv3.inference.moe_small import (
    ExpertMajorTiles,
    Tiles,
    expert_major_experts,
    group_slots_by_expert,
    small_batch_experts,
    small_batch_experts_reference,
    small_batch_experts_routed,
    use_expert_major,
    use_small_batch,
)
from dsv3.model.moe import MoE


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def random_moe(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    overrides.setdefault("n_shared_experts", 0)  # no shared expert: forward = the routed part
    moe = MoE(tiny_config(**overrides)).eval()
    randomize_(moe, seed)
    return moe


def operands(n, k, e, d, inter, seed=0, dtype=torch.float32, device="cpu"):
    """Random x, weights and gates; each token's K experts distinct, as top-k gives them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w13 = torch.randn(e, 2 * inter, d, generator=g) / d ** 0.5
    w2 = torch.randn(e, d, inter, generator=g) / inter ** 0.5
    indices = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=g) + 0.1
    x, w13, w2 = (t.to(device, dtype) for t in (x, w13, w2))
    return x, indices.to(device), weights.to(device), w13, w2


# ------------------------------------------------------------------------------------------ twin


@pytest.mark.parametrize("n", [1, 2, 4])
def test_reference_equals_moe_forward_fp32(n):
    moe = random_moe()
    x = torch.randn(n, moe.cfg.hidden_size, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        r = moe.gate(x)
        got = small_batch_experts_reference(x, r.indices, r.weights, moe.experts.w13, moe.experts.w2)
        for impl in ("loop", "grouped"):
            moe.set_experts_impl(impl)
            want = moe(x.unsqueeze(0))[0][0]
            assert rel(got, want) < 1e-5, impl


def test_rule_takes_cuda_bf16_and_few_slots_only():
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    assert not use_small_batch(1, 8, 32, x)  # CPU: the grouped path
    assert not use_small_batch(1, 8, 32, x.float())


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="loop_k"):
        small_batch_experts(*operands(1, 2, 4, 16, 16), Tiles(down="atomics"))


# ------------------------------------------------------------------------------------------ interpreter

# (N, K, E, D, I, tiles): tiles that divide D and I, tiles that leave a ragged last tile of each
SHAPES = [
    (1, 3, 8, 64, 32, Tiles(up_block_i=16, up_block_d=32, down_block_d=16, down_block_i=16)),
    (3, 2, 6, 48, 40, Tiles(up_block_i=16, up_block_d=32, down_block_d=32, down_block_i=16)),
    (2, 4, 5, 80, 24, Tiles(up_block_i=8, up_block_d=64, down_block_d=16, down_block_i=16)),
]


def shared_weights(d, inter, seed=1, dtype=torch.float32, device="cpu"):
    """A shared expert of one routed expert's size: w1 [I, D], w3 [I, D], w2 [D, I]."""
    g = torch.Generator().manual_seed(seed)
    ws = (torch.randn(inter, d, generator=g) / d ** 0.5, torch.randn(inter, d, generator=g) / d ** 0.5,
          torch.randn(d, inter, generator=g) / inter ** 0.5)
    return tuple(w.to(device, dtype) for w in ws)


def test_reference_with_shared_equals_moe_with_shared_expert():
    torch.manual_seed(0)
    moe = MoE(tiny_config(n_shared_experts=1)).eval()
    randomize_(moe, 0)
    x = torch.randn(3, moe.cfg.hidden_size)
    shared = (moe.shared.w1.weight, moe.shared.w3.weight, moe.shared.w2.weight)
    with torch.no_grad():
        r = moe.gate(x)
        got = small_batch_experts_reference(x, r.indices, r.weights, moe.experts.w13, moe.experts.w2, shared)
        want = moe(x.unsqueeze(0))[0][0]
    assert rel(got, want) < 1e-5


@interpreted
@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("down", ["partials", "loop_k"])
@pytest.mark.parametrize("n,k,e,d,inter,tiles", SHAPES)
def test_interpreted_kernels_equal_reference(n, k, e, d, inter, tiles, down, with_shared):
    pytest.importorskip("triton")
    tiles = replace(tiles, down=down)
    x, indices, weights, w13, w2 = operands(n, k, e, d, inter)
    shared = shared_weights(d, inter) if with_shared else None
    if n > 1:
        indices[1, 0] = indices[0, 0]  # two tokens' slots pick the same expert
    want = small_batch_experts_reference(x, indices, weights, w13, w2, shared)
    assert rel(small_batch_experts(x, indices, weights, w13, w2, tiles, shared), want) < 1e-5
    xb, w13b, w2b = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
    sb = tuple(w.bfloat16() for w in shared) if with_shared else None
    got = small_batch_experts(xb, indices, weights, w13b, w2b, tiles, sb)
    assert got.dtype == torch.bfloat16
    assert rel(got, small_batch_experts_reference(xb, indices, weights, w13b, w2b, sb)) < 1e-2


@interpreted
@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("down", ["partials", "loop_k"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("config", [{}, {"use_expert_bias": False, "n_group": 1, "topk_group": 1}])
def test_interpreted_routed_experts_equal_router_then_reference(config, n, down, with_shared):
    """small_batch_experts_routed (the gate/up kernel selecting each slot's expert from the routing GEMV's
    partials) against the model's router on h, then the twin: the tiny config (groups and bias) and one
    group without bias, split 3 (ragged slices); the expert ids and gates it writes for the down kernel
    come through its output."""
    pytest.importorskip("triton")
    from dsv3.inference.route_small import RouteTiles, route_partials_norm
    from dsv3.model.layers import RMSNorm

    moe = random_moe(seed=n, **config)
    cfg = moe.cfg
    norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    g = torch.Generator().manual_seed(3)
    x, delta = torch.randn(2, n, cfg.hidden_size, generator=g)
    shared = shared_weights(cfg.hidden_size, cfg.moe_intermediate_size) if with_shared else None
    tiles = Tiles(up_block_i=16, up_block_d=32, down_block_d=16, down_block_i=16, down=down)
    with torch.no_grad():
        parts, h, r = route_partials_norm(moe.gate, norm, x, delta, RouteTiles(block_d=16, warps=4, split=3))
        got = small_batch_experts_routed(h, parts, moe.gate, moe.experts.w13, moe.experts.w2, tiles, shared)
        routing = moe.gate(h)
        want = small_batch_experts_reference(h, routing.indices, routing.weights, moe.experts.w13, moe.experts.w2,
                                             shared)
    assert torch.equal(r, x + delta) and rel(h, norm(x + delta)) < 1e-6
    assert rel(got, want) < 1e-5


# ------------------------------------------------------------------------------------------ GPU only

BENCH_SHAPE = (8, 32, 2048, 1024)  # K, E, D, I of the bench config


@pytest.mark.gpu
@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("down", ["partials", "loop_k"])
@pytest.mark.parametrize("n,k,e,d,inter", [(1, *BENCH_SHAPE), (2, *BENCH_SHAPE), (4, *BENCH_SHAPE), (3, 3, 8, 80, 24)])
def test_gpu_kernels_equal_reference_bf16(n, k, e, d, inter, down, with_shared):
    x, indices, weights, w13, w2 = operands(n, k, e, d, inter, dtype=torch.bfloat16, device="cuda")
    shared = shared_weights(d, inter, dtype=torch.bfloat16, device="cuda") if with_shared else None
    if n > 1:
        indices[1, 0] = indices[0, 0]
    got = small_batch_experts(x, indices, weights, w13, w2, Tiles(down=down), shared)
    assert got.dtype == torch.bfloat16 and got.shape == (n, d)
    assert rel(got, small_batch_experts_reference(x, indices, weights, w13, w2, shared)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("down", ["partials", "loop_k"])
def test_gpu_compiled_and_graph_captured_equal_eager(down):
    """torch.compile(fullgraph=True) traces the op without a break; a CUDA graph of the compiled call
    replays it bit for bit; both agree with the eager op (inductor may fuse the partial sum)."""
    x, indices, weights, w13, w2 = operands(2, *BENCH_SHAPE, dtype=torch.bfloat16, device="cuda")
    tiles = Tiles(down=down)
    eager = small_batch_experts(x, indices, weights, w13, w2, tiles)
    compiled = torch.compile(lambda *a: small_batch_experts(*a, tiles=tiles), fullgraph=True)
    once = compiled(x, indices, weights, w13, w2)
    assert rel(once, eager) <= 1e-3
    compiled(x, indices, weights, w13, w2)  # warm: nothing left to compile or autotune inside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = compiled(x, indices, weights, w13, w2)
    x.copy_(torch.randn_like(x))  # new inputs in the same buffers: the replay must read them
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, compiled(x, indices, weights, w13, w2))
    assert rel(captured, small_batch_experts(x, indices, weights, w13, w2, tiles)) <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("n_shared", [0, 1])
@pytest.mark.parametrize("n", [1, 2])
def test_gpu_moe_forward_takes_the_small_path_and_equals_moe(n, n_shared, monkeypatch):
    moe = random_moe(n_shared_experts=n_shared).cuda().to(torch.bfloat16)
    x = torch.randn(1, n, moe.cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    calls = []
    monkeypatch.setattr("dsv3.inference.moe.small_batch_experts",
                        lambda *a, **kw: calls.append(kw["shared"]) or small_batch_experts(*a, **kw))
    with torch.no_grad():
        got = moe_forward(moe, x)
        want = moe(x)[0]
    assert calls, "the decode MoE did not take the small-batch path"
    assert (calls[0] is not None) == bool(n_shared), "a shared expert of one expert's size rides along"
    assert rel(got, want) <= 1e-2


@pytest.mark.gpu
def test_gpu_batch1_decode_compiled_and_captured_equals_eager():
    """A batch-1 decode step (the small path in every MoE layer), compiled and captured, against the
    eager step: BF16 logits within 5 % (as tests/test_inference.py allows fusion), with no fallback."""
    torch.manual_seed(0)
    model = dsv3.Transformer(tiny_config()).eval()
    randomize_(model, 0)
    model = model.cuda().to(torch.bfloat16)
    gen = Generator(model, cuda_graphs=True, compile=True)
    prompt = [3, 5, 7, 9, 11]
    with torch.no_grad():
        cache = gen.reserve(1, len(prompt) + 8)
        gen.prefill([prompt])
        tokens = torch.tensor([[5]], device="cuda")
        positions = cache.lengths.unsqueeze(1).clone()
        kv_len = gen.kv_len(len(prompt) + 1)
        graphed = gen.decode_runner(kv_len, tokens, positions).clone()
        assert gen.decode_runner.enabled and gen.compiled, "compile or capture fell back to eager"
        eager = gen.decode_step(kv_len, tokens, positions)
    assert (graphed - eager).abs().max().item() <= 0.05 * eager.abs().max().item()


# ------------------------------------------------------------------------------------------ expert-major


def crowd_on_expert_0(indices: torch.Tensor) -> torch.Tensor:
    """Every token's first expert becomes 0 (its other experts stay distinct): expert 0 gets N rows."""
    k = indices.shape[1]
    return torch.tensor([[0] + [i for i in row if i != 0][:k - 1] for row in indices.tolist()], device=indices.device)


def test_slots_grouped_by_expert_stably():
    indices = torch.tensor([[2, 0], [2, 3], [0, 2]])
    order, counts, starts = group_slots_by_expert(indices, 5, shared=True)
    # slots: routed 0..5 (experts 2 0 2 3 0 2), then shared 6..8 (expert 5)
    assert counts.tolist() == [2, 0, 3, 1, 0, 3] and starts.tolist() == [0, 2, 2, 5, 6, 6]
    assert order.tolist() == [1, 4, 0, 2, 5, 3, 6, 7, 8]


def test_expert_major_rule_takes_cuda_bf16_only():
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    assert not use_expert_major(8, 8, 32, x)  # CPU: the grouped path


# (N, K, E, D, I, tiles, routing): batch 1 (most experts without rows); more tokens than BLOCK_M on expert 0
# (three row blocks of 16; two of 32); ragged last tiles of D and I in both kernels; every slot on expert 0
# (not top-k's output: 40 rows of a 20-token batch, so a program loops over two row blocks)
EM_SHAPES = [
    (1, 3, 8, 64, 32, ExpertMajorTiles(block_d=32, block_i_in=16), "top-k"),
    (40, 2, 4, 48, 32, ExpertMajorTiles(block_d=16, block_d_out=16, block_i_in=16), "crowded"),
    (40, 2, 6, 48, 32, ExpertMajorTiles(block_m=32, block_d=16, block_d_out=32, block_i_in=32), "crowded"),
    (5, 4, 16, 80, 24, ExpertMajorTiles(block_i=16, block_d=32, block_d_out=32, block_i_in=16), "top-k"),
    (20, 2, 4, 48, 32, ExpertMajorTiles(block_d=16, block_i_in=16), "repeated"),
]


@interpreted
@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("n,k,e,d,inter,tiles,routing", EM_SHAPES)
def test_interpreted_expert_major_equals_reference(n, k, e, d, inter, tiles, routing, with_shared):
    pytest.importorskip("triton")
    x, indices, weights, w13, w2 = operands(n, k, e, d, inter)
    if routing == "crowded":
        indices = crowd_on_expert_0(indices)
    elif routing == "repeated":
        indices = torch.zeros_like(indices)
    shared = shared_weights(d, inter) if with_shared else None
    want = small_batch_experts_reference(x, indices, weights, w13, w2, shared)
    got = expert_major_experts(x, indices, weights, w13, w2, shared, tiles)
    assert got.shape == (n, d) and rel(got, want) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("with_shared", [False, True])
@pytest.mark.parametrize("n", [1, 4, 8, 32, 64])
def test_gpu_expert_major_equals_reference_bf16(n, with_shared):
    x, indices, weights, w13, w2 = operands(n, *BENCH_SHAPE, dtype=torch.bfloat16, device="cuda")
    shared = shared_weights(*BENCH_SHAPE[2:], dtype=torch.bfloat16, device="cuda") if with_shared else None
    if n >= 32:
        indices = crowd_on_expert_0(indices)  # past BLOCK_M rows on one expert
    got = expert_major_experts(x, indices, weights, w13, w2, shared)
    assert got.dtype == torch.bfloat16 and got.shape == (n, BENCH_SHAPE[2])
    assert rel(got, small_batch_experts_reference(x, indices, weights, w13, w2, shared)) <= 1e-2


@pytest.mark.gpu
def test_gpu_expert_major_compiled_and_graph_captured_equal_eager():
    """As the slot-major test above, with a shared expert and more rows on one expert than BLOCK_M; the
    grouping (counting sort) is traced and captured with the kernels."""
    x, indices, weights, w13, w2 = operands(32, *BENCH_SHAPE, dtype=torch.bfloat16, device="cuda")
    indices = crowd_on_expert_0(indices)
    shared = shared_weights(*BENCH_SHAPE[2:], dtype=torch.bfloat16, device="cuda")
    eager = expert_major_experts(x, indices, weights, w13, w2, shared)
    compiled = torch.compile(lambda *a: expert_major_experts(*a, shared=shared), fullgraph=True)
    once = compiled(x, indices, weights, w13, w2)
    assert rel(once, eager) <= 1e-3
    compiled(x, indices, weights, w13, w2)  # warm: nothing left to compile or autotune inside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = compiled(x, indices, weights, w13, w2)
    x.copy_(torch.randn_like(x))  # new inputs in the same buffers: the replay must read them
    indices.copy_(indices.roll(1, dims=0))  # and a new routing: the grouping is recomputed inside the graph
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, compiled(x, indices, weights, w13, w2))
    assert rel(captured, expert_major_experts(x, indices, weights, w13, w2, shared)) <= 1e-3


def test_expert_major_switch_routes_moe_forward_through_it(monkeypatch):
    """With moe_small.EXPERT_MAJOR on and its rule true (forced here: the rule is CUDA-only), moe_forward
    hands the routed experts and the shared expert to expert_major_experts; its twin stands in for the
    kernels on CPU, so the output must equal MoE.forward's."""
    from dsv3.inference import moe_small

    torch.manual_seed(0)
    moe = MoE(tiny_config(n_shared_experts=1)).eval()
    randomize_(moe, 0)
    calls = []

    def twin(x, indices, weights, w13, w2, shared=None):
        calls.append(shared)
        return small_batch_experts_reference(x, indices, weights, w13, w2, shared)

    monkeypatch.setattr(moe_small, "EXPERT_MAJOR", True)
    monkeypatch.setattr("dsv3.inference.moe.use_small_batch", lambda *a: False)
    monkeypatch.setattr("dsv3.inference.moe.use_expert_major", lambda *a: True)
    monkeypatch.setattr("dsv3.inference.moe.expert_major_experts", twin)
    x = torch.randn(2, 3, moe.cfg.hidden_size)
    with torch.no_grad():
        got, want = moe_forward(moe, x), moe(x)[0]
    assert len(calls) == 1 and calls[0] is not None, "the shared expert rides along"
    assert rel(got, want) < 1e-5
