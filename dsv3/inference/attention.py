"""MLA over the latent cache: the absorbed form for decoding, the expanded form as its twin.

Absorbed (spec §1.4 "Weight absorption", DeepSeek's attn_impl="absorb"; FlashMLA's "MQA mode"):
    W_UK, W_UV  = wkv_b viewed [H, nope + dv, kv_lora], split per head
    q_latent    = q_nope · W_UK                                   [B, T, H, kv_lora]
    scores      = ([q_latent | q_pe] · [c_kv | k_pe]) * scale     one 576-wide dot per (head, slot)
    o_latent    = softmax_fp32(scores) · c_kv                     [B, T, H, kv_lora]
    o           = o_latent · W_UV^T  -> wo
All heads share the 576-wide cached keys, so per sequence it is two batched matmuls with T·H query
rows: the cache is read once per step, never expanded to per-head keys and values.

Expanded (the model's own MHA form): k = [W_UK c_kv ; k_pe], v = W_UV c_kv for every slot, then
ordinary attention.  It is cheaper in FLOPs for long prompts, so prefill into an empty cache uses it
through the model's own attention core (`MLA.attn_impl`, causal); with a mask it is the slow,
obviously-correct twin that the tests hold equal to the absorbed form.

For a few query rows on CUDA, `cached_mla` takes `mla_decode.py`'s three Triton kernels instead
(behind `MLA_KERNEL`, on by default, see there; they also rotate q_pe, by the rope tables' rows at the
positions), and `absorbed_attention` here is their twin.  Not here: FP8 weights used as FP8.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..model.attention import ATTENTION_IMPLS, MLA
from ..model.rope import RotaryEmbedding, apply_rope
from . import latent_small
from . import mla_decode as mla_kernels
from .cache import LatentCache
from .gemv import decode_linear, paired_linear

ATTN_MODES = ("absorb", "expand")


class StepRope(NamedTuple):
    """RoPE for a step's rows, in both forms its consumers take: cos, sin [B, T, rope/2] at the positions
    (the torch code rotates with them) and the model's fp32 tables [P, rope/2] (the decode kernels read
    the row at each position themselves; compiled, the unused cos/sin then cost nothing)."""

    cos: torch.Tensor
    sin: torch.Tensor
    cos_table: torch.Tensor
    sin_table: torch.Tensor

    @classmethod
    def at(cls, rope: RotaryEmbedding, positions: torch.Tensor) -> StepRope:
        return cls(*rope.lookup(positions), rope.cos_table, rope.sin_table)


def _split_wkv_b(attn: MLA) -> tuple[torch.Tensor, torch.Tensor]:
    """wkv_b [H*(nope+dv), kv_lora] -> W_UK [H, nope, kv_lora], W_UV [H, dv, kv_lora] (views)."""
    w = attn.wkv_b.weight.view(attn.n_heads, attn.nope + attn.dv, -1)
    return w[:, :attn.nope], w[:, attn.nope:]


def absorbed_attention(attn: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                       visible: torch.Tensor) -> torch.Tensor:
    """q_nope [B, T, H, nope], roped q_pe [B, T, H, rope], kv [B, S, kv_lora + rope], visible [B, T, S]
    -> o [B, T, H, dv]; in torch ops (the MLA kernels' twin)."""
    b, t, h, _ = q_nope.shape
    w_uk, w_uv = _split_wkv_b(attn)
    c_kv = kv[..., :w_uk.shape[-1]]  # [B, S, kv_lora]
    q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
    q = torch.cat([q_latent, q_pe], dim=-1).reshape(b, t * h, -1)  # [B, T*H, 576]
    scores = torch.bmm(q, kv.transpose(1, 2)).float() * attn.softmax_scale  # [B, T*H, S]
    scores = torch.where(visible.unsqueeze(2), scores.view(b, t, h, -1), float("-inf"))
    probs = scores.softmax(dim=-1).to(kv.dtype).view(b, t * h, -1)
    o_latent = torch.bmm(probs, c_kv).view(b, t, h, -1)  # [B, T, H, kv_lora]
    return torch.einsum("bthc,hdc->bthd", o_latent, w_uv)


def expanded_attention(attn: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                       visible: torch.Tensor | None) -> torch.Tensor:
    """The same inputs as `absorbed_attention` -> o [B, T, H, dv], by expanding every slot's keys and
    values.  visible=None means queries at positions 0..T-1 over exactly T fresh slots (causal)."""
    c_kv, k_pe = kv.split([attn.cfg.kv_lora_rank, attn.rope], dim=-1)
    k_nope, v = attn.wkv_b(c_kv).unflatten(-1, (attn.n_heads, attn.nope + attn.dv)).split([attn.nope, attn.dv], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, qk]
    k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, attn.n_heads, -1)], dim=-1).transpose(1, 2)  # [B, H, S, qk]
    v = v.transpose(1, 2)  # [B, H, S, dv]
    if visible is None:
        return ATTENTION_IMPLS[attn.attn_impl](q, k, v, attn.softmax_scale).transpose(1, 2)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.softmax_scale  # [B, H, T, S]
    probs = scores.masked_fill(~visible.unsqueeze(1), float("-inf")).softmax(dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype).transpose(1, 2)


