"""`dsv3 train`: argument parsing for the trainer.  No arguments runs the built-in demo."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from ..cli import UsageError
from ..config import PRESETS
from .config import TrainConfig

EXAMPLES = """\
examples:
  dsv3 train                                   # the demo: tiny preset, stdlib corpus, ~3 min on 2 CPU cores
  dsv3 train --out runs/demo --resume          # continue an interrupted run to its planned end
  dsv3 train --out runs/job --auto-resume      # continue it if it has a checkpoint, else start it (job restarts)
  dsv3 train --preset small --steps 2000 --batch-size 32 --seq-len 512 --out runs/small
  dsv3 train --data my_corpus/ --tokenizer tokenizer.json --out runs/mine   # .txt/.jsonl/.parquet or a folder
  dsv3 train --preset bench --device cuda --precision bf16 --compile --batch-size 8 --seq-len 2048
  dsv3 train --preset bench --mtp-layers 1 --device cuda --compile --steps 300 --out runs/bench_mtp   # an MTP head to draft with
  torchrun --nproc-per-node 4 -m dsv3 train --dp-shard 4 --ep 2 --out runs/fsdp_ep      # FSDP2 + expert parallel
  torchrun --nproc-per-node 4 -m dsv3 train --pp 2 --pp-schedule dualpipev --ep 2 --out runs/pp
  torchrun --nproc-per-node 4 -m dsv3 train --out runs/small --resume --dp-shard 4   # a single-device run, scaled up

Outputs in OUT: metrics.jsonl, tb/ (TensorBoard), plots/*.png, checkpoints/step_N/ (Hugging Face
layout + tokenizer + trainer state), latest -> the newest checkpoint.  Distributed runs (torchrun) keep
sharded DCP checkpoints in checkpoints/step_N/ and export the Hugging Face layout to OUT/hf at the end
(dsv3 eval/generate --ckpt OUT/hf).  A SIGTERM to torchrun reaches every worker, which finishes its step
and saves a checkpoint; but torchrun SIGKILLs the workers --shutdown-timeout seconds (default 30) later,
so give large checkpoints time: torchrun --shutdown-timeout 300 ...
"""

# flag -> help; types and defaults come from TrainConfig
HELP = {
    "preset": f"model preset ({', '.join(PRESETS)})",
    "mtp_layers": "multi-token-prediction depth (default: the preset's)",
    "data": "training text: a file (.txt, .jsonl with 'text', .parquet with 'text'), or a folder (default: built-in corpus)",
    "out": "output folder",
    "steps": "optimizer steps",
    "batch_size": "sequences per optimizer step",
    "micro_batch_size": "sequences per forward/backward (gradient accumulation when smaller than --batch-size)",
    "seq_len": "tokens per sequence",
    "lr": "peak learning rate",
    "warmup_steps": "linear warmup steps (default: 5%% of the run, at most 2000)",
    "lr_shape": "wsd: constant, then cosine to 10%% over the last 20%% of steps; report: the report's phases "
                "as fractions of the run (cosine from 67.6%% to 96.6%%, then 10%%, then 3.3%% from 98.9%%)",
    "weight_decay": "AdamW weight decay on weight matrices",
    "grad_clip": "global gradient-norm clip",
    "moments": "AdamW moments stored in fp32 (fused torch AdamW) or bf16 (the report's choice: half the optimizer memory)",
    "batch_ramp_start": "batch size at step 0, ramped linearly to --batch-size",
    "batch_ramp_steps": "length of the batch-size ramp in steps",
    "bias_update_speed": "gamma of the aux-loss-free routing-bias update",
    "seq_aux_alpha": "weight of the sequence-wise balance loss (default: the preset's, 1e-4)",
    "ema_decay": "keep an EMA of the weights with this decay; its validation loss is logged as val_loss_ema",
    "recompute": "recompute activations per block in backward",
    "precision": "auto (bf16 on GPU, fp32 on CPU), bf16, fp32, or fp8 (e4m3 block-scaled GEMMs; see dsv3.fp8)",
    "fp8_scales": "with --precision fp8: spec (power-of-2 scales for the attention output projection and the routed "
                  "experts, as the report), amax (amax/448 everywhere) or pow2 (everywhere)",
    "compile": "torch.compile each block; on CUDA also cuDNN attention and sync-free expert dispatch (dsv3.perf, the benchmarked path)",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "seed": "random seed (weights, data order, FIM)",
    "val_seed": "seed of the train/val document split (kept apart from --seed so that a seed sweep validates on the same documents)",
    "deterministic": "deterministic kernels: auto (on for CPU), on, off",
    "tokenizer": "tokenizer.json (or a folder with one); default: train a BPE on the corpus",
    "vocab_size": "vocabulary of the trained tokenizer (default: the preset's)",
    "fim_rate": "fill-in-the-middle rate per document",
    "max_data_bytes": "read at most this many bytes of the corpus",
    "cache_dir": "where tokenizers and tokenised corpora are cached",
    "eval_interval": "steps between validations",
    "eval_batches": "validation batches per evaluation",
    "ckpt_interval": "steps between checkpoints",
    "keep_checkpoints": "how many step checkpoints to keep",
    "sample_prompt": "prompt of the sample printed at the end",
    "sample_tokens": "tokens of that sample",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3 train", description="Train a DeepSeek-V3-architecture model with the report's recipe.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name not in HELP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=HELP[f.name])
            continue
        kind = {"lr": float, "weight_decay": float, "grad_clip": float, "bias_update_speed": float, "seq_aux_alpha": float,
                "ema_decay": float, "fim_rate": float}.get(f.name, int if isinstance(default, int) or f.name in (
                    "micro_batch_size", "warmup_steps", "batch_ramp_start", "vocab_size", "max_data_bytes", "mtp_layers") else str)
        shown = repr(default) if isinstance(default, str) and default != default.strip() else default  # a trailing newline
        p.add_argument(flag, type=kind, default=default, help=HELP[f.name] + (f" (default: {shown})" if default is not None else ""))
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--auto-resume", action="store_true",
                   help="--resume when --out holds a complete checkpoint, else a fresh run: one command for a job that "
                        "a scheduler or torchrun --max-restarts may rerun")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds another run (deletes its checkpoints, metrics and tb/)")
    par = p.add_argument_group("distributed (under torchrun, or with any of these flags; see dsv3.distributed)")
    for flag, kind, text in PARALLEL_FLAGS:
        par.add_argument(flag, type=kind, default=None, help=text)
    return p


# flag, type, help; None means "not given" (the ParallelConfig default applies)
PARALLEL_FLAGS = [
    ("--dp-shard", int, "FSDP ranks (default: the world size left after --pp and --dp-replicate)"),
    ("--dp-replicate", int, "HSDP replicas of the FSDP group (default 1)"),
    ("--ep", int, "expert-parallel ranks, a divisor of --dp-shard (default 1)"),
    ("--pp", int, "pipeline-parallel ranks (default 1)"),
    ("--pp-schedule", str, "1f1b or dualpipev (default 1f1b)"),
    ("--n-microbatches", int, "micro-batches per pipeline step (default: pp for 1f1b, 2 pp for dualpipev)"),
]


def has_checkpoint(out: Path) -> bool:
    """Whether OUT holds a complete checkpoint of either trainer (their state files mark completion:
    dsv3.train.checkpointing.STATE_FILE, dsv3.distributed.checkpoint.STATE_FILE; no torch import here)."""
    return any(any((out / "checkpoints").glob(f"step_*/{name}")) for name in ("trainer_state.pt", "dist_state.pt"))


