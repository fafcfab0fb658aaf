"""An FP8 checkpoint's routed experts for a few tokens (decode at batch 1-4 with e4m3 weights): moe_small.py's
slot-major pair of kernels over `FP8InferenceExperts`' stacked e4m3 weights and 128x128 scales.

`FP8InferenceExperts` otherwise runs the training path at every batch: the dispatcher's sort, a
quantising launch, the grouped block-scaled GEMM, SwiGLU, another quantising launch, the second
grouped GEMM and the combine.  Here, as in moe_small.py, each (token, expert) slot reads only its
expert's rows, with no sort and no host sync:

  gate/up   program (slot, I tile): x[token] quantised per 1x128 tile in the program (the bytes of
            `reference.quant_rows`), BLOCK_I gate rows and BLOCK_I up rows of expert IDX[slot] in e4m3,
            each 128-deep dot promoted into fp32 with x's and the block's scales  ->  h[slot] =
            silu(gate) * up, [N*K, I] fp32.
  down      program (token, D tile): for each of the token's K slots in order, h[slot] quantised per
            1x128 tile, rows of w2[e] in e4m3, promoted per 128, times the slot's gate, summed in fp32
            (no atomics: deterministic, and CUDA-graph replays are bit-equal)  ->  out [N, D] in x's dtype.

Tiles (`Fp8ExpertTiles`, swept by bench/gemv_fp8_kernel.py): rows per program and GROUPS 128-wide blocks per
loop step, the weight bytes in flight per step.  The first version read one block a step with 32 output
rows per down program (64 programs at batch 1): with it, batch-1 decoding fell from 521 to 443 tok/s
(H200, run 25); moe_small.py's BF16 sweep had found 4 output rows per down program best.

A shared expert of one routed expert's size, as an FP8 checkpoint holds it (three FP8InferenceLinears), rides
along as one more slot per token with gate 1 (`shared=`, `fusable_shared_fp8`), as in moe_small.py.  Otherwise it runs as its own
three FP8 linears (a quantising launch and a GEMM each), SwiGLU and an add.

So it computes what `small_batch_experts_fp8_reference` does in torch: FP8InferenceExperts' maths with
h kept in fp32 between the GEMMs (the grouped path rounds h to x's dtype before quantising it: BF16's
rounding, below e4m3's).  Needs I a multiple of 128 (FP8InferenceExperts' condition too).

`FP8_SMALL_EXPERTS` (on since H200 run 26): `moe.py` takes these kernels for FP8InferenceExperts under
moe_small's N*K <= E rule.  With gemv_fp8's linears they took an FP8 checkpoint's batch-1 decoding from 1,058.7
to 1,320.6 tok/s (bench config, commit dc331c4; gemv_fp8.py has the table).  DECODE_TILES is the weight-only
form (W8A16: x and h unquantised), the sweep's best at 1 and 4 tokens (38.1 and 73.6 us per layer, against
47.1 and 91.9 for W8A8 with prequantised x, and 31.7 and 79.8 for moe_small's BF16 kernels on twice the bytes).
Ops are `torch.library.triton_op`s, so compiled, captured decode steps trace into them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..fp8 import ops
from ..fp8 import reference as ref
from ..fp8.inference import FP8InferenceLinear
from . import gemv_fp8
from .triton_ops import HAVE_TRITON, await_previous_kernel, kernel_op, launch

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ..fp8.kernels import _quantise, _scale

    _jit = triton.jit
else:  # CPU-only torch builds ship without Triton; FP8 experts then run the grouped reference path

    def _jit(fn):
        return fn


FP8_SMALL_EXPERTS = True  # read at trace time: set it before the first generate
BLOCK = 128


@dataclass(frozen=True)
class Fp8ExpertTiles:
    """Compile-time choices of the two kernels.  Defaults: moe_small.Tiles' best BF16 steps in bytes
    (gate/up 16 rows x 256 columns, down 4 rows x 512), as 128-wide e4m3 blocks.  Steps wider than the
    blocks there are are cut to a divisor of them.  H200 sweep at commit 048ffb2 (bench/gemv_fp8_kernel.py,
    bench/results/gemv_fp8_kernel_2026-12-03_run25_048ffb2.json): the defaults were the fastest at one
    token, 63.7 us per layer (0.79 TB/s of e4m3 weights) against 31.9 us for moe_small's BF16 kernels on
    twice the bytes (3.2 TB/s) and 99.0 us for the first version's tiles.  `prequant` and the single
    reduction after the loop came after that sweep, untimed."""

    up_block_i: int = 16  # gate rows (and as many up rows) per program: a power of two dividing 128
    up_groups: int = 4  # 128-wide blocks of x per loop step
    up_warps: int = 4
    up_stages: int = 3
    down_block_d: int = 4  # output columns per program: a power of two dividing 128
    down_groups: int = 8  # 128-wide blocks of h per loop step
    down_warps: int = 4
    down_stages: int = 3
    prequant: bool = False  # x and h quantised by the training quantiser's launch first, read as e4m3 by the kernels
    weight_only: bool = False  # x and h unquantised (W8A16): each e4m3 block times its scale, in registers


def use_small_batch_fp8(n_tokens: int, k: int, n_experts: int, x: Tensor) -> bool:
    """moe_small.use_small_batch's rule for FP8InferenceExperts, while FP8_SMALL_EXPERTS is set: CUDA, N*K <= E."""
    return FP8_SMALL_EXPERTS and x.is_cuda and x.dtype in (torch.bfloat16, torch.float32) and n_tokens * k <= n_experts