def cached_mla(attn: MLA, x: torch.Tensor, rope: StepRope, cache: LatentCache, layer: int, positions: torch.Tensor,
               visible: torch.Tensor | None, mode: str = "absorb", linear=None) -> torch.Tensor:
    """One MLA layer over the cache.  x [B, T, D] at positions [B, T] (`rope` at the same positions); writes
    the tokens' latents into `layer`'s slots, then attends over the first kv_len slots as `visible`
    [B, T, kv_len] allows: it must be `causal_mask(positions, kv_len)` (one serves every layer of a step;
    the MLA kernels rebuild it from the positions).  visible=None promises positions == arange(T) for every
    row of an empty cache (a prefill): attention then runs causally over the latents just computed,
    with the model's own core.  Returns [B, T, D].
    `linear` (gemv.paired_linear_after_norm's): answers wq_a and wkv_a of the normed input, computed by
    the caller; x is then the un-normed residual, read for its shape, dtype and device only."""
    if linear is None:  # wq_a and wkv_a read the same x: one GEMV launch for both while the kernel takes them
        linear = paired_linear(attn.wq_a, attn.wkv_a, x) if attn.cfg.q_lora_rank else decode_linear
    if latent_small.LATENT_KERNEL and latent_small.use_latent_kernel(attn, x, cache, visible):
        # decode: q_norm, kv_norm, k_pe's rope and the cache write in one launch (latent_small.py), then
        # project_q's wq_b and split
        q_a = latent_small.norm_rope_write(attn, linear(attn.wq_a, x), linear(attn.wkv_a, x), rope.cos_table,
                                           rope.sin_table, cache, layer, positions)
        q = linear(attn.wq_b, q_a).unflatten(-1, (attn.n_heads, attn.nope + attn.rope))
        q_nope, q_pe = q.split([attn.nope, attn.rope], dim=-1)  # q_pe not yet rotated
    else:
        q_nope, q_pe = attn.project_q(x, rope.cos, rope.sin, linear, rope=False)  # q_pe not yet rotated
        c_kv, k_pe = attn.project_latent(x, rope.cos, rope.sin, linear)
        cache.write(layer, positions, c_kv, k_pe)
    if visible is None:
        q_pe = apply_rope(q_pe, rope.cos, rope.sin)
        o = expanded_attention(attn, q_nope, q_pe, torch.cat([c_kv, k_pe], dim=-1), None)
    else:
        kv = cache.read(layer, visible.shape[-1])
        if mode == "absorb" and mla_kernels.MLA_KERNEL and mla_kernels.use_mla_decode(q_nope, kv, attn.wkv_b):
            # the kernels rotate q_pe and rebuild `visible` from the positions
            o = mla_kernels.mla_decode(q_nope, q_pe, kv, positions, rope.cos_table, rope.sin_table,
                                       attn.wkv_b.weight, attn.dv, attn.softmax_scale)
        else:
            core = absorbed_attention if mode == "absorb" else expanded_attention
            o = core(attn, q_nope, apply_rope(q_pe, rope.cos, rope.sin), kv, visible)
    return decode_linear(attn.wo, o.flatten(-2))
