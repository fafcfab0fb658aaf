"""The residual adds and RMSNorms inside the decode kernels' launches (`forward.ATTN_NORM_IN_GEMV`,
`forward.FFN_NORM_IN_ROUTE`):
the attention norm in wq_a + wkv_a's pair GEMV (gemv.small_m_linear_pair_norm), the FFN norm in the
routing GEMV (route_small.small_route_norm).  The kernels themselves are tested against their twins in
test_gemv.py and test_route_small.py; here, the decode step that uses them: which launches take which
norm and which residual, and the logits against the torch adds and norms (both switches off).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_switch_keeps_decode, decode_logits, interpreted, tiny_model

from dsv3.inference import forward, gemv, moe
from dsv3.model.layers import RMSNorm


SWITCHES = ("ATTN_NORM_IN_GEMV", "FFN_NORM_IN_ROUTE")


def force_fused_rules(monkeypatch):
    """The two kernels' rules true on the CPU (they need CUDA and BF16 otherwise)."""
    for switch in SWITCHES:
        monkeypatch.setattr(forward, switch, True)
    monkeypatch.setattr(gemv, "use_pair_norm", lambda *args: True)
    monkeypatch.setattr(moe, "use_norm_route", lambda *args: True)


def test_every_norm_after_the_first_runs_in_a_kernel_launch(monkeypatch):
    """Kernels replaced by recording torch twins: the logits equal the torch path's exactly, every layer
    after the first hands its attention norm (and the residual) to the pair launch, every MoE layer its
    FFN norm to the routing launch."""
    model = tiny_model()
    for switch in SWITCHES:
        monkeypatch.setattr(forward, switch, False)
    want = decode_logits(model, [3, 5, 7], 3)
    force_fused_rules(monkeypatch)
    pairs, routes = [], []

    def pair_twin(x, delta, norm_weight, eps, w1, w2, tiles):
        pairs.append((norm_weight, w1, w2))
        norm = RMSNorm(x.shape[-1], eps)
        norm.weight = torch.nn.Parameter(norm_weight)
        r = x + delta
        h = norm(r)
        return F.linear(h, w1), F.linear(h, w2), r

    def route_twin(gate, norm, x, delta, tiles):
        routes.append((gate, norm))
        r = x + delta
        h = norm(r)
        out = gate(h)
        return out.weights, out.indices, h, r

    monkeypatch.setattr(gemv, "small_m_linear_pair_norm", pair_twin)
    monkeypatch.setattr(moe, "small_route_norm", route_twin)
    got = decode_logits(model, [3, 5, 7], 3)
    assert torch.equal(got, want)
    steps = 1 + 3  # the prefill, then the decode steps
    layers = model.layers
    want_pairs = [(b.attn_norm.weight, b.attn.wq_a.weight, b.attn.wkv_a.weight) for b in layers[1:]] * steps
    assert [tuple(map(id, p)) for p in pairs] == [tuple(map(id, p)) for p in want_pairs]
    want_routes = [(b.ffn.gate, b.ffn_norm) for b in layers if b.is_moe] * steps
    assert [tuple(map(id, r)) for r in routes] == [tuple(map(id, r)) for r in want_routes]


@interpreted
@pytest.mark.parametrize("select_in_experts", [False, True])
def test_interpreted_kernels_in_the_decode_step_equal_torch_norms(monkeypatch, select_in_experts):
    """The real kernels under Triton's interpreter (fp32) inside the decode step.  With
    moe_small.SELECT_IN_EXPERTS also the slot-major experts, whose gate/up kernel picks each slot's expert
    from the routing GEMV's partials."""
    pytest.importorskip("triton")
    from dsv3.inference import moe_small

    model = tiny_model()
    for switch in SWITCHES:
        monkeypatch.setattr(forward, switch, False)
    want = decode_logits(model, [3, 5, 7], 3)
    force_fused_rules(monkeypatch)
    calls = []
    if select_in_experts:
        monkeypatch.setattr(moe, "use_small_batch", lambda *args: True)
        monkeypatch.setattr(moe_small, "SELECT_IN_EXPERTS", True)
        real = moe.small_batch_experts_routed
        monkeypatch.setattr(moe, "small_batch_experts_routed", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = decode_logits(model, [3, 5, 7], 3)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert bool(calls) == select_in_experts


def test_rules_take_few_rows_of_one_dtype_only(monkeypatch):
    """The kernels' own conditions past the GEMV's and the router's rules (forced true here): the pair's
    norm at most NORM_MAX_ROWS rows; delta and the norm's weight in x's dtype, delta of x's shape."""
    from dsv3.config import ModelConfig
    from dsv3.model.moe import Router

    monkeypatch.setattr(gemv, "use_pair", lambda x, w1, w2: True)
    monkeypatch.setattr(moe, "use_small_route", lambda gate, x: True)
    w, bf = torch.empty(8, 16), torch.bfloat16
    norm = RMSNorm(16, 1e-6)
    for m in range(1, gemv.NORM_MAX_ROWS + 2):
        x = torch.randn(m, 16)
        assert gemv.use_pair_norm(x, x, norm.weight, w, w) == (m <= gemv.NORM_MAX_ROWS)
    x = torch.randn(1, 16)
    assert not gemv.use_pair_norm(x, x.to(bf), norm.weight, w, w)
    assert not gemv.use_pair_norm(x, x, norm.weight.to(bf), w, w)
    assert not gemv.use_pair_norm(x, torch.randn(1, 8), norm.weight, w, w)
    gate = Router(ModelConfig.from_preset("tiny"))
    x = torch.randn(1, 2, 16)
    assert moe.use_norm_route(gate, norm, x, x)
    assert not moe.use_norm_route(gate, norm, x, x.to(bf))
    assert not moe.use_norm_route(gate, norm.to(bf), x, x)
    assert not moe.use_norm_route(gate, RMSNorm(16, 1e-6), x, x[:, :1])


@pytest.mark.gpu
def test_gpu_decode_with_selection_in_the_experts_equals_default(monkeypatch):
    from dsv3.inference import moe_small

    assert_switch_keeps_decode(monkeypatch, moe_small, "SELECT_IN_EXPERTS", through=(moe, "small_batch_experts_routed"))


@pytest.mark.gpu
@pytest.mark.parametrize("switch", SWITCHES)
def test_gpu_decode_with_norms_in_kernels_equals_torch_norms(monkeypatch, switch):
    """Logits on against off, and the kernel's entry point reached while tracing the step (so the rule held
    on the GPU: otherwise on and off would be the same torch path)."""
    module, name = (gemv, "small_m_linear_pair_norm") if switch == "ATTN_NORM_IN_GEMV" else (moe, "small_route_norm")
    real, calls = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *args: calls.append(1) or real(*args))
    assert_switch_keeps_decode(monkeypatch, forward, switch)
    assert calls