DECODE_TILES = Fp8ExpertTiles(weight_only=True)  # run 26's best at 1 and 4 tokens (W8A16)


def decode_tiles() -> Fp8ExpertTiles:
    """The tiles the decode MoE runs with: DECODE_TILES, in the W8A16 form while gemv_fp8.WEIGHT_ONLY is set
    (one switch for an FP8 checkpoint's decode kernels)."""
    return replace(DECODE_TILES, weight_only=True, prequant=False) if gemv_fp8.WEIGHT_ONLY else DECODE_TILES


def _check(t: Fp8ExpertTiles) -> None:
    for name in ("up_block_i", "down_block_d"):
        b = getattr(t, name)
        if b < 1 or BLOCK % b or b & (b - 1):
            raise ValueError(f"Fp8ExpertTiles.{name} must be a power of two dividing {BLOCK}, got {b}")
    if min(t.up_groups, t.down_groups, t.up_stages, t.down_stages) < 1:
        raise ValueError(f"Fp8ExpertTiles' groups and stages must be >= 1, got {t}")
    if t.weight_only and t.prequant:
        raise ValueError("Fp8ExpertTiles: weight_only reads x and h unquantised; prequant quantises them")


def small_batch_experts_fp8(x: Tensor, indices: Tensor, weights: Tensor, experts,
                            tiles: Fp8ExpertTiles = Fp8ExpertTiles(), shared: tuple | None = None) -> Tensor:
    """x [N, D], indices / weights [N, K] (chosen experts and their gates) through FP8InferenceExperts `experts`
    -> [N, D] in x's dtype.  shared: a shared expert of one routed expert's size as its three
    FP8InferenceLinears (w1, w3, w2), run as one more slot per token with gate 1 (moe_small's `shared=`)."""
    _check(tiles)
    assert experts.inter % BLOCK == 0, "FP8 stacked experts have 128-row gate and up blocks"
    t = tiles
    sh = _checked_shared(shared, experts)
    return _small_batch_experts_fp8_op(x.contiguous(), indices.contiguous(), weights.float().contiguous(), experts.w13,
                                       experts.w13_scale_inv, experts.w2, experts.w2_scale_inv, *sh, experts.pow2,
                                       t.up_block_i, t.up_groups, t.up_warps, t.up_stages, t.down_block_d,
                                       t.down_groups, t.down_warps, t.down_stages, t.prequant, t.weight_only)


