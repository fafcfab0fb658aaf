"""The few-row linear (dsv3.inference.gemv) against F.linear (cuBLAS) at the `bench` decode shapes, on one GPU.

    python bench/gemv_kernel.py [--out DIR] [--copies 8] [--deadline 85]
    python bench/gemv_kernel.py --smoke      # CPU, `tiny` shapes: F.linear (+ the kernel if TRITON_INTERPRET=1)

For M = 1, 2, 4, 8 rows of x (BF16) and every dense projection a decode step runs (wq_a, wq_b, wkv_a,
wo, the shared expert's w1/w3 and w2, the dense layer's w1/w3 and w2, the head; (N, K) from the config)
it times F.linear and small_m_linear under each GemvTiles of a sweep.  Each timing is a CUDA graph of
--copies calls with distinct weights (8 copies of the head are 1 GB, of wkv_a 19 MB; do_bench also
flushes the 60 MB L2 between replays, so every weight comes from HBM) replayed under
triton.testing.do_bench, divided by the copies.  Effective GB/s counts the weight bytes N*K*2.  Every
output is checked against F.linear's (relative Frobenius error; a miss is recorded in "errors" and the
tiles drop out of the best).  Sweep candidates go in priority order, each over every shape and M; those
left when --deadline passes are skipped (listed in "skipped").

The step mix sums one decode step's GEMVs per M, as the brief counts them: per layer wq_a, wq_b, wkv_a,
wo; per MoE layer the shared expert's w1, w3, w2; per dense layer its w1, w3, w2; the head once.  At
batch 1 the bench config's shared expert already rides in moe_small's kernels (one routed expert's
size), so the mix is also summed without it ("no_shared"): what cuBLAS still runs today at M=1.  The
absorbed-MLA products (wkv_b's halves, batched per head) are not plain linears and are not here.

Prints a table, the best tiles per shape and M, the mix sums (cuBLAS, the best tiles per shape, and
the best single GemvTiles for the whole mix), a final JSON line; writes gemv_kernel_<date>.json into --out.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import T0, git_commit, kernel_bench_parser, log, results_path, triton_interpreter  # noqa: E402
from dsv3 import ModelConfig  # noqa: E402
from dsv3.inference.gemv import GemvTiles, small_m_linear, small_m_linear_pair  # noqa: E402

LINEAR = "F.linear"
# projections of one input that the decode step runs as one small_m_linear_pair launch (the same x)
# (the dense pair is past gemv.PAIR_MAX_WEIGHTS: timed to keep that bound honest)
PAIRS = [("wq_a", "wkv_a"), ("shared w1/w3", "shared w1/w3"), ("dense w1/w3", "dense w1/w3")]
# priority order (a deadline cuts from the end): the default; each product kind's likely best; then
# variations of tile shape, warps, stages and split
SWEEP = [
    GemvTiles(),  # the default: mma 16x512, 2 warps (the 2026-12-01 sweep's best single choice)
    GemvTiles(mma=False, block_n=8, block_k=256, warps=4),  # the first guess, FMA
    GemvTiles(mma=True, block_n=16, block_k=256),  # cuBLAS's swap-AB nvjet tile, roughly
    GemvTiles(block_n=16, block_k=256),
    GemvTiles(block_n=4, block_k=512),
    GemvTiles(mma=True, block_n=64, block_k=128),  # wgmma's 64 rows
    GemvTiles(split_k=4),
    GemvTiles(mma=True, block_n=16, block_k=256, split_k=4),
    GemvTiles(mma=True, block_n=32, block_k=256),
    GemvTiles(block_n=8, block_k=512, warps=8),
    GemvTiles(block_n=16, block_k=128, stages=4),
    GemvTiles(block_n=4, block_k=256, warps=2),
    GemvTiles(mma=True, block_n=16, block_k=128, stages=5),
    GemvTiles(mma=True, block_n=32, block_k=128, split_k=2),
    GemvTiles(stages=1),
]


def decode_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of each dense projection of a decode step: weight [N, K], x [M, K]."""
    h, shared = cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts
    return {"wq_a": (cfg.q_lora_rank, h), "wq_b": (cfg.num_heads * cfg.qk_head_dim, cfg.q_lora_rank),
            "wkv_a": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h), "wo": (h, cfg.num_heads * cfg.v_head_dim),
            "shared w1/w3": (shared, h), "shared w2": (h, shared),
            "dense w1/w3": (cfg.intermediate_size, h), "dense w2": (h, cfg.intermediate_size),
            "head": (cfg.vocab_size, h)}


