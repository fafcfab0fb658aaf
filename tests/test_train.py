"""The trainer: bias balancing, preemption + resume, the golden loss curve, the CLI and its errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import randomize_, tiny_config

from dsv3.cli import main as cli
from dsv3.model.moe import MoE
from dsv3.train.balance import update_expert_biases
from dsv3.train.config import TrainConfig
from dsv3.train.metrics import max_violation, read_jsonl
from dsv3.train.trainer import Trainer

GOLDEN = Path(__file__).parent / "golden" / "tiny_losses.json"
WORDS = "def class return self import for in if else while with as try except yield lambda None True False print len range".split()
NAMES = "x y n value items result data key node tree count total index buffer parser token state".split()


def synthetic_code(seed: int, n_docs: int = 60) -> list[str]:
    """Deterministic code-like documents (stable across Python versions: random.Random is)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(20, 60)):
            indent = "    " * rng.randint(0, 2)
            words = [rng.choice(WORDS if rng.random() < 0.4 else NAMES) for _ in range(rng.randint(2, 8))]
            lines.append(indent + " ".join(words) + rng.choice([":", "", "()", " = 0", ","]))
        docs.append("\n".join(lines) + "\n")
    return docs


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "code.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_code(0)))
    return path


def small_run(corpus_file: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(preset="tiny", data=str(corpus_file), out=str(out), steps=8, batch_size=4, seq_len=64, lr=3e-3,
                vocab_size=512, eval_interval=4, eval_batches=2, ckpt_interval=100, cache_dir=str(out.parent / "cache"),
                sample_tokens=8, device="cpu", seed=0)
    base.update(overrides)
    return TrainConfig(**base)


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_jsonl(out / "metrics.jsonl")]


# ---------------------------------------------------------------------------- balancing
def test_bias_update_balances_a_skewed_router():
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    moe = MoE(cfg)
    randomize_(moe, 0)
    u = torch.nn.functional.normalize(torch.randn(cfg.hidden_size), dim=0)
    x = 0.5 * torch.randn(512, cfg.hidden_size) + u  # every token shares direction u...
    with torch.no_grad():
        moe.gate.bias.zero_()
        moe.gate.weight[:3] += 2.0 * u  # ...which experts 0-2 like: they attract most tokens
    def load():
        return torch.bincount(moe.gate(x).indices.flatten(), minlength=16)

    before = max_violation(load())
    for _ in range(300):
        update_expert_biases([moe], load()[None], gamma=0.01)
    after = max_violation(load())
    assert before > 1.0 and after < 0.35 * before


# ---------------------------------------------------------------------------- resume and golden
def test_preempted_and_resumed_run_matches_uninterrupted(corpus_file, tmp_path):
    full = Trainer(small_run(corpus_file, tmp_path / "full"), console=None)
    assert not full.run().interrupted

    first = Trainer(small_run(corpus_file, tmp_path / "split"))
    result = first.run(on_step=lambda t: t.request_stop() if t.step == 3 else None)
    assert result.interrupted and result.step == 3
    assert (tmp_path / "split" / "latest" / "trainer_state.pt").is_file()
    resumed = Trainer(small_run(corpus_file, tmp_path / "split", steps=999), resume=True)  # the saved plan wins
    assert resumed.run().step == 8
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert len(a) == len(b) == 8
    assert a == b  # bit-identical: on a CPU the run is deterministic


