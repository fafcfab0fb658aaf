"""bench/dist_throughput.py --smoke: 1 and 2 gloo processes, the JSON a GPU run commits."""

import json
import sys
from pathlib import Path

from dist_launch import run_command

BENCH = Path(__file__).resolve().parents[2] / "bench" / "dist_throughput.py"


def test_dist_throughput_smoke(tmp_path):
    r = run_command([sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path)], timeout=180)
    assert r.returncode == 0, r.stdout[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["gpus"] == 2 and summary["max_loss_diff_vs_1gpu"] <= 1e-5
    assert {"weak_scaling_efficiency", "device", "date", "commit"} <= summary.keys()
    (result,) = tmp_path.glob("dist_*_smoke.json")
    assert set(json.loads(result.read_text())["runs"]) == {"1", "2"}
