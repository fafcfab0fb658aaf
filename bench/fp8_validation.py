"""FP8 against BF16 training on one GPU: loss agreement over a long run, whole-step speed, FP8 GEMM rates.

Sections, in one job on one machine:
  env    device, versions, commit; the FP8 tensor-wise (8192^3, `torch._scaled_mm`) and BF16 ceilings
  gemm   FP8 GEMMs at the bench config's shapes: dense block-wise (cuBLAS `_scaled_mm` and our Triton),
         grouped experts (our Triton), each against BF16 (`mm`, `_grouped_mm`) on the same shapes
  train  BF16 and FP8 runs of --steps steps from the same seed, init and batches: the `bench` config on
         the built-in corpus through the trainer's data pipeline (`prepare_data`, `BatchIterator`),
         the trainer's optimiser, LR schedule, clipping and bias update; both with the same fast paths
         (`dsv3.perf.apply_fast_paths`).  fp32 master weights in both; BF16 = autocast, FP8 =
         `precision.prepare_model(model, "fp8")` under the same autocast.  Per-step times from CUDA
         events (median after the compile steps), losses read back once at the end.
  speed  (if time is left) both precisions at the throughput benchmark's batch (8 x 2048), timed steps
         on random tokens (--speed-batch, --speed-seq); --profile adds each step's kernel time by family
         (FP8 quantisation, FP8 GEMMs, BF16 GEMMs, attention, ...) from torch.profiler

Metric (report §3.5): relative loss error |L_fp8 - L_bf16| / L_bf16 of the losses smoothed over 20
steps, maximum over the last 80 % of steps.  With --seeds (or --merge of runs made with other seeds)
it is taken on the seed-mean curves: a single 1000-step run scatters by more than the 0.25 % target
(BF16 against BF16 of the next seed is reported as `bf16_seed_to_seed`, per-seed errors as `per_seed`).
--control adds a third run per seed, BF16 from the same init rounded once to BF16 (the same batches):
its error against BF16 (`control_bf16_round`) is how far a ~2^-8 nudge alone moves the curve, the
floor below which no precision can be told apart from BF16 at this length and learning rate.
A device call too short for every seed can run some (--seeds 0,1), then others, then --merge the JSONs;
one too short for a seed's arms (8 x 2048: ~200 s per arm) can run some (--arms fp8,bf16, then --arms
bf16_round), and --merge joins them.  Repeats of one arm (neither precision is deterministic on the
GPU) compare with bench/loss_curves.py.  Writes fp8_<date>.json and fp8_<date>_loss.png to --out
and prints a table and a final JSON line.  `--smoke` runs a toy config on the CPU (no compile).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import git_commit, profile_steps  # noqa: E402
from dsv3 import ModelConfig, Transformer  # noqa: E402
from dsv3 import precision as prec  # noqa: E402
from dsv3.data.dataset import BatchIterator  # noqa: E402
from dsv3.perf import apply_fast_paths  # noqa: E402
from dsv3.train.balance import update_expert_biases  # noqa: E402
from dsv3.train.config import TrainConfig  # noqa: E402
from dsv3.train.data_setup import prepare_data  # noqa: E402
from dsv3.train.losses import training_loss  # noqa: E402
from dsv3.train.optim import build_optimizer  # noqa: E402
from dsv3.train.schedules import LRSchedule  # noqa: E402

T0 = time.time()
TENSORWISE_CEILING_DOC = 1402.0  # benchmarks.md, FP8 e4m3 tensor-wise 8192^3 on one H200


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ gemm


def _bench(fn) -> float:
    """Median ms of fn over CUDA-event-timed repeats (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def grouped_operands(m: int, n: int, k: int, experts: int, dev: str = "cuda") -> dict[str, torch.Tensor]:
    """One routed-expert projection's random operands, BF16 and quantised by the Triton kernels:
    x [M, K], w [E, N, K] (wb: its BF16 transpose for `_grouped_mm`), dy [M, N]; xq/xs and xqt/xst the
    two layouts of x, wq/ws w's 128x128 blocks, dyt/dyts dy's Wgrad layout."""
    from dsv3.fp8 import ops

    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(experts, n, k, device=dev) * 0.02
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    xq, xs, xqt, xst = ops.quant_both(x, False, "triton")
    wq, ws, _ = ops.quant_weight(w, "triton")
    _, _, dyt, dyts = ops.quant_both(dy, False, "triton")
    return {"x": x, "w": w, "wb": w.to(torch.bfloat16).transpose(1, 2), "dy": dy, "xq": xq, "xs": xs, "xqt": xqt,
            "xst": xst, "wq": wq, "ws": ws, "dyt": dyt, "dyts": dyts}


def ceilings(dev: str, n: int = 8192) -> dict[str, float]:
    """TFLOP/s of an n^3 FP8 tensor-wise `_scaled_mm` and of a BF16 matmul (the operands die with the call)."""
    a = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    ab, bb = a.to(torch.bfloat16), b.to(torch.bfloat16)
    flop = 2 * n ** 3
    return {f"fp8_tensorwise_{n}": round(flop / _bench(lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16)) / 1e9, 1),
            f"bf16_{n}": round(flop / _bench(lambda: ab @ bb.t()) / 1e9, 1)}