def test_golden_loss_curve(corpus_file, tmp_path):
    """A deterministic tiny run's per-step losses.  A refactor must leave them unchanged; regenerate
    with DSV3_UPDATE_GOLDEN=1 only for an intended change of the numerics, and say so in the commit."""
    Trainer(small_run(corpus_file, tmp_path / "run")).run()
    got = losses(tmp_path / "run")
    if os.environ.get("DSV3_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"losses": got}, indent=1) + "\n")
    expected = json.loads(GOLDEN.read_text())["losses"]
    assert len(got) == len(expected)
    for step, (g, e) in enumerate(zip(got, expected), start=1):
        assert abs(g - e) <= 1e-4 * max(1.0, abs(e)), f"step {step}: {g} != golden {e}"
    assert got[-1] < got[0] - 0.5  # and it learns


def test_validation_runs_micro_batches_and_scores_the_same_windows(corpus_file, tmp_path):
    """--micro-batch-size bounds validation's forwards too (a run that needs accumulation to fit has no room
    for a whole batch's logits); the same windows, so the same loss up to fp32 rounding."""
    from dsv3.train.evaluate import evaluate

    trainer = Trainer(small_run(corpus_file, tmp_path / "run", steps=1, batch_size=4, micro_batch_size=1))
    trainer._build()
    sizes = []
    hook = trainer.model.embed.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    loss, bpb = trainer._validate()
    hook.remove()
    assert set(sizes) == {1} and len(sizes) == 4 * trainer.cfg.eval_batches
    whole = evaluate(trainer.model, trainer.data.corpus.val_tokens, 64, 4, trainer.cfg.eval_batches, torch.device("cpu"))
    assert loss == pytest.approx(whole, rel=1e-6) and 0 < bpb < loss  # fp32: batch shapes round differently


# ---------------------------------------------------------------------------- CLI
def _cli_args(corpus_file: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(corpus_file), "--out", str(out), "--steps", "3", "--batch-size", "2",
            "--seq-len", "32", "--vocab-size", "512", "--eval-interval", "3", "--eval-batches", "1",
            "--cache-dir", str(out.parent / "cache"), "--sample-tokens", "4", "--device", "cpu", *extra]


def test_cli_train_eval_and_plot(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(_cli_args(corpus_file, out)) == 0
    assert (out / "latest" / "config.json").is_file() and (out / "plots" / "loss.png").is_file()
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "tok_s", "val_loss", "mtp_loss", "balance_loss", "max_vio"} <= set(rows[-1])
    assert list((out / "tb").iterdir())
    assert cli(["eval", "--ckpt", str(out), "--data", str(corpus_file), "--seq-len", "32",
                "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert cli(["plot", str(out)]) == 0


def test_eval_rebuilds_the_runs_own_split(corpus_file, tmp_path, capsys):
    """Without --data, eval reads the run's data, seeds and cache from its train_config.json: a run with
    split seed 2 is scored on its own validation split, and --max-batches its eval_batches gives its last
    val_loss.  A config saved before val_seed existed split with its training seed."""
    out = tmp_path / "run"
    assert cli(_cli_args(corpus_file, out, "--seed", "1", "--val-seed", "2")) == 0
    capsys.readouterr()
    assert cli(["eval", "--ckpt", str(out), "--max-batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "split seed 2" in printed and str(corpus_file) in printed
    loss = float(printed.split("loss ")[1].split()[0])
    assert abs(loss - read_jsonl(out / "metrics.jsonl")[-1]["val_loss"]) < 1e-3
    old = json.loads(TrainConfig(seed=3).to_json())
    del old["val_seed"]
    assert TrainConfig.from_json(json.dumps(old)).val_seed == 3


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--batch-size", "0"), ("--seq-len", "0"),
                                        ("--lr-shape", "foo"), ("--moments", "fp16"), ("--fim-rate", "2"),
                                        ("--seq-len", "1"),  # not above the tiny preset's MTP depth: it crashed
                                        ("--deterministic", "maybe")])  # ran as "off" unnoticed
def test_bad_train_arguments_are_one_line_and_write_nothing(corpus_file, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    assert cli(_cli_args(corpus_file, out, flag, value)) == 2
    assert flag in _one_line_error(capsys)
    assert not out.exists()


def test_validation_split_shorter_than_a_sequence_is_one_line(tmp_path, capsys):
    """It used to train a step and then stop with a traceback at the first validation."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("tiny doc")
    (data / "b.txt").write_text("def f(x):\n    return x * 2\n" * 3000)
    out = tmp_path / "run"
    assert cli(_cli_args(data, out, "--seq-len", "64")) == 2  # the later --seq-len wins
    assert "validation split" in _one_line_error(capsys)
    assert not out.exists()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_data_path_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(_cli_args(tmp_path / "nope.txt", out)) == 2
    assert "nope.txt" in _one_line_error(capsys)
    assert not out.exists()


def test_unreadable_tokenizer_is_one_line_and_writes_nothing(corpus_file, tmp_path, capsys):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    out = tmp_path / "run"
    assert cli(_cli_args(corpus_file, out, "--tokenizer", str(bad))) == 2
    assert "tokenizer.json" in _one_line_error(capsys)
    assert not out.exists()


def test_corrupt_checkpoint_is_one_line(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(_cli_args(corpus_file, out)) == 0
    capsys.readouterr()
    ckpt = (out / "latest").resolve()
    (ckpt / "trainer_state.pt").write_bytes(b"truncated")
    assert cli(_cli_args(corpus_file, out, "--resume")) == 2
    assert "trainer_state.pt" in _one_line_error(capsys)
    shard = next(ckpt.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    assert cli(["eval", "--ckpt", str(ckpt), "--data", str(corpus_file), "--cache-dir", str(tmp_path / "cache")]) == 2
    assert shard.name in _one_line_error(capsys)


def test_ema_validation_is_logged(corpus_file, tmp_path):
    """--ema-decay: each validation also scores the EMA weights (val_loss_ema).  A decay near 0 keeps the
    EMA at the current weights, so the two losses agree; near 1 it stays at the init, which scores worse."""
    near_now = Trainer(small_run(corpus_file, tmp_path / "a", ema_decay=1e-9))
    near_now.run()
    row = read_jsonl(tmp_path / "a" / "metrics.jsonl")[-1]
    assert abs(row["val_loss_ema"] - row["val_loss"]) < 1e-5
    Trainer(small_run(corpus_file, tmp_path / "b", ema_decay=0.999999)).run()
    row = read_jsonl(tmp_path / "b" / "metrics.jsonl")[-1]
    assert row["val_loss_ema"] > row["val_loss"] + 0.1


def test_checkpoints_order_by_step_number(tmp_path):
    """step_1000000 sorts before step_999999 as text: pruning deleted each new checkpoint and --resume
    went back in time past a million steps."""
    from dsv3.train.checkpointing import STATE_FILE, checkpoint_dirs, resume_dir

    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        d = tmp_path / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / STATE_FILE).write_bytes(b"")
    assert [p.name for p in checkpoint_dirs(tmp_path)][-2:] == ["step_1000000", "step_1000001"]
    assert resume_dir(tmp_path).name == "step_1000001"  # no `latest`: the newest
    (tmp_path / "latest").symlink_to("checkpoints/step_999999")
    assert resume_dir(tmp_path).name == "step_999999"  # `latest` decides


def test_fresh_run_into_a_folder_with_a_run_needs_overwrite(corpus_file, tmp_path, capsys):
    """A second fresh run into one --out mixed its checkpoints with the first's (pruning deleted the new
    ones, --resume picked the old run): refused in one line, or replaced with --overwrite."""
    out = tmp_path / "run"
    assert cli(_cli_args(corpus_file, out, "--steps", "4", "--ckpt-interval", "2")) == 0
    capsys.readouterr()
    assert cli(_cli_args(corpus_file, out)) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert cli(_cli_args(corpus_file, out, "--overwrite", "--seed", "3")) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((out / "latest" / "train_config.json").read_text())["seed"] == 3


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_checkpoint_size_estimate_covers_what_is_written(corpus_file, tmp_path):
    """The free-space check's estimate is at least a checkpoint's real size, and not far above it."""
    from dsv3.train import checkpointing

    trainer = Trainer(small_run(corpus_file, tmp_path / "run", steps=1, ema_decay=0.99))
    trainer.run()
    written = _dir_bytes(tmp_path / "run" / "latest")
    estimate = checkpointing.checkpoint_bytes(trainer.model, trainer._state())
    assert written <= estimate <= written + checkpointing.CHECKPOINT_SLACK_BYTES


def test_short_disk_prunes_early_or_refuses_in_one_line(corpus_file, tmp_path, capsys, monkeypatch):
    """A full disk broke a 24 GB checkpoint mid-write, with an opaque serialisation error, after minutes of
    training. Now: checkpoints that pruning deletes anyway go first (never the newest), else a one-line
    refusal before anything is written, the earlier checkpoints intact."""
    from types import SimpleNamespace

    from dsv3.train import checkpointing

    out = tmp_path / "run"
    room_for = {"checkpoints": 2}  # the fake disk holds this many besides the one being written

    def disk_usage(path):
        held = len(checkpointing.checkpoint_dirs(out))
        free = 1 << 50 if held < room_for["checkpoints"] else 0
        return SimpleNamespace(total=1 << 50, used=0, free=free)

    monkeypatch.setattr(checkpointing.shutil, "disk_usage", disk_usage)
    # keep 2, room for 2: each save from the third on deletes the oldest first instead of after
    assert cli(_cli_args(corpus_file, out, "--steps", "5", "--ckpt-interval", "1", "--keep-checkpoints", "2")) == 0
    assert [p.name for p in checkpointing.checkpoint_dirs(out)] == ["step_000004", "step_000005"]
    capsys.readouterr()
    # room for 1 and keep 2: only the newest could go early, which is kept for crash safety -> refused
    room_for["checkpoints"] = 1
    out = out2 = tmp_path / "run2"
    assert cli(_cli_args(corpus_file, out2, "--steps", "4", "--ckpt-interval", "1", "--keep-checkpoints", "2")) == 2
    msg = _one_line_error(capsys)
    assert "not enough disk space" in msg and "--keep-checkpoints" in msg
    assert [p.name for p in checkpointing.checkpoint_dirs(out2)] == ["step_000001"]
    assert not list((out2 / "checkpoints").glob(".tmp_*"))


def test_auto_resume_starts_or_continues(corpus_file, tmp_path, capsys):
    """One command for a job that may be rerun: a fresh run where --out has no checkpoint, a resume where
    it has one (--resume alone refuses the first case, a plain run the second)."""
    out = tmp_path / "run"
    assert cli(_cli_args(corpus_file, out, "--auto-resume", "--steps", "4", "--ckpt-interval", "2")) == 0
    first = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    # a rerun of the same command after the run finished: nothing to do, nothing rewritten
    assert cli(_cli_args(corpus_file, out, "--auto-resume", "--steps", "4", "--ckpt-interval", "2")) == 0
    assert read_jsonl(out / "metrics.jsonl") == first
    assert cli(_cli_args(corpus_file, out, "--auto-resume", "--overwrite")) == 2
    assert "contradict" in _one_line_error(capsys)


def test_resume_without_checkpoint_is_an_error(corpus_file, tmp_path, capsys):
    assert cli(_cli_args(corpus_file, tmp_path / "empty", "--resume")) == 2
    assert "no complete checkpoint" in _one_line_error(capsys)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus_file, tmp_path):
    out = tmp_path / "run"
    args = _cli_args(corpus_file, out)
    args[args.index("--steps") + 1] = "100000"
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists() or len(read_jsonl(out / "metrics.jsonl")) < 2:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "SIGTERM" in output and "--resume" in output
    state = torch.load(out / "latest" / "trainer_state.pt", weights_only=True)
    assert 2 <= state["step"] < 100000


def test_cli_mtp_layers_overrides_the_preset(corpus_file, tmp_path):
    out = tmp_path / "run"
    assert cli(_cli_args(corpus_file, out, "--mtp-layers", "0")) == 0
    assert json.loads((out / "latest" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert "mtp_loss" not in read_jsonl(out / "metrics.jsonl")[-1]  # the tiny preset has one MTP layer; 0 removes it
    assert cli(_cli_args(corpus_file, tmp_path / "bad", "--mtp-layers", "-1")) == 2


@pytest.mark.slow
def test_cli_compiled_training_runs_to_its_sample(corpus_file, tmp_path, capsys):
    """--compile end to end on CPU: compiled blocks train, validate, checkpoint, and the closing
    full-recompute sample runs eagerly (compiled, it would recompile at every new length)."""
    out = tmp_path / "run"
    assert cli(_cli_args(corpus_file, out, "--compile")) == 0
    assert (out / "latest" / "config.json").is_file()
    assert "sample" in capsys.readouterr().out


def test_cli_bf16_moments_are_printed_and_stored_bf16(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(_cli_args(corpus_file, out, "--moments", "bf16")) == 0
    assert "AdamW moments bf16" in " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    state = torch.load(out / "latest" / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    assert {v["exp_avg"].dtype for v in state.values()} == {torch.bfloat16}
