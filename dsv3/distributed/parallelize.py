"""`parallelize(module, mesh, cfg)`: the one place parallelism is applied to model code (design principle 2).

In a fixed order, in place, on a `Transformer` or a pipeline `Stage` (anything with `layers`, optional
`mtp`, and its own leftover parameters):
  1. expert parallel   each MoE's experts split E/ep over the EP mesh, all-to-all dispatcher installed;
  2. recomputation     each block's forward under `torch.utils.checkpoint` (inputs kept, rest recomputed);
  3. compile           `Module.compile` per block (one graph shared by all MoE blocks);
  4. FSDP2             under EP, each block's experts first get their own `fully_shard` over the
                       dp_shard_mod_ep ranks (torchtitan's dp x ep layout); then `fully_shard` per block
                       over all of dp_shard for everything else; then the root for embedding, norms,
                       head and MTP projections.  HSDP when dp_replicate > 1.
The order matters: EP changes which expert weights exist before FSDP shards them; checkpointing wraps
the forward that compile traces; FSDP goes last so its hooks wrap the compiled, checkpointed blocks.

Gradients: FSDP averages over its mesh, so every non-expert gradient is the mean over the global batch,
as on one device.  An expert's gradient also sums contributions from its EP peers' tokens (through the
all-to-all backward); `ShardedExperts` scales it by 1/ep, and FSDP's average over the experts' own
mesh does the rest.  (FSDP's `set_gradient_divide_factor` would say the same, but with a mesh of size
one it divides twice under force-sum reduction, and gloo has no PREMUL_SUM.)

Mixed precision stays the trainer's autocast policy (fp32 master weights all-gathered in fp32);
FSDP's own bf16 parameter casting is not used, so the router and norms keep fp32 weights.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

from ..model.block import Block
from ..model.moe import MoE
from .expert_parallel import apply_expert_parallel
from .mesh import ParallelConfig, ParallelMesh


def blocks_of(module: nn.Module) -> list[Block]:
    """Decoder blocks of a Transformer or a Stage, main layers first, then MTP blocks."""
    layers = module.layers.values() if isinstance(module.layers, nn.ModuleDict) else module.layers
    mtp = getattr(module, "mtp", None) or []
    return list(layers) + [m.block for m in mtp]


def parallelize(module: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig) -> nn.Module:
    blocks = blocks_of(module)
    if cfg.ep > 1:
        for block in blocks:
            if isinstance(block.ffn, MoE):
                apply_expert_parallel(block.ffn, mesh.ep)
    if cfg.recompute:
        for block in blocks:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    if cfg.compile:
        for block in blocks:
            block.compile()
    # under a pipeline every micro-batch would all-gather again: keep blocks gathered until backward
    reshard = cfg.pp == 1
    for block in blocks:
        if cfg.ep > 1 and isinstance(block.ffn, MoE):
            experts = fully_shard(block.ffn.experts, mesh=mesh.experts_fsdp, reshard_after_forward=reshard)
            register_fsdp_forward_method(experts, "forward_grouped")  # MoE calls it, not forward
        fully_shard(block, mesh=mesh.fsdp, reshard_after_forward=reshard)
    fully_shard(module, mesh=mesh.fsdp, reshard_after_forward=reshard)
    return module
