"""The FP8 operations as `torch.library` operators, each dispatching to one backend by name.

Backends: "reference" (pure torch, `reference.py`: CPU, and the twin in tests), "triton" (`kernels.py`)
and "cublas" (as "triton", except the dense GEMM goes to `torch._scaled_mm`'s block-wise cuBLAS path,
Hopper with CUDA >= 12.9).  The backend is an argument, set per module by `convert.py`: no global state.

Custom ops keep the kernels opaque to torch.compile (fake implementations give the output shapes), so
a compiled block traces around them instead of into Triton launch code.  Operand layouts and padding
are `reference.py`'s.  Not here: autograd (`linear.py`, `experts.py`).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import reference as ref
from .reference import BLOCK, ceil128

FP8 = torch.float8_e4m3fn
BACKENDS = ("reference", "triton", "cublas")


def default_backend(device: torch.device) -> str:
    """cublas on Hopper and newer, triton on Ada (FP8 tensor cores, no block-wise cuBLAS), else reference."""
    if device.type != "cuda":
        return "reference"
    cap = torch.cuda.get_device_capability(device)
    return "cublas" if cap >= (9, 0) else "triton" if cap >= (8, 9) else "reference"


def _kernels():
    from . import kernels  # Triton is imported only where a GPU backend is asked for

    return kernels


def _exact(x: Tensor):
    """The reference maths must not be recast by an enclosing autocast region (its matmuls are fp32)."""
    return torch.autocast(x.device.type, enabled=False)


_LIB = torch.library.Library("dsv3_fp8", "DEF")


def _op(fn):
    """fn as the operator dsv3_fp8::<its name> (an OpOverload), the schema inferred from its annotations, one
    kernel for every device (CompositeExplicitAutograd: the backend argument chooses).  A Library kernel rather
    than `torch.library.custom_op`: a call costs ~2 us of host time over fn itself against custom_op's ~7.6
    (measured on the CI CPU), and an FP8 training step makes ~500 calls.  Autograd is linear.py's and
    experts.py's; these ops run inside their Functions, with grad mode off."""
    _LIB.define(fn.__name__ + torch.library.infer_schema(fn, mutates_args=()))
    _LIB.impl(fn.__name__, fn, "CompositeExplicitAutograd")
    return getattr(torch.ops.dsv3_fp8, fn.__name__).default


def _cols_major_empty(rows: int, kb: int, device) -> Tensor:
    return torch.empty(kb, rows, dtype=torch.float32, device=device).t()


# ------------------------------------------------------------------------------------------ quantisation


@_op
def quant_rows(x: Tensor, pow2: bool, backend: str) -> tuple[Tensor, Tensor]:
    """x [M, K] -> q [M, Kp], s [M, Kp/128] (1x128 tiles)."""
    if backend == "reference":
        with _exact(x):
            return ref.quant_rows(x, pow2)
    q, s, _, _ = _kernels().quant_act(x, rows=True, cols=False, pow2=pow2)
    return q, s


