"""Tensor-by-tensor parity of one distributed optimizer step with one process, for the layouts whose
gradient bookkeeping test_dist_parity.py leaves unchecked: EP smaller than the FSDP shard count (expert
weights EP-split and FSDP-sharded), EP over every rank, HSDP without EP, a 1F1B pipeline with data
parallelism, DualPipeV with EP, and gradient accumulation under FSDP (uneven) and HSDP (the replicas
all-reduce after the last micro-batch only).

test_dist_parity holds the losses and the global gradient norm to the reference; one norm can hide an
error confined to a few small tensors (one MoE's experts, a router) or errors that cancel.  Here each
layout runs one step of the harness recipe and is compared with the single-process reference of the
same seed and batch on:
  - every parameter's gradient as the clip receives it (DTensor shards gathered to full tensors; after
    clipping, a gradient wrongly scaled as a whole would be normalised back), on every rank holding it;
  - the global expert loads and the routing biases after the bias update;
  - the logged loss parts (CE, MTP CE, balance loss).
seq_aux_alpha is 0.5 (TINY has 0.01), so the balance loss drives a visible share of the router's
gradient and an error in its scaling shows.

Tolerances.  Gradients: ||g - g_ref|| <= 1e-5 ||g_ref|| per tensor.  Both sides are fp32; sharded
reductions, micro-batch splits and pipeline micro-batches only change the order of the sums, which
measures ~2.5e-7 here, while a bookkeeping bug (a missing 1/ep or 1/dp, a dropped micro-batch, a
mis-scaled balance term) is off by a factor.  Loss parts: 1e-5 absolute, as dist_harness.  Loads and
biases: exact -- loads are integer counts and the bias update moves each bias by +-gamma by sign.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from dist_harness import GAMMA, MTP_WEIGHT, Spec, build_step
from dist_launch import run_ranks
from torch.distributed.tensor import DTensor

import dsv3.distributed.step as step_module
from dsv3 import Transformer
from dsv3.train.balance import update_expert_biases
from dsv3.train.losses import training_loss

SEQ_AUX_ALPHA = 0.5
GRAD_RTOL = 1e-5
LOSS_ATOL = 1e-5

# name -> (world size, ParallelConfig fields, micro-batch: sequences per forward, None for the rank's batch)
LAYOUTS = {
    "ep2_of_4_shards": (4, {"ep": 2}, None),  # dp_shard_mod_ep 2: experts EP-split and FSDP-sharded
    "ep4": (4, {"ep": 4}, None),
    "hsdp_2x2": (4, {"dp_replicate": 2}, None),
    "pp2_dp2_1f1b": (4, {"pp": 2}, None),
    "dualpipev_ep2": (4, {"pp": 2, "ep": 2, "pp_schedule": "dualpipev"}, None),
    "fsdp2_accumulate_3_of_4": (2, {}, 3),  # 4 rows per rank in micro-batches of 3 and 1
    "hsdp_2x2_accumulate_1_of_2": (4, {"dp_replicate": 2}, 1),  # replicas all-reduce after the last micro-batch only
}


def _spec(parallel: dict | None = None) -> Spec:
    return Spec(parallel=parallel or {}, model={"seq_aux_alpha": SEQ_AUX_ALPHA}, steps=1)


def _routing_biases(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers() if n.endswith("gate.bias")}


def _reference() -> dict:
    """One step of the recipe on one process, the whole batch at once (no optimizer: the gradients,
    loads and biases of step one do not depend on it)."""
    spec = _spec()
    torch.manual_seed(spec.seed)
    model = Transformer(spec.model_config()).train()
    inputs, targets = next(iter(spec.batches()))
    out = model(inputs, return_aux=True)
    loss, parts = training_loss(out, targets, MTP_WEIGHT)
    loss.backward()
    update_expert_biases(model.moe_layers(), out.expert_loads, GAMMA)
    return {"grads": {n: p.grad for n, p in model.named_parameters()}, "biases": _routing_biases(model),
            "loads": out.expert_loads, "parts": {k: v.item() for k, v in parts.items()}}


@contextmanager
def _grads_at_clip(step):
    """Yields a dict that `step.step()` fills, when it reaches the clip, with every parameter's gradient
    of this rank's part (full tensors; gathering is a collective, so every rank of a mesh runs it)."""
    grads: dict[str, torch.Tensor | None] = {}
    clip = step_module.clip_grad_norm

    def record_then_clip(params, max_norm, pp_group):
        for name, p in step.part.named_parameters():
            g = p.grad
            grads[name] = None if g is None else (g.full_tensor() if isinstance(g, DTensor) else g).clone()
        return clip(params, max_norm, pp_group)

    step_module.clip_grad_norm = record_then_clip
    try:
        yield grads
    finally:
        step_module.clip_grad_norm = clip


