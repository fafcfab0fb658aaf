"""Helpers every benchmark script shares: timestamped log lines, a per-section time limit, the commit
being measured, and device sync/free."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises TimeoutError in the main thread after `seconds` (checked between Python bytecodes)."""
    if seconds <= 0:
        raise TimeoutError("no time left before the deadline")
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise TimeoutError(f"section exceeded {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def git_commit() -> str:
    """$DSV3_COMMIT (a device copy of the tree may have no .git), else `git rev-parse HEAD`."""
    if os.environ.get("DSV3_COMMIT"):
        return os.environ["DSV3_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
