"""Absorbed MLA for a few query tokens in three Triton kernels: `attention.absorbed_attention`'s maths
without its six cuBLAS products, concatenation and separate softmax.

Why: in the compiled batch-1 decode step of the `bench` config the absorbed attention was ~18 µs per
layer (two batched einsums with the per-head W_UK / W_UV, two bmm's over the cache whose cuBLAS kernels
change with kv_len, and a softmax; ~144 µs of an 833 µs step, H200 profile in
bench/results/decode_2026-12-01.json) for about 4 MB of weights and a few hundred KB of cache.

    absorb   q_latent[r, h] = q_nope[r, h] · W_UK[h]          grid (H, C / BLOCK_C); W_UK read once for all
                                                              R = B*T query rows (bf16 out, as the einsum's);
             the programs of column block 0 also rotate q_pe[r, h] (RoPE on adjacent pairs, fp32 maths,
             bf16 out: `apply_rope`) by the row of `RotaryEmbedding`'s fp32 cos / sin tables [P, rope / 2]
             at the row's position, so the step has no separate rope kernel for q nor cos/sin of its own
    attend   flash-decoding over the cache, all heads of a row at once (the 576-wide keys are shared):
             scores = (q_latent · c_kv^T + q_pe · k_pe^T) * scale over the slots the row sees (slot <=
             its position: the causal mask, `cache.causal_mask`, derived in the kernel from the row's
             position, so no mask buffer is built and splits past the position do no work), online
             softmax (fp32), acc += p · c_kv; grid (R, splits of SPLIT_S slots, head blocks); fp32 partials
    out      merges the splits' partials (max, sum, acc) and applies W_UV: o[r, h] = o_latent · W_UV[h]^T;
             grid (R, H, DV / BLOCK_V)

Rounding differs from the twin's only in order and in where BF16 roundings fall: the twin rounds the
normalised probabilities and o_latent to BF16, these kernels round the unnormalised p (before its
product with c_kv) and keep o_latent in fp32.  Rows that see no slot (position < 0) give zeros (the
twin: NaN).

Taken by `attention.cached_mla` while `MLA_KERNEL` is set and `use_mla_decode` holds: CUDA,
BF16, a plain `wkv_b`, at most MAX_ROWS query rows.  A `torch.library.triton_op`, so compiled steps and
CUDA graphs take it.

On by default since run 6.  Per layer against the compiled twin alone (H200,
bench/mla_decode_kernel.py, 2026-12-01; rows x tokens x cache) it wins at 1x1x256 (13.8 vs 15.9 us),
1x2x256 (14.9 vs 18.0) and 1x1x2048 (17.8 vs 23.5) and loses at 8x1x256 (21.8 vs 19.1) and 32x2x256
(90.6 vs 23.4: the absorb kernel walks the rows in turn), hence MAX_ROWS.  End to end, in the compiled,
graph-captured batch-1 decode step of the `bench` config, it first lost (1,051 tok/s against 1,141 off,
commit 3b27011, bench/results/decode_2026-12-01_run5_mla.json: the q rows were copied to contiguous
tensors and the mask converted before each launch); with the rows passed as views and the bool mask
read directly it wins: 1,226.6 tok/s against 1,175.1 off (+4.4 %, same job, commit 8690cb4,
bench/results/decode_2026-12-01_run6_switches.json; batch 8, past MAX_ROWS, unchanged within noise).
bench/decode.py's `mla` section flips it.

Twin: `attention.absorbed_attention` (and the expanded form behind it).  Written by hand: FlashMLA
is not a dependency here (its kernels target 64-head blocks and paged caches) and torch has no fused
absorbed-MLA op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .triton_ops import await_previous_kernel, kernel_op, launch

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # CPU-only torch builds ship without Triton; there the torch maths runs

    def _jit(fn):
        return fn


MLA_KERNEL = True  # read at trace time: set it before the first generate
MAX_ROWS = 2  # query rows (B*T) per step: batch 1, and its MTP verify step (see the docstring)


@dataclass(frozen=True)
class MLATiles:
    """Compile-time choices: the best of bench/mla_decode_kernel.py's sweep over all its cases (H200,
    2026-12-01: 64 slots per program beat 128, 256 and 512 in four of its five cases; at 32 rows x 2
    tokens, past MAX_ROWS, every choice took 86-112 us; wider or narrower absorb/out columns and 8
    warps gained nothing).  16 heads is tl.dot's least M and the bench config's head
    count; 64 slots per step keep the [16, 512] fp32 accumulator and a [64, 576] key tile within 4
    warps' registers."""

    absorb_block_c: int = 64  # absorb: latent columns per program
    absorb_warps: int = 4
    block_h: int = 16  # attend: heads per program (at least 16, tl.dot's M)
    block_s: int = 64  # attend: cache slots per step (at least 16)
    split_s: int = 64  # attend: slots per program (a multiple of block_s)
    attend_warps: int = 4
    attend_stages: int = 2
    out_block_v: int = 32  # out: value columns per program
    out_warps: int = 4


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _p2(n: int, least: int = 1) -> int:
    return max(least, 1 << (n - 1).bit_length())


