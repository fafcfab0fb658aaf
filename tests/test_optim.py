"""AdamW with BF16 moments (report §3.3) against a float64 twin, against torch's AdamW, and across a
state_dict round trip."""

import copy

import pytest
import torch

from dsv3.train.adamw_bf16 import AdamWBF16Moments
from dsv3.train.config import TrainConfig
from dsv3.train.optim import build_optimizer

HP = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def grads(seed: int, shapes) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * 10.0 ** torch.randint(-6, 1, (1,), generator=g).item() for s in shapes]
            for _ in range(6)]


def twin(p0: torch.Tensor, gs: list[torch.Tensor]) -> torch.Tensor:
    """float64 AdamW whose stored moments are rounded to BF16 after every update."""
    (b1, b2), lr, eps, wd = HP["betas"], HP["lr"], HP["eps"], HP["weight_decay"]
    p, m, v = p0.double(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(gs, start=1):
        g = g.double()
        m_new, v_new = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p * (1 - lr * wd) - lr / (1 - b1 ** t) * m_new / ((v_new / (1 - b2 ** t)).sqrt() + eps)
        m, v = m_new.to(torch.bfloat16).double(), v_new.to(torch.bfloat16).double()
    return p


def run(opt_cls, params: list[torch.Tensor], steps: list[list[torch.Tensor]], **kw) -> list[torch.Tensor]:
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_cls(ps, **HP, **kw)
    for gs in steps:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


def test_bf16_moments_equal_their_float64_twin():
    shapes = [(64, 32), (300,)]
    params = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in shapes]
    steps = grads(0, shapes)
    got = run(AdamWBF16Moments, params, steps)
    for i, p in enumerate(got):
        want = twin(params[i], [s[i] for s in steps])
        torch.testing.assert_close(p.double(), want, rtol=1e-5, atol=1e-6)


def test_bf16_moments_track_torch_adamw():
    """Same rule as torch's AdamW; only the moments' storage differs (~0.4 % per stored value)."""
    shapes = [(128, 64)]
    params = [torch.randn(s, generator=torch.Generator().manual_seed(2)) for s in shapes]
    steps = grads(3, shapes)
    ours = run(AdamWBF16Moments, params, steps)[0]
    ref = run(torch.optim.AdamW, params, steps)[0]
    moved = (ref - params[0]).norm()
    assert (ours - ref).norm() < 0.02 * moved


def test_state_dict_round_trip_keeps_bf16_moments_and_resumes_exactly():
    shapes = [(32, 16)]
    params = [torch.randn(s, generator=torch.Generator().manual_seed(4)) for s in shapes]
    steps = grads(5, shapes)
    straight = run(AdamWBF16Moments, params, steps)[0]
    p = torch.nn.Parameter(params[0].clone())
    opt = AdamWBF16Moments([p], **HP)
    for gs in steps[:3]:
        p.grad = gs[0].clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    p2 = torch.nn.Parameter(p.detach().clone())
    opt2 = AdamWBF16Moments([p2], **HP)
    opt2.load_state_dict(saved)
    assert opt2.state[p2]["exp_avg"].dtype == torch.bfloat16 and opt2.state[p2]["exp_avg_sq"].dtype == torch.bfloat16
    for gs in steps[3:]:
        p2.grad = gs[0].clone()
        opt2.step()
    assert torch.equal(p2.detach(), straight)


def test_build_optimizer_picks_the_moments_storage():
    model = torch.nn.Linear(4, 3)
    assert isinstance(build_optimizer(model, TrainConfig(moments="bf16"), torch.device("cpu")), AdamWBF16Moments)
    assert type(build_optimizer(model, TrainConfig(), torch.device("cpu"))) is torch.optim.AdamW
    with pytest.raises(ValueError, match="moments"):
        build_optimizer(model, TrainConfig(moments="fp16"), torch.device("cpu"))
