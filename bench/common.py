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
    """$DSV3_COMMIT (a device copy of the tree may have no .git, or a stale one), else `git rev-parse HEAD`,
    with "+dirty" when tracked files differ from HEAD: the code measured is then not HEAD's (on 2026-12-02 a
    device copy's stale .git named a commit two changes older than the code it ran)."""
    if os.environ.get("DSV3_COMMIT"):
        return os.environ["DSV3_COMMIT"]
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        head = git("rev-parse", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except Exception:
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def triton_interpreter() -> bool:
    """TRITON_INTERPRET=1 with Triton importable: kernels then run on the CPU (slowly), for --smoke."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def results_path(out: str | None, stem: str, smoke: bool) -> Path:
    """Where a benchmark writes its JSON: <out>/<stem>_<date>[_smoke].json, the folder made if needed.
    out defaults to bench/results, or to a fresh temporary folder with --smoke."""
    import datetime
    import tempfile

    folder = Path(out) if out else (Path(tempfile.mkdtemp(prefix="dsv3_bench_")) if smoke else ROOT / "bench" / "results")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}_{datetime.date.today().isoformat()}{'_smoke' if smoke else ''}.json"


def kernel_bench_parser(doc: str, smoke_help: str):
    """The options every kernel benchmark shares: --smoke (CPU; the kernels only under Triton's
    interpreter), --out, --commit.  doc: the script's docstring (first line: the description)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--out", default=None, help="folder for the JSON (default bench/results; with --smoke a temporary folder)")
    p.add_argument("--commit", default=None, help="git commit of the code measured (default: $DSV3_COMMIT or git)")
    return p


def write_results(res: dict, out: str | None, stem: str, smoke: bool, summary_keys: tuple[str, ...]) -> Path:
    """A kernel benchmark's ending: wall_s into res, res as <out>/<stem>_<date>[_smoke].json, a log line,
    and the final JSON line of res's summary_keys on stdout."""
    import json

    res["wall_s"] = round(time.time() - T0, 1)
    path = results_path(out, stem, smoke)
    path.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {path}")
    print(json.dumps({k: res.get(k) for k in summary_keys}))
    return path


def graph_time_us(fn, items: list[tuple], device: torch.device, rep: int = 30) -> tuple[float, list]:
    """Mean time of fn(*item) over the items (distinct weights each, so none stays in L2), replayed as
    one CUDA graph on a GPU (wall clock on a CPU), in µs; and the outputs of an eager pass (after a
    first pass that compiles outside the capture).  Under no_grad."""
    with torch.no_grad():
        outs = [fn(*item) for item in items]
        outs = [fn(*item) for item in items]
        if device.type != "cuda":
            start = time.perf_counter()
            for item in items:
                fn(*item)
            return (time.perf_counter() - start) * 1e6 / len(items), outs
        import triton.testing

        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for item in items:
                fn(*item)
    ms = triton.testing.do_bench(graph.replay, warmup=5, rep=rep, return_mode="median")
    return ms * 1e3 / len(items), outs


def kernel_bench_results(args, device: torch.device, preset: str, **fields) -> dict:
    """A kernel benchmark's results dict: date, commit, device, torch, preset, `fields`, and empty
    runs / errors / skipped."""
    import datetime

    return {"date": datetime.date.today().isoformat(), "commit": args.commit or git_commit(), "smoke": args.smoke,
            "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "preset": preset, **fields, "runs": {}, "errors": {}, "skipped": []}


def timed_candidates(paths, items: list[tuple], device: torch.device, deadline: float, key: str, res: dict,
                     always: tuple[str, ...] = ("torch", "torch compiled")):
    """Times each (name, fn) of paths over items with graph_time_us, yielding (name, us, outputs).  A
    candidate reached after the deadline (any but `always`) goes to res["skipped"]; one the compiler
    refuses, to res["errors"], and the sweep goes on."""
    for name, fn in paths:
        if name not in always and time.time() > deadline:
            res["skipped"].append(f"{key} {name}")
            continue
        try:
            us, outs = graph_time_us(fn, items, device)
        except Exception as e:
            res["errors"][f"{key} {name}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        yield name, us, outs


def kernel_family(name: str) -> str:
    """A GPU kernel's name -> the part of a training step it belongs to (for per-family totals)."""
    n = name.lower()
    if any(s in n for s in ("_quant_act", "_quant_weight", "_swiglu_quant")):
        return "fp8_quant"
    if any(s in n for s in ("_gemm_kernel", "_wgrad_kernel")) or ("gemm" in n and "f8" in n):
        return "fp8_gemm"
    if any(s in n for s in ("cudnn", "fmha", "flash", "attention", "sdpa", "flex")):
        return "attention"
    if "group" in n:
        return "grouped_gemm"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "matmul")):
        return "gemm"
    if "adam" in n:
        return "optimizer"
    if "triton" in n:
        return "triton_fused"
    if any(s in n for s in ("index", "scatter", "gather", "sort", "radix", "cub::", "searchsorted")):
        return "permute_index_sort"
    if any(s in n for s in ("elementwise", "vectorized", "reduce", "copy", "fill", "cat")):
        return "aten_elementwise"
    return "other"


def timeline_stats(intervals: list[tuple], steps: int, step_gap_us: float = 20.0, top: int = 0) -> dict:
    """Kernel (start, end) or (start, end, name) times in µs over `steps` steps -> how a step's wall time splits
    into kernels and the idle time between them.  Gaps shorter than step_gap_us are inside a step (the GPU
    moving from one graph node to the next); longer ones are between steps (the host's loop).  Overlapping
    kernels (streams) count once.  top > 0 adds "longest_gaps": [µs, kernel before, kernel after] (named
    intervals)."""
    intervals = sorted(intervals)
    busy, gaps, between, end, last, longest = 0.0, [], [], None, "", []
    for s, e, *name in intervals:
        if end is None or s >= end:
            if end is not None:
                (gaps if s - end < step_gap_us else between).append(s - end)
                longest.append([round(s - end, 1), last, name[0][:80] if name else ""])
            busy += e - s
            end = e
        elif e > end:  # overlapping kernels (another stream): count the union once
            busy += e - end
            end = e
        if name and e >= end:
            last = name[0][:80]
    gaps.sort()
    span = (intervals[-1][1] - intervals[0][0]) if intervals else 0.0
    r = {"steps": steps, "kernels_per_step": round(len(intervals) / steps, 1),
         "kernel_us_per_step": round(busy / steps, 1), "gap_us_per_step": round(sum(gaps) / steps, 1),
         "median_gap_us": round(gaps[len(gaps) // 2], 2) if gaps else None,
         "between_steps_us": round(sum(between) / max(len(between), 1), 1),
         "span_us_per_step": round(span / steps, 1)}
    if top:
        r["longest_gaps"] = sorted(longest, key=lambda g: -g[0])[:top]
    return r


def profile_steps(step, n: int, device: torch.device, header: str, path: Path) -> dict:
    """Runs step() n times under torch.profiler; writes `header`, GPU kernel time per step by family, the GPU's
    idle time between kernels (`timeline_stats`: per step, and the longest gaps with the kernels around them)
    and the top kernels to `path`.  Returns {"kernel_ms_per_step", "families", "idle", "file"}."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync(device)
    avgs = prof.key_averages()

    def dev_time(e):  # µs
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    # GPU kernels only: GPU-side user annotations ("Optimizer.step#AdamW.step") span kernels, not add to them
    kernels = [e for e in avgs if device.type == "cuda" and str(getattr(e, "device_type", "")).endswith("CUDA")
               and "#" not in e.key and not e.key.startswith(("Optimizer.", "ProfilerStep"))]
    total = sum(dev_time(e) for e in kernels) or 1
    families: dict[str, float] = {}
    for e in kernels:
        families[kernel_family(e.key)] = families.get(kernel_family(e.key), 0) + dev_time(e)
    fam = {k: {"ms_per_step": round(v / 1e3 / n, 2), "share": round(v / total, 3)}
           for k, v in sorted(families.items(), key=lambda kv: -kv[1])}
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = avgs.table(sort_by=sort, row_limit=45, max_name_column_width=110)
    except Exception:
        table = avgs.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=110)
    lines = [header, f"GPU kernel time per step: {total / 1e3 / n:.1f} ms", "", "time by kernel family (per step):"]
    lines += [f"  {k:<22} {v['ms_per_step']:8.2f} ms  {100 * v['share']:5.1f} %" for k, v in fam.items()]
    # the kernels' own timeline (not the averages): where the GPU waited, e.g. on the CPU's launches
    timeline = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA and "#" not in e.name
                and not e.name.startswith(("Optimizer.", "ProfilerStep"))]
    t = timeline_stats(timeline, n, step_gap_us=float("inf"), top=8)
    idle = {"ms_per_step": round(t["gap_us_per_step"] / 1e3, 2), "longest_gaps_us": t["longest_gaps"]}
    lines += ["", f"GPU idle between kernels: {idle['ms_per_step']} ms per step; the longest gaps (µs, kernel "
              "before -> kernel after):"]
    lines += [f"  {us:9.1f}  {before}  ->  {after}" for us, before, after in t["longest_gaps"]]
    lines += ["", "top kernels and ops by self device time:", table]
    path.write_text("\n".join(lines) + "\n")
    log(f"profile: {total / 1e3 / n:.1f} ms of kernels per step; " + ", ".join(f"{k} {v['ms_per_step']}" for k, v in fam.items()))
    return {"kernel_ms_per_step": round(total / 1e3 / n, 2), "families": fam, "idle": idle, "file": path.name}
