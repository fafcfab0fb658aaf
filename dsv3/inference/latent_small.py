"""MLA's small elementwise work between the paired GEMV and wq_b, for a few decode rows, in one Triton
kernel: q_norm of q_a, kv_norm of c_kv, RoPE of k_pe and the cache write.

Why: in the compiled, graph-captured batch-1 decode step of the `bench` config, every MLA layer runs three
small Inductor kernels after the paired GEMV (`gemv.paired_linear`) of wq_a and wkv_a: the two RMSNorms
fused, k_pe's rope, and `LatentCache.write`'s index_put_; each ~1.1-1.5 us plus a launch gap, for ~4 KB
of data per token (H200 profile, bench/results/decode_2026-12-02_run9.json, `profile_bs1`).  One launch
per layer does all three.

Per token row r (grid (rows, 2): program 0 the query, program 1 the latent, so neither waits on the other):
    q_a_normed[r]              = q_norm(q_a[r])                            [Q]  (Q = q_lora_rank, 1536)
    kv[layer, b, positions[b, t]] = [kv_norm(kv_a[r, :C]) | rope(kv_a[r, C:], cos, sin)]   [C + R]
with r = b * T + t and cos, sin the rows of `RotaryEmbedding`'s fp32 tables [P, R / 2] at positions[b, t]
(the kernel reads them itself: compiled with this and the MLA kernel on, the step computes no cos/sin).  The roundings are the twin's
(`RMSNorm.forward`, `apply_rope`): RMSNorm is xf * rsqrt(mean(xf^2) + eps) in fp32, rounded to x's dtype,
times the weight (product in fp32, rounded once); RoPE rotates adjacent pairs in fp32 and rounds once.
Only the order of the sum of squares differs (and, on a GPU, whatever Inductor's own kernels do to the twin
too: approximate fp32 division and rsqrt, fused multiply-adds).  One dtype throughout (activations, norm
weights and cache: BF16 when decoding), which the rule checks; sizes come from the tensors and need not be
powers of two (the loads are masked).

In place: the op declares `kv` mutated (`mutates_args`) and stores straight into it, like
`LatentCache.write`, whose index_put_ it replaces.  Under torch.compile the mutation is functionalised and
Inductor's reinplacing pass turns it back into the in-place launch, because `kv` is the whole cache (a
graph input: every layer's write and read go through the same base) and the layer is an index, not a view
(`kv[layer]` would be the trap `LatentCache.write` describes: a copy of the layer's slab per step).
tests/test_latent_small.py holds Inductor's final graph of a compiled decode step to that (no copy of the
cache), on any machine with Triton.  Negative positions wrap as index_put_'s do (by the cache's length S for
the write, by P for the tables' row, which `RotaryEmbedding.lookup`'s clamp keeps inside the tables);
positions past the cache store nothing (index_put_ raises).

Taken by `attention.cached_mla` while `LATENT_KERNEL` is set and `use_latent_kernel` holds: CUDA, a decode
step (a mask is given: prefill keeps the torch code, whose latents feed its attention directly), q-LoRA,
at most MAX_ROWS rows, the cache's batch, one dtype.  On since timed on the GPU (bench/decode.py's `latent`
section flips it; numbers at `LATENT_KERNEL`).  A `torch.library.triton_op`, so compiled steps trace into the launch and CUDA graphs
capture it.  Twin: `MLA.project_q` / `MLA.project_latent` (q_norm, kv_norm, `apply_rope`) and
`LatentCache.write`.  Written by hand: Inductor schedules the two reductions, the rope and index_put_'s
scatter as three kernels, and no library has MLA's latent write.

Checked against its twin under Triton's interpreter, compiled for sm_90, and on the H200 (GPU tests, run 10).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.attention import MLA
from .cache import LatentCache
from .triton_ops import await_previous_kernel, kernel_op, launch

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # CPU-only torch builds ship without Triton; there the torch code runs

    def _jit(fn):
        return fn


# H200, bench/decode.py --sections dsv3,latent at f756f29 (2026-12-02, one job): batch 1 1,378.2 -> 1,456.2 tok/s
# (42.9 -> 45.3 % of the HBM roofline), batch 8 6,141.5 -> 6,348.2; GPU tests 5 passed.  Read at trace time:
# set it before the first generate.
LATENT_KERNEL = True
MAX_ROWS = 64  # decode rows (B*T) per step; the kernel's cost is per row, the bound keeps it a decode path


@dataclass(frozen=True)
class LatentTiles:
    """Compile-time choices.  4 warps: 16 of the 2,048 padded q_a lanes per thread (untimed)."""

    warps: int = 4


def use_latent_kernel(attn: MLA, x: Tensor, cache: LatentCache, visible: Tensor | None) -> bool:
    """The rule (see the module docstring); x [B, T, D] is the layer's input (normed, or the residual when
    the norm ran inside wq_a + wkv_a's launch: the same shape and dtype, which q_a and kv_a take), visible
    the step's mask (None: a prefill)."""
    b, t = x.shape[:2]
    return (x.is_cuda and visible is not None and bool(attn.cfg.q_lora_rank) and b * t <= MAX_ROWS
            and b == cache.batch and x.dtype == cache.kv.dtype == attn.q_norm.weight.dtype == attn.kv_norm.weight.dtype
            and cache.kv.stride(-1) == 1)


