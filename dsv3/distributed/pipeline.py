"""Pipeline parallelism with `torch.distributed.pipelining` (spec §4.2): stages, schedules, stage losses.

Split: S stages (S = pp for 1F1B, 2 pp for DualPipeV), each a contiguous run of blocks (earlier stages
take the remainder), the embedding on stage 0, final norm + head + MTP on stage S-1.  DualPipeV puts
stages r and 2P-1-r on rank r, so rank 0 holds both ends of the model.

What travels between stages: the hidden state h [b, T, D] and, when the model has MTP, the token
embeddings emb [b, T, D] -- MTP depth k on the last stage needs Emb(t_{i+k}), and passing the
activations keeps the embedding a single parameter on stage 0 (no tied copy to keep in sync across
ranks).  Its gradient flows back through the stages with h's.

Balance loss and expert loads of a stage's MoE layers never leave the stage as outputs:
  - each stage adds its sequence-wise balance loss to the objective by attaching it to its hidden
    state (`_AddAuxLoss`: identity forward, gradient 1 for the loss in backward, Megatron's
    MoEAuxLossAutoScaler); the schedule's per-micro-batch gradient scaling then treats it exactly as
    if it were summed into the last stage's loss;
  - each stage counts its layers' loads (and the balance-loss values, for logging) over the step's
    micro-batches in `Stage.loads`; the trainer all-reduces one [n_moe_layers, E] tensor over the
    world (each rank fills its own rows), which sums the data-parallel ranks and gathers the stages,
    and every rank updates the biases of its layers from the whole batch's loads.
Stage shapes are given to `PipelineStage` up front, so no shape-inference forward runs.
Names of parameters in a `Stage` equal the Transformer's (blocks in a ModuleDict keyed by layer id),
so checkpoints do not depend on the split.  Not here: FSDP/EP of a stage (parallelize.py).

Not yet DualPipe's point (spec §4.2): torch's ScheduleDualPipeV runs a paired forward and backward one
after the other unless a custom overlap function is registered, and none is, while expert parallelism's
all-to-alls block the compute stream (expert_parallel.py).  So DualPipeV here gives the schedule's order
and its smaller bubble, but hides no communication behind computation.  Passing the token ids instead
of emb (embedding MTP's tokens on the last stage) would halve what crosses each boundary; not done.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

from ..model import Transformer, TransformerOutput
from ..train.losses import training_loss
from .mesh import ParallelConfig, ParallelMesh
from .parallelize import blocks_of, parallelize


def split_layers(num_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges, as even as possible; earlier stages take the remainder (the last
    stage also carries the head and MTP)."""
    base, extra = divmod(num_layers, n_stages)
    bounds = [0]
    for i in range(n_stages):
        bounds.append(bounds[-1] + base + (i < extra))
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def stage_ids(cfg: ParallelConfig, pp_rank: int) -> list[int]:
    """The stage indices rank `pp_rank` runs: [r] for 1F1B, [r, 2P-1-r] for DualPipeV."""
    return [pp_rank, 2 * cfg.pp - 1 - pp_rank] if cfg.pp_schedule == "dualpipev" else [pp_rank]