def step_mix(cfg: ModelConfig) -> dict[str, int]:
    """How many times a decode step runs each shape."""
    n_moe, n_dense = cfg.num_layers - cfg.first_k_dense, cfg.first_k_dense
    return {"wq_a": cfg.num_layers, "wq_b": cfg.num_layers, "wkv_a": cfg.num_layers, "wo": cfg.num_layers,
            "shared w1/w3": 2 * n_moe, "shared w2": n_moe, "dense w1/w3": 2 * n_dense, "dense w2": n_dense,
            "head": 1}


def tiles_name(t: GemvTiles) -> str:
    split = f" split{t.split_k}" if t.split_k > 1 else ""
    return f"{'mma' if t.mma else 'fma'} {t.block_n}x{t.block_k} w{t.warps} s{t.stages}{split}"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def per_copy_us(fn, x, weights, device) -> tuple[float, list[torch.Tensor]]:
    """Mean time of fn(x, w) over the weight copies, in one CUDA graph on GPU (wall clock on CPU);
    and the eager outputs."""
    outs = [fn(x, w) for w in weights]  # compiles (Triton) outside the capture
    if device.type != "cuda":
        t = time.perf_counter()
        for w in weights:
            fn(x, w)
        return (time.perf_counter() - t) * 1e6 / len(weights), outs
    import triton.testing

    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    ms = triton.testing.do_bench(graph.replay, warmup=5, rep=20, return_mode="median")
    return ms * 1e3 / len(weights), outs


