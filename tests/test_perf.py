"""dsv3.perf's fast paths against their slow twins: attention cores, the sorted dispatcher, compiled blocks.

CPU tests hold the switches exact (fp32) where the maths is the same; GPU tests (`-m gpu`) hold the
BF16 kernels to the eager reference within BF16 rounding, including 20 training steps.
"""

import copy

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.model.attention import ATTENTION_IMPLS, eager_attention
from dsv3.model.moe import LocalDispatcher
from dsv3.perf import SortedDispatcher, apply_fast_paths
from dsv3.train.losses import training_loss as objective


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=512, hidden_size=128, num_layers=3, num_heads=4, intermediate_size=256, first_k_dense=1,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        moe_intermediate_size=64, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_factor=1.0,
        original_max_position_embeddings=256, max_position_embeddings=256, num_mtp_layers=0,
    )
    base.update(kw)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0, device="cpu", dtype=torch.float32) -> Transformer:
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg)
    model.init_weights(std=0.05)  # larger than 0.006 so routing and attention are far from uniform
    return model.to(dtype)


def qkv(b, h, t, dqk, dv, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k = (torch.randn(b, h, t, dqk, generator=g, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(b, h, t, dv, generator=g, device=device, dtype=dtype)
    return q, k, v


# ------------------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("impl", ["cudnn", "flash_pad", "flex"])
def test_attention_impls_match_eager_on_cpu(impl):
    q, k, v = qkv(2, 3, 40, 24, 16)
    ref = eager_attention(q, k, v, 0.2)
    out = ATTENTION_IMPLS[impl](q, k, v, 0.2)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5


def test_sorted_dispatcher_matches_local_with_gradients():
    torch.manual_seed(0)
    n, k, e, d = 50, 3, 8, 12
    indices = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.rand(n, k)
    grads = []
    for disp in (LocalDispatcher(e), SortedDispatcher(e)):
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(1), requires_grad=True)
        w = weights.clone().requires_grad_(True)
        rows, counts, order = disp.dispatch(x, indices)
        assert counts.tolist() == torch.bincount(indices.flatten(), minlength=e).tolist()
        assert counts.dtype == torch.int64
        y = rows * torch.arange(1, n * k + 1, dtype=rows.dtype).unsqueeze(-1)  # position-dependent
        out = disp.combine(y, w, order)
        out.square().sum().backward()
        grads.append((rows.detach(), out.detach(), x.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sorted_dispatcher_handles_empty_experts():
    indices = torch.tensor([[0, 3], [3, 0], [0, 3]])
    rows, counts, order = SortedDispatcher(6).dispatch(torch.randn(3, 4), indices)
    assert counts.tolist() == [3, 0, 0, 3, 0, 0]
    assert rows.shape == (6, 4)


def test_fast_paths_keep_state_dict_and_outputs_on_cpu():
    cfg = small_cfg(num_mtp_layers=1)
    ref = build(cfg).set_impl(attn="eager", experts="loop")
    fast = copy.deepcopy(ref)
    keys = list(fast.state_dict())
    apply_fast_paths(fast, attention="flash_pad", compile=False)
    assert list(fast.state_dict()) == keys
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    losses = []
    for m in (ref, fast):
        m.train()
        loss, _ = objective(m(tokens[:, :-1], return_aux=True), tokens[:, 1:], mtp_weight=0.3)
        loss.backward()
        losses.append((loss.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-5, atol=1e-5)
    for g_ref, g_fast in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(g_ref, g_fast, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_blocks_trace_and_match_on_cpu():
    """Dynamo + AOT autograd over the blocks (backend aot_eager: no code generation on a CI CPU).
    BF16, the one dtype `torch._grouped_mm` traces in; compared with the uncompiled fast path."""
    cfg = small_cfg(num_mtp_layers=1)
    eager = build(cfg, dtype=torch.bfloat16)
    apply_fast_paths(eager, attention="sdpa", compile=False)
    compiled = copy.deepcopy(eager)
    apply_fast_paths(compiled, attention="sdpa", compile=True, backend="aot_eager")
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    out = []
    for m in (eager, compiled):
        loss, _ = objective(m(tokens[:, :-1], return_aux=True), tokens[:, 1:], mtp_weight=0.3)
        loss.backward()
        out.append((loss.detach().float(), m.layers[1].attn.wq_a.weight.grad.float()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=5e-2, atol=5e-3)


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cudnn", "flash_pad", "flex", "sdpa"])
def test_attention_impls_match_eager_bf16(impl):
    q, k, v = qkv(2, 4, 512, 192, 128, device="cuda", dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_leaves = [t.float().clone().requires_grad_(True) for t in (q, k, v)]
    scale = 192 ** -0.5
    out = ATTENTION_IMPLS[impl](*leaves, scale)
    ref = eager_attention(*ref_leaves, scale)
    g = torch.randn_like(ref)
    out.backward(g.to(out.dtype))
    ref.backward(g)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
def test_cudnn_attention_takes_fp32():
    """cuDNN attention has no fp32 kernel: `--precision fp32 --compile` on a GPU (the fast path sets
    "cudnn") runs plain SDPA instead of failing with no available kernel."""
    q, k, v = qkv(2, 4, 64, 192, 128, device="cuda", dtype=torch.float32)
    torch.testing.assert_close(ATTENTION_IMPLS["cudnn"](q, k, v, 0.1), eager_attention(q, k, v, 0.1), rtol=1e-3, atol=1e-3)


def _train(model, batches, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=True)
    losses = []
    for tokens in batches:
        opt.zero_grad(set_to_none=True)
        loss, _ = objective(model(tokens[:, :-1], return_aux=True), tokens[:, 1:], mtp_weight=0.3)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses).float().cpu()


@pytest.mark.gpu
def test_fast_path_trains_like_reference_bf16():
    """20 AdamW steps, BF16: cuDNN attention + grouped experts + sorted dispatcher + compiled blocks vs
    eager attention + loop experts.  Same weights and batches; the losses agree within BF16 rounding."""
    cfg = small_cfg(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4, n_routed_experts=16,
                    moe_intermediate_size=128, max_position_embeddings=512, num_mtp_layers=1)
    ref = build(cfg, device="cuda", dtype=torch.bfloat16)
    fast = copy.deepcopy(ref)
    ref.set_impl(attn="eager", experts="loop")
    apply_fast_paths(fast, attention="cudnn")
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, 256, (4, 257), device="cuda", generator=g) for _ in range(4)] * 5  # learnable
    l_ref, l_fast = _train(ref, batches), _train(fast, batches)
    assert torch.isfinite(l_fast).all()
    assert l_fast[-1] < l_fast[0] - 0.5  # it trains
    # BF16 rounding differs between the paths (fused kernels, fp32 gate sums); a wrong path is off by >0.1
    torch.testing.assert_close(l_fast, l_ref, rtol=1.5e-2, atol=2e-2)


def test_sorted_dispatcher_compiled_form_matches_local():
    """The fused forms `combine` and the permute backward take under torch.compile (traced here with
    aot_eager, which runs the same traced graph without generating kernels)."""
    torch.manual_seed(0)
    n, k, e, d = 40, 4, 8, 16
    indices = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.rand(n, k)
    x0 = torch.randn(n, d)
    proj = torch.randn(d, d)

    def run(disp, x, w):
        rows, counts, order = disp.dispatch(x, indices)
        return disp.combine(torch.tanh(rows @ proj), w, order), counts

    def loss_grads(fn, disp):
        x = x0.clone().requires_grad_(True)
        w = weights.clone().requires_grad_(True)
        out, counts = fn(disp, x, w)
        out.square().sum().backward()
        return out.detach(), counts, x.grad, w.grad

    ref = loss_grads(run, LocalDispatcher(e))
    compiled = loss_grads(torch.compile(run, backend="aot_eager", fullgraph=True), SortedDispatcher(e))
    for a, b in zip(ref, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