def section_gemm(tokens: int, cfg: ModelConfig) -> dict:
    from dsv3.fp8 import ops

    dev = "cuda"
    out = {}

    def tflops(flop, ms):
        return round(flop / ms / 1e9, 1)

    out.update(ceilings(dev))
    log(f"ceilings: fp8 tensor-wise {out['fp8_tensorwise_8192']}, bf16 {out['bf16_8192']} TFLOP/s")

    d, h = cfg.hidden_size, cfg.num_heads
    dense = {  # (N, K) of the bench config's Linear layers
        "wq_a": (cfg.q_lora_rank, d), "wq_b": (h * cfg.qk_head_dim, cfg.q_lora_rank),
        "wkv_a": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d), "wkv_b": (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        "wo": (d, h * cfg.v_head_dim), "mlp_w1": (cfg.intermediate_size, d), "mlp_w2": (d, cfg.intermediate_size),
        "shared_w1": (cfg.moe_intermediate_size, d), "shared_w2": (d, cfg.moe_intermediate_size),
    }
    rows = []
    for name, (nn_, k) in dense.items():
        x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(nn_, k, device=dev) * 0.02
        xq, xs = ops.quant_rows(x, False, "triton")
        wq, ws, _ = ops.quant_weight(w, "triton")
        flop = 2 * tokens * nn_ * k
        wb = w.to(torch.bfloat16)
        r = {"layer": name, "M": tokens, "N": nn_, "K": k,
             "bf16": tflops(flop, _bench(lambda: x @ wb.t())),
             "fp8_cublas_blockwise": tflops(flop, _bench(lambda: ops.gemm(xq, xs, wq, ws, torch.bfloat16, "cublas"))),
             "fp8_triton_blockwise": tflops(flop, _bench(lambda: ops.gemm(xq, xs, wq, ws, torch.bfloat16, "triton"))),
             "quant_act_ms": round(_bench(lambda: ops.quant_both(x, False, "triton")), 4)}
        rows.append(r)
        log(f"dense {name}: {r}")
    out["dense"] = rows

    e, k_act, inter = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    m = tokens * k_act
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, e, (m,), device=dev, generator=g)
    counts = torch.bincount(ids, minlength=e)
    offs = counts.cumsum(0).to(torch.int32)
    rows = []
    for name, (nn_, k) in {"w13": (2 * inter, d), "w2": (d, inter)}.items():
        o = grouped_operands(m, nn_, k, e, dev)
        x, dy, wb, xq, xs, xqt, xst, wq, ws, dyt, dyts = (o[n] for n in ("x", "dy", "wb", "xq", "xs", "xqt", "xst", "wq", "ws",
                                                                         "dyt", "dyts"))
        flop = 2 * m * nn_ * k
        r = {"layer": f"experts.{name}", "M": m, "N": nn_, "K": k, "groups": e,
             "bf16_grouped_mm": tflops(flop, _bench(lambda: torch._grouped_mm(x, wb, offs=offs))),
             "fp8_triton_grouped": tflops(flop, _bench(lambda: ops.grouped_gemm(xq, xs, wq, ws, counts, torch.bfloat16, "triton"))),
             "bf16_wgrad_grouped_mm": tflops(flop, _bench(lambda: torch._grouped_mm(dy.t(), x, offs=offs))),
             "fp8_triton_wgrad": tflops(flop, _bench(lambda: ops.grouped_wgrad(dyt, dyts, xqt, xst, counts, torch.float32, "triton")))}
        rows.append(r)
        log(f"grouped {name}: {r}")
    out["grouped"] = rows
    return out


