"""How the ranks are laid out: `ParallelConfig` -> a checked layout -> a named `DeviceMesh`.

The world is a 4-D mesh, slowest dimension first (torchtitan's layout without TP/CP):

    pp x dp_replicate x dp_shard_mod_ep x ep          dp_shard = dp_shard_mod_ep x ep

Every rank of a pipeline stage is a data-parallel rank: it reads its own slice of the global batch.
Expert parallelism is carved out of the sharded data-parallel ranks (the `ep` ranks of a group trade
tokens with all-to-all; they read different data), so the non-expert weights are FSDP-sharded over
all of dp_shard (HSDP: replicated over dp_replicate), while each expert weight is split E/ep ways by
EP and FSDP-sharded over the dp_shard_mod_ep ranks that remain.

`ParallelConfig.check` turns every impossible layout into one line that says what to change, before any
process group is touched.  Not here: which modules get sharded (parallelize.py), stages (pipeline.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ModelConfig

SCHEDULES = ("1f1b", "dualpipev")


@dataclass(frozen=True)
class ParallelConfig:
    dp_shard: int = -1  # FSDP ranks; -1: whatever the world size leaves after pp and dp_replicate
    dp_replicate: int = 1  # HSDP replicas (each a full FSDP group)
    ep: int = 1  # expert-parallel ranks (a divisor of dp_shard)
    pp: int = 1  # pipeline ranks
    pp_schedule: str = "1f1b"  # "1f1b": one stage per rank; "dualpipev": stages r and 2P-1-r on rank r
    n_microbatches: int | None = None  # per pipeline step; None: pp (1f1b) or 2*pp (dualpipev)
    recompute: bool = False  # activation recomputation per block
    compile: bool = False  # torch.compile per block

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that read different data (EP ranks included)."""
        return self.dp_replicate * self.dp_shard

    @property
    def n_stages(self) -> int:
        if self.pp == 1:
            return 1
        return 2 * self.pp if self.pp_schedule == "dualpipev" else self.pp

    @property
    def microbatches(self) -> int:
        """Micro-batches per pipeline step (1 without a pipeline)."""
        if self.pp == 1:
            return 1
        if self.n_microbatches is not None:
            return self.n_microbatches
        return 2 * self.pp if self.pp_schedule == "dualpipev" else self.pp

    def check(self, world_size: int, model: ModelConfig) -> ParallelConfig:
        """Returns the config with dp_shard resolved; raises ValueError (one line) for an impossible layout."""
        for name in ("dp_replicate", "ep", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_microbatches is not None and self.n_microbatches < 1:  # 0 once fell back to the default unnoticed
            raise ValueError(f"--n-microbatches must be >= 1, got {self.n_microbatches}")
        if self.pp_schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {self.pp_schedule!r}; choose from {', '.join(SCHEDULES)}")
        cfg = self
        if cfg.dp_shard == -1:
            rest, rem = divmod(world_size, cfg.pp * cfg.dp_replicate)
            if rem or rest < 1:
                raise ValueError(f"world size {world_size} is not divisible by pp {cfg.pp} x dp_replicate {cfg.dp_replicate}")
            cfg = replace(cfg, dp_shard=rest)
        if cfg.dp_shard < 1:
            raise ValueError(f"--dp-shard must be >= 1 (or -1 for the rest of the world), got {cfg.dp_shard}")
        if cfg.pp * cfg.dp_replicate * cfg.dp_shard != world_size:
            raise ValueError(f"world size {world_size} != pp {cfg.pp} x dp_replicate {cfg.dp_replicate} x dp_shard {cfg.dp_shard}")
        if cfg.dp_shard % cfg.ep:
            raise ValueError(f"ep {cfg.ep} must divide dp_shard {cfg.dp_shard}: expert-parallel ranks are a subset of the FSDP ranks")
        if cfg.ep > 1:
            _check_experts(model, cfg.ep)
        if cfg.pp > 1:
            if cfg.n_stages > model.num_layers:
                raise ValueError(f"{cfg.n_stages} pipeline stages ({cfg.pp_schedule}, pp {cfg.pp}) need at least as many layers; "
                                 f"the model has {model.num_layers}")
            # DualPipeV's split input/weight backward retains the graph, which compiled blocks refuse
            # ("compiled with non-empty donated buffers", mid-step); torch supports neither together
            if cfg.compile and cfg.pp_schedule == "dualpipev":
                raise ValueError("--compile is not supported with --pp-schedule dualpipev; use 1f1b, or drop --compile")
            need = 2 * cfg.pp if cfg.pp_schedule == "dualpipev" else cfg.pp
            if cfg.microbatches < need:
                raise ValueError(f"{cfg.pp_schedule} with pp {cfg.pp} needs n_microbatches >= {need}, got {cfg.microbatches}")
        elif cfg.pp_schedule != "1f1b" or cfg.n_microbatches not in (None, 1):
            raise ValueError("--pp-schedule / --n-microbatches need --pp >= 2")
        return cfg

    def describe(self) -> str:
        s = f"parallel: dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} (ep {self.ep}) x pp {self.pp}"
        if self.pp > 1:
            s += f", {self.pp_schedule} with {self.n_stages} stages and {self.microbatches} micro-batches"
        return s + (", recompute" if self.recompute else "") + (", compile" if self.compile else "")


def _check_experts(model: ModelConfig, ep: int) -> None:
    """Whole expert groups on a rank, or a group spread over a whole rank set: then group-limited
    routing (topk_group of n_group groups) bounds the ranks a token is sent to, as node-limited
    routing bounds nodes in the report (spec §1.6, §4.3)."""
    if model.num_moe_layers == 0:
        raise ValueError(f"ep {ep} needs MoE layers; the model has none")
    e, g = model.n_routed_experts, model.n_group
    if e % ep:
        raise ValueError(f"n_routed_experts {e} is not divisible by ep {ep}")
    if g > 1 and g % ep and ep % g:
        raise ValueError(f"n_group {g} and ep {ep}: one must divide the other so that expert groups map onto whole ranks")


def max_ranks_per_token(model: ModelConfig, ep: int) -> int:
    """The most EP ranks one token's top-k experts can live on under contiguous expert placement."""
    if model.n_group <= 1:
        return min(ep, model.num_experts_per_tok)
    ranks_per_group = max(1, ep // model.n_group)  # a group spread over several ranks
    return min(ep, model.topk_group * ranks_per_group, model.num_experts_per_tok)


@dataclass
class ParallelMesh:
    """The world mesh and the views the rest of dsv3.distributed uses, built once."""

    cfg: ParallelConfig
    world: DeviceMesh  # pp x dp_replicate x dp_shard_mod_ep x ep
    fsdp: DeviceMesh  # non-expert weights: dp_shard (or dp_replicate x dp_shard for HSDP)
    experts_fsdp: DeviceMesh  # expert weights: dp_shard_mod_ep (or dp_replicate x dp_shard_mod_ep)
    ep: DeviceMesh
    pp: DeviceMesh
    dp: DeviceMesh  # every rank that reads different data: loss and expert-load reductions

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self.pp.get_local_rank()


def build_mesh(cfg: ParallelConfig, device_type: str) -> ParallelMesh:
    """cfg must be checked (dp_shard resolved); the default process group must exist."""
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs torch.distributed initialised (torchrun, or init_process_group)")
    names = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep")
    world = init_device_mesh(device_type, (cfg.pp, cfg.dp_replicate, cfg.dp_shard // cfg.ep, cfg.ep), mesh_dim_names=names)
    dp_shard = world["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    dp = world["dp_replicate", "dp_shard_mod_ep", "ep"]._flatten("dp")
    if cfg.dp_replicate > 1:
        with warnings.catch_warnings():  # slicing a flattened dim: the 2-D HSDP mesh needs it
            warnings.filterwarnings("ignore", message="Slicing a flattened dim")
            fsdp = world["dp_replicate", "dp_shard"]
        experts_fsdp = world["dp_replicate", "dp_shard_mod_ep"]
    else:
        fsdp, experts_fsdp = dp_shard, world["dp_shard_mod_ep"]
    return ParallelMesh(cfg, world, fsdp, experts_fsdp, world["ep"], world["pp"], dp)
