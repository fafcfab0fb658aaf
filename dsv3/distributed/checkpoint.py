"""Distributed checkpoints: `torch.distributed.checkpoint` (DCP) for resuming, the HF layout for export.

    OUT/checkpoints/step_000100/   .metadata, __<rank>_0.distcp      model + AdamW state, every rank its shards
                                   dist_state.pt                     step, data position, RNG (rank 0; written
                                                                     last: marks the checkpoint complete)
                                   train_config.json, parallel_config.json, tokenizer.json
    OUT/latest -> checkpoints/step_000100
    OUT/hf/                        the full model in the Hugging Face layout (`export_hf`)

DCP stores every tensor under its Transformer name with its global shape, whatever the layout that
wrote it (FSDP shards, EP expert blocks, pipeline stages), so a run resumes on a different number of
ranks or another dp/ep/pp split: each rank reads the pieces its own layout needs.  The optimizer
state is flattened to per-parameter keys for the same reason.  Ranks write into a hidden folder that
rank 0 renames into place after everyone is done (assumes one shared filesystem).
`export_hf` gathers each stage's full tensors onto its first data-parallel rank and then onto rank 0,
which needs the whole model in CPU memory -- fine for the sizes trained here, not for 671B.
Not here: the single-device checkpoints (dsv3.train.checkpointing), which are HF folders directly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from ..checkpoint import save_pretrained
from ..config import ModelConfig
from ..model import Transformer
from ..train.checkpointing import step_dirs
from .mesh import ParallelMesh

STATE_FILE = "dist_state.pt"
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete distributed checkpoints under OUT, oldest first (by step number)."""
    return step_dirs(out, STATE_FILE)


def is_distributed_run(out: Path) -> bool:
    """Whether OUT's latest checkpoint was written by the distributed trainer."""
    return (out / "latest" / STATE_FILE).is_file()


def save(out: Path, step: int, part: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         files: dict[str, str], keep: int) -> Path:
    """Collective.  state: small picklable trainer state (rank 0's is written); files: name -> text
    written beside it by rank 0 (configs); the tokenizer is the caller's to add via files or later."""
    root = out / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(part, optimizer, options=_OPTIONS)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    dist.barrier()
    if rank0:
        for name, text in files.items():
            (tmp / name).write_text(text)
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        link, new = out / "latest", out / ".latest.tmp"
        new.unlink(missing_ok=True)
        new.symlink_to(final.relative_to(out))
        os.replace(new, link)
        for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, part: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective.  Loads model + optimizer state into this rank's layout; returns the trainer state."""
    model_sd, optim_sd = get_state_dict(part, optimizer, options=_OPTIONS)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(part, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=_OPTIONS)
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise ValueError(f"{path / STATE_FILE}: unreadable trainer state ({type(e).__name__})") from e


def full_state_dict(part: nn.Module, mesh: ParallelMesh) -> dict[str, torch.Tensor] | None:
    """Collective.  The whole model's tensors on global rank 0 (CPU, Transformer names); None elsewhere."""
    local = {}
    for name, t in part.state_dict().items():  # every rank of a stage walks the same names in order
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if mesh.dp_rank == 0:
            local[name] = t.detach().cpu()
    if mesh.cfg.pp == 1:
        return local if dist.get_rank() == 0 else None
    if mesh.dp_rank != 0:
        return None
    parts = [None] * mesh.cfg.pp if mesh.pp_rank == 0 else None
    dist.gather_object(local, parts, group_dst=0, group=mesh.pp.get_group())
    return {k: v for p in parts for k, v in p.items()} if parts is not None else None


def export_hf(part: nn.Module, mesh: ParallelMesh, model_cfg: ModelConfig, path: Path,
              dtype: torch.dtype = torch.float32) -> Path | None:
    """Collective.  Rank 0 writes the full model to `path` in the HF layout (`dsv3.from_pretrained`
    and transformers read it); returns the path there, None elsewhere."""
    tensors = full_state_dict(part, mesh)
    if tensors is None:
        return None
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.load_state_dict(tensors, strict=True, assign=True)  # strict: a missing stage is an error
    model.rope.reset_parameters("cpu")
    save_pretrained(model, path, dtype=dtype)
    return path
