"""One distributed optimizer step, the same maths as `dsv3.train.trainer.Trainer._train_step`:

    forward + backward on this rank's slice of the global batch (plain, or a pipeline schedule)
    -> expert loads all-reduced over every rank (whole batch, every stage) -> global grad-norm clip
    -> AdamW -> routing-bias update from the global loads on every rank (identical biases everywhere)

Gradients are means over the global batch (FSDP averages over data-parallel ranks; see parallelize.py),
so with the same seed and data a step matches one device up to reduction order.  The logged parts
(main CE, MTP CE, balance loss) are global means too.  Not here: data, schedules, logging (train.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..model import Transformer
from ..train.balance import update_expert_biases
from ..train.config import TrainConfig
from ..train.losses import training_loss
from ..train.optim import build_optimizer
from .mesh import ParallelMesh
from .parallelize import blocks_of, parallelize
from .pipeline import build_pipeline


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Global L2 norm of all gradients, then clipping.  DTensor gradients on different meshes (experts
    vs the rest) cannot be stacked, so each mesh's norm is reduced on its own and the squares summed;
    pipeline stages hold disjoint parameters, so their squares are summed over the pp group."""
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    sq = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        sq = sq + (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    total = sq.sqrt()
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


class DistributedStep:
    """The parallelized model (whole, or this rank's pipeline stages), its optimizer, and `step()`."""

    def __init__(self, model: Transformer, mesh: ParallelMesh, cfg: TrainConfig, device: torch.device,
                 autocast: torch.dtype | None, local_batch: int):
        self.mesh, self.cfg, self.device, self.autocast = mesh, cfg, device, autocast
        self.pcfg = mesh.cfg
        self.n_moe = len(model.moe_layers())
        self.n_experts = model.cfg.n_routed_experts
        self.has_mtp = model.cfg.num_mtp_layers > 0 and cfg.seq_len > 1
        if self.pcfg.pp > 1:
            self.pipeline = build_pipeline(model, mesh, self.pcfg, local_batch // self.pcfg.microbatches, cfg.seq_len,
                                           device, autocast or torch.float32)
            self.part = self.pipeline.part
            moes = [(row, b.ffn) for s in self.pipeline.stages
                    for row, b in zip(s.moe_rows, [b for b in blocks_of(s) if b.is_moe])]
        else:
            self.pipeline = None
            self.part = parallelize(model.to(device), mesh, self.pcfg)
            moes = list(enumerate(model.moe_layers()))
        self.moe_rows = [row for row, _ in moes]
        self.moe_layers = [moe for _, moe in moes]
        self.optimizer = build_optimizer(self.part, cfg, device)

    # ------------------------------------------------------------------ forward + backward
    def _forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, mtp_weight: float, micro_batch: int | None):
        """Returns (this rank's logged parts, its MoE loads [len(moe_rows), E]).  Without a pipeline,
        `micro_batch` sequences per forward accumulate gradients, as the single-device trainer does."""
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            if self.pipeline is None:
                return self._accumulate(inputs, targets, mtp_weight, micro_batch or len(inputs))
            return self._pipeline(inputs, targets, mtp_weight)

    def _accumulate(self, inputs, targets, mtp_weight: float, micro: int):
        n_all, parts, loads = len(inputs), {}, None
        pieces = list(zip(inputs.split(micro), targets.split(micro)))
        for i, (x, y) in enumerate(pieces):
            # each backward reduce-scatters its gradients into the shards (so memory stays sharded); under
            # HSDP the all-reduce across replicas waits for the last micro-batch (free: it sums the shards)
            self.part.set_requires_all_reduce(i == len(pieces) - 1)
            out = self.part(x, return_aux=True)
            loss, p = training_loss(out, y, mtp_weight)
            (loss * (len(x) / n_all)).backward()
            for k, v in p.items():
                parts[k] = parts.get(k, 0) + v.float() * (len(x) / n_all)
            if out.expert_loads is not None:
                loads = out.expert_loads if loads is None else loads + out.expert_loads
        return parts, loads

    def _pipeline(self, inputs, targets, mtp_weight: float):
        """One schedule step over the micro-batches; the first stage takes the inputs, the last the targets."""
        p = self.pipeline
        for s in p.stages:
            s.reset_stats()
        p.loss.mtp_weight, p.loss.parts = mtp_weight, []
        # contiguous: the first stage's input metadata is a dense [b, T], and older torch checks shape, dtype
        # and strides on every forward (2.13 only under TORCH_DISTRIBUTED_DEBUG=DETAIL); a [:, :-1] slice of
        # the token rows fails that check on CPU, while .to("cuda") happens to copy it dense
        args = (inputs.contiguous(),) if p.has_first else ()
        kwargs = {"target": targets, "losses": []} if p.has_last else {}
        p.schedule.step(*args, **kwargs)
        n_mb = self.pcfg.microbatches
        parts = {k: sum(d[k] for d in p.loss.parts) / n_mb for k in (p.loss.parts[0] if p.loss.parts else {})}
        parts["balance_loss"] = sum(s.balance for s in p.stages) / n_mb
        loads = [s.loads for s in p.stages if s.loads is not None]
        return parts, torch.cat(loads) if loads else None

    def _reduce(self, parts: dict, loads: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Global means of the logged parts and global expert loads, in one all-reduce each."""
        names = ["loss", "mtp_loss", "balance_loss"] if self.has_mtp else ["loss", "balance_loss"]
        vec = torch.stack([torch.as_tensor(parts.get(k, 0.0), dtype=torch.float32, device=self.device).reshape(())
                           for k in names])
        dist.all_reduce(vec)  # last-stage ranks carry the CE terms; every stage its balance loss
        vec = vec / self.pcfg.dp
        global_loads = None
        if self.n_moe:
            global_loads = torch.zeros(self.n_moe, self.n_experts, dtype=torch.int64, device=self.device)
            if loads is not None:
                global_loads[self.moe_rows] = loads.to(torch.int64)
            dist.all_reduce(global_loads)
        return dict(zip(names, vec)), global_loads

    # ------------------------------------------------------------------ the step
    def step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float, mtp_weight: float, gamma: float,
             micro_batch: int | None = None) -> dict:
        """inputs/targets [local batch, T] on this rank's device.  Returns the global step metrics."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        parts, loads = self._forward_backward(inputs, targets, mtp_weight, micro_batch)
        parts, loads = self._reduce(parts, loads)
        params = [p for p in self.part.parameters() if p.requires_grad]
        grad_norm = clip_grad_norm(params, self.cfg.grad_clip, self.mesh.pp.get_group() if self.pcfg.pp > 1 else None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if loads is not None:
            update_expert_biases(self.moe_layers, loads[self.moe_rows], gamma)
        return {**parts, "grad_norm": grad_norm, "loads": loads}

