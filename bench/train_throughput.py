"""Training throughput of the `bench` config on one GPU: dsv3 against Hugging Face, in one job.

Every system trains the same config (benchmarks.md: 8 x 2048 tokens, BF16 weights and activations,
fused AdamW, MTP off) from a random init on fresh random tokens every step; warm-up steps first
(compilation happens there), then timed steps between CUDA events, median reported.  Sections:

  env        device, versions, torchtitan presence, the BF16 matmul ceiling measured here (8192^3)
  attn       the causal attention core for qk 192 / v 128 at the bench shape, forward + backward:
             SDPA's default choice, cuDNN, padded flash, FlexAttention; the fastest correct one is used
  dsv3_ref   dsv3 eager, default SDPA (the attention kernel transformers gets), no compile
  dsv3_cudnn dsv3 eager with the winning attention core and the sorted dispatcher
  dsv3_fast  dsv3.perf.apply_fast_paths: + per-block torch.compile (the loss compiles its CE on CUDA) <- the headline
  profile    torch.profiler over a few fast steps -> kernel table + time per kernel family
  dsv3_localdisp  dsv3_fast with the model's own LocalDispatcher (what the sorted dispatcher is worth)
  hf_eager   transformers DeepseekV3ForCausalLM, attn "sdpa", experts "grouped_mm"
  hf_compile the same with each decoder layer compiled
  mtp        dsv3_fast with MTP depth 1 (FLOPs include the MTP layer and its head)
  batch      the largest batch that fits with the fast path (8, 12, 16, 24, 32, ...)

Prints a table and a final JSON line; writes train_<date>.json (and the profile) into --out.
`--smoke` runs a toy config for a few steps on whatever device there is (CPU in CI).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dsv3  # noqa: E402
from bench.common import T0, free, git_commit, log, profile_steps, sync, time_limit  # noqa: E402
from dsv3 import ModelConfig, Transformer  # noqa: E402
from dsv3.model.attention import ATTENTION_IMPLS  # noqa: E402
from dsv3.perf import apply_fast_paths  # noqa: E402
from dsv3.train.losses import training_loss as objective  # noqa: E402
from dsv3.train.metrics import peak_flops  # noqa: E402



# ------------------------------------------------------------------------------------------ helpers


class Timer:
    """CUDA events on a GPU, perf_counter on a CPU; elapsed in ms, read only after `sync`."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.start = torch.cuda.Event(enable_timing=True) if self.cuda else None
        self.end = torch.cuda.Event(enable_timing=True) if self.cuda else None

    def __enter__(self):
        if self.cuda:
            self.start.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
        else:
            self.ms_ = (time.perf_counter() - self.t) * 1e3

    def ms(self) -> float:
        return self.start.elapsed_time(self.end) if self.cuda else self.ms_


def gib(n: int) -> float:
    return round(n / 2**30, 2)


# ------------------------------------------------------------------------------------------ systems


def build_dsv3(cfg: ModelConfig, device) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    return model.to(torch.bfloat16).train()


