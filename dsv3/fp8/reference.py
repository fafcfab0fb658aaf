"""Pure-torch FP8 (e4m3) fine-grained quantisation and block-scaled GEMMs: the twins of `kernels.py`.

The scheme (spec §3.2-3.3):
  - activations and gradients: one scale per 1x128 tile along the GEMM's inner dimension, computed
    online as amax / 448 (optionally rounded up to a power of two);
  - weights: one scale per 128x128 block (`dsv3.checkpoint.fp8`, the released checkpoint's format);
  - the GEMM: loop over K in 128-wide blocks, an fp32 dot of each block of e4m3 values, multiplied
    by a_s * b_s and added into an fp32 accumulator ("promotion every 128 K-elements").

Layout conventions shared with the kernels, chosen so `torch._scaled_mm` takes them as they are:
  - every FP8 operand is [rows, K] with K contiguous, both dims zero-padded to multiples of 128;
  - 1x128 scales are [rows, K/128] stored column-major (memory of a contiguous [K/128, rows]);
  - 128x128 scales are [rows/128, K/128] contiguous, with a leading group dim for stacked experts.
Zero padding contributes zero to every dot, so a padded GEMM equals the unpadded one.

Slow but obviously correct: CPU training in FP8 runs through these, and tests hold the Triton and
cuBLAS paths equal to them.  Not here: dispatch between backends (`ops.py`), autograd (`linear.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checkpoint.fp8 import FP8_DTYPE, FP8_MAX, quantize_weight

BLOCK = 128
AMAX_EPS = 1e-12  # an all-zero tile gets a tiny scale and quantises to zeros (no 0/0)


def ceil128(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _pad2(x: torch.Tensor) -> torch.Tensor:
    """[..., R, C] -> [..., ceil128(R), ceil128(C)], zero padded."""
    r, c = x.shape[-2:]
    return F.pad(x, (0, ceil128(c) - c, 0, ceil128(r) - r))


def true_div(x: torch.Tensor, d: float) -> torch.Tensor:
    """x / d rounded once (IEEE).  On CUDA, dividing by a Python scalar multiplies by its fp32
    reciprocal (two roundings: 1 ulp off for about half of all x); on CPU it divides.  A tensor divisor
    divides on both, so CPU, CUDA and the Triton kernels (div_rn) agree to the bit."""
    return x / torch.full_like(x, d)


def _scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    s = true_div(amax.float().clamp(min=AMAX_EPS), FP8_MAX)
    return torch.exp2(torch.ceil(torch.log2(s))) if pow2 else s


def reciprocal(s: torch.Tensor) -> torch.Tensor:
    """1 / s rounded once (IEEE), on every device.  Activations are quantised as x * (1/s), one rounding
    more than x / s: the e4m3 value differs only where x / s lies within an fp32 ulp of a rounding
    boundary (0.05 % of elements in bench/results/fp8_quant_kernel_2026-12-01.json).  DeepSeek's
    DeepGEMM casts the same way (x * (448 / amax)); the Triton quantiser ran 2.6x faster than with an
    IEEE division per element (16.6 against 42.6 ms per bench training step, H200)."""
    return torch.ones_like(s) / s


def col_major(s: torch.Tensor) -> torch.Tensor:
    """[rows, kb] with the memory of a contiguous [kb, rows] (what scaled_mm wants for 1x128 scales)."""
    return s.t().contiguous().t()


def quant_rows(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 tiles along the last dim.  x [M, K] -> q [M, Kp] e4m3, s [M, Kp/128] fp32 (column-major).
    Rows are not padded: M is a GEMM's outer dim here."""
    m, k = x.shape
    xp = F.pad(x.float(), (0, ceil128(k) - k)).view(m, ceil128(k) // BLOCK, BLOCK)  # [M, Kp/128, 128]
    s = _scale(xp.abs().amax(-1), pow2)  # [M, Kp/128]
    q = (xp * reciprocal(s)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(m, ceil128(k))
    return q, col_major(s)


def quant_cols(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """128x1 tiles (128 rows of one column), stored transposed for a GEMM whose inner dim is M (Wgrad).
    x [M, K] -> qt [Kp, Mp] e4m3, st [Kp, Mp/128] fp32 (column-major)."""
    return quant_rows(_pad2(x.float()).t().contiguous(), pow2)


def gathered(x: torch.Tensor, src: torch.Tensor, row_mul: torch.Tensor | None = None) -> torch.Tensor:
    """Rows x[src] in fp32, each times row_mul (fp32) if given: the MoE's token copies in expert order
    (forward), or the output gradient's copies times their gates (backward).  [len(src), K]."""
    rows = x.index_select(0, src).float()
    return rows if row_mul is None else rows * row_mul.float()[:, None]


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h [M, 2I] (gate, then up) -> silu(gate) * up [M, I], in fp32 and rounded to h's dtype: the BF16
    tensor the unfused path stores and then quantises."""
    g, u = h.float().chunk(2, -1)
    return (F.silu(g) * u).to(h.dtype)


def swiglu_backward(h: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
    """The gradient of swiglu at h for da [M, I] -> dh [M, 2I] (d gate, then d up), fp32 maths rounded to
    h's dtype (autograd's silu backward: sigmoid(g) (1 + g (1 - sigmoid(g))))."""
    g, u = h.float().chunk(2, -1)
    sg = torch.sigmoid(g)
    da = da.float()
    return torch.cat([da * u * sg * (1 + g * (1 - sg)), da * g * sg], -1).to(h.dtype)


def quant_both(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """quant_rows and quant_cols of x: the two layouts a Linear's input (or output gradient) is used in."""
    return (*quant_rows(x, pow2), *quant_cols(x, pow2))


def quant_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 blocks (dsv3.checkpoint.fp8), padded.  w [..., N, K] -> q [..., Np, Kp], s [..., Np/128, Kp/128]."""
    if w.dim() == 3:
        parts = [quant_weight(we) for we in w]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    q, s = quantize_weight(w)
    return _pad2(q.view(torch.uint8)).view(FP8_DTYPE), s.float().contiguous()


def dequant_rows(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quant_rows up to rounding: [M, Kp] (float64 keeps the products exact)."""
    return (q.to(dtype).view(q.shape[0], q.shape[1] // BLOCK, BLOCK) * s.to(dtype)[..., None]).view(q.shape)


def dequant_blocks(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quant_weight on padded operands: [..., Np, Kp]."""
    return q.to(dtype) * s.to(dtype).repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)


def _row_scales(b_s: torch.Tensor, n: int) -> torch.Tensor:
    """b's scales as one per (row, K block): 128x128 block scales are repeated over their 128 rows."""
    return b_s if b_s.shape[0] == n else b_s.repeat_interleave(BLOCK, 0)


def gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype = torch.float32,
         acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """C = A B^T with promotion every 128 K-elements.  a [M, Kp] with 1x128 scales a_s [M, Kp/128];
    b [N, Kp] with 128x128 scales [N/128, Kp/128] or 1x128 scales [N, Kp/128] -> [M, N] out_dtype."""
    m, k = a.shape
    bs = _row_scales(b_s, b.shape[0])
    acc = torch.zeros(m, b.shape[0], dtype=acc_dtype, device=a.device)
    for kb in range(k // BLOCK):
        blk = slice(kb * BLOCK, (kb + 1) * BLOCK)
        part = a[:, blk].to(acc_dtype) @ b[:, blk].to(acc_dtype).t()  # one 128-deep dot, exact-ish in fp32
        acc += part * (a_s[:, kb, None].to(acc_dtype) * bs[None, :, kb].to(acc_dtype))
    return acc.to(out_dtype)


def grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, counts: torch.Tensor,
                 out_dtype: torch.dtype = torch.float32, out_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a grouped by expert (counts[g] rows each, in order) times b[g]^T.
    a [M, Kp], a_s [M, Kp/128]; b [G, N, Kp], b_s [G, N/128, Kp/128] -> [M, N]; with out_rows [M] (a
    permutation) row r of the product is output row out_rows[r]."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    start = 0
    for g, n in enumerate(counts.tolist()):
        out[start:start + n] = gemm(a[start:start + n], a_s[start:start + n], b[g], b_s[g], out_dtype)
        start += n
    return out if out_rows is None else torch.empty_like(out).index_copy_(0, out_rows, out)


def grouped_wgrad(at: torch.Tensor, at_s: torch.Tensor, bt: torch.Tensor, bt_s: torch.Tensor, counts: torch.Tensor,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per group g: C[g] = sum over the rows m of group g of A^T[:, m] B^T[:, m]^T (the weight gradient,
    inner dim = tokens).  at [N, Mp], bt [K, Mp] with 1x128 scales along M ([N, Mp/128], [K, Mp/128]),
    both quantised over global 128-row tiles -> [G, N, K].  Rows outside group g count as zero."""
    n_rows = at.shape[1]
    ends = counts.cumsum(0)
    out = torch.empty(len(counts), at.shape[0], bt.shape[0], dtype=out_dtype, device=at.device)
    row = torch.arange(n_rows, device=at.device)
    for g in range(len(counts)):
        keep = ((row >= ends[g] - counts[g]) & (row < ends[g])).to(torch.float32)  # [Mp]
        a_g = (at.float() * keep).to(FP8_DTYPE)  # masking by exact 0/1 keeps e4m3 values exact
        out[g] = gemm(a_g, at_s, bt, bt_s, out_dtype)
    return out