# ------------------------------------------------------------------------------------------ training


def batches_for(args, cfg: ModelConfig, device, seed: int) -> tuple[torch.Tensor, str]:
    """All the run's batches, [steps, B, T+1] int64 on the device: identical for both precisions."""
    tcfg = TrainConfig(preset=args.preset, seq_len=args.seq, seed=seed, data=getattr(args, "data", None), max_data_bytes=args.data_bytes,
                       cache_dir=args.cache_dir)
    from rich.console import Console

    data = prepare_data(tcfg, cfg.vocab_size, None, Console())
    log(data.describe())
    it = BatchIterator(data.corpus.train_tokens, args.batch, args.seq, seed=seed)
    out = torch.empty(args.steps, args.batch, args.seq + 1, dtype=torch.long)
    for i in range(args.steps):
        x, y = it.next_batch()
        out[i, :, :-1], out[i, :, -1] = x, y[:, -1]
    return out.to(device), data.describe()


def fp8_keep(args) -> tuple[str, ...]:
    """--fp8-keep as module-name prefixes (empty: every FP8 layer of the policy runs FP8)."""
    return tuple(k for k in (getattr(args, "fp8_keep", "") or "").split(",") if k)


def build(cfg: ModelConfig, precision: str, args, device, seed: int = 0, round_init: bool = False):
    torch.manual_seed(seed)
    model = Transformer(cfg).to(device)
    if round_init:  # the control arm: the same init, each fp32 weight rounded once to BF16 (relative change <= 2^-8)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    model = prec.prepare_model(model, precision, args.fp8_scales, fp8_keep=fp8_keep(args)).train()
    if device.type == "cuda":
        # --deterministic: SDPA pinned to memory-efficient attention, whose backward stops splitting over keys
        # under deterministic algorithms.  cuDNN attention's backward has no deterministic mode in torch, and
        # plain "sdpa" still picks cuDNN on the H200 (run 26: the repeats differed, with cuDNN's warning)
        apply_fast_paths(model, attention="efficient" if args.deterministic else "cudnn", compile=not args.no_compile,
                         mode=args.compile_mode)
    return model