def mark_step(mode):
    """Under CUDA-graph trees (compile mode reduce-overhead) a new step may reuse the last one's outputs."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def dsv3_step_fn(model, opt, mode=None):
    def step(tokens):  # tokens [B, T+1]
        mark_step(mode)
        opt.zero_grad(set_to_none=True)
        loss, _ = objective(model(tokens[:, :-1], return_aux=True), tokens[:, 1:], mtp_weight=0.3)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def hf_config(cfg: ModelConfig, experts: str):
    from transformers import DeepseekV3Config

    d = cfg.to_hf_config(torch_dtype="bfloat16")
    d = {k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype", "rope_scaling")}
    d["num_nextn_predict_layers"] = 0
    c = DeepseekV3Config(**d, attn_implementation="sdpa", experts_implementation=experts)
    c.use_cache = False
    return c


def build_hf(cfg: ModelConfig, device, experts: str = "grouped_mm"):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV3ForCausalLM(hf_config(cfg, experts))
    if getattr(model.config, "_experts_implementation", None) != experts and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(experts)
    return model.to(torch.bfloat16).train()


def hf_step_fn(model, opt, mode=None):
    def step(tokens):
        mark_step(mode)
        opt.zero_grad(set_to_none=True)
        ids = tokens[:, :-1]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # HF shifts the labels itself
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def adamw(model, device):
    return torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                             fused=device.type in ("cuda", "cpu"))


def measure(name, step, args, device, vocab, flops_per_token, batch=None, steps=None, warmup=None) -> dict:
    """Warm-up, then timed steps on fresh random tokens; no host sync inside the timed loop."""
    b, t = batch or args.batch, args.seq
    steps, warmup = steps or args.steps, warmup or args.warmup
    gen = torch.Generator(device=device).manual_seed(1234)

    def tokens():
        return torch.randint(0, vocab, (b, t + 1), device=device, generator=gen)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tw = time.time()
    for _ in range(warmup):
        step(tokens())
    sync(device)
    warm_s = time.time() - tw
    timers, losses = [], []
    for _ in range(steps):
        tok = tokens()
        with Timer(device) as tm:
            losses.append(step(tok))
        timers.append(tm)
    sync(device)
    ms = sorted(tm.ms() for tm in timers)
    med = statistics.median(ms)
    tok_s = b * t / (med / 1e3)
    peak = peak_flops(device, "bf16")
    losses = torch.stack(losses).float().cpu()
    r = {
        "name": name, "batch": b, "seq": t, "steps": steps, "warmup": warmup,
        "step_ms_median": round(med, 2), "step_ms_min": round(ms[0], 2), "step_ms_max": round(ms[-1], 2),
        "tok_s": round(tok_s, 1), "tflops": round(tok_s * flops_per_token / 1e12, 1),
        "mfu": round(tok_s * flops_per_token / peak, 4) if peak else None,
        "mfu_vs_matmul_ceiling": (round(tok_s * flops_per_token / (args.matmul_tflops * 1e12), 4)
                                  if args.matmul_tflops else None),
        "flops_per_token": flops_per_token,
        "warmup_s": round(warm_s, 1),
        "loss_first": round(losses[0].item(), 4), "loss_last": round(losses[-1].item(), 4),
        "loss_finite": bool(torch.isfinite(losses).all()),
    }
    if device.type == "cuda":
        r["peak_mem_gib"] = gib(torch.cuda.max_memory_allocated())
        r["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
    log(f"{name}: {r['step_ms_median']} ms/step, {r['tok_s']:.0f} tok/s, {r['tflops']} TFLOP/s, "
        f"MFU {r['mfu']}, peak {r.get('peak_mem_gib')} GiB (warm-up {r['warmup_s']} s)")
    return r


# ------------------------------------------------------------------------------------------ sections


def section_env(args, device, res):
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    res["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    res["torch"] = torch.__version__
    res["transformers"] = version("transformers")
    res["triton"] = version("triton")
    res["torchtitan"] = version("torchtitan")
    res["cuda"] = torch.version.cuda
    res["cudnn"] = torch.backends.cudnn.version() if device.type == "cuda" else None
    res["peak_tflops_bf16"] = (peak_flops(device, "bf16") or 0) / 1e12 or None
    if device.type == "cuda":
        n = 8192
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        tms = []
        for _ in range(10):
            with Timer(device) as tm:
                a @ b
            tms.append(tm)
        sync(device)
        ms = statistics.median(t.ms() for t in tms)
        args.matmul_tflops = round(2 * n**3 / (ms / 1e3) / 1e12, 1)
        res["matmul_bf16_8192_tflops"] = args.matmul_tflops
        del a, b
    log(f"env: {res['device']}, torch {res['torch']}, transformers {res['transformers']}, "
        f"torchtitan {res['torchtitan']}, matmul ceiling {res.get('matmul_bf16_8192_tflops')} TFLOP/s")


def section_attn(args, device, res, cfg):
    """Forward + backward of the causal core at the bench shape; error against SDPA's default choice."""
    b, h, t, dqk, dv = args.batch, cfg.num_heads, args.seq, cfg.qk_head_dim, cfg.v_head_dim
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=g)

    # the layouts MLA hands over: [B, T, H, d] transposed to [B, H, T, d]; v a slice of the kv projection
    q, k = rand(b, t, h, dqk).transpose(1, 2), rand(b, t, h, dqk).transpose(1, 2)
    v = rand(b, t, h, cfg.qk_nope_head_dim + dv)[..., cfg.qk_nope_head_dim:].transpose(1, 2)
    grad = torch.randn(b, h, t, dv, device=device, dtype=torch.bfloat16, generator=g)
    flops = 3 * b * h * t * t * (dqk + dv)  # causal, forward + backward (benchmarks.md)
    scale = cfg.softmax_scale
    out, ref = {}, None
    for name in args.attn_candidates:
        fn = ATTENTION_IMPLS[name]
        try:
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            for _ in range(3):
                o = fn(*leaves, scale)
                o.backward(grad)
            tms = []
            for _ in range(args.attn_iters):
                with Timer(device) as tm:
                    o = fn(*leaves, scale)
                    o.backward(grad)
                tms.append(tm)
            sync(device)
            ms = statistics.median(x.ms() for x in tms)
            o = fn(q, k, v, scale).float()
            if ref is None:
                ref = o
            out[name] = {"ms": round(ms, 3), "tflops": round(flops / (ms / 1e3) / 1e12, 1),
                         "max_abs_err_vs_" + args.attn_candidates[0]: round((o - ref).abs().max().item(), 5)}
        except Exception as e:  # a backend that refuses these dims is a result, not a crash
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        log(f"attn {name}: {out[name]}")
        free(device)
    ok = {n: r for n, r in out.items() if "ms" in r and list(r.values())[-1] < 0.05}
    winner = min(ok, key=lambda n: ok[n]["ms"]) if ok else "sdpa"
    if "cudnn" in ok and ok["cudnn"]["ms"] <= 1.02 * ok[winner]["ms"]:
        winner = "cudnn"  # a tie with SDPA's own choice: pin the backend rather than depend on the default
    res["attention"] = {"shape": f"B{b} H{h} T{t} qk{dqk} v{dv} causal, fwd+bwd, bf16", "impls": out, "winner": winner}
    return winner


