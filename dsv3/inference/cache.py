"""The latent KV cache of MLA (spec §1.4 "What is cached"): per layer and token only the normalised
latent c_kv [kv_lora_rank] and the roped shared key k_pe [qk_rope_head_dim], 576 numbers for V3.

One preallocated tensor `kv` [layers, batch, max_len, kv_lora + rope] holds every layer: the main
model's blocks first, then the MTP blocks used for drafting.  Slot j of a sequence holds its token at
position j, so positions are each sequence's true positions whatever the batch's ragged lengths.
`lengths` [batch] (on device) counts the committed tokens of each sequence; speculative decoding
rolls back rejected drafts by advancing it past the accepted tokens only (`speculative.commit`, in
place: captured graphs keep its address) — the stale slots behind it are simply overwritten later,
and attention never reads them because a query at position p only sees slots j <= p.

Deliberately not here: paging or prefix sharing between sequences, and eviction.  Sizes are fixed
at construction so that decode steps keep static shapes (CUDA graphs need stable addresses).
"""

from __future__ import annotations

import torch


class LatentCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        self.kv = torch.zeros(num_layers, batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # committed tokens per sequence
        # index tensors for `write`, made once instead of every step
        self.layer_ids = torch.arange(num_layers, device=device)
        self.rows = torch.arange(batch, device=device).unsqueeze(1)  # [B, 1]

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, mtp_layers: int = 0) -> "LatentCache":
        """A cache for `model`'s main blocks plus its first `mtp_layers` MTP blocks, in the model's dtype."""
        cfg, ref = model.cfg, model.head.weight
        return cls(cfg.num_layers + mtp_layers, batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, ref.dtype, ref.device)

    @property
    def batch(self) -> int:
        return self.kv.shape[1]

    @property
    def max_len(self) -> int:
        return self.kv.shape[2]

    def write(self, layer: int, positions: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Stores c_kv [B, T, kv_lora] and k_pe [B, T, rope] of tokens at positions [B, T] into their slots.
        Indexed writes, not slicing, so that every sequence writes at its own offset without a host sync;
        all three indices are tensors on `kv` itself (not a scatter into the view kv[layer]), which is the
        form torch.compile keeps in place: the view form makes it copy the layer's slab every step."""
        latent = torch.cat([c_kv, k_pe], dim=-1).to(self.kv.dtype)  # [B, T, 576]
        self.kv.index_put_((self.layer_ids[layer], self.rows, positions), latent)

    def read(self, layer: int, kv_len: int) -> torch.Tensor:
        """The first kv_len slots of a layer: [B, kv_len, kv_lora + rope] (a view, c_kv first)."""
        return self.kv[layer, :, :kv_len]

    def reset(self) -> None:
        self.lengths.zero_()


def causal_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """positions [B, T] -> visible [B, T, kv_len]: slot j is visible to the query at position p iff j <= p.
    Slots past a sequence's length (right padding, rolled-back drafts) lie in its queries' future, so
    this one test is both the causal mask and the per-sequence length mask of a ragged batch."""
    slots = torch.arange(kv_len, device=positions.device)
    return slots <= positions.unsqueeze(-1)
