"""The model's forward pass over the latent cache, assembled from its own modules.

Same order as `Transformer.forward` (embedding -> blocks -> norm, then MTP), with two substitutions:
attention reads and writes the cache (`cached_mla`) and MoE layers skip host syncs (`moe_residual_forward`).
The residual adds sit where the next consumer can take them (`block_forward`).
Weights are only read, never copied or changed (nor the module modes), so a trainer can sample mid-run.

Positions are explicit [B, T] tensors: each sequence of a ragged batch sits at its true positions,
and a step's shapes (B, T, kv_len) are all the host has to know, which is what CUDA graphs need.
The output head is not applied here: callers pick the positions whose logits they need.
"""

from __future__ import annotations

import torch

from ..model import Transformer
from ..model.block import Block
from .attention import StepRope, cached_mla
from .cache import LatentCache, causal_mask
from .gemv import decode_linear, paired_linear, paired_linear_after_norm
from .moe import moe_residual_forward

# The residual add and RMSNorm before wq_a + wkv_a inside their pair GEMV's launch, and before routing
# inside the routing GEMV's (one launch fewer each: 7 + 7 per step at the bench config).  Read at trace
# time: set them before the first generate; bench/decode.py's `attn_norm` and `ffn_norm` sections flip them.
ATTN_NORM_IN_GEMV = True
FFN_NORM_IN_ROUTE = True


def block_forward(block: Block, x: torch.Tensor, rope: StepRope, cache: LatentCache, layer: int,
                  positions: torch.Tensor, visible: torch.Tensor | None, mode: str,
                  select: torch.Tensor | None = None,
                  delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block on the residual stream x + delta [B, T, D] (delta: the previous block's FFN output, not yet
    added; None: the stream is x).  Returns the stream after the block in the same form, (x, delta), so
    that the next consumer adds it: the next block's attention norm, or the final norm.  With `select`
    [B] (an index into T per sequence) both are [B, 1, D]: attention still writes every position's
    latents, the FFN runs on the selected positions only.

    With ATTN_NORM_IN_GEMV and FFN_NORM_IN_ROUTE, the residual adds and RMSNorms before wq_a + wkv_a and
    before routing run inside those launches where the kernels take them (gemv.small_m_linear_pair_norm,
    route_small.small_route_norm); else, and as the twin, torch adds and norms."""
    attn = block.attn
    fused = None
    if ATTN_NORM_IN_GEMV and delta is not None and attn.cfg.q_lora_rank:
        fused = paired_linear_after_norm(block.attn_norm, attn.wq_a, attn.wkv_a, x, delta)
    if fused is not None:
        linear, x = fused
        a = cached_mla(attn, x, rope, cache, layer, positions, visible, mode, linear=linear)
    else:
        x = x if delta is None else x + delta
        a = cached_mla(attn, block.attn_norm(x), rope, cache, layer, positions, visible, mode)
    if select is not None:
        rows = torch.arange(x.shape[0], device=x.device)
        x, a = x[rows, select].unsqueeze(1), a[rows, select].unsqueeze(1)
    if block.is_moe:
        return moe_residual_forward(block.ffn, block.ffn_norm, x, a, FFN_NORM_IN_ROUTE)
    x = x + a
    h = block.ffn_norm(x)
    return x, block.ffn(h, linear=paired_linear(block.ffn.w1, block.ffn.w3, h))  # w1 and w3 in one launch


def _visible(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """causal_mask over kv_len slots.  A compiled step traces kv_len as an int symbol, whose range is
    unbounded (ints may be negative): saying kv_len >= 1 once lets every size derived from it (the cache
    view, the MLA kernels' split count) be known non-empty without guards."""
    torch._check(kv_len >= 1)
    return causal_mask(positions, kv_len)


def main_forward(model: Transformer, cache: LatentCache, tokens: torch.Tensor, positions: torch.Tensor,
                 kv_len: int, mode: str = "absorb", fresh: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, positions [B, T] -> (h after the final norm, h before it), both [B, T, D].
    The first is what the head reads; MTP reads one or the other (cfg.mtp_hidden_after_norm)."""
    rope = StepRope.at(model.rope, positions)  # cos, sin [B, T, rope/2] and the tables the kernels index
    visible = None if fresh else _visible(positions, kv_len)  # [B, T, kv_len], the same for every layer
    x, delta = model.embed(tokens), None
    for i, block in enumerate(model.layers):
        x, delta = block_forward(block, x, rope, cache, i, positions, visible, mode, delta=delta)
    x = x + delta
    return model.norm(x), x


def mtp_forward(model: Transformer, cache: LatentCache, h_prev: torch.Tensor, tokens_ahead: torch.Tensor,
                positions: torch.Tensor, kv_len: int, mode: str = "absorb", fresh: bool = False,
                select: torch.Tensor | None = None) -> torch.Tensor:
    """MTP depth 1 (spec §1.9) at positions [B, T]: h_prev [B, T, D] is the main model's hidden state at
    position i, tokens_ahead [B, T] the token at i+1.  Its cache layer follows the main layers.
    Returns the MTP block's output [B, T, D] ([B, 1, D] at `select` [B], when a draft needs only that
    position's: the MoE then runs on one token per sequence); `mtp_logits` of it predict the tokens at i+2."""
    mtp = model.mtp[0]
    rope = StepRope.at(model.rope, positions)
    visible = None if fresh else _visible(positions, kv_len)
    x = decode_linear(mtp.eh_proj, torch.cat([mtp.enorm(model.embed(tokens_ahead)), mtp.hnorm(h_prev)], dim=-1))
    x, delta = block_forward(mtp.block, x, rope, cache, model.cfg.num_layers, positions, visible, mode, select)
    return x + delta


def mtp_logits(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    """MTP block output [..., D] -> fp32 logits [..., V] through the shared head (h's dtype's values, widened
    by the GEMV itself where it runs: no cast launch)."""
    return decode_linear(model.head, model.mtp[0].head_norm(h), float_out=True)
