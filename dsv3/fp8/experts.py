"""FP8 routed experts for training: the grouped form of `linear.py`, one GEMM per projection for all experts.

    h   = x W13[e]^T     (grouped Fprop)   x rows sorted by expert, 1x128 tiles; W13 [E, 2I, D] 128x128 blocks
    a   = silu(gate) * up                  BF16 / fp32, outside FP8 (the report keeps SwiGLU's math out of FP8)
    y   = a W2[e]^T      (grouped Fprop)
Backward: grouped Dgrad against the transposed weight blocks, grouped Wgrad per expert over its rows,
with 1x128 tiles along the token dim; gradients of the stacked fp32 weights come out fp32.

`FP8Experts` is an `Experts` (same parameters and keys); `forward_one` (the "loop" twin) runs each
expert through the dense FP8 linear, so tests can hold the grouped kernels equal to it.  Not here: the
router and dispatcher, which stay the model's (router in fp32, combine in BF16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.moe import Experts
from . import ops
from .linear import fp8_linear, out_dtype_for


class FP8GroupedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, out_dtype: torch.dtype, backend: str,
                pow2: bool) -> torch.Tensor:
        """x [M, K] sorted by expert, weight [E, N, K] fp32, counts [E] -> [M, N] out_dtype."""
        n, k = weight.shape[1:]
        wq, ws, wqt = ops.quant_weight(weight.detach(), backend)  # [E, Np, Kp], [E, Np/128, Kp/128], [E, Kp, Np]
        xq, xs, xqt, xst = ops.quant_both(x.detach(), pow2, backend)
        y = ops.grouped_gemm(xq, xs, wq, ws, counts, out_dtype, backend)[:, :n]
        ctx.save_for_backward(xqt, xst, wqt, ws, counts)
        ctx.meta = (x.dtype, weight.dtype, n, k, backend, pow2)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xqt, xst, wqt, ws, counts = ctx.saved_tensors
        x_dtype, w_dtype, n, k, backend, pow2 = ctx.meta
        dyq, dys, dyqt, dyst = ops.quant_both(dy, pow2, backend)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = ops.grouped_gemm(dyq, dys, wqt, ws.transpose(1, 2), counts, x_dtype, backend)[:, :k]
        if ctx.needs_input_grad[1]:
            dw = ops.grouped_wgrad(dyqt, dyst, xqt, xst, counts, torch.float32, backend)[:, :n, :k].to(w_dtype)
        return dx, dw, None, None, None, None


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, backend: str, pow2: bool = False) -> torch.Tensor:
    return FP8GroupedLinearFn.apply(x, weight, counts, out_dtype_for(x), backend, pow2)


class FP8Experts(Experts):
    def __init__(self, n_experts: int, dim: int, inter: int, backend: str = "auto", pow2: bool = False, device=None):
        with torch.device(device or "cpu"):
            super().__init__(n_experts, dim, inter)
        self.backend = backend
        self.pow2 = pow2

    @classmethod
    def from_experts(cls, ex: Experts, backend: str = "auto", pow2: bool = False) -> "FP8Experts":
        """Takes over ex's stacked parameters (the same tensors)."""
        e, two_i, d = ex.w13.shape
        new = cls(e, d, two_i // 2, backend=backend, pow2=pow2, device="meta")
        new.w13, new.w2 = ex.w13, ex.w2
        return new

    def _backend(self, x: torch.Tensor) -> str:
        return ops.default_backend(x.device) if self.backend == "auto" else self.backend

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by expert, counts [E] -> [M, D]."""
        b = self._backend(x)
        gate, up = fp8_grouped_linear(x, self.w13, counts, b, self.pow2).chunk(2, dim=-1)
        return fp8_grouped_linear(F.silu(gate) * up, self.w2, counts, b, self.pow2)

    def forward_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        b = self._backend(x)
        gate, up = fp8_linear(x, self.w13[e], b, self.pow2).chunk(2, dim=-1)
        return fp8_linear(F.silu(gate) * up, self.w2[e], b, self.pow2)
