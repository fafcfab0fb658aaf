"""`dsv3 train` on several processes (torchrun): the single-device trainer's recipe, laid out by a
`ParallelConfig` (FSDP2 / HSDP, expert parallel, pipeline parallel with 1F1B or DualPipeV).

    torchrun --nproc-per-node 4 -m dsv3 train --dp-shard 4 --ep 2          # FSDP over 4, experts split 2 ways
    torchrun --nproc-per-node 4 -m dsv3 train --pp 2 --pp-schedule dualpipev --ep 2

Reused from dsv3.train: the data pipeline (`prepare_data`, `BatchIterator`), LR / MTP-weight / bias-speed
/ batch-ramp schedules, the loss, AdamW, the bias rule, metrics files and plots.  Every rank draws the
same global batch from the same seeded iterator and trains on its data-parallel slice, so a run gives
the single-device run's losses (tests/distributed hold them equal).  One exception: a batch ramp's sizes
are rounded to multiples of the data-parallel ranks, so they match a single process's only where they
divide (and resuming on another number of ranks re-plans the rest of the ramp).  Rank 0 alone logs and writes files.

Checkpoints are DCP (resumable on another layout, checkpoint.py); the final model is also exported to
OUT/hf in the Hugging Face layout (`--resume` on a finished run redoes a missing or incomplete export).
`--resume` also continues a single-device run's checkpoint (its HF weights and index-keyed optimizer
state, sharded on load) under FSDP / EP, which scales a run up mid-way; not yet under --pp.
Validation splits each eval batch over the data-parallel ranks as training does and sums the cross-entropy
over them, so val_loss is the single-device value (not under a pipeline, where the model is split: use
`dsv3 eval --ckpt OUT/hf` afterwards).  Not supported here yet: EMA, and gradient accumulation or a batch
ramp under a pipeline (its micro-batch shapes are fixed).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console

from .. import precision as prec
from ..data.dataset import BatchIterator, iter_eval
from ..model import Transformer
from ..checkpoint import from_pretrained
from ..train.checkpointing import DiskSpaceError, check_fresh_out, clear_run, load_trainer_state, resume_dir
from ..train.config import TrainConfig
from ..train.data_setup import prepare_data
from ..train.evaluate import bits_per_byte, scored_text
from ..train.metrics import MetricsLogger, max_violation_per_layer, mfu, peak_flops
from ..train.optim import decay_split
from ..train.schedules import BatchPlan, lr_schedule, bias_update_speed, mtp_weight
from . import checkpoint as ckpt
from .mesh import ParallelConfig, ParallelMesh, build_mesh
from .step import DistributedStep

TOKENIZER_FILE = "tokenizer.json"  # beside the exported model in OUT/hf


def init_distributed(device: str, timeout: datetime.timedelta | None = None) -> tuple[torch.device, bool]:
    """Joins the torchrun job (or makes a one-process group); returns (this rank's device, whether
    this call created the process group).  timeout: how long a collective may wait before the job
    fails (None: torch's default, 10 minutes for NCCL)."""
    cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not cuda:
        raise ValueError(f"--device {device}: no CUDA device here")
    dev = torch.device("cpu")
    if cuda:
        local = os.environ.get("LOCAL_RANK")  # torchrun: one GPU per local rank; else --device's (cuda:1) or the first
        dev = torch.device("cuda", int(local)) if local is not None else torch.device(device if ":" in device else "cuda:0")
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"rank on {dev}, but only {torch.cuda.device_count()} CUDA devices are visible "
                             "(fewer --nproc-per-node, or check CUDA_VISIBLE_DEVICES)")
        # before any CUDA allocation (NCCL communicators, the mesh, the model): otherwise everything
        # lands on GPU 0
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return dev, False
    backend = "nccl" if cuda else "gloo"
    # device_id binds the NCCL communicator to this rank's GPU (eager init; barrier() knows its device)
    kw = {"device_id": dev if cuda else None, "timeout": timeout}
    if "RANK" in os.environ:
        dist.init_process_group(backend, **kw)
    else:  # `dsv3 train --dp-shard 1 ...` without torchrun: a world of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)
    return dev, True


