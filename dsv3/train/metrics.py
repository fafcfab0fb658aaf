"""Training metrics: peak-FLOPs table and MFU, MoE load imbalance, and the run's metric files.

Throughput is reported against a dense peak looked up by device name (design principle 7,
benchmarks.md). A device not in the table gets None, never a guess, so that no made-up MFU is printed.

A run's curves live in two append-only JSON-lines files in its output folder, which `plots.py`
reads and which survive resume: `metrics.jsonl` (one object per `log` call) and `expert_loads.jsonl`
(per-layer, per-expert token counts). Scalars also go to TensorBoard under `tb/` when it is installed.
Written by hand because the files must stay plain, appendable and truncatable on resume;
TensorBoard's event files are not.
"""

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

# Dense (no sparsity) BF16 tensor-core peak, TFLOP/s, from the vendors' datasheets; FP16 is the same
# on all of these. Matched as a case-insensitive substring of the device name, longest key first,
# so "H100 PCIe" wins over "H100" and "H200" over "H20".
PEAK_BF16_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "H100": 989.0,  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,  # SXM
    "H200 NVL": 835.0,
    "GH200": 989.0,
    "H800": 989.0,  # SXM, the report's GPU
    "H800 PCIe": 756.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 6000 Ada": 364.0,
    "RTX A6000": 154.8,
    "RTX 4090": 165.0,  # with FP32 accumulation, as training uses
    "RTX 3090": 71.0,
    "MI300X": 1307.0,
}

# Devices with FP8 tensor cores (Hopper, Ada, Blackwell, CDNA3): dense FP8 peak = 2x BF16.
FP8_CAPABLE = frozenset({"B200", "H100", "H100 PCIe", "H100 NVL", "H200", "H200 NVL", "GH200", "H800",
                         "H800 PCIe", "H20", "L40S", "L40", "L4", "RTX 6000 Ada", "RTX 4090", "MI300X"})


def device_name(device: torch.device | str) -> str | None:
    """The accelerator's name ("NVIDIA H200") for a CUDA device; a string that is no device spec
    ("cuda:0", "cpu") is taken as a name already. None for CPU and other devices."""
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError:
            return device
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return None


def peak_flops(device: torch.device | str, precision: str = "bf16") -> float | None:
    """Dense peak FLOP/s of `device` at `precision` ("bf16", "fp16" or "fp8"); None if unknown or CPU."""
    if precision not in ("bf16", "fp16", "fp8"):
        raise ValueError(f"precision must be bf16, fp16 or fp8, got {precision!r}")
    name = device_name(device)
    if name is None:
        return None
    matches = [key for key in PEAK_BF16_TFLOPS if key.lower() in name.lower()]
    if not matches:
        return None
    key = max(matches, key=len)
    if precision == "fp8":
        return 2 * PEAK_BF16_TFLOPS[key] * 1e12 if key in FP8_CAPABLE else None
    return PEAK_BF16_TFLOPS[key] * 1e12


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.4 = 40%); None when the peak is unknown."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / peak


def max_violation(loads) -> float:
    """MaxVio = max(load) / mean(load) - 1 over one layer's per-expert token counts; 0 when all are 0."""
    loads = torch.as_tensor(loads, dtype=torch.float64)
    if loads.dim() != 1:
        raise ValueError(f"expected per-expert loads of shape [experts], got {tuple(loads.shape)}")
    return max_violation_per_layer(loads[None])[0]


def max_violation_per_layer(loads_2d) -> list[float]:
    """MaxVio of each row of [layers, experts] token counts."""
    loads = torch.as_tensor(loads_2d, dtype=torch.float64)
    if loads.dim() != 2:
        raise ValueError(f"expected loads of shape [layers, experts], got {tuple(loads.shape)}")
    mean = loads.mean(dim=1)
    safe_mean = torch.where(mean > 0, mean, 1.0)  # an idle layer is balanced, not NaN
    return torch.where(mean > 0, loads.amax(dim=1) / safe_mean - 1, 0.0).tolist()


def _scalar(name: str, value) -> int | float | None:
    # One JSON-safe number: tensors and numpy scalars unwrapped, NaN and +-inf written as null.
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {name!r} must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    elif isinstance(value, np.generic | np.ndarray):
        if value.size != 1:
            raise TypeError(f"metric {name!r} must be a scalar, got shape {value.shape}")
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file. A torn last line (a crash mid-write) is skipped; one elsewhere is an error."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON: {e}") from None
    return rows


def _open_append(path: Path):
    # Cut a torn last line left by a crash, so the next row starts on a line of its own.
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a")


class MetricsLogger:
    """Appends metrics of a run to `out_dir/metrics.jsonl`, `out_dir/expert_loads.jsonl` and TensorBoard.

    Column names that `plots.plot_run` draws: loss, val_loss, mtp_loss, balance_loss, lr. Any other
    numeric scalar is recorded as well. Only one process (rank 0) should log.
    """

    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.loads_path = self.out_dir / "expert_loads.jsonl"
        self._metrics = _open_append(self.metrics_path)
        self._loads = None  # opened on first use: a dense model never writes the file
        self._tb = self._open_tb(purge_step=None) if tensorboard else None

    def _open_tb(self, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            warnings.warn(f"TensorBoard logging off ({e}); metrics.jsonl is still written")
            return None
        return SummaryWriter(str(self.out_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, **scalars) -> None:
        row = {"step": int(step)} | {k: _scalar(k, v) for k, v in scalars.items()}
        self._metrics.write(json.dumps(row, allow_nan=False) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, step)

    def log_expert_loads(self, step: int, loads) -> None:
        """Token counts per expert, `loads` [layers, experts]; MaxVio per layer goes to TensorBoard."""
        loads = torch.as_tensor(loads).detach().cpu()
        if loads.dim() != 2:
            raise ValueError(f"expected loads of shape [layers, experts], got {tuple(loads.shape)}")
        if self._loads is None:
            self._loads = _open_append(self.loads_path)
        self._loads.write(json.dumps({"step": int(step), "loads": loads.tolist()}) + "\n")
        self._loads.flush()
        if self._tb is not None:
            for layer, vio in enumerate(max_violation_per_layer(loads)):
                self._tb.add_scalar(f"max_violation/layer_{layer}", vio, step)

    def truncate_after(self, step: int) -> None:
        """Drop rows with step > `step` from both files, e.g. when resuming from an earlier checkpoint.

        Call it before logging from the resumed step; TensorBoard hides its later events too.
        """
        self._metrics.close()
        if self._loads is not None:
            self._loads.close()
        for path in (self.metrics_path, self.loads_path):
            if path.exists():
                kept = [r for r in read_jsonl(path) if r["step"] <= step]
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                os.replace(tmp, path)  # atomic: a crash here leaves the old file or the new one
        self._metrics = open(self.metrics_path, "a")
        if self._loads is not None:
            self._loads = open(self.loads_path, "a")
        if self._tb is not None:
            self._tb.close()
            self._tb = self._open_tb(purge_step=step + 1)

    def close(self) -> None:
        self._metrics.close()
        if self._loads is not None:
            self._loads.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