def use_mla_decode(q_nope: Tensor, kv: Tensor, wkv_b) -> bool:
    """The rule (see the module docstring): q_nope [B, T, H, nope], kv [B, S, C + rope]."""
    from torch import nn

    b, t = q_nope.shape[:2]
    return (q_nope.is_cuda and q_nope.dtype == kv.dtype == torch.bfloat16 and b * t <= MAX_ROWS
            and type(wkv_b) is nn.Linear and wkv_b.weight.dtype == torch.bfloat16 and kv.stride(-1) == 1)


def _unit_last_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def mla_decode(q_nope: Tensor, q_pe: Tensor, kv: Tensor, positions: Tensor, cos_table: Tensor, sin_table: Tensor,
               wkv_b: Tensor, dv: int, scale: float, tiles: MLATiles = MLATiles()) -> Tensor:
    """q_nope [B, T, H, nope], q_pe [B, T, H, rope] not yet rotated, kv [B, S, C + rope] (a cache view, last
    dim contiguous), positions [B, T] (integer: each query sees the slots up to its position and is rotated by
    the tables' row there, as `RotaryEmbedding.lookup` reads it), cos_table and sin_table
    [P, rope / 2] (`RotaryEmbedding`'s, one layout, unit last stride), wkv_b [H * (nope + dv), C]
    -> o [B, T, H, dv] in q_nope's dtype."""
    t = tiles
    for name in ("absorb_block_c", "block_h", "block_s", "split_s", "out_block_v"):
        if getattr(t, name) & (getattr(t, name) - 1):
            raise ValueError(f"MLATiles.{name} must be a power of two, got {getattr(t, name)}")
    if t.block_h < 16 or t.block_s < 16 or t.split_s % t.block_s:
        raise ValueError(f"MLATiles: block_h and block_s >= 16 (tl.dot), split_s a multiple of block_s; got {t}")
    b, tq, h, nope = q_nope.shape
    rope = q_pe.shape[-1]
    if (cos_table.dim() != 2 or cos_table.shape[-1] * 2 != rope or cos_table.shape != sin_table.shape
            or cos_table.stride() != sin_table.stride() or cos_table.stride(-1) != 1):
        raise ValueError(f"cos_table and sin_table [P, rope / 2] of one layout (unit last stride) for q_pe's rope "
                         f"{rope}; got {tuple(cos_table.shape)} strides {cos_table.stride()} and "
                         f"{tuple(sin_table.shape)} strides {sin_table.stride()}")
    # views where the layout allows (q_nope is a slice of wq_b's output): a copy here would be one more
    # kernel per layer
    return _mla_decode_op(_unit_last_stride(q_nope.reshape(b * tq, h, nope)), _unit_last_stride(q_pe.reshape(b * tq, h, -1)),
                          kv, positions.reshape(b * tq), cos_table, sin_table, wkv_b, tq, dv, float(scale),
                          t.absorb_block_c, t.absorb_warps, t.block_h, t.block_s, t.split_s, t.attend_warps,
                          t.attend_stages, t.out_block_v, t.out_warps).view(b, tq, h, dv)


