"""Distributed training on several GPUs of one host: weak scaling and loss parity against one GPU.

For each world size n in 1, 2, 4, ... up to --gpus, one `torchrun --standalone` job runs this file with
--worker on n processes, the layout FSDP over n with expert parallel over n (bench config: 32 experts
in 4 groups, so 2 ranks hold 2 whole groups each and 4 ranks one group each):

  parity      fp32 (TF32 off), a fixed global batch (--parity-batch x --parity-seq) split over the n
              ranks, --parity-steps steps from the same seed: the per-step losses; the n-GPU losses are
              compared with the 1-GPU ones (max |diff|), the check that the layout trains the same model
  throughput  BF16 autocast (the trainer's precision policy), --batch sequences of --seq tokens *per GPU*
              (weak scaling: the global batch grows with n), cuDNN attention, AdamW; --warmup steps, then
              --steps timed steps (host clock after a device sync); the median step gives tok/s per GPU,
              and weak-scaling efficiency = tok/s per GPU at n / tok/s on 1 GPU

The 1-GPU baseline runs the same distributed code path (a world of one), so the ratio measures what
sharding and the all-to-all cost, not a different trainer.  Not measured: torch.compile (off), pipeline
parallelism, multi-node.  NVLink SHARP / multicast is switched off (NCCL_NVLS_ENABLE=0 and friends).

World sizes run in the order 1, --gpus, then those between, under one --timeout for them all (a
job still running then is killed, workers included; sizes not started are skipped), and a collective
that waits longer than --collective-timeout fails its job: a hang or a crash costs one world size,
not the lease.  A failed size is recorded with the end of its log (dist_<date>_<n>.log beside the JSON).

Prints a table and a final JSON line; writes dist_<date>.json into --out (bench/results by default),
rewritten after every world size.  Exit code 1 when any world size failed.
`--smoke` runs a toy config on 1 and 2 CPU processes with gloo (CI) and writes to a temporary folder.

    python bench/dist_throughput.py --gpus 4            # on a 4-GPU host: 1, 2 and 4 GPUs
    python bench/dist_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# before torch / NCCL initialise, in the launcher and (inherited) in every worker
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in NO_MULTICAST.items():
    os.environ[_k] = _v

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from bench.common import git_commit, log
from dsv3.train.metrics import mfu, peak_flops

PID_DIR = "DSV3_BENCH_PID_DIR"  # where each worker writes its pid (see _kill)
MIN_RUN_S = 45.0  # a world size started with less time left than this could not finish: skipped

SMOKE_MODEL = dict(
    vocab_size=256, hidden_size=64, num_layers=3, num_heads=2, intermediate_size=96, first_k_dense=1,
    q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
    n_group=4, topk_group=2, original_max_position_embeddings=64, max_position_embeddings=64, num_mtp_layers=0,
)


# ------------------------------------------------------------------------------------------ worker


def _model_config(smoke: bool):
    from dsv3 import ModelConfig

    return ModelConfig(**SMOKE_MODEL) if smoke else ModelConfig.from_preset("bench")


def _build(args, world: int, device: torch.device, precision: str, batch_per_rank: int, seq: int):
    """A seeded model laid out FSDP x EP over the world, and its DistributedStep."""
    from dsv3 import Transformer
    from dsv3.distributed.mesh import ParallelConfig, build_mesh
    from dsv3.distributed.step import DistributedStep
    from dsv3.train.config import TrainConfig

    mcfg = _model_config(args.smoke)
    pcfg = ParallelConfig(dp_shard=world, ep=world).check(world, mcfg)
    torch.manual_seed(0)  # the same weights at every world size (initialised on the device: fast)
    with torch.device(device):
        model = Transformer(mcfg).train()
    if device.type == "cuda" and precision == "bf16":
        import dsv3.perf  # noqa: F401 -- registers the cuDNN attention core

        model.set_impl(attn="cudnn")
    tcfg = TrainConfig(preset="bench", batch_size=batch_per_rank * world, seq_len=seq, lr=3e-4, device=device.type,
                       precision=precision)
    step = DistributedStep(model, build_mesh(pcfg, device.type), tcfg, device,
                           torch.bfloat16 if precision == "bf16" else None, batch_per_rank)
    return step, mcfg, pcfg


def _tokens(mcfg, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, mcfg.vocab_size, (batch, seq + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _parity(args, world: int, device: torch.device) -> list[float]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    per_rank = args.parity_batch // world
    step, mcfg, _ = _build(args, world, device, "fp32", per_rank, args.parity_seq)
    lo = step.mesh.dp_rank * per_rank
    losses = []
    for i in range(args.parity_steps):
        inputs, targets = _tokens(mcfg, args.parity_batch, args.parity_seq, seed=1000 + i)  # the global batch
        r = step.step(inputs[lo:lo + per_rank].to(device), targets[lo:lo + per_rank].to(device), 3e-4, 0.3, 1e-3)
        losses.append(r["loss"].item())
    return losses


def _throughput(args, world: int, device: torch.device) -> dict:
    step, mcfg, _ = _build(args, world, device, "bf16" if device.type == "cuda" else "fp32", args.batch, args.seq)
    rank = step.mesh.dp_rank
    times = []
    cuda = device.type == "cuda"
    for i in range(args.warmup + args.steps):
        inputs, targets = _tokens(mcfg, args.batch, args.seq, seed=(world * 1000 + rank) * 1000 + i)  # fresh data per rank
        inputs, targets = inputs.to(device), targets.to(device)
        _sync(device)
        if cuda:  # CUDA events, as benchmarks.md asks; the CPU (gloo) smoke run uses the wall clock
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        step.step(inputs, targets, 3e-4, 0.0, 1e-3)["loss"].item()
        if cuda:
            end.record()
        _sync(device)
        if i >= args.warmup:
            times.append(start.elapsed_time(end) / 1e3 if cuda else time.perf_counter() - t0)
    dt = statistics.median(times)
    tok_per_gpu = args.batch * args.seq / dt
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    flops = mcfg.flops_per_token(args.seq)
    return {"step_ms": dt * 1e3, "tok_s_per_gpu": tok_per_gpu, "tok_s": tok_per_gpu * world,
            "tflops_per_gpu": tok_per_gpu * flops / 1e12,
            "mfu": mfu(tok_per_gpu, flops, peak_flops(device, "bf16")) if cuda else None, "peak_gib": peak}


@record  # torchrun's summary then names the first failing rank and its traceback
def worker(args) -> None:
    import torch.distributed as dist

    from dsv3.distributed.train import init_distributed

    if os.environ.get(PID_DIR):  # the launcher kills these if the job outlives its time (torchrun's
        (Path(os.environ[PID_DIR]) / os.environ.get("RANK", "0")).write_text(str(os.getpid()))  # own sessions)
    # a hung collective fails the job after --collective-timeout (its message names the collective)
    # instead of waiting NCCL's default 10 minutes, the whole time the GPU host is lent for
    device, _ = init_distributed("cpu" if args.smoke else "cuda", datetime.timedelta(seconds=args.collective_timeout))
    world = dist.get_world_size()
    if not args.smoke:
        torch.backends.cudnn.benchmark = False
    out = {"world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (gloo)",
           "parity_losses": _parity(args, world, device)}
    torch.backends.cuda.matmul.allow_tf32 = True  # the throughput phase runs BF16 anyway
    gc.collect()  # the parity model, optimizer and FSDP state hold reference cycles: free them before measuring
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    out.update(_throughput(args, world, device))
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ launcher


def _sizes(gpus: int) -> list[int]:
    sizes, n = [], 1
    while n < gpus:
        sizes.append(n)
        n *= 2
    return sizes + [gpus]


def _order(gpus: int) -> list[int]:
    """World sizes, most needed first: the 1-GPU baseline, the full world, then those between (the
    ones dropped when time runs out)."""
    sizes = _sizes(gpus)
    return sizes[:1] + sizes[:0:-1]


def _kill(proc: subprocess.Popen, pid_dir: Path) -> None:
    """Ends a torchrun job: SIGTERM to torchrun (it stops its workers), then SIGKILL to torchrun and to
    every worker that wrote its pid (torchrun starts each in a session of its own, so killing torchrun's
    process group would leave them running, holding their GPUs)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for f in pid_dir.glob("*"):
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(f.read_text()), signal.SIGKILL)


