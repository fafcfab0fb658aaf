"""The one-launch router for a few tokens (dsv3/inference/route_small.py), and its split two-launch form,
against their twin, `Router.forward`:
on CPU under Triton's interpreter (run with `TRITON_INTERPRET=1` where Triton is installed, else
skipped), and (GPU) in BF16, compiled and captured, and inside a decode step.

Indices must be equal; gates within 1e-6 (fp32, the GEMV's summation order only).  Ties go to the lower
index, as the counting top-k under compile gives them (`torch.topk` leaves their order unspecified).
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
from dsv3.inference import route_small
from dsv3.inference.route_small import RouteTiles, route, small_route, small_route_norm, use_small_route
from dsv3.model import ranking
from dsv3.model.moe import Router


def random_router(cfg: ModelConfig, seed: int = 0) -> Router:
    torch.manual_seed(seed)
    gate = Router(cfg)
    randomize_(gate, seed)  # routing bias of both signs
    return gate


def test_rule_and_switch_off_give_the_model_router():
    gate = random_router(tiny_config())
    x = torch.randn(2, gate.cfg.hidden_size)
    assert not use_small_route(gate, x)  # CPU
    assert not use_small_route(random_router(tiny_config(scoring_func="softmax", use_expert_bias=False)), x)
    r = gate(x)
    gates, indices = route(gate, x)
    assert torch.equal(indices, r.indices) and torch.equal(gates, r.weights)


# ------------------------------------------------------------------------------------------ interpreter

CONFIGS = {
    "tiny": tiny_config(),  # E 8, 4 groups, K 3 (not a power of two)
    "tiny, no bias": tiny_config(use_expert_bias=False),  # group score = the group max
    "tiny, one group, ragged D": tiny_config(hidden_size=80, n_group=1, topk_group=1),
    "bench": ModelConfig.from_preset("bench"),  # E 32, D 2048
}


TILES = {"one launch": RouteTiles(block_d=64, warps=4), "split 4": RouteTiles(block_d=64, warps=4, split=4),
         "split 3, ragged slices": RouteTiles(block_d=16, warps=4, split=3)}


@interpreted
@pytest.mark.parametrize("tiles", list(TILES))
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_interpreted_kernel_equals_router(name, n, tiles):
    pytest.importorskip("triton")
    gate = random_router(CONFIGS[name], seed=n)
    x = torch.randn(n, gate.cfg.hidden_size, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want = gate(x)
        gates, indices = small_route(gate, x, TILES[tiles])
    assert indices.dtype == torch.int64 and torch.equal(indices, want.indices)
    assert (gates - want.weights).abs().max().item() <= 1e-6


@interpreted
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("tiles", list(TILES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny", "tiny, one group, ragged D"])
def test_interpreted_norm_in_the_route_equals_add_norm_and_router(name, dtype, tiles, with_delta):
    """small_route_norm against x + delta, the model's RMSNorm, then the router: in fp32 the residual
    exactly and h to 1e-6 (the same roundings, the squares summed in another order), the routing on h as
    `small_route`'s test holds it; in BF16 within the interpreter's truncations.  eps 0.1 is ~40 % of the
    first row's mean square: a dropped eps fails."""
    pytest.importorskip("triton")
    from dsv3.model.layers import RMSNorm

    cfg = CONFIGS[name]
    gate = random_router(cfg, seed=1).to(dtype)
    norm = RMSNorm(cfg.hidden_size, 0.1).to(dtype)
    g = torch.Generator().manual_seed(2)
    norm.weight.data = (1 + 0.2 * torch.randn(cfg.hidden_size, generator=g)).to(dtype)
    x = (torch.randn(3, cfg.hidden_size, generator=g) * torch.tensor([[0.5], [2.0], [8.0]])).to(dtype)
    delta = torch.randn(3, cfg.hidden_size, generator=g).to(dtype) if with_delta else None
    with torch.no_grad():
        r_want = x if delta is None else x + delta
        h_want = norm(r_want)
        want = gate(h_want)
        gates, indices, h, r = small_route_norm(gate, norm, x, delta, TILES[tiles])
    def ulps(a, b):  # BF16: the interpreter truncates where the GPU rounds (an ulp at most, 2^-7 relative)
        return ((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-30)).max().item() * 2 ** 7

    if dtype == torch.float32:
        assert torch.equal(r, r_want) and (h - h_want).abs().max().item() <= 1e-6 * h_want.abs().max().item()
    else:
        assert ulps(r, r_want) <= 1.0 and ulps(h, h_want) <= 3.0  # h: three roundings, each an ulp off at most
    if dtype == torch.float32:
        assert torch.equal(indices, want.indices) and (gates - want.weights).abs().max().item() <= 1e-6


