"""DeepSeekMoE: routing rules, loop vs grouped experts, loads and the sequence-wise balance loss."""

import pytest
import torch
from helpers import randomize_, tiny_config

from dsv3.model.moe import MoE, Router


def _router(**overrides) -> Router:
    r = Router(tiny_config(**overrides))
    randomize_(r, 0)
    return r


def test_dropped_groups_are_masked_with_minus_inf():
    """All biased scores negative: masking dropped groups with 0.0 (old HF) would select from them."""
    r = _router(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    with torch.no_grad():
        r.bias.fill_(-3.0)
    x = torch.randn(64, r.cfg.hidden_size)
    out = r(x)
    choice = (out.scores + r.bias).view(64, 4, 4)
    kept = choice.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices  # [N, 2] groups
    groups_of_selected = out.indices // 4  # [N, K]
    assert (groups_of_selected.unsqueeze(-1) == kept.unsqueeze(1)).any(-1).all()


def test_router_gemm_stays_fp32_under_bf16_autocast():
    """Training steps run under bf16 autocast; the gating GEMM must not follow it (spec §3.1: gating in
    its original precision): same scores, experts and gates as without autocast, in fp32."""
    r = _router(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    x = torch.randn(256, r.cfg.hidden_size, requires_grad=True)
    want = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = r(x)
        got.weights.sum().backward()
    assert got.scores.dtype == got.weights.dtype == torch.float32
    assert torch.equal(got.scores, want.scores) and torch.equal(got.indices, want.indices)
    assert x.grad.dtype == torch.float32 and r.weight.grad.dtype == torch.float32


def test_bias_steers_selection_only():
    r = _router()
    x = torch.randn(32, r.cfg.hidden_size)
    with torch.no_grad():
        r.bias.zero_()
        r.bias[5] = 10.0  # expert 5 always selected...
    out = r(x)
    assert (out.indices == 5).any(dim=-1).all()
    # ...but every gate is the unbiased sigmoid score, renormalised over the selection, x route scale
    s = torch.sigmoid(x @ r.weight.T)
    picked = s.gather(1, out.indices)
    expected = picked / picked.sum(-1, keepdim=True) * r.cfg.routed_scaling_factor
    torch.testing.assert_close(out.weights, expected)


def test_softmax_scoring_without_bias_is_not_renormalised():
    r = _router(scoring_func="softmax", use_expert_bias=False, norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1)
    x = torch.randn(8, r.cfg.hidden_size)
    out = r(x)
    probs = (x @ r.weight.T).softmax(-1)
    torch.testing.assert_close(out.weights, probs.gather(1, out.indices))
    assert r.bias is None


def test_bias_stays_fp32_under_dtype_casts():
    r = _router().to(torch.bfloat16)
    assert r.weight.dtype == torch.bfloat16 and r.bias.dtype == torch.float32
    # a bf16 bias assigned by a state-dict load goes back to fp32 at the next cast, as it did before keep_dtypes
    r.load_state_dict({"weight": r.weight.detach(), "bias": r.bias.detach().bfloat16()}, assign=True)
    assert r.to(torch.bfloat16).bias.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loop_and_grouped_experts_agree_forward_and_backward(dtype):
    cfg = tiny_config(n_routed_experts=16, n_group=4, num_experts_per_tok=4)
    moe = MoE(cfg)
    randomize_(moe, 1)
    moe = moe.to(dtype)
    x = torch.randn(3, 10, cfg.hidden_size, dtype=dtype)
    results = {}
    for impl in ("loop", "grouped"):
        moe.zero_grad()
        moe.set_experts_impl(impl)
        xi = x.clone().requires_grad_()
        y, stats = moe(xi)
        y.float().square().mean().backward()
        results[impl] = (y.detach(), xi.grad, moe.experts.w13.grad.clone(), moe.experts.w2.grad.clone(), stats.load)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(results["loop"], results["grouped"]):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_loads_count_every_routed_copy():
    cfg = tiny_config()
    moe = MoE(cfg)
    randomize_(moe, 2)
    _, stats = moe(torch.randn(2, 7, cfg.hidden_size))
    assert stats.load.sum().item() == 2 * 7 * cfg.num_experts_per_tok and stats.load.shape == (cfg.n_routed_experts,)


def test_sequence_balance_loss_matches_formula_and_is_minimal_when_balanced():
    cfg = tiny_config(seq_aux_alpha=0.01)
    moe = MoE(cfg).train()
    randomize_(moe, 3)
    x = torch.randn(2, 9, cfg.hidden_size)
    _, stats = moe(x)
    r = moe.gate(x.view(-1, cfg.hidden_size))
    e, k, t = cfg.n_routed_experts, cfg.num_experts_per_tok, 9
    losses = []
    for b in range(2):
        idx = r.indices.view(2, t, k)[b]
        f = torch.bincount(idx.flatten(), minlength=e).float() * e / (k * t)
        s = r.scores.view(2, t, e)[b]
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        losses.append(cfg.seq_aux_alpha * (f * p).sum())
    torch.testing.assert_close(stats.balance_loss, torch.stack(losses).mean())
    moe.eval()
    assert moe(x)[1].balance_loss.item() == 0.0  # only computed in training


def test_grouped_experts_under_autocast_with_fp32_master_weights():
    """autocast skips _grouped_mm: the layer must cast like a matmul, matching the loop twin."""
    cfg = tiny_config(n_routed_experts=16, n_group=4, num_experts_per_tok=4)
    moe = MoE(cfg)
    randomize_(moe, 4)
    x = torch.randn(2, 8, cfg.hidden_size)
    outs = {}
    for impl in ("loop", "grouped"):
        moe.set_experts_impl(impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = moe(x)
        y.float().sum().backward()
        outs[impl] = y.float()
    torch.testing.assert_close(outs["loop"], outs["grouped"], atol=3e-2, rtol=3e-2)


def test_eager_attention_stays_fp32_under_bf16_autocast():
    """The reference attention is the twin of the fast ones: an enclosing bf16 autocast used to recast its
    fp32 matmuls (scores rounded to bf16 before the softmax)."""
    from dsv3.model.attention import eager_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 24, generator=g).bfloat16() for _ in range(3))
    plain = eager_attention(q, k, v, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = eager_attention(q, k, v, 0.2)
    assert torch.equal(auto, plain)


def test_flex_attention_trains_on_a_cpu():
    """FlexAttention has no CPU backward: off CUDA with gradients the 'flex' choice runs the eager maths."""
    from dsv3 import perf  # noqa: F401  (registers the fast attention choices)
    from dsv3.model.attention import ATTENTION_IMPLS, eager_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g, requires_grad=True) for _ in range(3))
    out = ATTENTION_IMPLS["flex"](q, k, v, 0.3)
    out.sum().backward()
    assert torch.allclose(out, eager_attention(q, k, v, 0.3)) and q.grad is not None
