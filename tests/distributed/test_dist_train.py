"""The distributed trainer's validation and checkpoint saving: val_loss equals one process's with each
rank scoring only its share (and a pipeline run says it skips validation); a SIGTERM right after an
interval checkpoint saves it once; killed saves' folders are removed; a disk too small for all ranks'
shards stops every rank before anything is written; an incomplete HF export is told from a whole one."""

import io
import json
import os
import signal
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_harness import TINY, Spec, build_step
from dist_launch import run_ranks
from rich.console import Console
from test_train import synthetic_code

from dsv3 import ModelConfig, Transformer
from dsv3.distributed import checkpoint as ckpt
from dsv3.distributed.mesh import ParallelConfig
from dsv3.distributed.train import DistributedTrainer, evaluate_data_parallel
from dsv3.train.checkpointing import CHECKPOINT_SLACK_BYTES, DiskSpaceError
from dsv3.train.config import TrainConfig
from dsv3.train.evaluate import evaluate

SEQ, BATCH = 16, 8
# 17 windows: eval batches of 8, 8 and 1, so the last leaves rank 1 of 2 no rows
VAL = np.random.default_rng(0).integers(0, TINY["vocab_size"], 17 * SEQ + 1)


def _validation_worker(rank: int, world: int, out: str) -> None:
    step = build_step(Spec(parallel={"ep": 2}, batch=BATCH, seq_len=SEQ), world)  # FSDP + EP: both collective
    result = {}
    for micro in (None, 3):
        rows = []
        hook = step.part.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
        loss = evaluate_data_parallel(step.part, VAL, SEQ, BATCH, None, torch.device("cpu"), None, step.mesh, micro)
        hook.remove()
        result[str(micro)] = {"loss": loss, "rows": rows}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_validation_splits_batches_and_equals_one_process(tmp_path):
    """Each rank scores its training share of every eval batch, --micro-batch-size rows per forward, every
    rank running the same number of forwards (they are collective); the loss is one process's."""
    run_ranks(_validation_worker, 2, str(tmp_path))
    torch.manual_seed(Spec().seed)
    ref = evaluate(Transformer(Spec().model_config()), VAL, SEQ, BATCH, None, torch.device("cpu"))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for micro, rows in (("None", [BATCH // 2, BATCH // 2, 1]), ("3", [3, 1, 3, 1, 1])):
            assert abs(got[micro]["loss"] - ref) <= 1e-6 * ref, (rank, micro, got[micro]["loss"], ref)
            assert got[micro]["rows"] == rows, (micro, got[micro]["rows"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "code.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_code(0)))
    return path


def _trainer(data: str, out: str, pcfg: ParallelConfig, **overrides) -> DistributedTrainer:
    cfg = TrainConfig(preset="tiny", data=data, out=out, steps=4, batch_size=4, seq_len=32, vocab_size=512,
                      eval_interval=100, eval_batches=1, ckpt_interval=2, device="cpu", seed=0,
                      cache_dir=str(Path(data).parent / "cache"))
    return DistributedTrainer(replace(cfg, **overrides), pcfg, resume=False, device=torch.device("cpu"))


def _pipeline_worker(rank: int, world: int, data: str, out: str) -> None:
    trainer = _trainer(data, out, ParallelConfig(pp=2), steps=1, eval_interval=1)
    trainer.console = Console(file=io.StringIO(), record=True, width=200)
    trainer.run()
    Path(out, f"log{rank}.txt").write_text(trainer.console.export_text())


def test_pipeline_run_says_validation_is_skipped(corpus, tmp_path):
    run_ranks(_pipeline_worker, 2, str(corpus), str(tmp_path), timeout=240)
    log = (tmp_path / "log0.txt").read_text()
    assert "validation: skipped under --pp" in log, log
    assert "val_loss" not in (tmp_path / "metrics.jsonl").read_text()


def _sigterm_after_interval_save_worker(rank: int, world: int, data: str, out: str) -> None:
    trainer = _trainer(data, out, ParallelConfig())
    saved_steps, save = [], ckpt.save
    ckpt.save = lambda out, step, *args: saved_steps.append(step) or save(out, step, *args)
    train_step = trainer._train_step

    def step_then_sigterm():  # as torchrun forwards a SIGTERM, to one rank, right after step 2 ends
        result = train_step()
        if trainer.step == 2 and rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    trainer._train_step = step_then_sigterm
    trainer.run()
    Path(out, f"saved{rank}.json").write_text(json.dumps(saved_steps))


def test_sigterm_after_interval_save_saves_once_and_stale_tmps_go(corpus, tmp_path):
    out = tmp_path / "run"
    for stale in (".tmp_step_000001", ".tmp_step_000007"):  # saves killed at other steps
        (out / "checkpoints" / stale).mkdir(parents=True)
        (out / "checkpoints" / stale / "__0_0.distcp").write_bytes(b"half")
    run_ranks(_sigterm_after_interval_save_worker, 2, str(corpus), str(out), timeout=240)
    for rank in range(2):
        assert json.loads((out / f"saved{rank}.json").read_text()) == [2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]
    assert (out / "latest").resolve().name == "step_000002"


def _disk_space_worker(rank: int, world: int, out: str) -> None:
    spec = Spec(parallel={"dp_replicate": 2})  # HSDP: DCP writes the replicas' shards once
    step = build_step(spec, world)
    ckpt.save(Path(out), 1, step.part, step.optimizer, {"step": 1}, {}, keep=5)
    # the whole model's fp32 weights and two fp32 AdamW moments, whichever rank holds them
    tensors = 3 * 4 * sum(p.numel() for p in Transformer(spec.model_config()).parameters())
    usage = namedtuple("usage", "total used free")
    outcomes = {}
    for name, step_number, free in (("short", 2, 0.9 * tensors), ("enough", 3, 1.1 * tensors)):
        free = int(free) + CHECKPOINT_SLACK_BYTES
        ckpt.shutil.disk_usage = lambda path, free=free: usage(0, 0, free)  # asked on rank 0 only
        try:
            ckpt.save(Path(out), step_number, step.part, step.optimizer, {"step": step_number}, {}, keep=5)
            outcomes[name] = "saved"
        except DiskSpaceError as e:
            outcomes[name] = str(e)
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcomes))


def test_checkpoint_refused_on_every_rank_when_the_disk_is_short(tmp_path):
    """Rank 0 checks all ranks' tensor bytes (replicas once, within 10%) against the free space; when
    short, every rank raises before anything is written, and the earlier checkpoint stays."""
    run_ranks(_disk_space_worker, 2, str(tmp_path))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["enough"] == "saved"
        assert got["short"].startswith("not enough disk space for a checkpoint under ") and "\n" not in got["short"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001", "step_000003"]


def test_export_complete_needs_every_file(tmp_path):
    hf = tmp_path / "hf"
    Transformer(ModelConfig(**TINY)).save_pretrained(hf)
    (hf / "tokenizer.json").write_text("{}")
    assert ckpt.export_complete(hf, ("tokenizer.json",))
    for name in ("tokenizer.json", "model-00001-of-00001.safetensors", "config.json"):
        (hf / name).rename(tmp_path / name)
        assert not ckpt.export_complete(hf, ("tokenizer.json",)), name
        (tmp_path / name).rename(hf / name)
    assert not ckpt.export_complete(tmp_path / "nothing")
