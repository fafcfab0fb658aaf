"""The single-device training loop: data -> model -> loss -> AdamW -> bias update, with visibility.

One optimizer step:
    for each micro-batch: forward (autocast), loss = CE + lambda*MTP + balance, backward (scaled)
    clip grad norm -> AdamW step (LR from the schedule) -> routing-bias update from the step's loads
    -> EMA -> metrics row -> (interval) validation, expert loads, checkpoint
SIGTERM / SIGINT set a flag; the step in flight finishes, a checkpoint is written, and the run returns.
A second SIGINT interrupts at once.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import precision as prec
from ..checkpoint import from_pretrained
from ..data.dataset import BatchIterator
from ..device import resolve_device
from ..model import Transformer
from ..perf import apply_fast_paths
from .balance import update_expert_biases
from .checkpointing import check_fresh_out, clear_run, load_trainer_state, resume_dir, save_checkpoint
from .config import TrainConfig
from .data_setup import RunData, prepare_data
from .evaluate import bits_per_byte, evaluate, scored_text
from .losses import training_loss
from .metrics import MetricsLogger, max_violation_per_layer, mfu, peak_flops
from .optim import build_optimizer
from .recompute import enable_recompute
from .sample import sample
from .schedules import BatchPlan, lr_schedule, bias_update_speed, mtp_weight


@dataclass
class RunResult:
    step: int
    interrupted: bool
    val_loss: float | None
    val_bpb: float | None
    unigram_loss: float
    checkpoint: Path | None
    sample: str | None


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, console: Console | None = None, overwrite: bool = False):
        """Validates everything that can be wrong with the inputs before anything is written.  A fresh run
        into a folder holding another run's checkpoints needs `overwrite` (which replaces that run)."""
        self.console = console or Console()
        out = cfg.out_path
        self.resume_from = None
        self.overwrite = overwrite and not resume
        if resume:
            self.resume_from = resume_dir(out)
            if self.resume_from is None:
                raise ValueError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")
            self.resume_state = load_trainer_state(self.resume_from)
            # replay the run's own config; only where to write and the device may change
            saved = TrainConfig.from_json((self.resume_from / "train_config.json").read_text())
            saved.out, saved.device = cfg.out, cfg.device
            cfg = saved
        else:
            check_fresh_out(out, overwrite)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = prec.resolve_precision(cfg.precision, self.device)
        self.model_cfg = cfg.model_config()
        tokenizer_source = str(self.resume_from / "tokenizer.json") if self.resume_from else cfg.tokenizer
        self.data: RunData = prepare_data(cfg, self.model_cfg.vocab_size, tokenizer_source, self.console)
        self._stop_requested = False

    # ------------------------------------------------------------------ set-up
    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if self.resume_from:
            self.model = from_pretrained(self.resume_from, device=self.device, dtype=torch.float32)
        else:
            self.model = Transformer(self.model_cfg).to(self.device)
        self.model = prec.prepare_model(self.model, self.precision, cfg.fp8_scales).train()
        if cfg.recompute:
            enable_recompute(self.model)
        if cfg.compile and self.device.type == "cuda":
            apply_fast_paths(self.model)  # the benchmarked path: cuDNN attention, sync-free dispatch, compiled blocks
        elif cfg.compile:
            for block in list(self.model.layers) + [m.block for m in self.model.mtp]:
                block.compile()
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.plan = BatchPlan(cfg.steps, cfg.batch_size, cfg.batch_ramp_start, cfg.batch_ramp_steps)
        self.schedule = lr_schedule(cfg.lr_shape, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.decay_start_frac,
                                    cfg.min_lr_frac, self.plan)
        self.batches = BatchIterator(self.data.corpus.train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        self.ema = {n: p.detach().float().cpu().clone() for n, p in self.model.named_parameters()} if cfg.ema_decay else None
        self.step = 0
        if self.resume_from:
            s = self.resume_state
            self.optimizer.load_state_dict(s["optimizer"])
            self.batches.load_state_dict(s["batches"])
            torch.set_rng_state(s["rng_cpu"])
            if self.device.type == "cuda" and s.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(s["rng_cuda"])
            self.ema = s.get("ema")
            self.step = s["step"]

    def _state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "batches": self.batches.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "ema": self.ema,
        }

    def _print_header(self) -> None:
        c, m = self.cfg, self.model_cfg
        counts = m.param_counts()
        self.console.print(f"[bold]dsv3 train[/bold]  preset={c.preset}  device={self.device}  out={c.out}")
        self.console.print(f"model: {counts['total_with_mtp'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M active/token), "
                           f"{m.num_layers} layers ({m.first_k_dense} dense), {m.n_routed_experts} experts top-{m.num_experts_per_tok}, "
                           f"MTP depth {m.num_mtp_layers}")
        self.console.print(f"data: {self.data.describe()}")
        self.console.print(prec.describe(self.precision, self.cfg.moments, self.cfg.fp8_scales))
        self.console.print(f"steps {c.steps} x {c.batch_size} x {c.seq_len} tokens, lr {c.lr} (warmup {self.schedule.warmup_steps}, "
                           f"{self.schedule.describe()}), bias speed {c.bias_update_speed}, MTP weight {c.mtp_weight_early}/{c.mtp_weight_late}")
        if self.resume_from:
            self.console.print(f"resuming from {self.resume_from} at step {self.step}")

    # ------------------------------------------------------------------ one optimizer step
    def _train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        frac = self.plan.fraction(self.step)  # of the run's tokens: bias freeze and MTP switch (and LR phases) are token-indexed
        lr = self.schedule.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.plan.batch_size(self.step)
        micro = min(cfg.micro_batch_size or batch, batch)
        lam = mtp_weight(frac, 1.0, cfg.mtp_weight_early, cfg.mtp_weight_late, cfg.mtp_weight_switch_frac)
        autocast = prec.autocast_dtype(self.precision)
        parts_sum: dict[str, torch.Tensor] = {}
        loads = None
        done = 0
        while done < batch:
            n = min(micro, batch - done)
            inputs, targets = (t.to(self.device, non_blocking=True) for t in self.batches.next_batch(n))
            with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
                out = model(inputs, return_aux=True)
                loss, parts = training_loss(out, targets, lam)
            (loss * (n / batch)).backward()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0) + v.float() * (n / batch)
            if out.expert_loads is not None:
                loads = out.expert_loads if loads is None else loads + out.expert_loads
            done += n
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if loads is not None:
            gamma = bias_update_speed(frac, 1.0, cfg.bias_update_speed, cfg.bias_freeze_frac)
            update_expert_biases(model.moe_layers(), loads, gamma)
        if self.ema is not None:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    self.ema[name].lerp_(p.detach().float().cpu(), 1 - cfg.ema_decay)
        self.step += 1
        return {"lr": lr, "grad_norm": grad_norm, "batch_size": batch, "tokens": batch * cfg.seq_len, "loads": loads, **parts_sum}

    # ------------------------------------------------------------------ the run
    def _on_signal(self, signum, frame) -> None:
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_requested = True
        self.console.print(f"\n[yellow]{signal.Signals(signum).name}: finishing this step, then saving a checkpoint[/yellow]")

    def request_stop(self) -> None:
        self._stop_requested = True

    def _validate(self, model: torch.nn.Module | None = None) -> tuple[float, float]:
        cfg = self.cfg
        val = self.data.corpus.val_tokens
        loss = evaluate(model or self.model, val, cfg.seq_len, cfg.batch_size, cfg.eval_batches, self.device,
                        prec.autocast_dtype(self.precision), micro_batch=cfg.micro_batch_size)
        scored = scored_text(val, cfg.seq_len, cfg.batch_size, cfg.eval_batches, self.data.tokenizer.byte_lengths())
        return loss, bits_per_byte(loss, *scored)

    def _validate_ema(self) -> float:
        """Validation loss of the EMA weights (the report's use of the EMA: an early estimate of the model
        after LR decay); buffers such as the routing biases are the model's own."""
        params = {n: self.ema[n].to(self.device, p.dtype) for n, p in self.model.named_parameters()}
        return self._validate(_WithParams(self.model, params))[0]

    def run(self, on_step=None) -> RunResult:
        """Trains to `cfg.steps` (or until a stop is requested).  `on_step(trainer)` runs after each step."""
        cfg, out = self.cfg, self.cfg.out_path
        self._build()
        self._print_header()
        if self.step >= cfg.steps:  # resuming a finished run: nothing to train, nothing to rewrite
            self.console.print(f"run already complete at step {self.step} of {cfg.steps}: {self.resume_from}")
            return RunResult(self.step, False, None, None, self.data.unigram_loss, self.resume_from, None)
        if self.overwrite:
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(cfg.to_json())
        self.data.tokenizer.save(out / "tokenizer.json")
        logger = MetricsLogger(out)
        logger.truncate_after(self.step)
        flops_per_token = self.model_cfg.flops_per_token(cfg.seq_len, include_mtp=True)
        peak = peak_flops(self.device, self.precision) if self.precision == "bf16" else None  # no fp32 peak table
        load_interval = max(1, cfg.eval_interval // 5)
        val_loss = val_bpb = None
        ckpt = None
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(cfg.deterministic == "on" or (cfg.deterministic == "auto" and self.device.type == "cpu"))
        columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
        try:
            with Progress(*columns, console=self.console, transient=False) as bar:
                task = bar.add_task("train", total=cfg.steps, completed=self.step, info="")
                while self.step < cfg.steps and not self._stop_requested:
                    t0 = time.perf_counter()
                    r = self._train_step()
                    loss = r["loss"].item()  # the one host sync per step: the metrics row needs it
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    tok_s = r["tokens"] / dt
                    row = {"loss": loss, "lr": r["lr"], "grad_norm": r["grad_norm"], "tok_s": tok_s, "batch_size": r["batch_size"]}
                    if "mtp_loss" in r:
                        row["mtp_loss"] = r["mtp_loss"]
                    row["balance_loss"] = r["balance_loss"]
                    if r["loads"] is not None:
                        vio = max_violation_per_layer(r["loads"].cpu())
                        row["max_vio"] = sum(vio) / len(vio)
                        if self.step % load_interval == 0 or self.step == cfg.steps:
                            logger.log_expert_loads(self.step, r["loads"].cpu())
                    util = mfu(tok_s, flops_per_token, peak)
                    if util is not None:
                        row["mfu"] = util
                    if self.step % cfg.eval_interval == 0 or self.step == cfg.steps:
                        val_loss, val_bpb = self._validate()
                        row.update(val_loss=val_loss, val_bpb=val_bpb)
                        if self.ema is not None:
                            row["val_loss_ema"] = self._validate_ema()
                    logger.log(self.step, **row)
                    info = f"loss {loss:.3f}" + (f" val {val_loss:.3f}" if val_loss is not None else "") + f" | {tok_s:,.0f} tok/s"
                    bar.update(task, completed=self.step, info=info)
                    if not self.console.is_terminal and (self.step % max(1, cfg.steps // 20) == 0 or self.step == cfg.steps):
                        self.console.print(f"step {self.step}/{cfg.steps} {info}")  # a log file gets plain lines
                    if self.step % cfg.ckpt_interval == 0 and self.step < cfg.steps:
                        ckpt = save_checkpoint(out, self.step, self.model, self.data.tokenizer, cfg, self._state())
                    if on_step is not None:
                        on_step(self)
            ckpt = save_checkpoint(out, self.step, self.model, self.data.tokenizer, cfg, self._state())
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            torch.use_deterministic_algorithms(was_deterministic)
            logger.close()
        interrupted = self.step < cfg.steps
        self.console.print(f"checkpoint: {ckpt}" + ("  (interrupted: `--resume` continues)" if interrupted else ""))
        text = None
        if not interrupted:
            text = self._finish(out, val_loss, val_bpb)
        return RunResult(self.step, interrupted, val_loss, val_bpb, self.data.unigram_loss, ckpt, text)

    def _finish(self, out: Path, val_loss: float | None, val_bpb: float | None) -> str:
        from .plots import plot_run

        for path in plot_run(out):
            self.console.print(f"plot: {path}")
        if val_loss is not None:
            self.console.print(f"validation loss {val_loss:.3f} nats/token ({val_bpb:.3f} bits/byte); "
                               f"unigram baseline {self.data.unigram_loss:.3f} nats/token")
        tok = self.data.tokenizer
        prompt = self.cfg.sample_prompt
        autocast = prec.autocast_dtype(self.precision)
        # eager, in the run's precision: a compiled model would recompile for each new length of this
        # full-recompute sampler (minutes on a GPU for 16 tokens), and in fp32 the experts' segment-loop
        # fallback would also break the graph at every layer
        with torch.compiler.set_stance("force_eager"), \
                torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
            ids = sample(self.model, tok.encode(prompt), self.cfg.sample_tokens, seed=self.cfg.seed,
                         stop_id=tok.eos_id, max_len=self.cfg.seq_len)
        text = prompt + tok.decode(ids, skip_special=True)
        self.console.rule("sample")
        self.console.print(text, markup=False, highlight=False)
        self.console.rule()
        return text


class _WithParams(torch.nn.Module):
    """`model` run with other parameter values (torch.func.functional_call); train/eval mode passes through."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.model, self.params = model, params

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.params, args, kwargs, strict=False)
