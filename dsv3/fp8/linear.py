"""FP8 Linear for training: Fprop, Dgrad and Wgrad all as e4m3 block-scaled GEMMs (spec §3.1-3.2).

    Fprop  y  = x W^T      x in 1x128 tiles (along K), W in 128x128 blocks        -> BF16 (autocast) / x's dtype
    Dgrad  dx = dy W       dy in 1x128 tiles (along N), W^T in 128x128 blocks     -> x's dtype (BF16 under autocast)
    Wgrad  dW = dy^T x     dy and x in 128x1 tiles (along tokens, stored transposed) -> fp32 (master dtype)

Dgrad quantises the output gradient per 1x128 tile, never per 128x128 block: the report's block-wise
Dgrad made a 16B MoE diverge (App. B.2).  The master weight stays an fp32 `nn.Parameter` and is
quantised afresh on every forward (online amax, no history); the forward caches x only in FP8 (the
128x1 layout Wgrad needs), as the report caches Linear inputs in FP8.

`FP8Linear` is an `nn.Linear` (same parameters, same state_dict keys, same init), so checkpoints,
optimisers and `Transformer.init_weights` see no difference.  Not here: the grouped experts
(`experts.py`), the choice of layers (`convert.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops


def out_dtype_for(x: torch.Tensor) -> torch.dtype:
    """What nn.Linear would return: the autocast dtype inside autocast, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def as_autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x as nn.Linear reads it: inside an autocast region cast to the autocast dtype, else x.  The residual
    stream and the RMSNorms' outputs are fp32 under autocast (fp32 master weights); read as BF16, the
    quantisers read half the bytes and the Dgrad writes half, the cast fusing into the norm in a compiled
    block, and the FP8 GEMMs see the inputs the BF16 run's GEMMs see."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, backend: str, pow2: bool) -> torch.Tensor:
        """x [M, K], weight [N, K] (fp32 master) -> [M, N] out_dtype."""
        n, k = weight.shape
        wq, ws, wqt = ops.quant_weight(weight.detach(), backend)  # [Np, Kp], [Np/128, Kp/128], [Kp, Np]
        xq, xs, xqt, xst = ops.quant_both(x.detach(), pow2, backend)  # 1x128 for Fprop, 128x1 (transposed) for Wgrad
        y = ops.gemm(xq, xs, wq, ws, out_dtype, backend)[:, :n]
        ctx.save_for_backward(xqt, xst, wqt, ws)
        ctx.meta = (x.dtype, weight.dtype, n, k, backend, pow2)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xqt, xst, wqt, ws = ctx.saved_tensors
        x_dtype, w_dtype, n, k, backend, pow2 = ctx.meta
        dyq, dys, dyqt, dyst = ops.quant_both(dy, pow2, backend)  # [M, Np] 1x128; [Np, Mp] 128x1
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = ops.gemm(dyq, dys, wqt, ws.t(), x_dtype, backend)[:, :k]  # [M, Np] x [Kp, Np]^T
        if ctx.needs_input_grad[1]:
            dw = ops.gemm(dyqt, dyst, xqt, xst, torch.float32, backend)[:n, :k].to(w_dtype)  # [Np, Mp] x [Kp, Mp]^T
        return dx, dw, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str, pow2: bool = False) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T in FP8 -> [..., N]."""
    x = as_autocast_input(x)
    y = FP8LinearFn.apply(x.reshape(-1, x.shape[-1]), weight, out_dtype_for(x), backend, pow2)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8 e4m3; backend "auto" picks one by the input's device."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, backend: str = "auto", pow2: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = backend
        self.pow2 = pow2

    @classmethod
    def from_linear(cls, lin: nn.Linear, backend: str = "auto", pow2: bool = False) -> "FP8Linear":
        """Takes over lin's parameters (the same tensors, not copies)."""
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, backend=backend, pow2=pow2, device="meta")
        new.weight = lin.weight
        new.bias = lin.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = ops.default_backend(x.device) if self.backend == "auto" else self.backend
        y = fp8_linear(x, self.weight, backend, self.pow2)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 e4m3 (1x128 act, 128x128 weight), backend={self.backend}"