@_jit
def _absorb_kernel(QN, W, QL, QP, POS, COS, SIN, QPR, R, P, sqn_r, sqn_h, sw_h, sql_r, sql_h, sqp_r, sqp_h, spos_r,
                   stab_p, sqpr_r, sqpr_h, NOPE: tl.constexpr, NOPE_P2: tl.constexpr, C: tl.constexpr,
                   BLOCK_C: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, PDL: tl.constexpr):
    await_previous_kernel(PDL)
    h, pid_c = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, NOPE_P2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    w_ok = (d[:, None] < NOPE) & (c[None, :] < C)
    w = tl.load(W + h * sw_h + d[:, None] * C + c[None, :], mask=w_ok, other=0.0).to(tl.float32)  # W_UK[h] [NOPE, BLOCK_C]
    for r in range(R):
        q = tl.load(QN + r * sqn_r + h * sqn_h + d, mask=d < NOPE, other=0.0).to(tl.float32)
        tl.store(QL + r * sql_r + h * sql_h + c, tl.sum(q[:, None] * w, axis=0).to(QL.dtype.element_ty), mask=c < C)
    if pid_c == 0:  # RoPE on q_pe's adjacent pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)
        i = tl.arange(0, HALF_P2)
        i_ok = i < HALF
        for r in range(R):
            pos = tl.load(POS + r * spos_r).to(tl.int64)
            # the tables' row, as RotaryEmbedding.lookup indexes: a negative position counts from the end,
            # outside [-P, P) the first or last row
            row = tl.minimum(tl.maximum(tl.where(pos < 0, pos + P, pos), 0), P - 1)
            x0 = tl.load(QP + r * sqp_r + h * sqp_h + 2 * i, mask=i_ok, other=0.0).to(tl.float32)
            x1 = tl.load(QP + r * sqp_r + h * sqp_h + 2 * i + 1, mask=i_ok, other=0.0).to(tl.float32)
            cos = tl.load(COS + row * stab_p + i, mask=i_ok, other=0.0).to(tl.float32)
            sin = tl.load(SIN + row * stab_p + i, mask=i_ok, other=0.0).to(tl.float32)
            out = QPR + r * sqpr_r + h * sqpr_h + 2 * i
            tl.store(out, (x0 * cos - x1 * sin).to(QPR.dtype.element_ty), mask=i_ok)
            tl.store(out + 1, (x1 * cos + x0 * sin).to(QPR.dtype.element_ty), mask=i_ok)


