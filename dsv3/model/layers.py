"""The two small building blocks every layer uses: RMSNorm (fp32 math) and the SwiGLU MLP.

`module_call(linear, x)` is how a layer applies its projections by default; callers that run a
projection differently (decoding's few-row GEMV kernel, `dsv3.inference.gemv.decode_linear`) pass their
own function of the same shape instead, so the layer's maths stays written once."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def module_call(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return linear(x)


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in fp32 and cast back (spec pitfall 8; HF does the same)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x).  w1 = gate_proj, w3 = up_proj, w2 = down_proj in HF names."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor, linear=module_call) -> torch.Tensor:
        return linear(self.w2, F.silu(linear(self.w1, x)) * linear(self.w3, x))


def no_autocast(x: torch.Tensor):
    """A region where an enclosing autocast does not recast matmuls (devices autocast knows): for maths
    the spec keeps in fp32 (the router's gating GEMM, the reference attention's scores and softmax)."""
    if x.device.type in ("cuda", "cpu"):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()