@torch.library.register_fake(quant_rows)
def _(x, pow2, backend):
    m, kp = x.shape[0], ceil128(x.shape[1])
    return x.new_empty(m, kp, dtype=FP8), _cols_major_empty(m, kp // BLOCK, x.device)


@_op
def quant_both(x: Tensor, pow2: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [M, K] -> 1x128 tiles (q [M, Kp], s) and 128x1 tiles transposed (qt [Kp, Mp], st [Kp, Mp/128])."""
    if backend == "reference":
        with _exact(x):
            return (*ref.quant_rows(x, pow2), *ref.quant_cols(x, pow2))
    return _kernels().quant_act(x, rows=True, cols=True, pow2=pow2)


@torch.library.register_fake(quant_both)
def _(x, pow2, backend):
    m, kp, mp = x.shape[0], ceil128(x.shape[1]), ceil128(x.shape[0])
    return (x.new_empty(m, kp, dtype=FP8), _cols_major_empty(m, kp // BLOCK, x.device),
            x.new_empty(kp, mp, dtype=FP8), _cols_major_empty(kp, mp // BLOCK, x.device))


def _both_empty(m: int, k: int, like: Tensor):
    kp, mp = ceil128(k), ceil128(m)
    return (like.new_empty(m, kp, dtype=FP8), _cols_major_empty(m, kp // BLOCK, like.device),
            like.new_empty(kp, mp, dtype=FP8), _cols_major_empty(kp, mp // BLOCK, like.device))


@_op
def quant_gathered(x: Tensor, src: Tensor, row_mul: Optional[Tensor], pow2: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """quant_both of the rows x[src] [M', K], each times row_mul [M'] if given, gathered as they are read."""
    if backend == "reference":
        with _exact(x):
            return ref.quant_both(ref.gathered(x, src, row_mul), pow2)
    return _kernels().quant_act(x, rows=True, cols=True, pow2=pow2, src=src, row_mul=row_mul)


@torch.library.register_fake(quant_gathered)
def _(x, src, row_mul, pow2, backend):
    return _both_empty(src.shape[0], x.shape[1], x)


@_op
def swiglu_quant(h: Tensor, pow2: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h [M, 2I] (gate, up) -> quant_both of silu(gate) * up [M, I] (reference.swiglu), not written in BF16.
    Shapes the fused kernel does not take (I % 128 != 0) compute the product in torch first."""
    if backend == "reference":
        with _exact(h):
            return ref.quant_both(ref.swiglu(h), pow2)
    if not _kernels().swiglu_takes(h):
        return _kernels().quant_act(ref.swiglu(h), rows=True, cols=True, pow2=pow2)
    return _kernels().swiglu_quant(h, pow2)


@torch.library.register_fake(swiglu_quant)
def _(h, pow2, backend):
    return _both_empty(h.shape[0], h.shape[1] // 2, h)


@_op
def quant_weight(w: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """w [G?, N, K] -> q [G?, Np, Kp], s [G?, Np/128, Kp/128] (128x128 blocks), qt = q^T [G?, Kp, Np]."""
    if backend == "reference":
        with _exact(w):
            q, s = ref.quant_weight(w)
            return q, s, q.transpose(-1, -2).contiguous()
    return _kernels().quant_weight(w)


@torch.library.register_fake(quant_weight)
def _(w, backend):
    *g, n, k = w.shape
    np_, kp = ceil128(n), ceil128(k)
    return (w.new_empty(*g, np_, kp, dtype=FP8), w.new_empty(*g, np_ // BLOCK, kp // BLOCK, dtype=torch.float32),
            w.new_empty(*g, kp, np_, dtype=FP8))


# ------------------------------------------------------------------------------------------ GEMMs


def _scaled_mm(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, out_dtype: torch.dtype) -> Tensor:
    """torch._scaled_mm block-wise: scale_a [M, K/128] column-major; scale_b the transpose of a contiguous
    [N/128, K/128] (128x128) or of a column-major [N, K/128] (1x128).  Row-major scales are refused."""
    a_s = a_s if a_s.stride(0) == 1 else ref.col_major(a_s)
    if b_s.shape[0] == b.shape[0]:
        b_s = b_s if b_s.stride(0) == 1 else ref.col_major(b_s)
    else:
        b_s = b_s.contiguous()
    return torch._scaled_mm(a, b.t(), scale_a=a_s, scale_b=b_s.t(), out_dtype=out_dtype)


CUBLAS_REFUSED: dict[tuple, str] = {}  # shapes torch._scaled_mm raised on (read by the benchmark's report)


def _cublas_takes(a: Tensor, b: Tensor, b_s: Tensor) -> bool:
    """Shapes cuBLAS block-wise scaling computes correctly.  Measured on an H200 (torch 2.11, CUDA 13.0):
    with K/128 not a multiple of 4 (K = 640, the Dgrad of wkv_a [576, D]) it returns garbage in part of
    the output without raising, so those go to Triton.  M % 16: a layout requirement of scaled_mm."""
    return (a.shape[0] % 16 == 0 and (a.shape[1] // BLOCK) % 4 == 0
            and (tuple(a.shape), tuple(b.shape), tuple(b_s.shape)) not in CUBLAS_REFUSED)


@_op
def gemm(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, out_dtype: torch.dtype, backend: str) -> Tensor:
    """a [M, Kp] (1x128 scales) x b [N, Kp] (128x128 or 1x128 scales) -> [M, N], fp32 promotion per 128 K."""
    if backend == "reference":
        with _exact(a):
            return ref.gemm(a, a_s, b, b_s, out_dtype)
    if backend == "cublas" and _cublas_takes(a, b, b_s):
        try:
            return _scaled_mm(a, a_s, b, b_s, out_dtype)
        except RuntimeError as e:  # a shape or layout this cuBLAS refuses: Triton, said once per shape
            key = (tuple(a.shape), tuple(b.shape), tuple(b_s.shape))
            CUBLAS_REFUSED[key] = str(e).splitlines()[0]
            warnings.warn(f"torch._scaled_mm refused {key}: {CUBLAS_REFUSED[key]}; using the Triton kernel")
    return _kernels().gemm(a, a_s, b, b_s, out_dtype)


@torch.library.register_fake(gemm)
def _(a, a_s, b, b_s, out_dtype, backend):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


@_op
def grouped_gemm(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, counts: Tensor, out_dtype: torch.dtype,
                 backend: str, out_rows: Optional[Tensor] = None) -> Tensor:
    """a [M, Kp] rows grouped by counts [G] x b [G, N, Kp] (128x128 scales) -> [M, N]; with out_rows [M] (a
    permutation), product row r is stored as output row out_rows[r] (the MoE's rows back in token order)."""
    if backend == "reference":
        with _exact(a):
            return ref.grouped_gemm(a, a_s, b, b_s, counts, out_dtype, out_rows)
    return _kernels().grouped_gemm(a, a_s, b, b_s, counts, out_dtype, out_rows)


@torch.library.register_fake(grouped_gemm)
def _(a, a_s, b, b_s, counts, out_dtype, backend, out_rows=None):
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


@_op
def grouped_gemm_swiglu_backward(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, counts: Tensor, h: Tensor,
                                 backend: str) -> Tensor:
    """SwiGLU's backward after a grouped Dgrad: da = (a x b)[:, :I] (as grouped_gemm, rounded to h's dtype),
    h [M, 2I] SwiGLU's input (gate, then up) -> dh [M, 2I] = reference.swiglu_backward(h, da).  On Hopper one
    kernel, the Dgrad with dh computed in its epilogue (kernels.grouped_gemm_swiglu_backward); else the two."""
    if backend == "reference":
        with _exact(a):
            return ref.swiglu_backward(h, ref.grouped_gemm(a, a_s, b, b_s, counts, h.dtype)[:, :h.shape[1] // 2])
    return _kernels().grouped_gemm_swiglu_backward(a, a_s, b, b_s, counts, h)


@torch.library.register_fake(grouped_gemm_swiglu_backward)
def _(a, a_s, b, b_s, counts, h, backend):
    return h.new_empty(h.shape)


@_op
def grouped_wgrad(at: Tensor, at_s: Tensor, bt: Tensor, bt_s: Tensor, counts: Tensor, out_dtype: torch.dtype,
                  backend: str) -> Tensor:
    """Per group: at [N, Mp] x bt [K, Mp] over the group's rows (1x128 scales along M) -> [G, N, K]."""
    if backend == "reference":
        with _exact(at):
            return ref.grouped_wgrad(at, at_s, bt, bt_s, counts, out_dtype)
    return _kernels().grouped_wgrad(at, at_s, bt, bt_s, counts, out_dtype)


@torch.library.register_fake(grouped_wgrad)
def _(at, at_s, bt, bt_s, counts, out_dtype, backend):
    return at.new_empty(counts.shape[0], at.shape[0], bt.shape[0], dtype=out_dtype)
