"""Expert parallelism: the loop twin against the model's local path, the all-to-all dispatcher against
the twin (2 and 4 gloo ranks, forward and backward), group-limited routing's rank bound, layout errors."""

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import randomize_, tiny_config
from dist_launch import run_ranks
from torch.distributed.device_mesh import init_device_mesh

from dsv3.distributed.expert_parallel import (
    apply_expert_parallel,
    emulate_expert_parallel,
)
from dsv3.distributed.mesh import ParallelConfig, max_ranks_per_token
from dsv3.model.moe import MoE

CFG = dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
SIZES = {2: [5, 11], 4: [1, 6, 2, 7]}  # tokens per rank: uneven, so split sizes vary


def _moe(seed: int = 0) -> MoE:
    moe = MoE(tiny_config(**CFG))
    randomize_(moe, seed)
    return moe


def _inputs(ep: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return list(torch.randn(sum(SIZES[ep]), 64, generator=g).split(SIZES[ep]))


def _local_routed(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    r = moe.gate(x)
    rows, counts, order = moe.dispatcher.dispatch(x, r.indices)
    return moe.dispatcher.combine(moe.experts.forward_grouped(rows, counts), r.weights, order)


@pytest.mark.parametrize("ep", [1, 2, 4, 8])
def test_emulation_equals_local_dispatch(ep):
    moe = _moe()
    xs = list(torch.randn(16, 64).split([16 // ep + (i < 16 % ep) for i in range(ep)]))
    got = torch.cat(emulate_expert_parallel(moe, xs))
    torch.testing.assert_close(got, _local_routed(moe, torch.cat(xs)), rtol=1e-6, atol=1e-6)


def _twin(ep: int, bf16: bool = False) -> dict:
    """Per-rank outputs and gradients (inputs; expert weights, rank r's block) of the emulation, which
    moves rows in the dtype they have (fp32 under autocast too: the grouped GEMM casts them).  On one
    thread, as the ranks run (dist_launch): a CPU GEMM's fp32 sums are split by thread count, and the
    bf16 test compares bit for bit (2 threads put the gate's dx 1 ulp off on an AVX-512 machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        moe = _moe()
        xs = [x.clone().requires_grad_() for x in _inputs(ep)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ys = emulate_expert_parallel(moe, xs)
        g = torch.Generator().manual_seed(2)
        sum((y * torch.randn(y.shape, generator=g)).sum() for y in ys).backward()
    finally:
        torch.set_num_threads(threads)
    n = CFG["n_routed_experts"] // ep
    return {"y": ys, "dx": [x.grad for x in xs],
            "dw13": [moe.experts.w13.grad[r * n:(r + 1) * n] for r in range(ep)],
            "dw2": [moe.experts.w2.grad[r * n:(r + 1) * n] for r in range(ep)]}


def _all_to_all_worker(rank: int, world: int, out: str, bf16: bool = False) -> None:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    moe = _moe()
    apply_expert_parallel(moe, mesh)
    xs = _inputs(world)
    x = xs[rank].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = _local_routed(moe, x)
        received, _, _ = moe.dispatcher.dispatch(x, moe.gate(x).indices)  # allocated in the wire's dtype
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(t.shape, generator=g) for t in xs]  # the twin's draws, in rank order
    (y * grads[rank]).sum().backward()
    # ShardedExperts scales weight gradients by 1/ep (a mean over EP peers' data): undo for the twin's sum
    torch.save({"y": y.detach(), "dx": x.grad, "dw13": moe.experts.w13.grad.to_local() * world,
                "dw2": moe.experts.w2.grad.to_local() * world, "wire": received.dtype}, Path(out) / f"rank{rank}.pt")
    dist.barrier()


@pytest.mark.parametrize("ep", [2, 4])
def test_all_to_all_dispatcher_equals_twin(ep, tmp_path):
    run_ranks(_all_to_all_worker, ep, str(tmp_path))
    twin = _twin(ep)
    for r in range(ep):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for key in ("y", "dx", "dw13", "dw2"):
            torch.testing.assert_close(got[key], twin[key][r], rtol=1e-5, atol=1e-6, msg=f"rank {r} {key}")


def test_all_to_all_sends_bf16_under_autocast_with_the_uncast_results(tmp_path):
    """The fp32 rows are cast to bf16 before the all-to-all (half the bytes each way); the grouped GEMM
    would cast them on arrival anyway, so outputs and gradients equal the uncast twin's bit for bit."""
    run_ranks(_all_to_all_worker, 2, str(tmp_path), True)
    twin = _twin(2, bf16=True)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["wire"] == torch.bfloat16
        for key in ("y", "dx", "dw13", "dw2"):
            torch.testing.assert_close(got[key], twin[key][r], rtol=0, atol=0, msg=f"rank {r} {key}")


@pytest.mark.parametrize("ep", [2, 4, 8])
def test_group_limited_routing_bounds_ranks_per_token(ep):
    """Contiguous placement puts whole groups (or a group per rank set) on ranks: a token's top-k
    experts then sit on at most topk_group x (ranks per group) ranks."""
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=6)
    moe = MoE(cfg)
    randomize_(moe, 0)
    ranks = moe.gate(torch.randn(512, cfg.hidden_size)).indices // (16 // ep)  # [N, K] rank of each expert
    reached = torch.tensor([len(set(row.tolist())) for row in ranks])
    bound = max_ranks_per_token(cfg, ep)
    assert bound == {2: 2, 4: 2, 8: 4}[ep]
    assert reached.max() <= bound and reached.max() == bound


@pytest.mark.parametrize("pcfg, world, model, message", [
    (ParallelConfig(dp_shard=2), 4, {}, "world size 4 != pp 1 x dp_replicate 1 x dp_shard 2"),
    (ParallelConfig(pp=3), 4, {}, "not divisible by pp 3"),
    (ParallelConfig(ep=3), 6, {}, "n_routed_experts 8 is not divisible by ep 3"),
    (ParallelConfig(ep=4), 2, {}, "ep 4 must divide dp_shard 2"),
    (ParallelConfig(ep=8), 8, {"n_routed_experts": 24, "n_group": 3}, "n_group 3 and ep 8"),
    (ParallelConfig(pp=2, pp_schedule="dualpipev"), 2, {"num_layers": 3}, "4 pipeline stages"),
    (ParallelConfig(pp=2, pp_schedule="dualpipev", n_microbatches=2), 2, {}, "needs n_microbatches >= 4"),
    (ParallelConfig(pp=2, n_microbatches=0), 2, {}, "--n-microbatches must be >= 1, got 0"),  # not the default
    (ParallelConfig(pp=2, pp_schedule="gpipe"), 2, {}, "unknown pipeline schedule 'gpipe'"),
    (ParallelConfig(pp_schedule="dualpipev"), 2, {}, "need --pp >= 2"),
    (ParallelConfig(pp=2, pp_schedule="dualpipev", compile=True), 2, {}, "--compile is not supported with --pp-schedule dualpipev"),
])
def test_impossible_layouts_fail_in_one_line(pcfg, world, model, message):
    with pytest.raises(ValueError, match=message) as e:
        pcfg.check(world, tiny_config(**{**CFG, "num_layers": 4, **model}))
    assert "\n" not in str(e.value)


def test_check_resolves_dp_shard():
    pcfg = ParallelConfig(pp=2, ep=2).check(8, tiny_config(**CFG, num_layers=4))
    assert (pcfg.dp_shard, pcfg.dp, pcfg.n_stages, pcfg.microbatches) == (4, 4, 2, 2)


def test_launcher_fails_and_cleans_up_when_a_rank_fails():
    with tempfile.TemporaryDirectory() as tmp, pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)):
        run_ranks(_failing_worker, 2, tmp, timeout=60)
    assert not mp.active_children()


def _failing_worker(rank: int, world: int, tmp: str) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 fails")