def run_dsv3(name, cfg, args, device, *, attention, fast, compile, keep=False, dispatcher=True):
    model = build_dsv3(cfg, device)
    if fast:
        apply_fast_paths(model, attention=attention, compile=compile, backend=args.backend, dispatcher=dispatcher,
                         mode=args.compile_mode)
    else:
        model.set_impl(attn=attention, experts="grouped")
    opt = adamw(model, device)
    step = dsv3_step_fn(model, opt, args.compile_mode if fast and compile else None)
    r = measure(name, step, args, device, cfg.vocab_size, cfg.flops_per_token(args.seq, include_mtp=cfg.num_mtp_layers > 0))
    r["settings"] = {"attention": attention, "experts": "grouped", "sorted_dispatcher": fast and dispatcher, "compile": compile,
                     "compile_mode": args.compile_mode if fast and compile else None, "mtp_depth": cfg.num_mtp_layers}
    if keep:
        return r, (model, opt, step)
    del model, opt, step
    free(device)
    return r, None


def run_hf(name, cfg, args, device, *, compile):
    model = build_hf(cfg, device)
    r_cfg = {"attn_implementation": model.config._attn_implementation,
             "experts_implementation": getattr(model.config, "_experts_implementation", None), "compile": compile,
             "compile_mode": args.compile_mode if compile else None}
    if compile:
        for layer in model.model.layers:
            layer.compile(backend=args.backend, mode=args.compile_mode)
    opt = adamw(model, device)
    try:
        r = measure(name, hf_step_fn(model, opt, args.compile_mode if compile else None), args, device, cfg.vocab_size, cfg.flops_per_token(args.seq))
    finally:
        del model, opt
        free(device)
    r["settings"] = r_cfg
    return r


def section_profile(model_opt_step, args, device, cfg, path: Path, res):
    _, _, step = model_opt_step
    gen = torch.Generator(device=device).manual_seed(99)
    header = (f"dsv3 fast path, {args.profile_steps} steps of B{args.batch} x T{args.seq}, {res.get('device')}, "
              f"torch {torch.__version__}, commit {args.commit}, {args.date}")
    res["profile"] = profile_steps(
        lambda: step(torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device, generator=gen)),
        args.profile_steps, device, header, path)