class _AddAuxLoss(torch.autograd.Function):
    """h -> a copy of h; backward hands the auxiliary loss the gradient 1 (a fresh tensor, not a view:
    the pipeline runtime detaches stage outputs in place)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return h.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.ones(shape, dtype=dtype, device=device)


class Stage(nn.Module):
    """Stage `index` of `n_stages`: blocks `layer_ids` of `model` (the same module objects), plus the
    embedding on the first stage and norm, head and MTP on the last; the rope tables are shared."""

    def __init__(self, model: Transformer, index: int, n_stages: int, layer_ids: range):
        super().__init__()
        self.cfg = model.cfg
        self.index, self.is_first, self.is_last = index, index == 0, index == n_stages - 1
        self.rope = model.rope
        self.embed = model.embed if self.is_first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if self.is_last else None
        self.head = model.head if self.is_last else None
        self.mtp = model.mtp if self.is_last else None
        rows = {id(moe): i for i, moe in enumerate(model.moe_layers())}
        # rows of this stage's MoE layers in `model.moe_layers()` order (main blocks, then MTP)
        self.moe_rows = [rows[id(b.ffn)] for b in blocks_of(self) if b.is_moe]
        self.reset_stats()

    def reset_stats(self) -> None:
        self.loads: torch.Tensor | None = None  # [len(moe_rows), E] summed over the step's micro-batches
        self.balance = 0.0  # the stage's balance-loss values summed over micro-batches (logging)

    def _record(self, stats: list) -> None:
        """Adds one forward's loads [len(moe_rows), E] and balance-loss value to the step's sums."""
        stats = [s for s in stats if s is not None]
        if not stats:
            return
        loads = torch.stack([s.load for s in stats])
        self.loads = loads if self.loads is None else self.loads + loads
        self.balance = self.balance + sum(s.balance_loss.detach() for s in stats)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """First stage: tokens [b, T]; others: h [b, T, D] (+ emb [b, T, D] with MTP).
        Returns (h,) or (h, emb) to the next stage; the last returns (logits [b, T, V], *MTP logits)."""
        if self.is_first:
            emb = self.embed(x)  # [b, T, D]
            h = emb
        else:
            h = x
        t = h.shape[1]
        cos, sin = self.rope(torch.arange(t, device=h.device))
        stats = []
        for layer in self.layers.values():
            h, s = layer(h, cos, sin)
            stats.append(s)
        h = _with_balance_loss(h, stats)
        if not self.is_last:
            self._record(stats)
            return (h, emb.clone()) if self.cfg.num_mtp_layers else (h,)  # a copy: outputs must not alias inputs
        h_final = self.norm(h)
        outputs = [self.head(h_final)]
        h_prev = h_final if self.cfg.mtp_hidden_after_norm else h
        for k, mtp in enumerate(self.mtp, start=1):
            n = t - k
            if n <= 0:
                break
            h_prev, s = mtp(h_prev[:, :n], emb[:, k:], cos[:n], sin[:n])
            h_prev = _with_balance_loss(h_prev, [s])
            stats.append(s)
            outputs.append(self.head(mtp.head_norm(h_prev)))
        self._record(stats)
        return tuple(outputs)


def _with_balance_loss(h: torch.Tensor, stats: list) -> torch.Tensor:
    """h, with the balance losses of `stats` riding on its gradient (unchanged h without MoE layers)."""
    losses = [s.balance_loss for s in stats if s is not None]
    return _AddAuxLoss.apply(h, torch.stack(losses).sum()) if losses else h


class PipelineLoss:
    """The last stage's loss_fn: main CE + mtp_weight x MTP CE (the balance losses come in through the
    stages).  Records the detached parts of every micro-batch for logging."""

    def __init__(self):
        self.mtp_weight = 0.0
        self.parts: list[dict[str, torch.Tensor]] = []

    def __call__(self, outputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
        out = TransformerOutput(outputs[0], list(outputs[1:]), None, outputs[0].new_zeros((), dtype=torch.float32))
        loss, parts = training_loss(out, targets, self.mtp_weight)
        parts.pop("balance_loss")
        self.parts.append(parts)
        return loss


class ModelPart(nn.Module):
    """A rank's stages gathered under the Transformer's parameter names (for the optimizer and checkpoints)."""

    def __init__(self, stages: list[Stage]):
        super().__init__()
        self.layers = nn.ModuleDict({k: v for s in stages for k, v in s.layers.items()})
        for name in ("embed", "norm", "head", "mtp"):
            found = [getattr(s, name) for s in stages if getattr(s, name) is not None]
            if found:
                setattr(self, name, found[0])


@dataclass
class Pipeline:
    stages: list[Stage]  # this rank's stage modules (FSDP-wrapped), in stage_ids order
    schedule: Schedule1F1B | ScheduleDualPipeV
    loss: PipelineLoss
    part: ModelPart

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.stages)


def build_pipeline(model: Transformer, mesh: ParallelMesh, cfg: ParallelConfig, microbatch: int, seq_len: int,
                   device: torch.device, logits_dtype: torch.dtype) -> Pipeline:
    """Splits `model` (built whole, identically on every rank), keeps this rank's stages, parallelizes
    each (EP, recompute, compile, FSDP) and builds the schedule.  microbatch: sequences per micro-batch."""
    n = cfg.n_stages
    ranges = split_layers(model.cfg.num_layers, n)
    ids = stage_ids(cfg, mesh.pp_rank)
    stages = [Stage(model, i, n, ranges[i]).to(device) for i in ids]
    for s in stages:
        parallelize(s, mesh, cfg)
    m = model.cfg
    act = torch.empty(microbatch, seq_len, m.hidden_size, device="meta", requires_grad=True)  # gradients flow back
    between = (act, act) if m.num_mtp_layers else (act,)
    logits = tuple(torch.empty(microbatch, seq_len - k, m.vocab_size, dtype=logits_dtype, device="meta")
                   for k in range(m.num_mtp_layers + 1) if seq_len - k > 0)
    tokens = torch.empty(microbatch, seq_len, dtype=torch.long, device="meta")
    pipe_stages = [
        PipelineStage(s, s.index, n, device, input_args=tokens if s.is_first else between,
                      output_args=logits if s.is_last else between, group=mesh.pp.get_group())
        for s in stages
    ]
    loss = PipelineLoss()
    if cfg.pp_schedule == "dualpipev":
        schedule = ScheduleDualPipeV(pipe_stages, n_microbatches=cfg.microbatches, loss_fn=loss)
    else:
        schedule = Schedule1F1B(pipe_stages[0], n_microbatches=cfg.microbatches, loss_fn=loss)
    return Pipeline(stages, schedule, loss, ModelPart(stages))
