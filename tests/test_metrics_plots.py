"""Peak-FLOPs lookup, MFU, MaxVio, the run's metric files and the plots drawn from them."""

import json
import math

import numpy as np
import pytest
import torch

from dsv3.train import plots
from dsv3.train.metrics import (MetricsLogger, max_violation, max_violation_per_layer, mfu,
                                peak_flops, read_jsonl)


def test_peak_lookup():
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H200", precision="fp8") == 2 * 989e12
    assert peak_flops("NVIDIA H20") == 148e12  # not mistaken for an H200
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", precision="fp8") is None  # Ampere has no FP8
    assert peak_flops("cpu") is None and peak_flops(torch.device("cpu")) is None
    assert peak_flops("Some Future Accelerator") is None
    with pytest.raises(ValueError):
        peak_flops("NVIDIA H200", precision="int4")


def test_mfu():
    assert mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    assert mfu(1000.0, 6e9, None) is None


def test_max_violation():
    assert max_violation([1, 1, 1, 1]) == 0.0
    assert max_violation(torch.tensor([4, 0, 0, 0])) == pytest.approx(3.0)
    assert max_violation(np.array([3, 1, 2, 2])) == pytest.approx(0.5)
    assert max_violation([0, 0, 0]) == 0.0
    assert max_violation_per_layer([[1, 1], [3, 1], [0, 0]]) == pytest.approx([0.0, 0.5, 0.0])
    with pytest.raises(ValueError):
        max_violation([[1, 2]])


def _write_run(out, steps=60, layers=3, experts=8):
    with MetricsLogger(out, tensorboard=False) as log:
        for t in range(steps):
            log.log(t, loss=torch.tensor(5.0 * math.exp(-t / 20) + 1), lr=1e-3 * min(1, (t + 1) / 5),
                    mtp_loss=np.float32(6.0 - t / 30), balance_loss=1e-4, tokens=t * 512)
            if t % 10 == 0:
                log.log(t, val_loss=4.0 - t / 30)
                log.log_expert_loads(t, torch.randint(0, 100, (layers, experts)))


def test_logger_writes_jsonl_and_truncates(tmp_path):
    _write_run(tmp_path)
    with MetricsLogger(tmp_path, tensorboard=False) as log:  # reopened, as on resume: appends
        log.log(60, loss=float("nan"), grad_norm=float("inf"), lr=1e-4, ok=True)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == 60 + 6 + 1
    assert rows[0]["loss"] == pytest.approx(6.0) and rows[0]["tokens"] == 0
    assert rows[-1] == {"step": 60, "loss": None, "grad_norm": None, "lr": 1e-4, "ok": 1}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=pytest.fail)  # strict JSON: no NaN / Infinity literals
    loads = read_jsonl(tmp_path / "expert_loads.jsonl")
    assert [r["step"] for r in loads] == [0, 10, 20, 30, 40, 50]
    assert np.asarray(loads[0]["loads"]).shape == (3, 8)

    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.truncate_after(25)
        log.log(26, loss=1.0)
    assert max(r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")) == 26
    assert [r["step"] for r in read_jsonl(tmp_path / "expert_loads.jsonl")] == [0, 10, 20]


def test_logger_rejects_non_scalars(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log, pytest.raises(TypeError):
        log.log(0, loss=torch.ones(2))


def test_torn_last_line_is_dropped_on_reopen(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 2.0}\n{"step": 1, "lo')
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0, "loss": 2.0}]
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, loss=1.5)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]


def test_tensorboard_events_written(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path) as log:
        log.log(0, loss=1.0)
    assert any((tmp_path / "tb").iterdir())


def test_plot_run_writes_pngs(tmp_path):
    _write_run(tmp_path)
    paths = plots.plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["expert_load.png", "loss.png"]
    for p in paths:
        assert p.parent == tmp_path / "plots" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_run_skips_missing_columns(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(0, loss=3.0)
        log.log(1, loss=2.5)
    assert [p.name for p in plots.plot_run(tmp_path)] == ["loss.png"]


def test_plot_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.plot_run(tmp_path)
    assert plots.main([str(tmp_path / "absent")]) == 2
    assert plots.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("dsv3 plot: ") for line in err)
    _write_run(tmp_path, steps=3)
    assert plots.main([str(tmp_path)]) == 0
    assert "loss.png" in capsys.readouterr().out