class DistributedTrainer:
    """The run: set-up, the step loop with rank-0 logging, checkpoints, the final export."""

    def __init__(self, cfg: TrainConfig, pcfg: ParallelConfig, resume: bool, device: torch.device, overwrite: bool = False):
        """Checks everything that can be wrong before anything is written (ValueError, one line)."""
        self.rank0 = dist.get_rank() == 0
        self.console = Console(quiet=not self.rank0)
        self._cpu_group = dist.new_group(backend="gloo")  # host-side flags, whatever the device backend
        self.resume_from, self.from_single_device = None, False
        self.overwrite = overwrite and not resume
        if resume:
            self.resume_from = resume_dir(cfg.out_path, ckpt.STATE_FILE)
            if self.resume_from is None:  # a single-device run scaled up: its HF weights and optimizer state
                self.resume_from, self.from_single_device = resume_dir(cfg.out_path), True
            if self.resume_from is None:
                raise ValueError(f"--resume: no complete checkpoint under {cfg.out_path / 'checkpoints'}")
            saved = TrainConfig.from_json((self.resume_from / "train_config.json").read_text())
            saved.out, saved.device = cfg.out, cfg.device  # replay the run; the layout may change
            cfg = saved
        else:
            check_fresh_out(cfg.out_path, overwrite)
        if cfg.ema_decay:
            raise ValueError("--ema-decay is not supported by distributed training yet")
        if cfg.precision == "fp8":  # the FP8 layers are not applied here: a run would say fp8 and train bf16
            raise ValueError("--precision fp8 is not supported by distributed training yet (use bf16)")
        self.cfg, self.device = cfg, device
        self.precision = prec.resolve_precision(cfg.precision, device)
        self.model_cfg = cfg.model_config()
        pcfg = ParallelConfig(**{**asdict(pcfg), "recompute": cfg.recompute, "compile": cfg.compile})
        self.pcfg = pcfg.check(dist.get_world_size(), self.model_cfg)
        if self.from_single_device and self.pcfg.pp > 1:
            raise ValueError("a single-device checkpoint resumes under FSDP / EP, not yet under --pp: resume it without "
                             "--pp first (its next checkpoint is distributed and resumes on any layout)")
        self._check_batches()
        self.data = self._prepare_data(str(self.resume_from / "tokenizer.json") if self.resume_from else cfg.tokenizer)
        self._stop = False

    def _prepare_data(self, tokenizer: str | None):
        """Rank 0 trains and caches the tokenizer and the tokenised corpus first, the others then read
        the cache; a bad input fails on rank 0 and stops every rank (no rank left waiting)."""
        data, error = None, None
        if self.rank0:
            try:
                data = prepare_data(self.cfg, self.model_cfg.vocab_size, tokenizer, self.console)
            except (ValueError, FileNotFoundError, OSError) as e:
                error = e
        ok = torch.tensor(float(error is None))
        dist.broadcast(ok, src=0, group=self._cpu_group)
        if error is not None:
            raise error
        if not ok.item():
            raise _OtherRankFailed()
        return data or prepare_data(self.cfg, self.model_cfg.vocab_size, tokenizer, self.console)

    def _check_batches(self) -> None:
        c, p = self.cfg, self.pcfg
        sizes = [c.batch_size] + ([c.batch_ramp_start] if c.batch_ramp_start else [])
        for size in sizes:
            if size % p.dp:
                raise ValueError(f"batch size {size} is not divisible by the {p.dp} data-parallel ranks")
        if p.pp > 1:
            if c.batch_ramp_start or c.micro_batch_size:
                raise ValueError("--batch-ramp-start / --micro-batch-size are not supported with --pp (use --n-microbatches)")
            if (c.batch_size // p.dp) % p.microbatches:
                raise ValueError(f"{c.batch_size // p.dp} sequences per data-parallel rank are not divisible into "
                                 f"{p.microbatches} micro-batches")

    # ------------------------------------------------------------------ set-up
    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the single-device trainer's initial weights, on every rank
        if self.from_single_device:
            model = from_pretrained(self.resume_from, device="cpu", dtype=torch.float32).train()
            optimizer_names = [n for group in decay_split(model) for n, _ in group]  # before parallelize wraps it
        else:
            model = Transformer(self.model_cfg).train()
        if cfg.compile and self.device.type == "cuda":  # the attention bench/dist_throughput.py measures, as on one device
            from .. import perf  # noqa: F401 -- registers the cuDNN attention core

            model.set_impl(attn="cudnn")
        self.mesh = build_mesh(self.pcfg, self.device.type)
        self.step_fn = DistributedStep(model, self.mesh, cfg, self.device, prec.autocast_dtype(self.precision),
                                       cfg.batch_size // self.pcfg.dp)
        self.plan = BatchPlan(cfg.steps, cfg.batch_size, cfg.batch_ramp_start, cfg.batch_ramp_steps, self.pcfg.dp)
        self.schedule = lr_schedule(cfg.lr_shape, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.decay_start_frac,
                                    cfg.min_lr_frac, self.plan)
        self.batches = BatchIterator(self.data.corpus.train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        self.step = 0
        if self.from_single_device:
            state = load_trainer_state(self.resume_from)
            ckpt.load_single_device_optimizer(self.step_fn.part, self.step_fn.optimizer, state["optimizer"], optimizer_names)
            self.batches.load_state_dict(state["batches"])
            torch.set_rng_state(state["rng_cpu"])
            self.step = state["step"]
        elif self.resume_from:
            state = ckpt.load(self.resume_from, self.step_fn.part, self.step_fn.optimizer)
            self.batches.load_state_dict(state["batches"])
            torch.set_rng_state(state["rng_cpu"])
            self.step = state["step"]

    def _save(self) -> Path:
        # the tokenizer goes in with the other files, before the state file marks the checkpoint complete
        files = {"train_config.json": self.cfg.to_json(), "parallel_config.json": json.dumps(asdict(self.pcfg), indent=2),
                 "tokenizer.json": self.data.tokenizer.to_json()}
        state = {"step": self.step, "batches": self.batches.state_dict(), "rng_cpu": torch.get_rng_state()}
        return ckpt.save(self.cfg.out_path, self.step, self.step_fn.part, self.step_fn.optimizer, state, files,
                         self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------ one step
    def _train_step(self) -> dict:
        cfg, p = self.cfg, self.pcfg
        frac = self.plan.fraction(self.step)  # of the run's tokens: bias freeze and MTP switch (and LR phases) are token-indexed
        batch = self.plan.batch_size(self.step)
        per_rank = batch // p.dp
        lo = self.mesh.dp_rank * per_rank
        # this rank's rows of the global batch; every rank advances the same global position
        inputs, targets = self.batches.next_batch(batch, rows=slice(lo, lo + per_rank))
        inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        lam = mtp_weight(frac, 1.0, cfg.mtp_weight_early, cfg.mtp_weight_late, cfg.mtp_weight_switch_frac)
        gamma = bias_update_speed(frac, 1.0, cfg.bias_update_speed, cfg.bias_freeze_frac)
        lr = self.schedule.lr(self.step)
        r = self.step_fn.step(inputs, targets, lr, lam, gamma, micro_batch=cfg.micro_batch_size)
        self.step += 1
        return {**r, "lr": lr, "batch_size": batch, "tokens": batch * cfg.seq_len}

    def _validate(self) -> tuple[float, float] | None:
        if self.pcfg.pp > 1:
            return None
        corpus = self.data.corpus
        loss = evaluate_data_parallel(self.step_fn.part, corpus.val_tokens, self.cfg.seq_len, self.cfg.batch_size,
                                      self.cfg.eval_batches, self.device, prec.autocast_dtype(self.precision), self.mesh,
                                      micro_batch=self.cfg.micro_batch_size)
        scored = scored_text(corpus.val_tokens, self.cfg.seq_len, self.cfg.batch_size, self.cfg.eval_batches,
                             self.data.tokenizer.byte_lengths())
        return loss, bits_per_byte(loss, *scored)

    def _stop_agreed(self) -> bool:
        """A signal may reach ranks at different steps: stop when any rank has one, all together."""
        flag = torch.tensor(float(self._stop))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._cpu_group)
        return bool(flag.item())

    def _on_signal(self, signum, frame) -> None:
        if self._stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop = True
        self.console.print(f"\n[yellow]{signal.Signals(signum).name}: finishing this step, then saving a checkpoint[/yellow]")

    # ------------------------------------------------------------------ the run
    def run(self) -> Path | None:
        """Trains to cfg.steps (or a signal); returns the HF export on rank 0 when the run completes."""
        cfg, out = self.cfg, self.cfg.out_path
        self._build()
        m = self.model_cfg
        self.console.print(f"[bold]dsv3 train (distributed)[/bold]  preset={cfg.preset}  world={dist.get_world_size()}  "
                           f"device={self.device.type}  out={cfg.out}")
        self.console.print(self.pcfg.describe())
        self.console.print(f"data: {self.data.describe()}")
        self.console.print(prec.describe(self.precision, self.cfg.moments))
        if self.resume_from:
            self.console.print(f"resuming from {self.resume_from} at step {self.step}")
        if self.step >= cfg.steps:  # resuming a finished run: nothing to train, nothing to rewrite (as single-device) ...
            if self._agreed(ckpt.export_complete(out / "hf", (TOKENIZER_FILE,))):
                self.console.print(f"run already complete at step {self.step} of {cfg.steps}: {self.resume_from}")
                return None
            # ... but an export that failed or was deleted can only be redone from here
            self.console.print(f"run complete at step {self.step} of {cfg.steps}; {out / 'hf'} is missing or incomplete: "
                               "exporting it")
            return self._export()
        if self.pcfg.pp > 1:
            self.console.print("validation: skipped under --pp (the model is split across ranks); "
                               f"`dsv3 eval --ckpt {out / 'hf'}` scores the final model")
        if self.rank0:
            if self.overwrite:
                clear_run(out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_config.json").write_text(cfg.to_json())
            self.data.tokenizer.save(out / "tokenizer.json")
        logger = MetricsLogger(out) if self.rank0 else None
        if logger:
            logger.truncate_after(self.step)
        flops = m.flops_per_token(cfg.seq_len, include_mtp=True)
        peak = peak_flops(self.device, self.precision) if self.precision == "bf16" else None
        world = dist.get_world_size()
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(cfg.deterministic == "on" or (cfg.deterministic == "auto" and self.device.type == "cpu"))
        every = max(1, cfg.steps // 20)
        # the step of the newest checkpoint, which a stop right after an interval save (or before a resumed
        # run's first step) must not write again
        saved_step, path = (self.step, self.resume_from) if self.resume_from else (None, None)
        try:
            while self.step < cfg.steps and not self._stop_agreed():
                t0 = time.perf_counter()
                r = self._train_step()
                loss = r["loss"].item()
                dt = time.perf_counter() - t0
                tok_s = r["tokens"] / dt
                row = {"loss": loss, "lr": r["lr"], "grad_norm": r["grad_norm"], "tok_s": tok_s,
                       "tok_s_per_rank": tok_s / world, "batch_size": r["batch_size"], "balance_loss": r["balance_loss"]}
                if "mtp_loss" in r:
                    row["mtp_loss"] = r["mtp_loss"]
                if r["loads"] is not None:
                    vio = max_violation_per_layer(r["loads"].cpu())
                    row["max_vio"] = sum(vio) / len(vio)
                util = mfu(tok_s / world, flops, peak)
                if util is not None:
                    row["mfu"] = util
                if self.step % cfg.eval_interval == 0 or self.step == cfg.steps:
                    val = self._validate()
                    if val is not None:
                        row.update(val_loss=val[0], val_bpb=val[1])
                if logger:
                    logger.log(self.step, **row)
                    if r["loads"] is not None and (self.step % max(1, cfg.eval_interval // 5) == 0 or self.step == cfg.steps):
                        logger.log_expert_loads(self.step, r["loads"].cpu())
                if self.step % every == 0 or self.step == cfg.steps:
                    val = f" val {row['val_loss']:.3f}" if "val_loss" in row else ""
                    self.console.print(f"step {self.step}/{cfg.steps} loss {loss:.3f}{val} | {tok_s:,.0f} tok/s "
                                       f"({tok_s / world:,.0f} per rank)")
                if self.step % cfg.ckpt_interval == 0 and self.step < cfg.steps:
                    saved_step, path = self.step, self._save()
            if saved_step != self.step:
                path = self._save()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            torch.use_deterministic_algorithms(was_deterministic)
            if logger:
                logger.close()
        self.console.print(f"checkpoint: {path}" + ("  (interrupted: `--resume` continues)" if self.step < cfg.steps else ""))
        if self.step < cfg.steps:
            return None
        export = self._export()
        if export is not None:
            from ..train.plots import plot_run

            for p in plot_run(out):
                self.console.print(f"plot: {p}")
        return export

    def _export(self) -> Path | None:
        """Collective.  The final model and tokenizer in OUT/hf; the path on rank 0, None elsewhere."""
        export = ckpt.export_hf(self.step_fn.part, self.mesh, self.model_cfg, self.cfg.out_path / "hf",
                                files={TOKENIZER_FILE: self.data.tokenizer.to_json()})
        if export is not None:
            self.console.print(f"exported (Hugging Face layout): {export}")
        return export

    def _agreed(self, flag: bool) -> bool:
        """Rank 0's answer on every rank: a file check on the shared folder must not split the ranks."""
        t = torch.tensor(float(flag))
        dist.broadcast(t, src=0, group=self._cpu_group)
        return bool(t.item())


@torch.no_grad()
def evaluate_data_parallel(model: torch.nn.Module, tokens, seq_len: int, batch_size: int, max_batches: int | None,
                           device: torch.device, autocast: torch.dtype | None, mesh: ParallelMesh,
                           micro_batch: int | None = None) -> float:
    """`dsv3.train.evaluate.evaluate` over the data-parallel ranks: each scores its slice of every eval
    batch (training's slicing; a short last batch in near-equal parts), `micro_batch` rows per forward
    (--micro-batch-size), and the CE sums and token counts are all-reduced, so every rank returns the
    single-device loss."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [CE sum, tokens]
    for inputs, targets in iter_eval(tokens, batch_size, seq_len, max_batches):
        mine = torch.tensor_split(torch.arange(len(inputs)), mesh.cfg.dp)[mesh.dp_rank]
        # every rank runs as many forwards as the largest share needs (FSDP's gathers and EP's all-to-alls
        # are collective); a forward left no rows runs on one row and does not count: the model takes no
        # empty batch
        largest = -(-len(inputs) // mesh.cfg.dp)  # rank 0's share: tensor_split gives the first ranks the extra rows
        chunk = micro_batch or largest
        for j in range(-(-largest // chunk)):
            part = mine[j * chunk:(j + 1) * chunk]
            rows = part if len(part) else torch.arange(1)
            x, y = inputs[rows].to(device), targets[rows].to(device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                logits = model(x)
            if len(part):
                sums[0] += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").double()
                sums[1] += y.numel()
    model.train(was_training)
    dist.all_reduce(sums, group=mesh.dp.get_group())
    if sums[1] == 0:
        raise ValueError(f"validation split of {len(tokens)} tokens is shorter than one sequence of {seq_len + 1}")
    return (sums[0] / sums[1]).item()


class _OtherRankFailed(Exception):
    """Rank 0 failed on bad input and says so; the other ranks stop quietly."""


def main(cfg: TrainConfig, pcfg: ParallelConfig, resume: bool, overwrite: bool = False) -> int:
    """The CLI's entry: one-line errors (printed by rank 0 only), exit code 2."""
    from ..cli import UsageError

    try:
        device, created = init_distributed(cfg.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        try:
            trainer = DistributedTrainer(cfg, pcfg, resume, device, overwrite)
        except (ValueError, FileNotFoundError, OSError, _OtherRankFailed) as e:
            if dist.get_rank() == 0:
                raise UsageError(str(e)) from None
            return 2
        try:
            trainer.run()
        except DiskSpaceError as e:  # before a checkpoint is written, on every rank: the earlier ones are intact
            if dist.get_rank() == 0:
                raise UsageError(str(e)) from None
            return 2
        return 0
    finally:
        if created:
            dist.destroy_process_group()
