"""Run a function on N gloo CPU processes and the single-process reference the distributed runs are held to.

`run_ranks(fn, world, *args)` spawns `world` processes (torch.multiprocessing, spawn), each calling
fn(rank, world, *args) after joining a gloo process group through a FileStore in a fresh temporary
folder (no TCP port to pick or collide on; gloo's own sockets use ephemeral ports).  A rank's
exception fails the test with its traceback; on a timeout or failure every child is killed and
joined, so no test leaves processes behind.  `run_command` does the same for a command line
(torchrun --standalone picks a free rendezvous port itself).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store: str, fn, args) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
    # a finished rank leaves without the interpreter's and C++ static teardown: once (CI, 2026-12-03) gloo's
    # teardown aborted a rank whose results were written ("terminate called without an active exception",
    # SIGABRT), failing a test whose numbers held.  A rank that raised still exits through the raise above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> None:
    with tempfile.TemporaryDirectory(prefix="dsv3_dist_") as tmp:
        store = str(Path(tmp) / "store")
        ctx = mp.start_processes(_entry, args=(world, store, fn, args), nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed test did not finish within {timeout:.0f}s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join()


def run_command(cmd: list[str], timeout: float = 180.0) -> subprocess.CompletedProcess:
    """Runs cmd (e.g. torchrun) in its own process group; on a timeout the whole group is killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def torchrun(nproc: int, *args: str) -> list[str]:
    """The command line of `torchrun --standalone` (a free rendezvous port) for `python -m <args>`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", *args]
