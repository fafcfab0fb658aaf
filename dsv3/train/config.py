"""TrainConfig: every knob of a training run, saved beside each checkpoint so `--resume` replays it.

Defaults follow the report's recipe (spec §2.1) where it gives a number: AdamW beta 0.9/0.95, weight
decay 0.1, clipping at 1.0, bias update speed 1e-3 frozen for the last 500B/14.8T of tokens, MTP weight
0.3 then 0.1, FIM at rate 0.1.  Learning rate and batch are scaled to small runs: the report's 2.2e-4
at 15,360 x 4K-token batches is far too small a step for a 3M-parameter model on a few MB of code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig


@dataclass
class TrainConfig:
    preset: str = "tiny"
    mtp_layers: int | None = None  # MTP depth; None: the preset's (bench has 0 for peer comparisons, 1 for MTP runs)
    data: str | None = None  # None: the built-in corpus (the running Python's stdlib sources)
    out: str = "runs/demo"
    steps: int = 500
    batch_size: int = 8  # sequences per optimizer step (after a ramp, if any)
    micro_batch_size: int | None = None  # None: no gradient accumulation
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_frac: float = 0.1  # cosine decays to lr * this (report: 2.2e-4 -> 2.2e-5)
    warmup_steps: int | None = None  # None: 5 % of the run, at most 2000
    decay_start_frac: float = 0.8  # constant LR until this fraction of the run, then cosine
    lr_shape: str = "wsd"  # wsd (the fields above) | report (the report's five phases, schedules.REPORT_SHAPE)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8  # UNCONFIRMED in the report
    moments: str = "fp32"  # AdamW moments' storage: fp32 (fused torch AdamW) | bf16 (the report's choice, adamw_bf16.py)
    grad_clip: float = 1.0
    batch_ramp_start: int | None = None  # sequences per step at step 0 (report: 3072 -> 15360)
    batch_ramp_steps: int = 0
    bias_update_speed: float = 1e-3  # gamma of the aux-loss-free balancing
    bias_freeze_frac: float = 14.3 / 14.8  # gamma -> 0 for the rest of the run (report)
    mtp_weight_early: float = 0.3
    mtp_weight_late: float = 0.1
    mtp_weight_switch_frac: float = 10 / 14.8
    seq_aux_alpha: float | None = None  # None: the model config's (1e-4)
    ema_decay: float | None = None  # keep an EMA of the weights (report: yes, decay UNCONFIRMED)
    recompute: bool = False  # activation recomputation per block
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32 | fp8
    # fp8 only: spec (power-of-2 scales for wo and the routed experts, spec §3.4) | amax (amax/448 everywhere,
    # the validation runs of 2026-12-01) | pow2 (every FP8 layer); see dsv3/fp8/convert.py
    fp8_scales: str = "spec"
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    # the train/val document split's own seed: fixed, so runs that differ in --seed validate on the same documents
    # (a seed sweep's val losses compare).  Configs saved before it existed split with `seed` (from_json).
    val_seed: int = 0
    # torch.use_deterministic_algorithms for the run: "auto" = on for CPU (bit-identical reruns and resumes;
    # multithreaded index-accumulate kernels otherwise vary in the last bits), off on GPU (speed)
    deterministic: str = "auto"
    tokenizer: str | None = None  # a tokenizer.json (or folder); None: train one on the corpus
    vocab_size: int | None = None  # tokenizer vocabulary to train; None: the preset's vocab_size
    fim_rate: float = 0.1
    max_data_bytes: int | None = None
    cache_dir: str = "~/.cache/dsv3"
    eval_interval: int = 100
    eval_batches: int = 8
    ckpt_interval: int = 250
    keep_checkpoints: int = 2
    sample_prompt: str = "def fibonacci(n):\n"
    sample_tokens: int = 64

    def __post_init__(self) -> None:
        """Argument errors before anything is built or written: `dsv3 train` turns them into one line, exit 2."""
        at_least = {"steps": 1, "batch_size": 1, "seq_len": 1, "micro_batch_size": 1, "warmup_steps": 0, "batch_ramp_start": 1,
                    "batch_ramp_steps": 0, "eval_interval": 1, "eval_batches": 1, "ckpt_interval": 1, "keep_checkpoints": 1,
                    "sample_tokens": 0, "vocab_size": 1, "max_data_bytes": 1}
        for name, least in at_least.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.fim_rate <= 1:
            raise ValueError(f"--fim-rate must be within [0, 1], got {self.fim_rate}")
        from .schedules import LR_SHAPES

        choices = (("lr_shape", LR_SHAPES), ("moments", ("fp32", "bf16")), ("fp8_scales", ("spec", "amax", "pow2")),
                   ("deterministic", ("auto", "on", "off")))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def model_config(self) -> ModelConfig:
        """The preset with this run's overrides (MTP depth, balance-loss weight), checked against seq_len."""
        cfg = ModelConfig.from_preset(self.preset)
        if self.mtp_layers is not None:
            if self.mtp_layers < 0:
                raise ValueError(f"--mtp-layers must be >= 0, got {self.mtp_layers}")
            cfg = cfg.replace(num_mtp_layers=self.mtp_layers)
        if self.seq_aux_alpha is not None:
            cfg = cfg.replace(seq_aux_alpha=self.seq_aux_alpha)
        if self.seq_len <= cfg.num_mtp_layers:  # MTP depth k predicts k tokens ahead: it needs positions left
            raise ValueError(f"--seq-len {self.seq_len} must exceed the MTP depth {cfg.num_mtp_layers}")
        if self.seq_len > cfg.max_position_embeddings:
            raise ValueError(f"--seq-len {self.seq_len} exceeds the preset's max_position_embeddings {cfg.max_position_embeddings}")
        return cfg

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        fields, saved = {f.name for f in dataclasses.fields(cls)}, json.loads(text)
        saved.setdefault("val_seed", saved.get("seed", 0))  # older runs split with their training seed
        return cls(**{k: v for k, v in saved.items() if k in fields})

    @property
    def out_path(self) -> Path:
        return Path(self.out)
