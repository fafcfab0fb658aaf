"""A few training steps of a tiny model, distributed (in each rank) or on one process (the reference),
and the comparison of the two.

Both sides build the model from the same seed, draw the same global batches and run the same recipe
(AdamW, clipping, MTP + balance losses, bias update); each rank trains on its data-parallel slice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dsv3 import ModelConfig, Transformer
from dsv3.distributed import checkpoint as ckpt
from dsv3.distributed.mesh import ParallelConfig, build_mesh
from dsv3.distributed.step import DistributedStep
from dsv3.train.balance import update_expert_biases
from dsv3.train.config import TrainConfig
from dsv3.train.losses import training_loss
from dsv3.train.optim import build_optimizer

# every V3 feature (q-LoRA, groups, bias, MTP, a dense first layer) at a size a 2-core CPU trains in seconds
TINY = dict(
    vocab_size=256, hidden_size=64, num_layers=4, num_heads=2, intermediate_size=96, first_k_dense=1,
    q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, original_max_position_embeddings=64,
    max_position_embeddings=64, num_mtp_layers=1, seq_aux_alpha=0.01,
)


@dataclass
class Spec:
    parallel: dict = field(default_factory=dict)  # ParallelConfig fields
    model: dict = field(default_factory=dict)  # overrides of TINY
    steps: int = 3
    save_after: int | None = None  # write a DCP checkpoint under `run_dir` after this many steps
    resume: bool = False  # start from the latest checkpoint under `run_dir` instead of step 0
    run_dir: str | None = None
    export: str | None = None  # after the last step, write the full model here in the HF layout
    batch: int = 8  # global sequences per step
    seq_len: int = 16
    seed: int = 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{**TINY, **self.model})

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch, seq_len=self.seq_len, lr=1e-2, seed=self.seed,
                           bias_update_speed=1e-2, device="cpu")

    def batches(self):
        g = torch.Generator().manual_seed(self.seed + 1)
        for _ in range(self.steps):
            tokens = torch.randint(0, TINY["vocab_size"], (self.batch, self.seq_len + 1), generator=g)
            yield tokens[:, :-1], tokens[:, 1:]


MTP_WEIGHT, GAMMA = 0.3, 1e-2


def reference_run(spec: Spec) -> tuple[dict[str, list[float]], Transformer]:
    """The single-process run: whole batch, plain model.  Returns per-step losses and gradient norms
    (the norm catches gradient-scale errors that AdamW's normalisation would hide from the loss),
    and the trained model."""
    cfg = spec.train_config()
    torch.manual_seed(spec.seed)
    model = Transformer(spec.model_config()).train()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    run = {"loss": [], "grad_norm": []}
    for inputs, targets in spec.batches():
        for group in opt.param_groups:
            group["lr"] = cfg.lr
        out = model(inputs, return_aux=True)
        loss, parts = training_loss(out, targets, MTP_WEIGHT)
        loss.backward()
        run["grad_norm"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_biases(model.moe_layers(), out.expert_loads, GAMMA)
        run["loss"].append(parts["loss"].item())
    return run, model


def build_step(spec: Spec, world: int) -> DistributedStep:
    model_cfg = spec.model_config()
    pcfg = ParallelConfig(**spec.parallel).check(world, model_cfg)
    mesh = build_mesh(pcfg, "cpu")
    torch.manual_seed(spec.seed)
    model = Transformer(model_cfg).train()
    return DistributedStep(model, mesh, spec.train_config(), torch.device("cpu"), None, spec.batch // pcfg.dp)


def train_worker(rank: int, world: int, spec_json: str, out: str) -> None:
    """Runs spec's steps; rank 0 writes {"loss": [...], "grad_norm": [...]} to `out` (JSON)."""
    spec = Spec(**json.loads(spec_json))
    step = build_step(spec, world)
    per_rank = spec.batch // step.pcfg.dp
    lo = step.mesh.dp_rank * per_rank
    run = {"loss": [], "grad_norm": []}
    start = 0
    if spec.resume:
        start = ckpt.load(ckpt.checkpoint_dirs(Path(spec.run_dir))[-1], step.part, step.optimizer)["step"]
    for i, (inputs, targets) in enumerate(spec.batches()):
        if i < start:
            continue
        if i == spec.save_after:
            ckpt.save(Path(spec.run_dir), i, step.part, step.optimizer, {"step": i}, {}, keep=1)
        r = step.step(inputs[lo:lo + per_rank], targets[lo:lo + per_rank], spec.train_config().lr, MTP_WEIGHT, GAMMA)
        run["loss"].append(r["loss"].item())
        run["grad_norm"].append(r["grad_norm"].item())
    if spec.export:
        ckpt.export_hf(step.part, step.mesh, spec.model_config(), Path(spec.export))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(run))


def assert_same_run(got: dict, ref: dict) -> None:
    for a, b in zip(got["loss"], ref["loss"], strict=True):
        assert abs(a - b) <= 1e-5, (got["loss"], ref["loss"])
    for a, b in zip(got["grad_norm"], ref["grad_norm"], strict=True):
        assert abs(a - b) <= 1e-4 * b, (got["grad_norm"], ref["grad_norm"])


def spec_json(spec: Spec) -> str:
    return json.dumps(asdict(spec))