def train_run(cfg: ModelConfig, arm: str, batches: torch.Tensor, args, device, seed: int) -> dict:
    """arm: "bf16", "fp8", "bf16_round" (BF16 from the BF16-rounded init: the noise-floor control) or
    "fp8_round" (FP8 from that init: how far the same nudge moves FP8's trajectory)."""
    precision = arm.removesuffix("_round")
    model = build(cfg, precision, args, device, seed, round_init=arm.endswith("_round"))
    tcfg = TrainConfig(lr=args.lr, weight_decay=0.1, grad_clip=1.0, moments=args.moments)
    opt = build_optimizer(model, tcfg, device)
    sched = LRSchedule(args.lr, args.warmup, args.steps)
    autocast = prec.autocast_dtype(precision)
    losses, events = [], []
    cuda = device.type == "cuda"
    tw = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = sched.lr(step)
        tokens = batches[step]
        if cuda:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = model(tokens[:, :-1], return_aux=True)
            loss, parts = training_loss(out, tokens[:, 1:], 0.0)  # the trainer's objective: CE + balance
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if out.expert_loads is not None:
            update_expert_biases(model.moe_layers(), out.expert_loads, args.bias_update_rate)
        losses.append(parts["loss"])
        if cuda:
            ev[1].record()
            events.append(ev)
        if step == 2 and cuda:
            torch.cuda.synchronize()
            log(f"{precision}: first 3 steps (compile) {time.time() - tw:.1f}s")
    if cuda:
        torch.cuda.synchronize()
    wall = time.time() - tw
    ms = [a.elapsed_time(b) for a, b in events[args.skip:]] if cuda else []
    loss = torch.stack(losses).float().cpu().tolist()
    r = {"precision": precision, "arm": arm, "seed": seed, "steps": args.steps, "wall_s": round(wall, 1), "loss": loss,
         "step_ms_median": round(statistics.median(ms), 3) if ms else None,
         "tok_s": round(args.batch * args.seq / (statistics.median(ms) / 1e3), 1) if ms else None,
         "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None}
    log(f"{arm}, seed {seed}: {args.steps} steps in {wall:.1f}s, median {r['step_ms_median']} ms/step, "
        f"loss {loss[0]:.4f} -> {loss[-1]:.4f}")
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return r


def speed_run(cfg: ModelConfig, precision: str, args, device, batch: int, seq: int, steps: int = 10, warmup: int = 4,
              profile_path: Path | None = None) -> dict:
    """Median step time on random tokens; with profile_path, 3 more steps under torch.profiler too
    (kernel time by family: fp8_quant, fp8_gemm, gemm, attention, ...; written to that file)."""
    held = {"model": build(cfg, precision, args, device)}  # emptied at the end: the step closure must not keep it alive
    held["opt"] = build_optimizer(held["model"], TrainConfig(lr=1e-4), device)
    autocast = prec.autocast_dtype(precision)
    g = torch.Generator(device=device).manual_seed(1)

    def step():
        if args.compile_mode == "reduce-overhead":  # CUDA-graph trees: the previous step's outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device, generator=g)
        with torch.autocast(device.type, dtype=autocast):
            out = held["model"](tokens[:, :-1], return_aux=True)
            loss = training_loss(out, tokens[:, 1:], 0.0)[0]
        loss.backward()
        held["opt"].step()
        held["opt"].zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        if i >= warmup:
            times.append((a, b))
    torch.cuda.synchronize()
    med = statistics.median(x.elapsed_time(y) for x, y in times)
    r = {"precision": precision, "batch": batch, "seq": seq, "compile_mode": args.compile_mode, "step_ms_median": round(med, 2),
         "tok_s": round(batch * seq / med * 1e3, 1)}
    if profile_path is not None:
        header = (f"{precision} training step, {args.preset} config, B{batch} x T{seq}, 3 steps, "
                  f"{torch.cuda.get_device_name()}, torch {torch.__version__}, commit {git_commit()}")
        r["profile"] = profile_steps(step, 3, device, header, profile_path)
    held.clear()
    torch.cuda.empty_cache()
    log(f"speed {precision}: {r}")
    return r


def smoothed(x: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(x):
        acc += v
        if i >= w:
            acc -= x[i - w]
        out.append(acc / min(i + 1, w))
    return out


def loss_error(bf16: list[float], fp8: list[float], window: int = 20, tail: float = 0.8) -> dict:
    sb, sf = smoothed(bf16, window), smoothed(fp8, window)
    start = int(len(sb) * (1 - tail))
    signed = [(f - b) / b for b, f in zip(sb[start:], sf[start:])]
    errs = [abs(e) for e in signed]
    return {"max_rel_loss_err": max(errs), "mean_rel_loss_err": sum(errs) / len(errs),
            "signed_mean_rel_loss_err": sum(signed) / len(signed), "from_step": start + 1,
            "smoothing_window": window, "final_smoothed": {"bf16": sb[-1], "fp8": sf[-1]}}


def seed_metrics(runs: dict[str, dict]) -> dict:
    """runs: seed -> {"bf16": run, "fp8": run}.  The headline error compares the seed-mean curves: one
    seed's 1000-step curve scatters by more than 0.25 % (BF16 against BF16 of another seed is reported
    beside it as the noise floor).  Per-seed errors are kept too."""
    seeds = sorted(runs, key=int)
    mean = {pr: [statistics.fmean(v) for v in zip(*(runs[s][pr]["loss"] for s in seeds))] for pr in ("bf16", "fp8")}
    out = loss_error(mean["bf16"], mean["fp8"])
    out["seeds"] = [int(s) for s in seeds]
    out["per_seed"] = {s: loss_error(runs[s]["bf16"]["loss"], runs[s]["fp8"]["loss"]) for s in seeds}
    if len(seeds) > 1:  # the noise floor of one run: BF16 against BF16 from the next seed
        out["bf16_seed_to_seed"] = {f"{a}-{b}": loss_error(runs[a]["bf16"]["loss"], runs[b]["bf16"]["loss"])["max_rel_loss_err"]
                                    for a, b in zip(seeds, seeds[1:])}
    controlled = [s for s in seeds if "bf16_round" in runs[s]]
    if controlled:  # the same seed and batches, BF16 from an init rounded once to BF16: the trajectory's own scatter
        ctl = [statistics.fmean(v) for v in zip(*(runs[s]["bf16_round"]["loss"] for s in controlled))]
        ref = [statistics.fmean(v) for v in zip(*(runs[s]["bf16"]["loss"] for s in controlled))]
        out["control_bf16_round"] = {"seeds": [int(s) for s in controlled],
                                     "max_rel_loss_err": loss_error(ref, ctl)["max_rel_loss_err"],
                                     "mean_rel_loss_err": loss_error(ref, ctl)["mean_rel_loss_err"],
                                     "per_seed": {s: loss_error(runs[s]["bf16"]["loss"], runs[s]["bf16_round"]["loss"])["max_rel_loss_err"]
                                                  for s in controlled}}
    out["seed_bias"] = seed_bias(runs, seeds)
    out["mean_curves"] = mean
    return out


def seed_bias(runs: dict[str, dict], seeds: list[str]) -> dict:
    """The signed mean relative gap over the tail, per seed, for FP8 and (where run) the control, with
    its mean, standard deviation and standard error over the seeds.  The max over ~800 smoothed points of
    a noisy gap is biased upwards; this is the statistic whose sign and error bar say whether FP8 trains
    worse at all (the 2026-12-01 three seeds: FP8 +1.82, +0.50, -1.40 %, mean +0.31 +- 0.94 %, against
    the control's mean +0.83 %)."""
    out = {}
    for arm in ("fp8", "bf16_round"):
        have = [s for s in seeds if arm in runs[s]]
        if not have:
            continue
        gaps = {s: loss_error(runs[s]["bf16"]["loss"], runs[s][arm]["loss"])["signed_mean_rel_loss_err"] for s in have}
        v = list(gaps.values())
        sd = statistics.stdev(v) if len(v) > 1 else None
        out["control" if arm == "bf16_round" else arm] = {
            "per_seed": gaps, "mean": statistics.fmean(v), "sd": sd,
            "se": sd / math.sqrt(len(v)) if sd is not None else None}
    return out


def plot(path: Path, bf16: list[float], fp8: list[float], title: str, control: list[float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    steps = range(1, len(bf16) + 1)
    sb, sf = smoothed(bf16, 20), smoothed(fp8, 20)
    ax.plot(steps, bf16, color="tab:blue", alpha=0.2, lw=0.6)
    ax.plot(steps, fp8, color="tab:red", alpha=0.2, lw=0.6)
    ax.plot(steps, sb, color="tab:blue", label="BF16 (20-step mean)")
    ax.plot(steps, sf, color="tab:red", label="FP8 (20-step mean)", ls="--")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax2.plot(steps, [100 * (f - b) / b for b, f in zip(sb, sf)], color="k", lw=0.8, label="FP8")
    if control is not None:  # same length as bf16 (control seeds are a subset only when merged that way)
        sc = smoothed(control, 20)
        ax2.plot(steps, [100 * (c - b) / b for b, c in zip(sb, sc)], color="tab:green", lw=0.8,
                 label="BF16, init rounded to BF16 (control)")
        ax2.legend(fontsize=7)
    ax2.axhline(0.25, color="tab:gray", ls=":")
    ax2.axhline(-0.25, color="tab:gray", ls=":")
    ax2.axvline(int(0.2 * len(bf16)) + 1, color="tab:gray", ls="--", lw=0.6)
    ax2.set_ylabel("FP8 vs BF16 (%)")
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------ main


def data_source_of(result: dict) -> str | None:
    """The --data a result file trained on (None: the built-in corpus). Merged files before 2026-12-04 wrote
    `data_source` None whatever the runs read; their `data` line ("<source>: N train / M val tokens, ...") names it."""
    if result.get("data_source") is not None or not result.get("data"):
        return result.get("data_source")
    source = result["data"].split(": ", 1)[0]
    return None if source.startswith("built-in corpus") else source


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--preset", default="bench")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=2.2e-4,
                   help="peak learning rate (default: the report's 2.2e-4).  Runs 18-26 used 8e-4, where a BF16-rounding "
                        "nudge alone moves the loss 5.5x further than at 2e-4 (CPU proxy, bench/results/README.md run 26)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--bias-update-rate", type=float, default=1e-3,
                   help="the balancing bias's update speed gamma (the report's 0.001); 0 freezes the biases, which "
                        "takes the sign-of-load feedback out of the trajectory's sensitivity (a diagnostic, not the recipe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp8-scales", default="spec", choices=("spec", "amax", "pow2"),
                   help="FP8 arm's scales (dsv3/fp8/convert.py); the 2026-12-01 runs were amax, before spec became the default")
    p.add_argument("--fp8-keep", default="",
                   help="FP8 arm: comma-separated module-name prefixes left BF16 (e.g. layers.0.attn); an experiment, "
                        "not the report's policy (bench/fp8_grad_error.py)")
    p.add_argument("--moments", default="fp32", choices=("fp32", "bf16"),
                   help="AdamW moments of every arm (the report: bf16)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, a BF16 and an FP8 run each (own init and data "
                                                  "order); the loss error is then taken on the seed-mean curves (default: --seed)")
    p.add_argument("--control", action="store_true",
                   help="a third run per seed: BF16 from the same init rounded once to BF16 (a ~2^-8 relative nudge), "
                        "the same batches; its error against BF16 is the trajectory's own scatter, the floor FP8 is judged by")
    p.add_argument("--arms", default="fp8,bf16",
                   help="comma-separated arms to run per seed: fp8, bf16, bf16_round (the control; --control adds it), "
                        "fp8_round (FP8 from the control's init). "
                        "A seed's arms may run in separate jobs (at 8 x 2048 three arms pass one 600 s device call) "
                        "and --merge joins them")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True, warn_only=True) and CUBLAS_WORKSPACE_CONFIG=:4096:8: "
                        "GPU runs of one arm repeat (2026-12-03, run 24: without it BF16 against itself differs by "
                        "1.45 %%, FP8 by 9.77 %%), so an arm against its _round twin measures the trajectory's "
                        "sensitivity alone (for loss runs: it may slow the step).  Attention then runs on SDPA's memory-efficient "
                        "kernel (deterministic backward under that mode), not cuDNN's: two BF16 runs of 200 steps at 8 x 2048 "
                        "were bit-equal, at 234 against 172 ms per step (run 26).  Ops with no deterministic kernel warn")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="fp8_*.json files of earlier runs of other seeds: combine their runs, recompute the metrics and "
                        "the plot into --out; runs nothing")
    p.add_argument("--skip", type=int, default=20, help="steps left out of the step-time median (compile)")
    p.add_argument("--data", default=None,
                   help="a file or folder of text (the trainer's --data); default: the built-in corpus, 1.8 M tokens, "
                        "which 1,000 steps of 8 x 2048 pass ~9 times. A larger one, e.g. an installed package's "
                        "sources, keeps every step on unseen text")
    p.add_argument("--data-bytes", type=int, default=24 << 20, help="corpus bytes to tokenise")
    p.add_argument("--cache-dir", default="/tmp/dsv3-cache")
    p.add_argument("--sections", default="env,gemm,train,speed")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip later sections past this many seconds")
    p.add_argument("--gemm-tokens", type=int, default=16384, help="GEMM micro-benchmark rows (the bench step's tokens)")
    p.add_argument("--speed-batch", type=int, default=8)
    p.add_argument("--speed-seq", type=int, default=2048)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the blocks (e.g. reduce-overhead: CUDA graphs; default: none)")
    p.add_argument("--profile", action="store_true",
                   help="speed section: also profile 3 steps of each precision (fp8_<date>_profile_{bf16,fp8}.txt)")
    p.add_argument("--smoke", action="store_true",
                   help="toy config (tiny preset, 30 steps of 2 x 64, no compile), CPU ok; flags given beside it win")
    args = p.parse_args(argv)
    if args.smoke:  # its settings become defaults, so e.g. `--smoke --steps 10` runs 10 steps
        p.set_defaults(preset="tiny", steps=30, batch=2, seq=64, skip=2, warmup=5, data_bytes=2 << 20,
                       no_compile=True, sections="env,train")
        args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    arms = [a for a in args.arms.split(",") if a] + (["bf16_round"] if args.control and "bf16_round" not in args.arms else [])
    if unknown := set(arms) - {"fp8", "bf16", "bf16_round", "fp8_round"}:
        raise SystemExit(f"--arms: unknown {sorted(unknown)}; choose from fp8, bf16, bf16_round, fp8_round")
    if args.deterministic:  # before the first cuBLAS handle; see --deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig.from_preset(args.preset)
    date = datetime.date.today().isoformat()
    res = {"date": date, "commit": git_commit(), "preset": args.preset, "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "batch": args.batch, "seq": args.seq, "steps": args.steps, "lr": args.lr, "warmup": args.warmup,
           "bias_update_rate": args.bias_update_rate,
           "data_source": args.data, "deterministic": args.deterministic,
           "fp8_scales": args.fp8_scales, "fp8_keep": list(fp8_keep(args)), "moments": args.moments,
           "seeds": seeds, "smoke": args.smoke, "errors": {}}
    if device.type == "cuda":
        import triton

        res["triton"] = triton.__version__
        res["cuda"] = torch.version.cuda
        res["fp8_backend"] = __import__("dsv3.fp8.ops", fromlist=["x"]).default_backend(device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"fp8_{date}.json", out_dir / f"fp8_{date}_loss.png"

    def save():
        json_path.write_text(json.dumps(res, indent=1) + "\n")

    def guarded(name, fn):
        if name not in sections:
            return
        if time.time() - T0 > args.budget_s:
            res["errors"][name] = "skipped: time budget"
            log(f"{name}: skipped (budget)")
            return
        try:
            fn()
        except Exception as e:
            res["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        save()

    def summarise(runs: dict[str, dict]) -> None:
        res.update(seed_metrics(runs))
        mean = res.pop("mean_curves")
        first = runs[min(runs, key=int)]
        if first["bf16"]["step_ms_median"]:
            res["step_speedup_vs_bf16"] = round(first["bf16"]["step_ms_median"] / first["fp8"]["step_ms_median"], 3)
        seeds = ", ".join(runs)
        ctl = [s for s in runs if "bf16_round" in runs[s]]
        control = ([statistics.fmean(v) for v in zip(*(runs[s]["bf16_round"]["loss"] for s in ctl))]
                   if ctl and len(ctl) == len(runs) else None)
        plot(png_path, mean["bf16"], mean["fp8"],
             f"{res['preset']} config, B{res['batch']} x T{res['seq']}, {res['steps']} steps, seed{'s' if len(runs) > 1 else ''} {seeds}"
             f"{' (mean curves)' if len(runs) > 1 else ''}, {res['device']}, {date}\n"
             f"max rel. err. of 20-step means over the last 80 %: {100 * res['max_rel_loss_err']:.3f} %"
             + (f" (control: {100 * res['control_bf16_round']['max_rel_loss_err']:.3f} %)" if control else ""),
             control)

    def train():
        runs = res["runs_by_seed"] = {}
        for seed in seeds:
            batches, data = batches_for(args, cfg, device, seed)
            res["data"] = data
            runs[str(seed)] = {}
            for arm in arms:  # FP8 first: a broken FP8 path fails in seconds, not after the BF16 run
                runs[str(seed)][arm] = train_run(cfg, arm, batches, args, device, seed)
                save()
        if all({"fp8", "bf16"} <= set(r) for r in runs.values()):  # else: arms for a later --merge
            summarise(runs)

    if args.merge:  # earlier runs' train sections, other seeds of the same config: combine, run nothing
        runs, shape = {}, None
        for f in args.merge:
            old = json.loads(Path(f).read_text())
            this = {k: old.get(k) for k in ("preset", "batch", "seq", "steps", "lr", "warmup")}
            this["data_source"] = data_source_of(old)
            this["deterministic"] = old.get("deterministic", False)
            this["bias_update_rate"] = old.get("bias_update_rate", 1e-3)  # fixed at the report's 0.001 before it was recorded
            # files from before these were recorded ran amax scales and fp32 moments
            this |= {"fp8_scales": old.get("fp8_scales", "amax"), "moments": old.get("moments", "fp32"),
                     "fp8_keep": old.get("fp8_keep", [])}
            if shape is not None and this != shape:
                raise SystemExit(f"--merge: {f} ran {this}, the first file {shape}: only runs of one config combine")
            shape = this
            for seed, seed_arms in (old.get("runs_by_seed") or {str(old.get("seed", 0)): old["runs"]}).items():
                runs.setdefault(seed, {}).update(seed_arms)  # one seed's arms may come from several files
            res.update({k: old[k] for k in ("commit", "device", "date", "data", "torch", "triton", "cuda", "fp8_backend",
                                            "preset", "batch", "seq", "steps", "lr", "warmup") if k in old})
            res.update({k: this[k] for k in ("fp8_scales", "moments", "fp8_keep", "deterministic", "bias_update_rate",
                                             "data_source")})
        res["merged_from"] = [Path(f).name for f in args.merge]
        if lacking := sorted(seed for seed, r in runs.items() if not {"fp8", "bf16"} <= set(r)):
            raise SystemExit(f"--merge: seed(s) {', '.join(lacking)} lack an fp8 or bf16 arm in these files; "
                             "bench/loss_curves.py compares arbitrary arms")
        summarise(runs)
        res["runs_by_seed"] = runs
        sections = set()
    else:
        guarded("train", train)
    if device.type == "cuda":
        guarded("gemm", lambda: res.update(gemm=section_gemm(args.gemm_tokens, cfg)))

    def speed():
        r = {pr: speed_run(cfg, pr, args, device, args.speed_batch, args.speed_seq,
                           profile_path=out_dir / f"fp8_{date}_profile_{pr}.txt" if args.profile else None)
             for pr in ("bf16", "fp8")}
        r["speedup"] = round(r["bf16"]["step_ms_median"] / r["fp8"]["step_ms_median"], 3)
        res["speed"] = r
        if res.get("step_speedup_vs_bf16") is None:  # no loss run in this job: the bench step is the figure
            res["step_speedup_vs_bf16"] = r["speedup"]
            res["step_speedup_from"] = f"speed section, {args.speed_batch} x {args.speed_seq}"

    if device.type == "cuda":
        guarded("speed", speed)
    if device.type == "cuda":
        from dsv3.fp8.ops import CUBLAS_REFUSED

        res["cublas_refused"] = {str(k): v for k, v in CUBLAS_REFUSED.items()}
    res["wall_s"] = round(time.time() - T0, 1)
    save()
    # the loss run's fields only where one ran (or was merged): else they would echo its unused defaults
    loss_keys = ("steps", "batch", "seq", "seeds", "max_rel_loss_err", "seed_bias") if "runs_by_seed" in res else ()
    summary = {k: res.get(k) for k in ("device", "date", "commit", *loss_keys, "step_speedup_vs_bf16", "errors")}
    if "step_speedup_from" in res:
        summary["step_speedup_from"] = res["step_speedup_from"]
    if "speed" in res:
        summary["speed"] = res["speed"]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