@_jit
def _attend_kernel(QL, QP, KV, POS, OP, MP, LP, S, scale, b_of_row_div,
                   sql_r, sql_h, sqp_r, sqp_h, skv_b, skv_s, spos_r, sop_r, sop_s, sop_h, smp_r, smp_s,
                   H: tl.constexpr, C: tl.constexpr, C_P2: tl.constexpr, ROPE: tl.constexpr, ROPE_P2: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_S: tl.constexpr, PDL: tl.constexpr):
    await_previous_kernel(PDL)
    r, sp, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    scale = tl.cast(scale, tl.float32)  # inductor hands a Python float in as fp64: keep the scores fp32
    b = r // b_of_row_div  # rows are (batch, query token) flattened: T rows per sequence
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, C_P2)
    p = tl.arange(0, ROPE_P2)
    h_ok = h < H
    ql_ptrs = QL + r * sql_r + h[:, None] * sql_h + c[None, :]
    qp_ptrs = QP + r * sqp_r + h[:, None] * sqp_h + p[None, :]
    ql = tl.load(ql_ptrs, mask=h_ok[:, None] & (c[None, :] < C), other=0.0)
    qp = tl.load(qp_ptrs, mask=h_ok[:, None] & (p[None, :] < ROPE), other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, C_P2], dtype=tl.float32)
    end = tl.minimum(tl.minimum((sp + 1) * SPLIT_S, S), tl.load(POS + r * spos_r) + 1)  # every slot < end is seen
    for s0 in range(sp * SPLIT_S, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < end
        base = KV + b.to(tl.int64) * skv_b + s[:, None].to(tl.int64) * skv_s
        kl = tl.load(base + c[None, :], mask=s_ok[:, None] & (c[None, :] < C), other=0.0)  # [BLOCK_S, C_P2]
        kp = tl.load(base + C + p[None, :], mask=s_ok[:, None] & (p[None, :] < ROPE), other=0.0)  # [BLOCK_S, ROPE_P2]
        # ieee: fp32 operands (CPU tests) stay fp32, no tf32; BF16 operands ignore it
        scores = (tl.dot(ql, tl.trans(kl), input_precision="ieee")
                  + tl.dot(qp, tl.trans(kp), input_precision="ieee")) * scale  # [BLOCK_H, BLOCK_S] fp32
        scores = tl.where(s_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: exp(-inf) = 0, not NaN
        alpha = tl.exp(m - shift)
        prob = tl.exp(scores - shift[:, None])
        l = l * alpha + tl.sum(prob, axis=1)
        acc = acc * alpha[:, None] + tl.dot(prob.to(kl.dtype), kl, input_precision="ieee")
        m = m_new
    tl.store(OP + r * sop_r + sp * sop_s + h[:, None] * sop_h + c[None, :], acc, mask=h_ok[:, None] & (c[None, :] < C))
    tl.store(MP + r * smp_r + sp * smp_s + h, m, mask=h_ok)
    tl.store(LP + r * smp_r + sp * smp_s + h, l, mask=h_ok)


@_jit
def _out_kernel(OP, MP, LP, W, OUT, n_split, sop_r, sop_s, sop_h, smp_r, smp_s, sw_h, so_r, so_h,
                NOPE: tl.constexpr, C: tl.constexpr, C_P2: tl.constexpr, DV: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr):
    await_previous_kernel(PDL)
    h, v = tl.program_id(1), tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    c = tl.arange(0, C_P2)
    w_ok = (v[:, None] < DV) & (c[None, :] < C)
    w = tl.load(W + h * sw_h + (NOPE + v[:, None]) * C + c[None, :], mask=w_ok, other=0.0).to(tl.float32)  # W_UV[h] rows
    r = tl.program_id(0)
    top = tl.load(MP + r * smp_r + h)
    for sp in range(1, n_split):
        top = tl.maximum(top, tl.load(MP + r * smp_r + sp * smp_s + h))
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros_like(top)
    o = tl.zeros([C_P2], dtype=tl.float32)
    for sp in range(n_split):
        m = tl.load(MP + r * smp_r + sp * smp_s + h)
        lsum = tl.load(LP + r * smp_r + sp * smp_s + h)
        part = tl.load(OP + r * sop_r + sp * sop_s + h * sop_h + c, mask=c < C, other=0.0)
        wgt = tl.exp(m - shift)  # a split that saw nothing: 0
        total += wgt * lsum
        o += wgt * part
    o = tl.where(total > 0, o / total, 0.0)  # [C_P2] o_latent, fp32
    tl.store(OUT + r * so_r + h * so_h + v, tl.sum(w * o[None, :], axis=1).to(OUT.dtype.element_ty), mask=v < DV)


@kernel_op("dsv3::mla_decode")
def _mla_decode_op(q_nope: Tensor, q_pe: Tensor, kv: Tensor, positions: Tensor, cos_table: Tensor, sin_table: Tensor,
                   wkv_b: Tensor, t: int, dv: int,
                   scale: float, absorb_block_c: int, absorb_warps: int, block_h: int, block_s: int, split_s: int,
                   attend_warps: int, attend_stages: int, out_block_v: int, out_warps: int) -> Tensor:
    # q_nope [R, H, nope], q_pe [R, H, rope] (not rotated), kv [B, S, C + rope] (each with a unit last stride),
    # positions [R], cos_table / sin_table [P, rope / 2] (one layout, unit last stride)
    r, h, nope = q_nope.shape
    rope = q_pe.shape[-1]
    c = kv.shape[-1] - rope
    s = kv.shape[1]
    assert wkv_b.shape == (h * (nope + dv), c) and wkv_b.is_contiguous(), "wkv_b [H * (nope + dv), C], contiguous"
    c_p2, rope_p2 = _p2(c, 16), _p2(rope, 16)
    sw_h = (nope + dv) * c  # one head's rows of wkv_b: W_UK[h] (nope rows), then W_UV[h] (dv rows)
    q_latent = torch.empty(r, h, c, dtype=q_nope.dtype, device=q_nope.device)
    q_rot = torch.empty(r, h, rope, dtype=q_pe.dtype, device=q_pe.device)  # q_pe rotated
    block_c = min(absorb_block_c, c_p2)
    launch(_absorb_kernel, r)[(h, _cdiv(c, block_c))](
        q_nope, wkv_b, q_latent, q_pe, positions, cos_table, sin_table, q_rot, r, cos_table.shape[0], q_nope.stride(0),
        q_nope.stride(1), sw_h, q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1),
        positions.stride(0), cos_table.stride(0), q_rot.stride(0), q_rot.stride(1), NOPE=nope, NOPE_P2=_p2(nope), C=c,
        BLOCK_C=block_c, HALF=rope // 2, HALF_P2=_p2(rope // 2), num_warps=absorb_warps)
    # s >= 1 (a decode step always sees its own slot), said to the shape environment too: a compiled step
    # with a symbolic kv_len then knows n_split >= 1 and needs no guard on "n_split == 0" when it allocates
    # the partials (torch 2.11 failed such a guard in a recompile: bench/results run 7)
    torch._check(s >= 1)
    n_split = _cdiv(s, split_s)
    partial = torch.empty(r, n_split, h, c, dtype=torch.float32, device=q_nope.device)
    top = torch.empty(r, n_split, h, dtype=torch.float32, device=q_nope.device)
    total = torch.empty_like(top)
    launch(_attend_kernel, r)[(r, n_split, _cdiv(h, block_h))](
        q_latent, q_rot, kv, positions, partial, top, total, s, scale, t,
        q_latent.stride(0), q_latent.stride(1), q_rot.stride(0), q_rot.stride(1), kv.stride(0), kv.stride(1),
        positions.stride(0), partial.stride(0), partial.stride(1), partial.stride(2), top.stride(0), top.stride(1),
        H=h, C=c, C_P2=c_p2, ROPE=rope, ROPE_P2=rope_p2, BLOCK_H=block_h, BLOCK_S=block_s, SPLIT_S=split_s,
        num_warps=attend_warps, num_stages=attend_stages)
    out = torch.empty(r, h, dv, dtype=q_nope.dtype, device=q_nope.device)
    block_v = min(out_block_v, _p2(dv))
    launch(_out_kernel, r)[(r, h, _cdiv(dv, block_v))](
        partial, top, total, wkv_b, out, n_split, partial.stride(0), partial.stride(1), partial.stride(2),
        top.stride(0), top.stride(1), sw_h, out.stride(0), out.stride(1),
        NOPE=nope, C=c, C_P2=c_p2, DV=dv, BLOCK_V=block_v, num_warps=out_warps)
    return out
