"""Expert parallelism (spec §1.6, §4.1, §4.3): each of `ep` ranks holds E/ep routed experts, and token
rows travel to the rank of their expert and back with `all_to_all_single`.

Placement is contiguous: rank r holds experts [r E/ep, (r+1) E/ep).  Expert groups are contiguous too,
so when ep divides n_group (or n_group divides ep) whole groups sit on a rank (or a group on a rank
set), and group-limited routing -- topk_group of n_group groups per token -- bounds the ranks a token
is sent to, as node-limited routing bounds nodes in the report (`mesh.max_ranks_per_token`).

`AllToAllDispatcher` plugs into `MoE.dispatcher` with `LocalDispatcher`'s contract:
    dispatch(x [N, D], indices [N, K]) -> rows [M, D] of the *local* experts, sorted by local expert,
                                          counts [E/ep], and a `Route` (what combine needs)
    combine(y [M, D], weights [N, K], route) -> [N, D]
It composes the local dispatcher (sort the N*K token copies by global expert, i.e. by destination
rank), one all-to-all of the per-expert counts (so every rank knows its receive sizes), one
all-to-all of the rows, and a regroup of the received rows by local expert; combine reverses those.
Every token copy is one row on the wire, in the autocast dtype under autocast (no per-rank
de-duplication as DeepEP does); split sizes are data-dependent, so dispatch syncs with the host once
per MoE layer.

`ShardedExperts` is the rank's view of the stacked expert weights: w13 [E, 2I, D] and w2 [E, D, I] as
DTensors sharded on dim 0 over the EP mesh (global shapes and names unchanged, so checkpoints reshard
between layouts); it runs only the local experts on the rows it received.

`emulate_expert_parallel` is the slow twin: the same plan for `ep` ranks inside one process, rows
moved by list slicing instead of communication.  Tests hold it equal to the model's local path and
to the all-to-all dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ..model.moe import LocalDispatcher, MoE, expert_ffn


def regroup_order(recv_counts: torch.Tensor, n_rows: int) -> torch.Tensor:
    """recv_counts [ep (source rank), E_local], summing to n_rows: rows arrive grouped by source, then
    local expert.  Returns the permutation [n_rows] that sorts them by local expert (then source)."""
    ep, n_local = recv_counts.shape
    expert_of_row = torch.arange(n_local, device=recv_counts.device).repeat(ep)  # [ep * E_local]
    expert_of_row = expert_of_row.repeat_interleave(recv_counts.flatten(), output_size=n_rows)  # [n_rows]
    return expert_of_row.argsort(stable=True)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable split sizes; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


@dataclass
class Route:
    """What combine needs to send expert outputs home and put them back in token order."""

    order: torch.Tensor  # [N*K] the local dispatcher's sort of token copies by global expert
    regroup: torch.Tensor  # [M] received rows -> local-expert order
    send_splits: list[int]  # rows this rank sent to each rank
    recv_splits: list[int]  # rows this rank received from each rank


class AllToAllDispatcher:
    def __init__(self, n_experts: int, group: dist.ProcessGroup):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.n_local = n_experts // self.ep
        self.local = LocalDispatcher(n_experts)

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Route]:
        """x [N, D], indices [N, K] -> rows [M, D] for this rank's experts sorted by local expert,
        counts [E/ep], route."""
        rows, counts, order = self.local.dispatch(x, indices)  # [N*K, D] by global expert = by destination
        # x comes from the fp32 residual stream, and the grouped GEMM casts it to the autocast dtype on
        # arrival: casting first halves the bytes of this all-to-all and of its backward.  After the
        # gather, not before: its backward sums the K copies' gradients, which should stay fp32
        device = rows.device.type
        if torch.is_autocast_enabled(device):
            rows = rows.to(torch.get_autocast_dtype(device))
        send_counts = counts.view(self.ep, self.n_local)  # [ep (destination), E_local]
        recv_counts = torch.empty_like(send_counts)  # [ep (source), E_local]
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # the one host sync
        send_splits, recv_splits = splits
        received = _AllToAll.apply(rows, recv_splits, send_splits, self.group)  # [M, D] by source rank
        regroup = regroup_order(recv_counts, sum(recv_splits))
        return received[regroup], recv_counts.sum(0), Route(order, regroup, send_splits, recv_splits)

    def combine(self, y: torch.Tensor, weights: torch.Tensor, route: Route) -> torch.Tensor:
        """y [M, D] in dispatch order, weights [N, K] -> [N, D]."""
        by_source = torch.empty_like(y).index_copy(0, route.regroup, y)
        rows = _AllToAll.apply(by_source, route.send_splits, route.recv_splits, self.group)  # [N*K, D]
        return self.local.combine(rows, weights, route.order)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale`."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class ShardedExperts(nn.Module):
    """This rank's E/ep experts.  w13 [E, 2I, D] / w2 [E, D, I] are DTensors Shard(0) on the EP mesh
    (FSDP may shard them further); `to_local` gives the [E/ep, ...] block the received rows need.

    Each rank's loss is the mean over its own tokens, and these experts see the tokens of all ep
    peers, so their gradient is a sum of ep such means: it is scaled by 1/ep to make it a mean (the
    data-parallel average over the other ranks is FSDP's)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, inter: int, mesh: DeviceMesh):
        super().__init__()
        self.inter = inter
        rank, ep = mesh.get_local_rank(), mesh.size()
        self.grad_scale = 1.0 / ep
        self.w13 = nn.Parameter(DTensor.from_local(w13.detach().chunk(ep)[rank].clone(), mesh, [Shard(0)], run_check=False))
        self.w2 = nn.Parameter(DTensor.from_local(w2.detach().chunk(ep)[rank].clone(), mesh, [Shard(0)], run_check=False))

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by local expert, counts [E/ep] -> [M, D]."""
        w13, w2 = (_ScaleGrad.apply(w.to_local(), self.grad_scale) for w in (self.w13, self.w2))
        return expert_ffn(x, w13, w2, counts)


def apply_expert_parallel(moe: MoE, mesh: DeviceMesh) -> None:
    """Shards `moe`'s experts over the 1-D EP mesh and installs the all-to-all dispatcher, in place.
    The grouped path is the only one with a dispatcher, so the loop path is switched off."""
    full = moe.experts
    moe.experts = ShardedExperts(full.w13, full.w2, full.inter, mesh)
    moe.dispatcher = AllToAllDispatcher(moe.cfg.n_routed_experts, mesh.get_group())
    moe.set_experts_impl("grouped")


def emulate_expert_parallel(moe: MoE, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The slow twin: `ep = len(xs)` ranks in one process, rank r holding tokens xs[r] [N_r, D] and
    experts [r E/ep, (r+1) E/ep) of `moe`'s full expert weights.  Returns each rank's routed-expert
    output [N_r, D] (no shared expert), computed with the dispatcher's plan, rows moved by slicing."""
    ep, n_experts = len(xs), moe.cfg.n_routed_experts
    n_local, local = n_experts // ep, LocalDispatcher(n_experts)
    routes = [moe.gate(x) for x in xs]
    sent = [local.dispatch(x, r.indices) for x, r in zip(xs, routes)]  # per rank: rows, counts [E], order
    counts = [c.view(ep, n_local) for _, c, _ in sent]  # [destination, E_local] per source
    chunks = [rows.split(c.sum(1).tolist()) for (rows, _, _), c in zip(sent, counts)]  # [source][destination]
    returned: list[list[torch.Tensor]] = [[None] * ep for _ in range(ep)]  # [source][destination]
    for d in range(ep):
        recv_counts = torch.stack([counts[s][d] for s in range(ep)])  # [source, E_local]
        regroup = regroup_order(recv_counts, int(recv_counts.sum()))
        received = torch.cat([chunks[s][d] for s in range(ep)])[regroup]
        w = slice(d * n_local, (d + 1) * n_local)
        y = expert_ffn(received, moe.experts.w13[w], moe.experts.w2[w], recv_counts.sum(0))
        back = torch.empty_like(y).index_copy(0, regroup, y).split(recv_counts.sum(1).tolist())
        for s in range(ep):
            returned[s][d] = back[s]
    return [local.combine(torch.cat(returned[s]), r.weights, order) for s, ((_, _, order), r) in enumerate(zip(sent, routes))]