def _p2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _rows(x: Tensor, b: int, t: int) -> Tensor:
    """[B, T, N] -> [B*T, N] with a unit last stride (a view where the layout allows: a copy would be one
    more kernel per layer)."""
    x = x.reshape(b * t, -1)
    return x if x.stride(-1) == 1 else x.contiguous()


def norm_rope_write(attn: MLA, q_a: Tensor, kv_a: Tensor, cos_table: Tensor, sin_table: Tensor, cache: LatentCache,
                    layer: int, positions: Tensor, tiles: LatentTiles = LatentTiles()) -> Tensor:
    """q_a [B, T, Q], kv_a [B, T, C + R] (wq_a's and wkv_a's outputs), cos_table / sin_table [P, R / 2]
    (`RotaryEmbedding`'s, one layout, unit last stride, read at each position as its `lookup` reads them),
    positions [B, T] -> attn.q_norm(q_a) [B, T, Q]; stores [kv_norm(c_kv) | rope(k_pe)] into `layer`'s slots at
    `positions`, as `cache.write` does.  The kernel on any device Triton runs on (the interpreter included); the rule
    is the caller's."""
    b, t, q = q_a.shape
    dtypes = {q_a.dtype, kv_a.dtype, attn.q_norm.weight.dtype, attn.kv_norm.weight.dtype, cache.kv.dtype}
    if len(dtypes) != 1:
        raise ValueError(f"norm_rope_write takes one dtype for activations, norm weights and cache, got {dtypes}")
    c = kv_a.shape[-1] - 2 * cos_table.shape[-1]
    sizes_ok = (attn.q_norm.weight.shape == (q,) and attn.kv_norm.weight.shape == (c,)
                and kv_a.shape[-1] == cache.kv.shape[-1] and cache.kv.stride(-1) == 1)
    tables_ok = (cos_table.dim() == 2 and cos_table.shape == sin_table.shape
                 and cos_table.stride() == sin_table.stride() and cos_table.stride(-1) == 1)
    if not sizes_ok or not tables_ok or tiles.warps & (tiles.warps - 1):
        raise ValueError(f"q_a [B, T, Q], kv_a [B, T, C + R] and the cache (unit last stride) as the norms have them, "
                         f"cos_table and sin_table [P, R / 2] of one layout (unit last stride), warps a power of two; "
                         f"got q_a {tuple(q_a.shape)}, kv_a {tuple(kv_a.shape)}, cos_table {tuple(cos_table.shape)} "
                         f"strides {cos_table.stride()}, sin_table {tuple(sin_table.shape)} strides "
                         f"{sin_table.stride()}, cache {tuple(cache.kv.shape)}, {tiles}")
    out = _norm_rope_write_op(_rows(q_a, b, t), _rows(kv_a, b, t), cos_table, sin_table,
                              attn.q_norm.weight, attn.kv_norm.weight, cache.kv, positions, layer, t,
                              float(attn.q_norm.eps), float(attn.kv_norm.eps), tiles.warps)
    return out.view(b, t, q)


@_jit
def _rms_norm(x, w, n, eps, X_DTYPE: tl.constexpr):
    """One row: x [BLOCK] fp32 (padding lanes 0), w [BLOCK] -> w * round(x * rsqrt(mean(x^2) + eps)) in fp32,
    the product not yet rounded; mean over the n real lanes."""
    eps = tl.cast(eps, tl.float32)  # inductor hands a Python float in as fp64: the twin adds eps in fp32
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    return w.to(tl.float32) * (x * inv).to(X_DTYPE).to(tl.float32)


@_jit
def _norm_q_row(QA, QW, QOUT, r, sqa_r, sqo_r, eps, Q: tl.constexpr, Q_P2: tl.constexpr):
    """QOUT[r] = q_norm(QA[r])."""
    q = tl.arange(0, Q_P2)
    ok = q < Q
    x = tl.load(QA + r * sqa_r + q, mask=ok, other=0.0).to(tl.float32)
    y = _rms_norm(x, tl.load(QW + q, mask=ok, other=0.0), Q, eps, QA.dtype.element_ty)
    tl.store(QOUT + r * sqo_r + q, y.to(QOUT.dtype.element_ty), mask=ok)


