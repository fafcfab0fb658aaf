"""`torchrun ... -m dsv3 train --ep 2` gives `dsv3 train`'s losses and validation losses; its DCP
checkpoint resumes on one process through the same command (no parallel flags), and the final model is
exported to OUT/hf, again by `--resume` when that export is missing."""

import json
import shutil
import sys

import pytest
import torch
from dist_launch import run_command, torchrun
from test_train import synthetic_code

import dsv3
from dsv3.cli import main as cli
from dsv3.train.metrics import read_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "code.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_code(0)))
    return path


def args(corpus, out) -> list[str]:
    return ["--preset", "tiny", "--data", str(corpus), "--out", str(out), "--steps", "4", "--batch-size", "4",
            "--seq-len", "64", "--lr", "1e-3", "--vocab-size", "512", "--eval-interval", "2", "--eval-batches", "2",
            "--ckpt-interval", "2", "--cache-dir", str(out.parent / "cache"), "--sample-tokens", "4",
            "--device", "cpu", "--seed", "0"]


def losses(out, key: str = "loss") -> dict[int, float]:
    return {row["step"]: row[key] for row in read_jsonl(out / "metrics.jsonl") if key in row}


def test_torchrun_train_matches_single_process_and_resumes_on_one(corpus, tmp_path):
    assert cli(["train", *args(corpus, tmp_path / "single")]) == 0
    single = losses(tmp_path / "single")

    dist_out = tmp_path / "dist"
    r = run_command(torchrun(2, "dsv3", "train", *args(corpus, dist_out), "--ep", "2"))
    assert r.returncode == 0, r.stdout[-3000:]
    got = losses(dist_out)
    assert got.keys() == single.keys() and all(abs(got[s] - single[s]) <= 1e-5 for s in single), (got, single)
    # each rank scores half of every eval batch; the all-reduced sums give the single process's value
    got_val, single_val = losses(dist_out, "val_loss"), losses(tmp_path / "single", "val_loss")
    assert got_val.keys() == single_val.keys() == {2, 4}
    assert all(abs(got_val[s] - single_val[s]) <= 1e-5 for s in single_val), (got_val, single_val)
    assert (dist_out / "hf" / "config.json").is_file() and (dist_out / "hf" / "tokenizer.json").is_file()
    # `dsv3 export` reads a DCP step in one process: the final step equals the trainer's own export
    assert cli(["export", "--ckpt", str(dist_out / "checkpoints" / "step_000004"), "--out", str(tmp_path / "exp")]) == 0
    final, exported_step = dsv3.from_pretrained(dist_out / "hf").state_dict(), dsv3.from_pretrained(tmp_path / "exp").state_dict()
    assert final.keys() == exported_step.keys() and all(torch.equal(final[k], exported_step[k]) for k in final)
    assert (tmp_path / "exp" / "tokenizer.json").is_file()
    assert cli(["export", "--ckpt", str(dist_out / "checkpoints" / "step_000002"), "--out", str(tmp_path / "exp2")]) == 0
    # eval cannot read a DCP checkpoint, and says what can
    assert cli(["eval", "--ckpt", str(dist_out / "checkpoints" / "step_000002")]) == 2

    # an export that failed or was deleted: `--resume` on the finished run writes it again
    exported = dsv3.from_pretrained(dist_out / "hf").state_dict()
    shutil.rmtree(dist_out / "hf")
    r = run_command(torchrun(2, "dsv3", "train", "--out", str(dist_out), "--resume"))
    # the console wraps at its width, which splits the message where the path is long: compare words
    assert r.returncode == 0 and "missing or incomplete: exporting it" in " ".join(r.stdout.split()), r.stdout[-3000:]
    again = dsv3.from_pretrained(dist_out / "hf").state_dict()
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)
    assert (dist_out / "hf" / "tokenizer.json").is_file() and not list(dist_out.glob(".hf*"))
    assert losses(dist_out) == got  # nothing trained

    # a crash after step 3: only step 2's checkpoint is left; `--resume` alone continues it on one process
    ckpts = dist_out / "checkpoints"
    shutil.rmtree(ckpts / "step_000004")
    (dist_out / "latest").unlink()
    (dist_out / "latest").symlink_to("checkpoints/step_000002")
    r = run_command([sys.executable, "-m", "dsv3", "train", "--out", str(dist_out), "--resume"])
    assert r.returncode == 0, r.stdout[-3000:]
    assert "resuming from" in r.stdout and "world=1" in r.stdout
    resumed = losses(dist_out)
    assert all(abs(resumed[s] - single[s]) <= 1e-5 for s in single), (resumed, single)
    # resuming the finished run trains and rewrites nothing, as the single-device trainer does
    r = run_command([sys.executable, "-m", "dsv3", "train", "--out", str(dist_out), "--resume"])
    assert r.returncode == 0 and "already complete" in r.stdout, r.stdout[-3000:]
    assert losses(dist_out) == resumed


def test_single_device_run_resumes_under_torchrun(corpus, tmp_path):
    """Scaling a run up mid-way: a single-device checkpoint (HF weights + index-keyed optimizer state)
    continues under torchrun with FSDP + EP and gives the single process's losses."""
    assert cli(["train", *args(corpus, tmp_path / "single")]) == 0
    single = losses(tmp_path / "single")

    out = tmp_path / "scaled"
    assert cli(["train", *args(corpus, out)]) == 0
    shutil.rmtree(out / "checkpoints" / "step_000004")  # as if stopped after step 2
    (out / "latest").unlink()
    (out / "latest").symlink_to("checkpoints/step_000002")
    r = run_command(torchrun(2, "dsv3", "train", "--out", str(out), "--resume", "--ep", "2"))
    assert r.returncode == 0, r.stdout[-3000:]
    assert "resuming from" in r.stdout and "step_000002 at step 2" in r.stdout and "world=2" in r.stdout, r.stdout[-3000:]
    got = losses(out)
    assert got.keys() == single.keys() and all(abs(got[s] - single[s]) <= 1e-5 for s in single), (got, single)
    assert (out / "latest" / "dist_state.pt").is_file() and (out / "hf" / "config.json").is_file()


def test_bad_layout_is_one_line_exit_2(corpus, tmp_path):
    r = run_command([sys.executable, "-m", "dsv3", "train", *args(corpus, tmp_path / "bad"), "--ep", "3"],
                    timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert lines[-1].startswith("dsv3 train: ") and "ep 3" in lines[-1], r.stdout
    assert not (tmp_path / "bad").exists()


def test_missing_data_under_torchrun_is_one_line_from_rank_0(tmp_path):
    r = run_command(torchrun(2, "dsv3", "train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out"),
                             "--device", "cpu"), timeout=120)
    assert r.returncode != 0
    errors = [line for line in r.stdout.splitlines() if line.startswith("dsv3 train: ")]
    assert len(errors) == 1 and "nope" in errors[0], r.stdout
    assert "exitcode  : 2" in r.stdout  # torchrun's own report names rank 0's exit code
    assert 'dsv3/' not in "".join(line for line in r.stdout.splitlines() if line.lstrip().startswith("File "))
    assert not (tmp_path / "out").exists()


def test_help_says_torchrun_kills_workers_after_its_shutdown_timeout():
    from dsv3.train.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "--shutdown-timeout seconds (default 30)" in text and "torchrun --shutdown-timeout 300" in text