def section_batch(model_opt_step, args, device, cfg, res, deadline):
    model, opt, step = model_opt_step
    sizes = [s for s in args.batch_sizes if s > args.batch]
    fits = [{"batch": args.batch, "tok_s": res["runs"]["dsv3_fast"]["tok_s"],
             "peak_mem_gib": res["runs"]["dsv3_fast"].get("peak_mem_gib")}]
    out = {"tried": [], "fits": fits, "oom_at": None}
    for b in sizes:
        if time.time() > deadline:
            out["stopped"] = "deadline"
            break
        try:
            with time_limit(deadline - time.time()):
                r = measure(f"dsv3_fast_B{b}", step, args, device, cfg.vocab_size, cfg.flops_per_token(args.seq),
                            batch=b, steps=args.batch_steps, warmup=2)
            fits.append({"batch": b, "tok_s": r["tok_s"], "mfu": r["mfu"], "peak_mem_gib": r.get("peak_mem_gib"),
                         "step_ms_median": r["step_ms_median"]})
            out["tried"].append(b)
        except torch.OutOfMemoryError:
            out["tried"].append(b)
            out["oom_at"] = b
            opt.zero_grad(set_to_none=True)
            free(device)
            log(f"batch {b}: out of memory")
            break
    out["largest_fitting_batch"] = fits[-1]["batch"]
    out["note"] = "batch > 8 runs shapes dynamic in the batch dimension (one recompile); same model and optimiser"
    res["batch_search"] = out



# ------------------------------------------------------------------------------------------ main


