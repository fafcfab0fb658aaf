"""FP8 routed experts for training: the grouped form of `linear.py`, one GEMM per projection for all experts.

    h   = x W13[e]^T     (grouped Fprop)   x rows sorted by expert, 1x128 tiles; W13 [E, 2I, D] 128x128 blocks
    a   = silu(gate) * up                  BF16 / fp32, outside FP8 (the report keeps SwiGLU's math out of FP8)
    y   = a W2[e]^T      (grouped Fprop)
Backward: grouped Dgrad against the transposed weight blocks, grouped Wgrad per expert over its rows,
with 1x128 tiles along the token dim; gradients of the stacked fp32 weights come out fp32.

`FP8RoutedFn` is the same maths with the MoE's dispatch and combine folded in, for experts that all live
in this process (the model calls `forward_dispatched` where its dispatcher has `sort`).  There no BF16
copy is written between the token stream and the FP8 operands:
    forward   the quantiser gathers each token's copies as it reads x (no permuted x); SwiGLU is computed
              inside the quantiser of a (a never written); the second GEMM stores its rows in token order
              (row map in its epilogue), so the combine, an fp32 weighted sum, reads contiguous rows;
    backward  the quantiser gathers dy's copies, each times its gate, as it reads (no permuted dy); the
              last Dgrad stores the rows' gradients in token order, summed over each token's copies in fp32.
SwiGLU's backward is computed by the Dgrad that produces its input gradient da, in its epilogue on Hopper
(`ops.grouped_gemm_swiglu_backward`: da is never written; the BF16 dh then goes to quant_both).  A
quantiser that computed dh itself moved fewer bytes but ran slower, 884 us against the pair's 833 us at
the bench shape (H200, run 17; 1,187 us in a lower-register form), and was deleted.
Measured on the bench step (H200, run 17): FP8 155.2-156.0 ms against 164.95 before (run 16), 1.006-1.017x
BF16; storing the rows in token order saved ~1 ms of it.
Its twin is the unfused path (`fuses_dispatch = False`: the dispatcher, `forward_grouped`, the
dispatcher's combine), which tests hold equal.

`FP8Experts` is an `Experts` (same parameters and keys); `forward_one` (the "loop" twin) runs each
expert through the dense FP8 linear, so tests can hold the grouped kernels equal to it.  Not here: the
router and the dispatcher's sort, which stay the model's (router in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.moe import Experts, sum_copies, weighted_sum
from . import ops
from .linear import as_autocast_input, fp8_linear, out_dtype_for


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
    x = as_autocast_input(x)
    return FP8GroupedLinearFn.apply(x, weight, counts, out_dtype_for(x), backend, pow2)


class FP8RoutedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gates: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor, out_dtype: torch.dtype, backend: str, pow2: bool) -> torch.Tensor:
        """x [N, D] tokens, gates [N, K], order [N*K] (token copies n*K + j sorted by expert), counts [E],
        w13 [E, 2I, D], w2 [E, D, I] fp32 -> [N, D] out_dtype: sum_j gates[n, j] expert_j(x[n])."""
        n, k, d, inter = gates.shape[0], gates.shape[1], x.shape[1], w2.shape[2]
        w13q, w13s, w13qt = ops.quant_weight(w13.detach(), backend)
        w2q, w2s, w2qt = ops.quant_weight(w2.detach(), backend)
        xq, xs, xqt, xst = ops.quant_gathered(x.detach(), order // k, None, pow2, backend)  # [N*K, Dp], sorted rows
        h = ops.grouped_gemm(xq, xs, w13q, w13s, counts, out_dtype, backend)[:, :2 * inter]  # [N*K, 2I]
        aq, a_s, aqt, ast = ops.swiglu_quant(h, pow2, backend)
        # stored in token order (copy n*K + j at row n*K + j): the combine below reads contiguous rows
        y = ops.grouped_gemm(aq, a_s, w2q, w2s, counts, out_dtype, backend, order)[:, :d].view(n, k, d)
        ctx.save_for_backward(xqt, xst, h, aqt, ast, w13qt, w13s, w2qt, w2s, counts, gates, order, y)
        ctx.meta = (x.dtype, w13.dtype, backend, pow2)
        return weighted_sum(y, gates.detach())

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        xqt, xst, h, aqt, ast, w13qt, w13s, w2qt, w2s, counts, gates, order, y = ctx.saved_tensors
        x_dtype, w_dtype, backend, pow2 = ctx.meta
        n, k, d = y.shape
        inter = h.shape[1] // 2
        dout = dout.contiguous()
        dx = dgates = dw13 = dw2 = None
        if ctx.needs_input_grad[1]:  # d gates[n, j] = <dout[n], y of copy j>
            dgates = (dout.unsqueeze(1).float() * y.float()).sum(-1).to(gates.dtype)
        # dy of sorted row q = dout[its token] * its gate, gathered and weighted inside the quantiser
        gate_of_row = gates.detach().flatten().index_select(0, order).float()
        dyq, dys, dyqt, dyst = ops.quant_gathered(dout, order // k, gate_of_row, pow2, backend)
        if ctx.needs_input_grad[5]:
            dw2 = ops.grouped_wgrad(dyqt, dyst, aqt, ast, counts, torch.float32, backend)[:, :d, :inter].to(w_dtype)
        # the Dgrad of a = silu(gate) * up, with SwiGLU's backward in its epilogue: dh [N*K, 2I], then quantised
        dh = ops.grouped_gemm_swiglu_backward(dyq, dys, w2qt, w2s.transpose(1, 2), counts, h, backend)
        dhq, dhs, dhqt, dhst = ops.quant_both(dh, pow2, backend)
        if ctx.needs_input_grad[0]:  # the rows' gradients in token order, each token's k copies summed
            drows = ops.grouped_gemm(dhq, dhs, w13qt, w13s.transpose(1, 2), counts, x_dtype, backend, order)
            dx = sum_copies(drows[:, :d], k)
        if ctx.needs_input_grad[4]:
            dw13 = ops.grouped_wgrad(dhqt, dhst, xqt, xst, counts, torch.float32, backend)[:, :2 * inter, :d].to(w_dtype)
        return dx, dgates, None, None, dw13, dw2, None, None, None


class FP8Experts(Experts):
    def __init__(self, n_experts: int, dim: int, inter: int, backend: str = "auto", pow2: bool = False, device=None):
        with torch.device(device or "cpu"):
            super().__init__(n_experts, dim, inter)
        self.backend = backend
        self.pow2 = pow2
        self.fuses_dispatch = True  # model.moe: forward_dispatched where the dispatcher can sort

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

    def forward_dispatched(self, x: torch.Tensor, gates: torch.Tensor, order: torch.Tensor,
                           counts: torch.Tensor) -> torch.Tensor:
        """x [N, D], gates [N, K], order [N*K] (the dispatcher's sort), counts [E] -> [N, D] (FP8RoutedFn)."""
        x = as_autocast_input(x)
        return FP8RoutedFn.apply(x, gates, order, counts, self.w13, self.w2, out_dtype_for(x), self._backend(x),
                                 self.pow2)

    def forward_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        b = self._backend(x)
        gate, up = fp8_linear(x, self.w13[e], b, self.pow2).chunk(2, dim=-1)
        return fp8_linear(F.silu(gate) * up, self.w2[e], b, self.pow2)
