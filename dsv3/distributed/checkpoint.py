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
rank 0 renames into place after everyone is done (assumes one shared filesystem); before that, rank 0
checks the folder's free space against all ranks' shards, and every rank refuses together
(`DiskSpaceError`) when it is short.
`export_hf` gathers each stage's full tensors onto its first data-parallel rank and then onto rank 0,
which needs the whole model in CPU memory -- fine for the sizes trained here, not for 671B.  It too
writes into a hidden folder renamed into place, so a killed export leaves no half OUT/hf.
Not here: the single-device checkpoints (dsv3.train.checkpointing), which are HF folders directly.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate

from ..checkpoint import save_pretrained
from ..checkpoint.hf_io import INDEX_FILE
from ..config import ModelConfig
from ..model import Transformer
from ..train.checkpointing import CHECKPOINT_SLACK_BYTES, DiskSpaceError, step_dirs
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
    written beside it by rank 0 (configs); the tokenizer is the caller's to add via files or later.
    Raises DiskSpaceError on every rank, before anything is written, when the disk cannot hold it."""
    root = out / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    rank0 = dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        # every save killed mid-write (torchrun's SIGKILL after its shutdown timeout) left a folder
        # whose space the next checkpoint may need, whatever its step
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    model_sd, optim_sd = get_state_dict(part, optimizer, options=_OPTIONS)
    _check_disk_space(root, _written_bytes(model_sd) + _written_bytes(optim_sd))
    if rank0:
        tmp.mkdir()
    dist.barrier()
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


def _written_bytes(state_dict: dict) -> int:
    """The tensor bytes this rank writes: DCP writes a replicated DTensor shard (HSDP) once, so it is
    counted on its first replica only; plain tensors (scalars, buffers) are counted on every rank."""
    total = 0
    for t in state_dict.values():
        if isinstance(t, DTensor):
            coordinate = t.device_mesh.get_coordinate()
            if any(isinstance(p, Replicate) and c for p, c in zip(t.placements, coordinate)):
                continue
            t = t.to_local()
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def _check_disk_space(root: Path, local_bytes: int) -> None:
    """Collective.  Rank 0 checks the shared folder holds every rank's shards and broadcasts the verdict,
    so all ranks raise together instead of failing mid-write with an opaque serialisation error."""
    sizes = [0] * dist.get_world_size()
    dist.all_gather_object(sizes, local_bytes)
    verdict = [None]  # rank 0's error message, if any
    if dist.get_rank() == 0:
        needed, free = sum(sizes) + CHECKPOINT_SLACK_BYTES, shutil.disk_usage(root).free
        if free < needed:
            verdict[0] = (f"not enough disk space for a checkpoint under {root}: it needs {needed / 2**30:.1f} GiB and "
                          f"{free / 2**30:.1f} GiB is free ({len(checkpoint_dirs(root.parent))} checkpoint(s) "
                          f"kept there); free space (older checkpoints there can go), or choose another --out")
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise DiskSpaceError(verdict[0])


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


def load_single_device_optimizer(part: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, names: list[str]) -> None:
    """Collective.  A single-device trainer's optimizer state (torch's index-keyed state dict, indices in
    `names` order: `dsv3.train.optim.decay_split`) into this rank's layout: keyed by parameter name, given
    whole on every rank, sharded here as the parameters are."""
    state = {names[i]: v for i, v in saved["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in saved["param_groups"]]
    set_optimizer_state_dict(part, optimizer, optim_state_dict={"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def load_model(path: Path) -> Transformer:
    """The model of one DCP checkpoint folder (checkpoints/step_N), in one process without a process
    group: DCP keeps global shapes under Transformer names, so any layout's checkpoint loads whole.
    Weights only (the optimizer state stays on disk); fp32 on the CPU."""
    from ..train.config import TrainConfig

    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path}: not a complete distributed checkpoint (no {STATE_FILE})")
    cfg = TrainConfig.from_json((path / "train_config.json").read_text()).model_config()
    model = Transformer(cfg)
    sd = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": the one process is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=str(path), no_dist=True)  # in place, into the model's own tensors
    return model


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
              dtype: torch.dtype = torch.float32, files: dict[str, str] | None = None) -> Path | None:
    """Collective.  Rank 0 writes the full model to `path` in the HF layout (`dsv3.from_pretrained`
    and transformers read it), with `files` (name -> text: the tokenizer) beside it, replacing what
    was there; returns the path there, None elsewhere."""
    tensors = full_state_dict(part, mesh)
    if tensors is None:
        return None
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.load_state_dict(tensors, strict=True, assign=True)  # strict: a missing stage is an error
    model.rope.reset_parameters("cpu")
    # a hidden folder holds the whole export (save_pretrained's own temporary folder too) until it is
    # complete: a killed export leaves no half `path`, and the next export removes what it left
    partial = path.parent / f".{path.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_pretrained(model, partial / path.name, dtype=dtype)
    for name, text in (files or {}).items():
        (partial / path.name / name).write_text(text)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial / path.name, path)
    partial.rmdir()
    return path


def export_complete(path: Path, files: tuple[str, ...] = ()) -> bool:
    """Whether `path` holds a whole export: config, index, every shard the index names, and `files`."""
    try:
        shards = set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError):  # missing or truncated
        return False
    return all((path / name).is_file() for name in ("config.json", *shards, *files))