def table(res) -> str:
    rows = [("run", "batch", "ms/step", "tok/s", "TFLOP/s", "MFU", "peak GiB")]
    for r in res["runs"].values():
        if "tok_s" in r:
            rows.append((r["name"], str(r["batch"]), f"{r['step_ms_median']:.1f}", f"{r['tok_s']:,.0f}",
                         f"{r['tflops']:.1f}", f"{100 * r['mfu']:.1f} %" if r["mfu"] else "-",
                         str(r.get("peak_mem_gib", "-"))))
        else:
            rows.append((r["name"], "-", "-", "-", "-", "-", r.get("error", "")[:60]))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python bench/train_throughput.py --out bench/results\n"
                                       "         python bench/train_throughput.py --smoke")
    p.add_argument("--smoke", action="store_true", help="toy config, few steps, any device (CI)")
    p.add_argument("--out", default=None, help="folder for the JSON and profile (default bench/results; "
                                               "with --smoke a temporary folder)")
    p.add_argument("--commit", default=None, help="git commit of the code measured (default: $DSV3_COMMIT or git)")
    p.add_argument("--sections", default="env,attn,dsv3_ref,dsv3_cudnn,dsv3_fast,profile,dsv3_localdisp,hf_eager,hf_compile,mtp,batch")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--deadline", type=float, default=480, help="seconds; optional sections after it are skipped")
    p.add_argument("--attention", default="auto", help="attention core for the fast path (auto: the attn winner)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; aot_eager on CPU)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for dsv3's blocks and HF's layers alike (reduce-overhead: CUDA graphs)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.backend = args.backend or ("inductor" if device.type == "cuda" else "aot_eager")
    args.commit = args.commit or git_commit()
    args.date = datetime.date.today().isoformat()
    args.matmul_tflops = None
    args.attn_candidates = ["sdpa", "cudnn", "flash_pad", "flex"]
    args.attn_iters, args.profile_steps, args.batch_steps = 10, 3, 4
    args.batch_sizes = [12, 16, 24, 32, 48, 64]
    if args.smoke:
        cfg = ModelConfig.from_preset("tiny").replace(num_mtp_layers=0)
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 2, 2
        args.attn_iters, args.profile_steps, args.batch_steps = 2, 1, 1
        args.batch_sizes = [3]
        preset = "tiny"
    else:
        cfg = ModelConfig.from_preset("bench")
        preset = "bench"
    sections = args.sections.split(",")
    deadline = T0 + args.deadline
    if args.out is None:
        import tempfile

        args.out = tempfile.mkdtemp(prefix="dsv3_bench_") if args.smoke else str(ROOT / "bench" / "results")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"train_{args.date}{'_smoke' if args.smoke else ''}.json"
    res: dict = {"date": args.date, "commit": args.commit, "preset": preset, "smoke": args.smoke,
                 "batch": args.batch, "seq": args.seq, "precision": "bf16 weights and activations, fused AdamW",
                 "flops_per_token": cfg.flops_per_token(args.seq), "runs": {}, "errors": {}}
    log(f"dsv3 {dsv3.__version__}, preset {preset}, B{args.batch} x T{args.seq}, device {device}, commit {args.commit}")

    def save():
        json_path.write_text(json.dumps(res, indent=1) + "\n")

    def guarded(name, fn, budget=None):
        """Runs one section; records its error instead of stopping the job."""
        if name not in sections:
            return None
        left = deadline - time.time()
        if budget is not None and left < budget:
            res["errors"][name] = f"skipped: {left:.0f}s left before the deadline, needs ~{budget}s"
            log(f"skip {name}: {res['errors'][name]}")
            return None
        try:
            with time_limit(max(left, 1) if budget is not None else 1e6):
                return fn()
        except Exception as e:
            res["errors"][name] = f"{type(e).__name__}: {str(e)[:500]}"
            log(f"{name} FAILED: {res['errors'][name]}")
            traceback.print_exc()
            free(device)
            return None
        finally:
            save()

    guarded("env", lambda: section_env(args, device, res))
    winner = guarded("attn", lambda: section_attn(args, device, res, cfg))
    if args.attention != "auto":
        attention = args.attention
    else:
        attention = winner or ("cudnn" if device.type == "cuda" else "sdpa")
    res["fast_attention"] = attention

    def put(r):
        res["runs"][r["name"]] = r

    guarded("dsv3_ref", lambda: put(run_dsv3("dsv3_ref", cfg, args, device, attention="sdpa", fast=False, compile=False)[0]))
    guarded("dsv3_cudnn", lambda: put(run_dsv3("dsv3_eager_fastattn", cfg, args, device, attention=attention, fast=True,
                                               compile=False)[0]))
    fast = guarded("dsv3_fast", lambda: run_dsv3("dsv3_fast", cfg, args, device, attention=attention, fast=True,
                                                 compile=True, keep=True))
    if fast:
        put(fast[0])
        prof_path = out_dir / f"train_profile_{args.date}{'_smoke' if args.smoke else ''}.txt"
        guarded("profile", lambda: section_profile(fast[1], args, device, cfg, prof_path, res))
    guarded("dsv3_localdisp", lambda: put(run_dsv3("dsv3_fast_local_dispatcher", cfg, args, device, attention=attention,
                                                   fast=True, compile=True, dispatcher=False)[0]), budget=60)
    guarded("hf_eager", lambda: put(run_hf("hf_eager", cfg, args, device, compile=False)))
    guarded("hf_compile", lambda: put(run_hf("hf_compiled", cfg, args, device, compile=True)), budget=120)
    guarded("mtp", lambda: put(run_dsv3("dsv3_fast_mtp1", cfg.replace(num_mtp_layers=1), args, device,
                                        attention=attention, fast=True, compile=True)[0]), budget=60)

    if fast:
        guarded("batch", lambda: section_batch(fast[1], args, device, cfg, res, deadline), budget=60)
        del fast
        free(device)

    # ---- summary
    runs = res["runs"]
    hf = [r for k, r in runs.items() if k.startswith("hf_") and "tok_s" in r]
    best_hf = max(hf, key=lambda r: r["tok_s"]) if hf else None
    d = runs.get("dsv3_fast")
    if d:
        res["dsv3_tok_s"], res["dsv3_mfu"], res["dsv3_tflops"] = d["tok_s"], d["mfu"], d["tflops"]
        res["dsv3_peak_mem_gib"] = d.get("peak_mem_gib")
    if best_hf:
        res["hf_tok_s"], res["hf_mfu"], res["hf_setting"] = best_hf["tok_s"], best_hf["mfu"], best_hf["name"]
    if d and best_hf:
        res["speedup_vs_hf"] = round(d["tok_s"] / best_hf["tok_s"], 3)
        if "hf_eager" in runs and "tok_s" in runs["hf_eager"]:
            res["speedup_vs_hf_eager"] = round(d["tok_s"] / runs["hf_eager"]["tok_s"], 3)
        if "dsv3_ref" in runs:
            res["dsv3_ref_vs_hf"] = round(runs["dsv3_ref"]["tok_s"] / best_hf["tok_s"], 3)
    res["wall_s"] = round(time.time() - T0, 1)
    save()
    print()
    print(table(res))
    summary = {k: res.get(k) for k in ("device", "date", "commit", "torch", "transformers", "preset", "batch", "seq",
                                        "dsv3_tok_s", "dsv3_mfu", "dsv3_tflops", "hf_tok_s", "hf_mfu", "hf_setting",
                                        "speedup_vs_hf", "speedup_vs_hf_eager", "fast_attention", "torchtitan")}
    summary["runs"] = {k: r.get("tok_s") for k, r in runs.items()}
    summary["errors"] = res["errors"]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
