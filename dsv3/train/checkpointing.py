"""Crash-safe training checkpoints.

    OUT/checkpoints/step_000100/   config.json, model-*.safetensors, index   (HF layout, fp32 master weights)
                                   tokenizer.json, train_config.json, trainer_state.pt
    OUT/latest -> checkpoints/step_000100                                   (symlink, swapped atomically)

A checkpoint is written whole into a hidden temporary folder and renamed into place, so a crash
mid-write leaves the previous checkpoints untouched; `trainer_state.pt` is written last and marks a
checkpoint complete.  `dsv3.from_pretrained` reads any checkpoint folder directly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import save_pretrained
from ..data.tokenizer import Tokenizer
from ..model import Transformer
from .config import TrainConfig

STATE_FILE = "trainer_state.pt"


class DiskSpaceError(OSError):
    """The disk cannot hold the next checkpoint; raised before anything is written."""


def step_dirs(out: Path, state_file: str = STATE_FILE) -> list[Path]:
    """Complete checkpoints under OUT (those holding `state_file`), oldest first: by step number, since
    step_1000000 sorts before step_999999 as text."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / state_file).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete single-device checkpoints under OUT, oldest first."""
    return step_dirs(out, STATE_FILE)


def resume_dir(out: Path, state_file: str = STATE_FILE) -> Path | None:
    """The checkpoint a --resume continues: the one `latest` points at, when complete; else the newest."""
    latest = out / "latest"
    if latest.is_symlink() and (latest / state_file).is_file():
        return latest.resolve()
    found = step_dirs(out, state_file)
    return found[-1] if found else None


def check_fresh_out(out: Path, overwrite: bool) -> None:
    """A fresh run may not write into a folder holding another run's checkpoints (pruning and --resume
    would mix the two runs) unless told to replace that run."""
    old = sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
    if old and not overwrite:
        raise ValueError(f"{out} already holds a run ({len(old)} checkpoint(s), {old[-1].name} among them): --resume to "
                         f"continue it, --overwrite to replace it, or another --out")


def clear_run(out: Path) -> None:
    """--overwrite: removes the previous run's checkpoints, `latest` link, metrics and TensorBoard events."""
    for name in ("checkpoints", "tb"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("latest", "metrics.jsonl", "expert_loads.jsonl"):
        (out / name).unlink(missing_ok=True)


def save_checkpoint(out: Path, step: int, model: Transformer, tokenizer: Tokenizer, cfg: TrainConfig, state: dict) -> Path:
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    _make_room(out, checkpoint_bytes(model, state), cfg.keep_checkpoints)
    save_pretrained(model, tmp, dtype=torch.float32)
    tokenizer.save(tmp / "tokenizer.json")
    (tmp / "train_config.json").write_text(cfg.to_json())
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point_latest(out, final)
    for old in checkpoint_dirs(out)[:-cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


# Tokenizer, configs, index and filesystem rounding: a checkpoint's bytes beyond its tensors.
CHECKPOINT_SLACK_BYTES = 64 << 20


def checkpoint_bytes(model: Transformer, state: dict) -> int:
    """What one checkpoint takes on disk: the fp32 weights plus every tensor of the trainer state
    (AdamW moments, EMA weights, RNG states), plus slack."""
    weights = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    return weights + _tensor_bytes(state) + CHECKPOINT_SLACK_BYTES


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _make_room(out: Path, needed: int, keep: int) -> None:
    """Checks the disk holds the next checkpoint before writing it: a full disk otherwise surfaces as an
    opaque serialisation error after minutes of writing (a `bench` checkpoint with AdamW state is ~24 GB).
    When space is short, the checkpoints that pruning would delete after this save are deleted first,
    except the newest, so a crash mid-write still leaves a complete checkpoint."""
    root = out / "checkpoints"
    free = shutil.disk_usage(root).free
    if free >= needed:
        return
    existing = checkpoint_dirs(out)
    doomed = existing[:len(existing) - (keep - 1)] if keep > 0 else []
    for old in doomed[:-1] if doomed and doomed[-1] == existing[-1] else doomed:
        shutil.rmtree(old, ignore_errors=True)
        free = shutil.disk_usage(root).free
        if free >= needed:
            return
    raise DiskSpaceError(f"not enough disk space for a checkpoint under {root}: it needs {needed / 2**30:.1f} GiB and "
                  f"{free / 2**30:.1f} GiB is free ({len(checkpoint_dirs(out))} checkpoint(s) kept there); free space, "
                  f"lower --keep-checkpoints, raise --ckpt-interval, or choose another --out")


def _point_latest(out: Path, target: Path) -> None:
    link, tmp = out / "latest", out / ".latest.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.relative_to(out))
    os.replace(tmp, link)


def load_trainer_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise ValueError(f"{ckpt / STATE_FILE}: unreadable trainer state ({type(e).__name__})") from e


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (-> its `latest`)."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "latest" / "config.json").is_file():
        path = (path / "latest").resolve()
    if not (path / "config.json").is_file():
        dcp = path if (path / "dist_state.pt").is_file() else path / "latest"  # dsv3.distributed.checkpoint.STATE_FILE
        if (dcp / "dist_state.pt").is_file():
            raise ValueError(f"{path}: a distributed (DCP) checkpoint: `dsv3 export --ckpt {path} --out DIR` writes it "
                             f"as a Hugging Face folder (a finished run has one in OUT/hf)")
        raise ValueError(f"{path}: not a checkpoint (no config.json)")
    return path