def main(argv=None) -> int:
    p = kernel_bench_parser(__doc__, "tiny shapes on CPU: F.linear, + the kernel if TRITON_INTERPRET=1")
    p.add_argument("--copies", type=int, default=8, help="distinct weight copies per timed graph")
    p.add_argument("--deadline", type=float, default=85, help="seconds; sweep candidates after it are skipped")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    date = datetime.date.today().isoformat()
    json_path = results_path(args.out, "gemv_kernel", args.smoke)
    if args.smoke:
        preset, ms, dtype, copies = "tiny", [1, 2], torch.float32, 2
    else:
        preset, ms, dtype, copies = "bench", [1, 2, 4, 8], torch.bfloat16, args.copies
    cfg = ModelConfig.from_preset(preset)
    shapes, mix = decode_shapes(cfg), step_mix(cfg)
    interpret = device.type == "cpu" and triton_interpreter()
    sweep = SWEEP if device.type == "cuda" else [SWEEP[0], SWEEP[6]] if interpret else []  # interpreter: both kinds
    res: dict = {"date": date, "commit": args.commit or git_commit(), "smoke": args.smoke, "torch": torch.__version__,
                 "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": preset,
                 "dtype": str(dtype).split(".")[-1], "copies": copies, "M": ms, "shapes": shapes, "step_mix": mix,
                 "runs": {}, "pairs": {}, "errors": {}, "skipped": []}
    if device.type == "cuda":
        import triton

        res["triton"] = triton.__version__
    log(f"device {res['device']}, {preset} shapes, M {ms}, {copies} weight copies, {dtype}, {len(sweep)} tile candidates")

    g = torch.Generator(device=device).manual_seed(0)
    weights = {s: [(torch.randn(n, k, device=device, generator=g) / k ** 0.5).to(dtype) for _ in range(copies)]
               for s, (n, k) in shapes.items()}
    xs = {(s, m): torch.randn(m, k, device=device, generator=g).to(dtype) for s, (_, k) in shapes.items() for m in ms}
    nbytes = {s: n * k * torch.finfo(dtype).bits // 8 for s, (n, k) in shapes.items()}
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: each side rounds its output once; fp32: summation order
    runs = res["runs"]  # runs[shape][M][candidate] = {us, gb_s, rel_err}
    refs = {}
    for s in shapes:
        runs[s] = {}
        for m in ms:
            us, refs[s, m] = per_copy_us(F.linear, xs[s, m], weights[s], device)
            runs[s][m] = {LINEAR: {"us": round(us, 2), "gb_s": round(nbytes[s] / us / 1e3, 1)}}
        log(f"{LINEAR:30s} {s:13s} " + "  ".join(f"M={m}: {runs[s][m][LINEAR]['us']:7.2f} us" for m in ms))

    deadline = T0 + args.deadline
    for tiles in sweep:
        name = tiles_name(tiles)
        if time.time() > deadline:
            res["skipped"].append(name)
            continue
        fn = lambda x, w, tiles=tiles: small_m_linear(x, w, tiles)  # noqa: E731
        try:
            for s in shapes:
                for m in ms:
                    us, outs = per_copy_us(fn, xs[s, m], weights[s], device)
                    err = max(rel(o, r) for o, r in zip(outs, refs[s, m]))
                    runs[s][m][name] = {"us": round(us, 2), "gb_s": round(nbytes[s] / us / 1e3, 1), "rel_err": float(f"{err:.2e}")}
                    if not err <= tol:
                        res["errors"][f"{name}, {s}, M={m}"] = f"relative error {err:.2e} against F.linear, over {tol}"
                log(f"{name:30s} {s:13s} " + "  ".join(f"M={m}: {runs[s][m][name]['us']:7.2f} us" for m in ms))
        except Exception as ex:  # tiles Triton cannot build (shared memory, registers), or an out-of-memory
            res["errors"][name] = f"{type(ex).__name__}: {str(ex)[:200]}"
            log(f"{name}: {res['errors'][name]}")

    # pairs of projections of one input in one launch (small_m_linear_pair, default tiles), against the
    # two single launches (default tiles) and two F.linear calls; where the kernels run (sweep not empty)
    default = tiles_name(GemvTiles())
    for first, second in PAIRS:
        if not sweep or first not in shapes or second not in shapes or time.time() > deadline + 30:
            continue
        key = f"{first} + {second}"
        res["pairs"][key] = {}
        pair_weights = list(zip(weights[first], weights[second]))
        for m in ms:
            try:
                us, outs = per_copy_us(lambda x, ww: small_m_linear_pair(x, *ww), xs[first, m], pair_weights, device)
            except Exception as ex:
                res["errors"][f"pair {key}"] = f"{type(ex).__name__}: {str(ex)[:200]}"
                break
            x = xs[first, m]  # both projections of one x (refs[second, m] used another x)
            err = max(max(rel(o[0], F.linear(x, w1)), rel(o[1], F.linear(x, w2))) for o, (w1, w2) in zip(outs, pair_weights))
            if not err <= tol:
                res["errors"][f"pair {key}, M={m}"] = f"relative error {err:.2e} against F.linear, over {tol}"
            two = [runs[sh][m].get(default, {}).get("us") for sh in (first, second)]
            res["pairs"][key][m] = {"pair_us": round(us, 2), "rel_err": float(f"{err:.2e}"),
                                    "two_launches_us": None if None in two else round(sum(two), 2),
                                    "two_linear_us": round(sum(runs[sh][m][LINEAR]["us"] for sh in (first, second)), 2)}
        log(f"pair {key:28s} " + "  ".join(f"M={m}: {v['pair_us']:7.2f} us (two launches {v['two_launches_us']})"
                                           for m, v in res["pairs"][key].items()))

    res["default_tiles"] = asdict(GemvTiles())
    res["best"], res["step"] = summarise(runs, res["errors"], shapes, mix, ms, {tiles_name(t): t for t in sweep})
    res["seconds"] = round(time.time() - T0, 1)
    json_path.write_text(json.dumps(res, indent=1) + "\n")
    print_tables(res, shapes, nbytes, ms)
    log(f"wrote {json_path}")
    print(json.dumps({k: res[k] for k in ("device", "date", "commit", "preset", "step", "errors", "skipped")}))
    return 0


def summarise(runs, errors, shapes, mix, ms, candidates):
    """best[shape][M]: the fastest correct tiles against F.linear; step[M]: the mix summed for F.linear,
    for the best tiles per shape, and for the one GemvTiles fastest over the whole mix (with and without
    the shared expert, which moe_small's kernels carry at batch 1)."""
    def ok(name, s, m):
        return name in runs[s][m] and name in candidates and name not in errors and f"{name}, {s}, M={m}" not in errors
    best, step = {s: {} for s in shapes}, {}
    for m in ms:
        for s in shapes:
            lin = runs[s][m][LINEAR]["us"]
            names = [n for n in runs[s][m] if ok(n, s, m)]
            b = min(names, key=lambda n: runs[s][m][n]["us"], default=None)
            best[s][m] = b and {"tiles": b, **asdict(candidates[b]), "us": runs[s][m][b]["us"],
                                "gb_s": runs[s][m][b]["gb_s"], "linear_us": lin, "speedup": round(lin / runs[s][m][b]["us"], 2)}
        step[m] = {}
        for label, parts in (("all", list(shapes)), ("no_shared", [s for s in shapes if not s.startswith("shared")])):
            lin = sum(mix[s] * runs[s][m][LINEAR]["us"] for s in parts)
            per_shape = None if any(best[s][m] is None for s in parts) else sum(mix[s] * best[s][m]["us"] for s in parts)
            whole = [n for n in candidates if all(ok(n, s, m) for s in parts)]
            single = min(whole, key=lambda n: sum(mix[s] * runs[s][m][n]["us"] for s in parts), default=None)
            single_us = single and sum(mix[s] * runs[s][m][single]["us"] for s in parts)
            step[m][label] = {"linear_us": round(lin, 1), "best_per_shape_us": per_shape and round(per_shape, 1),
                              "speedup": per_shape and round(lin / per_shape, 2), "best_single_tiles": single,
                              "best_single_us": single_us and round(single_us, 1)}
    return best, step


def print_tables(res, shapes, nbytes, ms):
    print(f"\n{'shape':13s} {'N x K':>12s} {'MB':>6s} {'M':>2s} {'F.linear us':>11s} {'GB/s':>6s} "
          f"{'best us':>8s} {'GB/s':>6s} {'speedup':>7s}  best tiles")
    for s, (n, k) in shapes.items():
        for m in ms:
            lin, b = res["runs"][s][m][LINEAR], res["best"][s][m]
            tail = f"{b['us']:8.2f} {b['gb_s']:6.0f} {b['speedup']:7.2f}  {b['tiles']}" if b else f"{'-':>8s}"
            print(f"{s:13s} {f'{n}x{k}':>12s} {nbytes[s] / 1e6:6.1f} {m:2d} {lin['us']:11.2f} {lin['gb_s']:6.0f} {tail}")
    print("\none decode step's GEMVs (us):")
    for m, parts in res["step"].items():
        for label, st in parts.items():
            print(f"  M={m} {label:9s} F.linear {st['linear_us']:8.1f}  best per shape {st['best_per_shape_us']!s:>8}"
                  f"  (x{st['speedup']})  best single tiles {st['best_single_us']!s:>8} {st['best_single_tiles']}")


if __name__ == "__main__":
    sys.exit(main())