def _distributed(args: dict, resume: bool, out: str) -> dict | None:
    """The ParallelConfig fields when this run is distributed (torchrun, a parallel flag, or resuming a
    distributed run), else None.  Pops the parallel flags from args."""
    given = {f[2:].replace("-", "_"): args.pop(f[2:].replace("-", "_")) for f, _, _ in PARALLEL_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    dist_ckpt = Path(out) / "latest" / "dist_state.pt"  # dsv3.distributed.checkpoint.STATE_FILE (no torch import here)
    if given or int(os.environ.get("WORLD_SIZE", "1")) > 1 or (resume and dist_ckpt.is_file()):
        return given
    return None


def main(argv: list[str]) -> int:
    args = vars(build_parser().parse_args(argv))
    resume, overwrite, auto_resume = args.pop("resume"), args.pop("overwrite"), args.pop("auto_resume")
    if auto_resume and overwrite:
        raise UsageError("--auto-resume and --overwrite contradict each other: choose one")
    resume = resume or (auto_resume and has_checkpoint(Path(args["out"])))
    parallel = _distributed(args, resume, args["out"])
    try:
        cfg = TrainConfig(**args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if parallel is not None:
        from ..distributed.mesh import ParallelConfig
        from ..distributed.train import main as train_distributed

        return train_distributed(cfg, ParallelConfig(**parallel), resume, overwrite)
    from .checkpointing import DiskSpaceError
    from .trainer import Trainer  # torch import after argument errors

    try:
        trainer = Trainer(cfg, resume=resume, overwrite=overwrite)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UsageError(str(e)) from None
    try:
        trainer.run()
    except DiskSpaceError as e:  # mid-run, before the checkpoint is written: the earlier ones are intact
        raise UsageError(str(e)) from None
    return 0