def _launch(args, n: int, timeout: float, log_path: Path) -> dict:
    """One torchrun job of n workers; its output goes to log_path (a file, not a pipe: a stray worker
    cannot keep us waiting on it).  Returns the worker's RESULT, or {"error": ...} on a failure or timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), __file__, "--worker",
           *(["--smoke"] if args.smoke else []),
           *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("batch", "seq", "warmup", "steps", "parity_batch",
                                                                  "parity_seq", "parity_steps", "collective_timeout")]]
    log(f"{n} process(es), {timeout:.0f}s left: {' '.join(cmd[3:])}")
    with tempfile.TemporaryDirectory(prefix="dsv3_pids_") as pid_dir, open(log_path, "w") as out:
        env = {**os.environ, **NO_MULTICAST, PID_DIR: pid_dir}  # explicit, whatever the caller's environment
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            error = f"exit {proc.returncode}" if proc.returncode else None
        except subprocess.TimeoutExpired:
            _kill(proc, Path(pid_dir))
            error = f"timed out after {timeout:.0f}s"
    text = log_path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if lines:  # measured, even if the job then failed to shut down cleanly
        return {**json.loads(lines[-1][len("RESULT "):]), **({"warning": error} if error else {})}
    tail = text[-4000:]
    log(f"{n}-process job failed ({error or 'no RESULT line'}); the end of {log_path}:\n{tail}")
    return {"error": error or "no RESULT line", "log_tail": tail}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python bench/dist_throughput.py --gpus 4\n"
                                       "         python bench/dist_throughput.py --smoke")
    p.add_argument("--gpus", type=int, default=None, help="largest world size (default: all visible GPUs; 2 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="toy config on CPU processes with gloo (CI)")
    p.add_argument("--batch", type=int, default=None, help="sequences per GPU per step in the throughput phase (default 8)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence in the throughput phase (default 2048)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    p.add_argument("--parity-batch", type=int, default=None, help="global sequences per parity step (default 8)")
    p.add_argument("--parity-seq", type=int, default=None, help="tokens per parity sequence (default 512)")
    p.add_argument("--parity-steps", type=int, default=None, help="parity steps compared (default 5)")
    p.add_argument("--timeout", type=float, default=480.0,
                   help="seconds for all world sizes together (default 480: a 10-minute GPU lease with room to spare); "
                        "a job still running then is killed, and world sizes not yet started are skipped")
    p.add_argument("--collective-timeout", type=float, default=180.0,
                   help="seconds a collective may wait before its job fails (default 180; NCCL's own is 600)")
    p.add_argument("--out", default=None, help="folder for the JSON (default bench/results; with --smoke a temporary folder)")
    p.add_argument("--commit", default=None, help="git commit measured (default: $DSV3_COMMIT or git)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = (dict(batch=2, seq=32, warmup=1, steps=3, parity_batch=4, parity_seq=32, parity_steps=3) if args.smoke else
                dict(batch=8, seq=2048, warmup=3, steps=10, parity_batch=8, parity_seq=512, parity_steps=5))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.worker:
        worker(args)
        return 0

    gpus = args.gpus or (2 if args.smoke else torch.cuda.device_count())
    if gpus < 1 or (not args.smoke and gpus > torch.cuda.device_count()):
        print(f"dist_throughput: --gpus {gpus}, but {torch.cuda.device_count()} CUDA devices are visible", file=sys.stderr)
        return 2
    if args.parity_batch % gpus:
        print(f"dist_throughput: --parity-batch {args.parity_batch} is not divisible by {gpus} GPUs", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.timeout
    date = datetime.date.today().isoformat()
    out = Path(args.out or (tempfile.mkdtemp(prefix="dsv3_bench_") if args.smoke else ROOT / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dist_{date}{'_smoke' if args.smoke else ''}.json"
    # the launcher itself never touches a GPU (the workers report the device name)
    res = {"date": date, "commit": args.commit or git_commit(), "device": None, "torch": torch.__version__,
           "smoke": args.smoke, "config": "smoke" if args.smoke else "bench", "layout": "FSDP over n x EP over n",
           "throughput": {"batch_per_gpu": args.batch, "seq": args.seq, "precision": "fp32" if args.smoke else "bf16",
                          "warmup": args.warmup, "timed_steps": args.steps},
           "parity": {"global_batch": args.parity_batch, "seq": args.parity_seq, "precision": "fp32 (TF32 off)",
                      "steps": args.parity_steps},
           "env": NO_MULTICAST, "gpus": gpus, "runs": {}}
    for n in _order(gpus):
        left = deadline - time.monotonic()
        if left < MIN_RUN_S:
            res["runs"][str(n)] = {"error": f"skipped: {left:.0f}s of --timeout left"}
        else:
            res["runs"][str(n)] = _launch(args, n, left, out / f"dist_{date}{'_smoke' if args.smoke else ''}_{n}.log")
        log(f"{n}: {json.dumps({k: v for k, v in res['runs'][str(n)].items() if k != 'log_tail'})}")
        _summarise(res)
        path.write_text(json.dumps(res, indent=2))  # after every world size: a later failure keeps what was measured

    ok = {n: r for n, r in res["runs"].items() if "error" not in r}
    print(f"\n{'GPUs':>4} {'ms/step':>9} {'tok/s/GPU':>11} {'TFLOP/s/GPU':>12} {'weak eff.':>9} {'max |dloss|':>12} {'peak GiB':>9}")
    for n in sorted(res["runs"], key=int):
        r = res["runs"][n]
        if n not in ok:
            print(f"{n:>4} {r['error']}")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        eff, diff = res["weak_scaling_efficiency_by_gpus"].get(n), res["max_loss_diff_vs_1gpu_by_gpus"].get(n)
        print(f"{n:>4} {r['step_ms']:>9.1f} {r['tok_s_per_gpu']:>11,.0f} {r['tflops_per_gpu']:>12.1f} "
              f"{eff if eff is not None else float('nan'):>9.3f} {diff if diff is not None else float('nan'):>12.2e} {peak:>9}")
    log(f"wrote {path}")
    print(json.dumps({k: res.get(k) for k in ("gpus", "weak_scaling_efficiency", "max_loss_diff_vs_1gpu", "device", "date",
                                               "commit")}))
    return 0 if len(ok) == len(res["runs"]) else 1


def _summarise(res: dict) -> None:
    """Efficiency and loss differences against the 1-GPU run, for the world sizes that finished."""
    runs = {n: r for n, r in res["runs"].items() if "error" not in r}
    res["device"] = next((r["device"] for r in runs.values()), res["device"])
    base = runs.get("1")
    if base is None:
        return
    res["weak_scaling_efficiency_by_gpus"] = {n: r["tok_s_per_gpu"] / base["tok_s_per_gpu"] for n, r in runs.items()}
    res["max_loss_diff_vs_1gpu_by_gpus"] = {
        n: max(abs(a - b) for a, b in zip(r["parity_losses"], base["parity_losses"], strict=True)) for n, r in runs.items()}
    full = str(res["gpus"])
    res["weak_scaling_efficiency"] = res["weak_scaling_efficiency_by_gpus"].get(full)
    res["max_loss_diff_vs_1gpu"] = res["max_loss_diff_vs_1gpu_by_gpus"].get(full)


if __name__ == "__main__":
    sys.exit(main())