@interpreted
def test_interpreted_ties_go_to_the_lower_index(monkeypatch):
    """Identity router weights make the logits exactly x: tied experts and tied groups, zero bias.  The
    twin is the router with the counting top-k forced on (what compiled decoding runs)."""
    pytest.importorskip("triton")
    cfg = tiny_config(hidden_size=8, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    gate = Router(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(8))
        gate.bias.zero_()
    x = torch.tensor([[0.5, 0.5, 0.1, 0.1, 0.3, 0.3, 0.3, -1.0],  # groups {0,1} {2,3} {4,5} {6,7}
                      [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2],  # all tied
                      [-1.0, 0.7, 0.7, -1.0, 0.7, 0.0, 0.0, 0.7]])
    monkeypatch.setattr(ranking, "_counting", lambda t: True)
    with torch.no_grad():
        want = gate(x)
        gates, indices = small_route(gate, x, RouteTiles(block_d=8, warps=1))
    assert torch.equal(indices, want.indices), (indices, want.indices)
    assert (gates - want.weights).abs().max().item() <= 1e-6


@interpreted
@pytest.mark.parametrize("split", [False, True])
def test_interpreted_decode_through_the_kernel_equals_default(monkeypatch, split):
    """ROUTE_KERNEL on and the rule forced true on CPU: every MoE layer of an eager decode routes
    through the (interpreted) kernel, one launch or split, and the logits equal the default decode's (fp32)."""
    pytest.importorskip("triton")
    model = tiny_model()
    want = decode_logits(model, [3, 5, 7], 3)
    calls = []
    monkeypatch.setattr(route_small, "ROUTE_KERNEL", True)
    monkeypatch.setattr(route_small, "SPLIT_ROUTE", split)
    monkeypatch.setattr(route_small, "use_small_route", lambda gate, x: calls.append(x.shape) or True)
    got = decode_logits(model, [3, 5, 7], 3)
    assert len(calls) >= 3 * (model.cfg.num_layers - model.cfg.first_k_dense)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("n", [1, 8, 64])
def test_gpu_kernel_equals_router_bf16(n, split):
    gate = random_router(ModelConfig.from_preset("bench")).cuda().to(torch.bfloat16)
    x = torch.randn(n, gate.cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = gate(x)
        gates, indices = small_route(gate, x, route_small.SPLIT_TILES if split else RouteTiles())
    # fp32 sums in another order: an index may flip only where two choices are within float noise
    assert (indices == want.indices).float().mean().item() >= 0.99
    same = (indices == want.indices).all(-1)
    assert (gates[same] - want.weights[same]).abs().max().item() <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 8, 64])
def test_gpu_norm_in_the_route_equals_add_norm_and_router_bf16(n):
    """BF16 at the bench config: the residual exactly, h within 2^-7 relative (an ulp: the sum of squares
    in another order), the routing of h as the plain kernel's test holds it."""
    from dsv3.model.layers import RMSNorm

    cfg = ModelConfig.from_preset("bench")
    gate = random_router(cfg).cuda().to(torch.bfloat16)
    norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps).cuda().to(torch.bfloat16)
    norm.weight.data = (1 + 0.2 * torch.randn(cfg.hidden_size, device="cuda")).bfloat16()
    x, delta = torch.randn(2, n, cfg.hidden_size, device="cuda", dtype=torch.bfloat16) * 4
    with torch.no_grad():
        gates, indices, h, r = small_route_norm(gate, norm, x, delta)
        want = gate(norm(x + delta))
    assert torch.equal(r, x + delta)
    assert ((h.float() - norm(r).float()).abs() <= 2 ** -7 * norm(r).float().abs() + 1e-6).all()
    assert (indices == want.indices).float().mean().item() >= 0.99
    same = (indices == want.indices).all(-1)
    assert (gates[same] - want.weights[same]).abs().max().item() <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True])
def test_gpu_compiled_and_graph_captured_equal_eager(split):
    gate = random_router(ModelConfig.from_preset("bench")).cuda().to(torch.bfloat16)
    x = torch.randn(4, gate.cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    tiles = route_small.SPLIT_TILES if split else RouteTiles()
    with torch.no_grad():  # as decoding runs: the op is inference-only (no backward)
        eager = small_route(gate, x, tiles)
        # dynamic=False: the tiles are constants, as decoding's are; otherwise the second parametrisation's
        # recompile of this same lambda makes the changed ints symbols, and inductor 2.11 cannot launch a user
        # kernel with a symbolic num_warps (NameError in its launcher, H200 run 14)
        compiled = torch.compile(lambda t: small_route(gate, t, tiles), fullgraph=True, dynamic=False)
        compiled(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = compiled(x)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[1], eager[1]) and torch.equal(captured[0], eager[0])


@pytest.mark.gpu
def test_gpu_decode_with_route_kernel_equals_default(monkeypatch):
    assert_switch_keeps_decode(monkeypatch, route_small, "ROUTE_KERNEL")


@pytest.mark.gpu
def test_gpu_decode_with_split_route_equals_default(monkeypatch):
    assert_switch_keeps_decode(monkeypatch, route_small, "SPLIT_ROUTE")