def _grad_worker(rank: int, world: int, layouts: dict, out: str) -> None:
    """Runs one step of each layout {name: (ParallelConfig fields, micro-batch)} in turn on this rank's
    data-parallel slice; writes <name>.rank<rank>.pt with its gradients, biases, loads and loss parts."""
    for name, (parallel, micro_batch) in layouts.items():
        spec = _spec(parallel)
        step = build_step(spec, world)
        per_rank = spec.batch // step.pcfg.dp
        lo = step.mesh.dp_rank * per_rank
        inputs, targets = next(iter(spec.batches()))
        with _grads_at_clip(step) as grads:
            metrics = step.step(inputs[lo:lo + per_rank], targets[lo:lo + per_rank], spec.train_config().lr,
                                MTP_WEIGHT, GAMMA, micro_batch=micro_batch)
        torch.save({"grads": grads, "biases": _routing_biases(step.part), "loads": metrics["loads"],
                    "parts": {k: metrics[k].item() for k in ("loss", "mtp_loss", "balance_loss")}},
                   Path(out) / f"{name}.rank{rank}.pt")


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory):
    """`layout_run(name)` -> that layout's per-rank results.  Every layout of one world size runs in one
    launch (starting the processes costs more than a step), made when the first of them is asked for."""
    launches: dict[int, dict[str, list[dict]]] = {}

    def results(name: str) -> list[dict]:
        world = LAYOUTS[name][0]
        if world not in launches:
            layouts = {n: (parallel, micro) for n, (w, parallel, micro) in LAYOUTS.items() if w == world}
            out = tmp_path_factory.mktemp(f"world{world}")
            run_ranks(_grad_worker, world, layouts, str(out), timeout=240)
            launches[world] = {n: [torch.load(out / f"{n}.rank{r}.pt") for r in range(world)] for n in layouts}
        return launches[world][name]

    return results


def _grad_errors(got: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative L2 error per parameter this rank holds (inf where its gradient is missing)."""
    return {n: float("inf") if g is None else ((g - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item()
            for n, g in got.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_matches_one_process_per_tensor(layout, reference, layout_run):
    ranks = layout_run(layout)
    for kind in ("grads", "biases"):  # a pipeline rank holds its stages' share; together, the whole model
        held, expected = set().union(*(r[kind] for r in ranks)), set(reference[kind])
        assert held == expected, (kind, "missing", expected - held, "unknown", held - expected)
    for rank, r in enumerate(ranks):
        worst = sorted(_grad_errors(r["grads"], reference["grads"]).items(), key=lambda e: -e[1])[:5]
        assert worst[0][1] <= GRAD_RTOL, f"rank {rank}: largest relative gradient errors {worst}"
        assert torch.equal(r["loads"], reference["loads"]), (rank, r["loads"], reference["loads"])
        for name, bias in r["biases"].items():
            assert torch.equal(bias, reference["biases"][name]), (rank, name, bias, reference["biases"][name])
        for part, value in reference["parts"].items():
            assert abs(r["parts"][part] - value) <= LOSS_ATOL, (rank, r["parts"], reference["parts"])