def fusable_shared_fp8(shared_mlp, experts) -> tuple | None:
    """A shared expert's (w1, w3, w2) when the kernels can run it as one more slot: three FP8InferenceLinears
    of one routed expert's padded shapes, with the experts' scale kind."""
    if shared_mlp is None:
        return None
    lins = (shared_mlp.w1, shared_mlp.w3, shared_mlp.w2)
    return lins if _fusable(lins, experts) else None


def _fusable(lins, experts) -> bool:
    if not all(type(lin) is FP8InferenceLinear for lin in lins):
        return False
    gate_shape, down_shape = experts.w13.shape[1:], experts.w2.shape[1:]
    return (lins[0].weight.shape == lins[1].weight.shape == (gate_shape[0] // 2, gate_shape[1])
            and lins[2].weight.shape == down_shape and all(lin.pow2 == experts.pow2 for lin in lins)
            and all(lin.weight.is_contiguous() and lin.weight_scale_inv.is_contiguous() for lin in lins))


def _checked_shared(shared, experts) -> tuple:
    """(w1, w1_s, w3, w3_s, w2, w2_s) of a fused shared expert, or six Nones."""
    if shared is None:
        return (None,) * 6
    assert _fusable(shared, experts), \
        "a fused FP8 shared expert: three FP8InferenceLinears of one routed expert's shapes and scale kind"
    return tuple(t for lin in shared for t in (lin.weight, lin.weight_scale_inv))


def gate_up_fp8(x: Tensor, indices: Tensor, w13: Tensor, w13_s: Tensor, pow2: bool,
                tiles: Fp8ExpertTiles = Fp8ExpertTiles()) -> Tensor:
    """The first kernel alone: h [N*K, I] fp32 (tests)."""
    _check(tiles)
    t = tiles
    return _gate_up_fp8_op(x.contiguous(), indices.contiguous(), w13, w13_s, pow2, t.up_block_i, t.up_groups,
                           t.up_warps, t.up_stages, t.prequant, t.weight_only)


def down_fp8(h: Tensor, indices: Tensor, weights: Tensor, w2: Tensor, w2_s: Tensor, dim: int, out_dtype: torch.dtype,
             pow2: bool, tiles: Fp8ExpertTiles = Fp8ExpertTiles()) -> Tensor:
    """The second kernel alone, on a given h [N*K, I] (tests)."""
    _check(tiles)
    t = tiles
    return _down_fp8_op(h.contiguous(), indices.contiguous(), weights.float().contiguous(), w2, w2_s, dim, out_dtype,
                        pow2, t.down_block_d, t.down_groups, t.down_warps, t.down_stages, t.prequant,
                        t.weight_only)


def small_batch_experts_fp8_reference(x: Tensor, indices: Tensor, weights: Tensor, w13: Tensor, w13_s: Tensor, w2: Tensor,
                                      w2_s: Tensor, dim: int, pow2: bool, h: Tensor | None = None,
                                      weight_only: bool = False, shared: tuple | None = None) -> Tensor:
    """The twin in torch (reference.quant_rows and reference.gemm per slot), h [N*K, I] fp32 between the GEMMs;
    with h given, only the down half (its test).  weight_only: x and h unquantised, against the dequantised
    weights (reference.dequant_blocks), in fp32.  shared: (w1, w1_s, w3, w3_s, w2, w2_s), a shared expert's
    e4m3 weights and scales, added to every token by the same maths with gate 1."""
    n, k = indices.shape
    inter = w2.shape[-1]

    def linear(a: Tensor, w: Tensor, w_s: Tensor) -> Tensor:  # a [1, <= Kp] fp32 -> [1, Np] fp32
        if weight_only:
            return F.pad(a, (0, w.shape[-1] - a.shape[-1])) @ ref.dequant_blocks(w, w_s).T
        return ref.gemm(*ref.quant_rows(a, pow2), w, w_s)

    if h is None:
        rows = []
        for slot, e in enumerate(indices.reshape(-1).tolist()):
            gate_up = linear(x[slot // k:slot // k + 1].float(), w13[e], w13_s[e])  # [1, 2I] fp32
            rows.append(F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
        h = torch.cat(rows)
    out = torch.zeros(n, dim, dtype=torch.float32, device=x.device)
    for slot, e in enumerate(indices.reshape(-1).tolist()):
        y = linear(h[slot:slot + 1].float(), w2[e], w2_s[e])[:, :dim]
        out[slot // k] += weights.reshape(-1)[slot].float() * y[0]
    if shared is not None:
        w1, s1, w3, s3, ws2, ss2 = shared
        for t in range(n):
            xt = x[t:t + 1].float()
            hs = F.silu(linear(xt, w1, s1)[:, :inter]) * linear(xt, w3, s3)[:, :inter]
            out[t] += linear(hs, ws2, ss2)[0, :dim]
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------ kernels


@_jit
def _block_operand(v, S, PREQ: tl.constexpr, A16: tl.constexpr, POW2: tl.constexpr):
    """One 128-wide block of x or h, fp32 as loaded -> (the values the products take, their scale): PREQ already
    e4m3, its scale read at S; A16 as it is, scale 1; else quantised here as one 1x128 tile."""
    if PREQ:
        s = tl.load(S)
        q = v
    elif A16:
        s = 1.0
        q = v
    else:
        s = _scale(tl.max(tl.abs(v), axis=0), POW2)
        q = _quantise(v, s, True).to(tl.float32)
    return q, s


@_jit
def _gate_up_fp8_kernel(X, XS, sxm, sxk, IDX, W13, WS13, SW1, SS1, SW3, SS3, H, NK, D, I: tl.constexpr,
                        DP: tl.constexpr, K: tl.constexpr, BLOCK_I: tl.constexpr, GROUPS: tl.constexpr,
                        POW2: tl.constexpr, PREQ: tl.constexpr, A16: tl.constexpr, PDL: tl.constexpr):
    # grid (N*K [+ N], I / BLOCK_I): h[slot, I tile] = silu(gate rows . xq) * (up rows . xq), promoted per 128 of D;
    # slots past NK are the shared expert's (one per token): gate rows SW1, up rows SW3, scales SS1 / SS3;
    # GROUPS divides DP / 128 (the launcher picks it so).  PREQ: X is x quantised, e4m3 [N, DP] (D = DP), with
    # scales XS at strides (sxm, sxk).  A16: x as it is, against the weights' blocks times their scales (W8A16).
    # Each block's products are scaled, summed over K once after the loop.
    slot = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = tl.arange(0, 128)
    await_previous_kernel(PDL)
    if slot < NK:  # expert IDX[slot]: its gate rows, then its up rows I further; int64 offsets
        token = slot // K
        e = tl.load(IDX + slot).to(tl.int64)
        gate_w = W13 + e * (2 * I * DP)
        up_w = gate_w + I * DP
        gate_s = WS13 + e * ((2 * I // 128) * (DP // 128))
        up_s = gate_s + (I // 128) * (DP // 128)
    else:
        token = slot - NK
        gate_w = SW1
        up_w = SW3
        gate_s = SS1
        up_s = SS3
    g_row = gate_w + offs_i[:, None] * DP + offs_k[None, :]  # [BLOCK_I, 128] at column 0
    u_row = up_w + offs_i[:, None] * DP + offs_k[None, :]
    g_scale = gate_s + (pid_i * BLOCK_I // 128) * (DP // 128)
    u_scale = up_s + (pid_i * BLOCK_I // 128) * (DP // 128)
    acc_g = tl.zeros((BLOCK_I, 128), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_I, 128), dtype=tl.float32)
    for k0 in range(0, DP // 128, GROUPS):
        for g in tl.static_range(GROUPS):
            kb = k0 + g
            d = kb * 128 + offs_k
            x = tl.load(X + token * D + d, mask=d < D, other=0.0).to(tl.float32)
            xq, s = _block_operand(x, XS + token * sxm + kb * sxk, PREQ, A16, POW2)
            wg = tl.load(g_row + kb * 128).to(tl.float32)
            wu = tl.load(u_row + kb * 128).to(tl.float32)
            acc_g += wg * xq[None, :] * (s * tl.load(g_scale + kb))
            acc_u += wu * xq[None, :] * (s * tl.load(u_scale + kb))
    gate = tl.sum(acc_g, axis=1)
    h = gate / (1.0 + tl.exp(-gate)) * tl.sum(acc_u, axis=1)
    tl.store(H + slot * I + offs_i, h)


@_jit
def _down_fp8_kernel(H, HS, shm, shk, IDX, GATES, W2, WS2, SW2, SS2, OUT, NK, D, I: tl.constexpr, DP: tl.constexpr,
                     K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_D: tl.constexpr, GROUPS: tl.constexpr,
                     POW2: tl.constexpr, PREQ: tl.constexpr, A16: tl.constexpr, PDL: tl.constexpr):
    # grid (N, cdiv(D, BLOCK_D)): out[token, D tile] = sum over its K slots, in order, of gate * (w2[e] rows . hq),
    # then (SLOTS = K + 1) the shared expert's slot NK + token, rows of SW2 with scales SS2, gate 1;
    # GROUPS divides I / 128.  PREQ: H is h quantised, e4m3 [N*K, I], with scales HS at strides (shm, shk).
    # A16: h as it is (fp32), against w2's blocks times their scales (W8A16).
    # Products scaled by their block's scales and the slot's gate, summed over I once, after the loop.
    token = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # < DP: w2's rows are padded to 128
    offs_k = tl.arange(0, 128)
    await_previous_kernel(PDL)
    total = tl.zeros((BLOCK_D, 128), dtype=tl.float32)
    for j in range(0, SLOTS):
        # values both branches would define go through tl.where and a masked load (one type on either side)
        slot = tl.where(j < K, token * K + j, NK + token)
        gate = tl.load(GATES + slot, mask=j < K, other=1.0)
        if j < K:
            e = tl.load(IDX + slot).to(tl.int64)
            w_base = W2 + e * (DP * I)
            s_base = WS2 + e * ((DP // 128) * (I // 128))
        else:
            w_base = SW2
            s_base = SS2
        w_row = w_base + offs_d[:, None] * I + offs_k[None, :]  # [BLOCK_D, 128] at column 0
        w_scale = s_base + (pid_d * BLOCK_D // 128) * (I // 128)
        for k0 in range(0, I // 128, GROUPS):
            for g in tl.static_range(GROUPS):
                kb = k0 + g
                h = tl.load(H + slot * I + kb * 128 + offs_k).to(tl.float32)
                hq, s = _block_operand(h, HS + slot * shm + kb * shk, PREQ, A16, POW2)
                w = tl.load(w_row + kb * 128).to(tl.float32)
                total += w * hq[None, :] * (s * tl.load(w_scale + kb) * gate)
    total = tl.sum(total, axis=1)
    tl.store(OUT + token * D + offs_d, total.to(OUT.dtype.element_ty), mask=offs_d < D)


# ------------------------------------------------------------------------------------------ the ops


def _quantised(x, pow2, prequant):
    """(x or its e4m3 copy, scales or an empty tensor, their strides) for a kernel's X / XS arguments."""
    if not prequant:
        return x, x.new_empty(0, dtype=torch.float32), 0, 0
    q, s = ops.quant_rows(x, pow2, ops.default_backend(x.device))
    return q, s, *s.stride()


def _launch_gate_up(x, indices, w13, w13_s, sw1, ss1, sw3, ss3, pow2, block_i, groups, warps, stages, prequant,
                    weight_only):
    n, k = indices.shape
    _, two_i, dp = w13.shape
    shared = sw1 is not None
    if not shared:  # never read: no shared slot exists; any pointers of the right types will do
        sw1, ss1, sw3, ss3 = w13, w13_s, w13, w13_s
    h = torch.empty(n * k + (n if shared else 0), two_i // 2, dtype=torch.float32, device=x.device)
    xq, xs, sxm, sxk = _quantised(x, pow2, prequant)
    launch(_gate_up_fp8_kernel, n)[(h.shape[0], two_i // 2 // block_i)](
        xq, xs, sxm, sxk, indices, w13, w13_s, sw1, ss1, sw3, ss3, h, n * k, xq.shape[1], I=two_i // 2, DP=dp, K=k,
        BLOCK_I=block_i,
        GROUPS=math.gcd(groups, dp // BLOCK), POW2=pow2, PREQ=prequant, A16=weight_only, num_warps=warps,
        num_stages=stages)
    return h


def _launch_down(h, indices, weights, w2, w2_s, sw2, ss2, dim, out_dtype, pow2, block_d, groups, warps, stages,
                 prequant, weight_only):
    n, k = indices.shape
    _, dp, inter = w2.shape
    shared = sw2 is not None
    if not shared:
        sw2, ss2 = w2, w2_s
    out = torch.empty(n, dim, dtype=out_dtype, device=h.device)
    hq, hs, shm, shk = _quantised(h, pow2, prequant)
    launch(_down_fp8_kernel, n)[(n, (dim + block_d - 1) // block_d)](
        hq, hs, shm, shk, indices, weights, w2, w2_s, sw2, ss2, out, n * k, dim, I=inter, DP=dp, K=k,
        SLOTS=k + shared, BLOCK_D=block_d,
        GROUPS=math.gcd(groups, inter // BLOCK), POW2=pow2, PREQ=prequant, A16=weight_only, num_warps=warps,
        num_stages=stages)
    return out


@kernel_op("dsv3::small_batch_experts_fp8")
def _small_batch_experts_fp8_op(x: Tensor, indices: Tensor, weights: Tensor, w13: Tensor, w13_s: Tensor, w2: Tensor,
                                w2_s: Tensor, sw1: Tensor | None, ss1: Tensor | None, sw3: Tensor | None,
                                ss3: Tensor | None, sw2: Tensor | None, ss2: Tensor | None, pow2: bool,
                                up_block_i: int, up_groups: int, up_warps: int, up_stages: int, down_block_d: int,
                                down_groups: int, down_warps: int, down_stages: int, prequant: bool,
                                weight_only: bool) -> Tensor:
    h = _launch_gate_up(x, indices, w13, w13_s, sw1, ss1, sw3, ss3, pow2, up_block_i, up_groups, up_warps, up_stages,
                        prequant, weight_only)
    return _launch_down(h, indices, weights, w2, w2_s, sw2, ss2, x.shape[1], x.dtype, pow2, down_block_d, down_groups,
                        down_warps, down_stages, prequant, weight_only)


@kernel_op("dsv3::gate_up_fp8")
def _gate_up_fp8_op(x: Tensor, indices: Tensor, w13: Tensor, w13_s: Tensor, pow2: bool, block_i: int, groups: int,
                    warps: int, stages: int, prequant: bool, weight_only: bool) -> Tensor:
    return _launch_gate_up(x, indices, w13, w13_s, None, None, None, None, pow2, block_i, groups, warps, stages, prequant,
                           weight_only)


@kernel_op("dsv3::down_fp8")
def _down_fp8_op(h: Tensor, indices: Tensor, weights: Tensor, w2: Tensor, w2_s: Tensor, dim: int, out_dtype: torch.dtype,
                 pow2: bool, block_d: int, groups: int, warps: int, stages: int, prequant: bool,
                 weight_only: bool) -> Tensor:
    return _launch_down(h, indices, weights, w2, w2_s, None, None, dim, out_dtype, pow2, block_d, groups, warps, stages,
                        prequant, weight_only)