@_jit
def _write_latent_row(KVA, COS, SIN, KVW, KV, POS, r, layer, T, S, P, skva_r, stab_p, skv_l, skv_b, skv_s, spos_b,
                      spos_t, eps, C: tl.constexpr, C_P2: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr):
    """KV[layer, b, pos] = [kv_norm(KVA[r, :C]) | rope(KVA[r, C:], COS[row], SIN[row])], r = b * T + t,
    pos = POS[b, t] (wrapped by S, as index_put_ does); COS / SIN the [P, HALF] tables, row = pos wrapped by
    P and clamped to [0, P), as `RotaryEmbedding.lookup` reads them."""
    b = r // T
    pos = tl.load(POS + b * spos_b + (r - b * T) * spos_t).to(tl.int64)
    row = tl.minimum(tl.maximum(tl.where(pos < 0, pos + P, pos), 0), P - 1)  # the tables' row, as lookup's
    pos = tl.where(pos < 0, pos + S, pos)  # index_put_ reads a negative index from the end
    inside = (pos >= 0) & (pos < S)
    # masks below are block compares against a bound that is 0 outside the cache, not `c_ok & inside`: Triton
    # 3.9's interpreter types a block-and-scalar `&` as int32, which its stores then refuse (same code compiled)
    n_c, n_i = tl.where(inside, C, 0), tl.where(inside, HALF, 0)
    dst = KV + tl.cast(layer, tl.int64) * skv_l + b.to(tl.int64) * skv_b + pos * skv_s  # 64-bit: the cache is big
    c = tl.arange(0, C_P2)
    c_ok = c < C
    x = tl.load(KVA + r * skva_r + c, mask=c_ok, other=0.0).to(tl.float32)
    y = _rms_norm(x, tl.load(KVW + c, mask=c_ok, other=0.0), C, eps, KVA.dtype.element_ty)
    tl.store(dst + c, y.to(KV.dtype.element_ty), mask=c < n_c)
    # RoPE on k_pe's adjacent pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in fp32, rounded once
    i = tl.arange(0, HALF_P2)
    i_ok = i < HALF
    x0 = tl.load(KVA + r * skva_r + C + 2 * i, mask=i_ok, other=0.0).to(tl.float32)
    x1 = tl.load(KVA + r * skva_r + C + 2 * i + 1, mask=i_ok, other=0.0).to(tl.float32)
    cos = tl.load(COS + row * stab_p + i, mask=i_ok, other=0.0).to(tl.float32)
    sin = tl.load(SIN + row * stab_p + i, mask=i_ok, other=0.0).to(tl.float32)
    tl.store(dst + C + 2 * i, (x0 * cos - x1 * sin).to(KV.dtype.element_ty), mask=i < n_i)
    tl.store(dst + C + 2 * i + 1, (x1 * cos + x0 * sin).to(KV.dtype.element_ty), mask=i < n_i)


@_jit
def _norm_rope_write_kernel(QA, KVA, COS, SIN, QW, KVW, QOUT, KV, POS, layer, T, S, P, sqa_r, skva_r, stab_p, sqo_r,
                            skv_l, skv_b, skv_s, spos_b, spos_t, eps_q, eps_kv,
                            Q: tl.constexpr, Q_P2: tl.constexpr, C: tl.constexpr, C_P2: tl.constexpr,
                            HALF: tl.constexpr, HALF_P2: tl.constexpr, PDL: tl.constexpr):
    await_previous_kernel(PDL)
    # grid (rows, 2): program (r, 0) norms the query row, (r, 1) writes the latent row
    r = tl.program_id(0)
    if tl.program_id(1) == 0:
        _norm_q_row(QA, QW, QOUT, r, sqa_r, sqo_r, eps_q, Q, Q_P2)
    else:
        _write_latent_row(KVA, COS, SIN, KVW, KV, POS, r, layer, T, S, P, skva_r, stab_p, skv_l, skv_b, skv_s, spos_b,
                          spos_t, eps_kv, C, C_P2, HALF, HALF_P2)


@kernel_op("dsv3::norm_rope_write", mutates_args=("kv",))
def _norm_rope_write_op(q_a: Tensor, kv_a: Tensor, cos_table: Tensor, sin_table: Tensor, q_weight: Tensor,
                        kv_weight: Tensor, kv: Tensor, positions: Tensor, layer: int, t: int, eps_q: float,
                        eps_kv: float, warps: int) -> Tensor:
    # q_a [R, Q], kv_a [R, C + rope] (unit last strides), cos_table / sin_table [P, rope / 2] (one layout, unit
    # last stride), kv [L, B, S, C + rope] the whole cache (written in place), positions [B, T] with R = B * T
    r, q = q_a.shape
    rope = 2 * cos_table.shape[-1]
    c = kv.shape[-1] - rope
    q_normed = torch.empty(r, q, dtype=q_a.dtype, device=q_a.device)
    if not r:
        return q_normed
    launch(_norm_rope_write_kernel, r)[(r, 2)](
        q_a, kv_a, cos_table, sin_table, q_weight, kv_weight, q_normed, kv, positions, layer, t, kv.shape[2],
        cos_table.shape[0], q_a.stride(0), kv_a.stride(0), cos_table.stride(0), q_normed.stride(0), kv.stride(0),
        kv.stride(1), kv.stride(2), positions.stride(0), positions.stride(1), eps_q, eps_kv, Q=q, Q_P2=_p2(q), C=c,
        C_P2=_p2(c), HALF=rope // 2, HALF_P2=_p2(rope // 2), num_warps=warps)
    return q_normed
