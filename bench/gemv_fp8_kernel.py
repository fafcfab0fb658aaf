"""The few-row FP8 kernels (dsv3.inference.gemv_fp8, moe_small_fp8) against the paths they would replace, at the
`bench` decode shapes, on one GPU.

    python bench/gemv_fp8_kernel.py [--out DIR] [--copies 4] [--deadline 150]
    TRITON_INTERPRET=1 python bench/gemv_fp8_kernel.py --smoke   # CPU, `tiny` shapes, the first three tiles
    (the interpreter's e4m3 cast does not round to nearest: the in-kernel quantisation misses by a few %)

Linears: for M = 1, 2, 8 rows of BF16 x and every dense projection of a decode step (gemv_kernel.py's
shapes), the FP8 checkpoint's layer as it runs today (`FP8InferenceLinear`: quantise x, block-scaled
GEMM), gemv.py's BF16 kernel on the BF16 weight of the same shape (the speed FP8 has to beat), and
small_m_linear_fp8 under each Fp8GemvTiles of the sweep (W8A8 as the layer; `weight_only` W8A16, checked against x
times the dequantised weight).  Routed experts: for N = 1, 2, 4 tokens x 8
experts, moe_small's BF16 kernels and small_batch_experts_fp8 under each Fp8ExpertTiles.  Timing as
gemv_kernel.py's: a CUDA graph over --copies distinct weight copies, replayed under do_bench (which
flushes L2), divided by the copies; GB/s counts the weight bytes a call reads (e4m3 + scales; for the
experts the chosen experts' only).  Every FP8 output is checked against the layer's path (linears) or
the torch twin (experts); a miss is recorded in "errors" and drops the tiles from the best.

Prints the per-shape best, the decode step's sums (gemv_kernel.step_mix), a final JSON line; writes
gemv_fp8_kernel_<date>.json into --out.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import T0, git_commit, kernel_bench_parser, log, results_path, triton_interpreter  # noqa: E402
from bench.gemv_kernel import decode_shapes, per_copy_us, rel, step_mix  # noqa: E402
from dsv3 import ModelConfig  # noqa: E402
from dsv3.checkpoint.fp8 import quantize_weight  # noqa: E402
from dsv3.fp8.reference import dequant_blocks  # noqa: E402
from dsv3.fp8.inference import FP8InferenceExperts, FP8InferenceLinear  # noqa: E402
from dsv3.inference.gemv import small_m_linear  # noqa: E402
from dsv3.inference.gemv_fp8 import Fp8GemvTiles, small_m_linear_fp8  # noqa: E402
from dsv3.inference.moe_small import small_batch_experts  # noqa: E402
from dsv3.inference.moe_small_fp8 import Fp8ExpertTiles, small_batch_experts_fp8, small_batch_experts_fp8_reference  # noqa: E402

LAYER, BF16 = "FP8InferenceLinear", "bf16 small_m_linear"
EXPERTS_BF16 = "bf16 small_batch_experts"
# priority order (a deadline cuts from the end)
LINEAR_SWEEP = [
    Fp8GemvTiles(warps=2, prequant=True),  # run 26's best single tiles (gemv_fp8.DECODE_TILES)
    Fp8GemvTiles(warps=2, weight_only=True, block_dots=True),  # W8A16, one dot per block: no quantising launch
    Fp8GemvTiles(weight_only=True, block_dots=True),
    Fp8GemvTiles(block_n=16, warps=2, weight_only=True, block_dots=True),
    Fp8GemvTiles(block_n=16, groups=8, warps=2, weight_only=True, block_dots=True),
    Fp8GemvTiles(),  # run 25's best single tiles: mma 32 x 4 blocks, x quantised in the kernel
    Fp8GemvTiles(prequant=True),  # the same reading x quantised by one launch first
    Fp8GemvTiles(weight_only=True),  # W8A16: x unquantised
    Fp8GemvTiles(mma=True, block_n=16, groups=4, warps=2, weight_only=True),  # gemv.GemvTiles in bytes per step
    Fp8GemvTiles(mma=False, block_n=4, groups=4, weight_only=True),  # gemv.NORM_TILES in bytes
    Fp8GemvTiles(mma=None, block_n=16, groups=2, split_k=4, weight_only=True),
    Fp8GemvTiles(mma=False, prequant=True),  # fma, one reduction after the loop
    Fp8GemvTiles(mma=False, block_n=16, groups=8, prequant=True),
    Fp8GemvTiles(mma=False, block_n=4, groups=4, prequant=True),  # gemv.py's NORM_TILES in bytes
    Fp8GemvTiles(mma=False, block_n=8, groups=4, prequant=True),
    Fp8GemvTiles(mma=None, block_n=16, groups=4, split_k=2, prequant=True),
    Fp8GemvTiles(mma=None, block_n=16, groups=2, split_k=4, prequant=True),
    Fp8GemvTiles(mma=None, block_n=16, groups=2, split_k=4),  # run 25's best at M=8 on the narrow shapes
    Fp8GemvTiles(block_n=16, groups=8, prequant=True),
    Fp8GemvTiles(block_n=64, groups=2, prequant=True),
    Fp8GemvTiles(warps=2, prequant=True),
    Fp8GemvTiles(mma=False, block_n=32, groups=4, warps=8, prequant=True),
    Fp8GemvTiles(stages=4, prequant=True),
]
EXPERT_SWEEP = [
    Fp8ExpertTiles(),  # run 25's best at one token, x and h quantised in the kernels
    Fp8ExpertTiles(prequant=True),
    Fp8ExpertTiles(weight_only=True),  # W8A16: x and h unquantised
    Fp8ExpertTiles(up_warps=2, down_warps=2, weight_only=True),
    Fp8ExpertTiles(up_warps=2, down_warps=2, prequant=True),  # run 25's best at 2 and 4 tokens, prequantised
    Fp8ExpertTiles(up_warps=2, down_warps=2),
    Fp8ExpertTiles(up_block_i=32, up_groups=4, down_block_d=8, down_groups=8, prequant=True),
    Fp8ExpertTiles(up_block_i=8, up_groups=8, down_block_d=2, down_groups=8, prequant=True),
    Fp8ExpertTiles(up_groups=8, down_groups=4, prequant=True),
    Fp8ExpertTiles(up_block_i=16, up_groups=16, down_block_d=16, down_groups=8, down_warps=8, prequant=True),
]


def gemv_name(t: Fp8GemvTiles) -> str:
    mma = {None: "auto", True: "mma", False: "fma"}[t.mma]
    split = f" split{t.split_k}" if t.split_k > 1 else ""
    return f"{mma} {t.block_n}x{t.groups}blk w{t.warps} s{t.stages}{split}{mode(t)}"


def mode(t) -> str:
    blocks = " block dots" if getattr(t, "block_dots", False) else ""
    return " prequant" if t.prequant else f" w8a16{blocks}" if t.weight_only else ""


def expert_name(t: Fp8ExpertTiles) -> str:
    return (f"up {t.up_block_i}x{t.up_groups}blk w{t.up_warps} s{t.up_stages} / "
            f"down {t.down_block_d}x{t.down_groups}blk w{t.down_warps} s{t.down_stages}{mode(t)}")


def fp8_layer(w: torch.Tensor) -> FP8InferenceLinear:
    """An FP8 checkpoint's layer holding w [N, K] as e4m3 with 128x128 scales (padded as the loader pads)."""
    n, k = w.shape
    layer = FP8InferenceLinear(k, n, device=w.device)
    q, s = quantize_weight(w.float())
    layer.weight.zero_()
    layer.weight.view(torch.uint8)[:n, :k] = q.view(torch.uint8)
    layer.weight_scale_inv.copy_(s.float())
    return layer


def timed(res, key, fn, x, weights, device, want, tol, nbytes):
    """One timing into res[key] (us, GB/s, error against want); an error over tol recorded by the caller."""
    us, outs = per_copy_us(fn, x, weights, device)
    err = None if want is None else max(rel(o, r) for o, r in zip(outs, want))
    res[key] = {"us": round(us, 2), "gb_s": round(nbytes / us / 1e3, 1)} | ({} if err is None else {"rel_err": float(f"{err:.2e}")})
    return outs, err is not None and not err <= tol


def main(argv=None) -> int:
    p = kernel_bench_parser(__doc__, "tiny shapes on CPU; the kernels only with TRITON_INTERPRET=1")
    p.add_argument("--copies", type=int, default=4, help="distinct weight copies per timed graph")
    p.add_argument("--deadline", type=float, default=150, help="seconds; sweep candidates after it are skipped")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    json_path = results_path(args.out, "gemv_fp8_kernel", args.smoke)
    interpret = device.type == "cpu" and triton_interpreter()
    if args.smoke:
        preset, ms, ns, dtype, copies = "tiny", [1, 2], [1], torch.float32, 1
        linear_sweep, expert_sweep = (LINEAR_SWEEP[:3], EXPERT_SWEEP[:3]) if interpret else ([], [])
    else:
        preset, ms, ns, dtype, copies = "bench", [1, 2, 8], [1, 2, 4], torch.bfloat16, args.copies
        linear_sweep, expert_sweep = LINEAR_SWEEP, EXPERT_SWEEP
    cfg = ModelConfig.from_preset(preset)
    if args.smoke:
        cfg = cfg.replace(moe_intermediate_size=128)  # FP8 experts' kernels need 128-row gate and up blocks
    shapes, mix = decode_shapes(cfg), step_mix(cfg)
    res: dict = {"date": datetime.date.today().isoformat(), "commit": args.commit or git_commit(), "smoke": args.smoke,
                 "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "preset": preset, "copies": copies, "M": ms, "N_tokens": ns, "shapes": shapes, "step_mix": mix,
                 "linears": {}, "experts": {}, "errors": {}, "skipped": []}
    log(f"device {res['device']}, {preset} shapes, {copies} weight copies, {len(linear_sweep)} + {len(expert_sweep)} tile candidates")
    g = torch.Generator(device=device).manual_seed(0)
    deadline = T0 + args.deadline

    # ---- linears
    bf16_w = {s: [(torch.randn(n, k, device=device, generator=g) / k ** 0.5).to(dtype) for _ in range(copies)]
              for s, (n, k) in shapes.items()}
    layers = {s: [fp8_layer(w) for w in ws] for s, ws in bf16_w.items()}
    xs = {(s, m): torch.randn(m, k, device=device, generator=g).to(dtype) for s, (_, k) in shapes.items() for m in ms}
    fp8_bytes = {s: layers[s][0].weight.numel() + 4 * layers[s][0].weight_scale_inv.numel() for s in shapes}
    refs = {}
    for s in shapes:
        res["linears"][s] = {}
        for m in ms:
            r = res["linears"][s][m] = {}
            refs[s, m], _ = timed(r, LAYER, lambda x, mod: mod(x), xs[s, m], layers[s], device, None, 0, fp8_bytes[s])
            if device.type == "cuda":
                n, k = shapes[s]
                timed(r, BF16, lambda x, w: small_m_linear(x, w), xs[s, m], bf16_w[s], device, None, 0, n * k * 2)
        log(f"{LAYER:34s} {s:13s} " + "  ".join(f"M={m}: {res['linears'][s][m][LAYER]['us']:7.2f} us" for m in ms))
    for tiles in linear_sweep:
        name = gemv_name(tiles)
        if time.time() > deadline:
            res["skipped"].append(name)
            continue
        fn = lambda x, mod, t=tiles: small_m_linear_fp8(x, mod.weight, mod.weight_scale_inv, mod.out_features, mod.pow2, t)  # noqa: E731
        try:
            for s in shapes:
                for m in ms:
                    want = refs[s, m] if not tiles.weight_only else [  # W8A16: x times the dequantised weight
                        xs[s, m].float() @ dequant_blocks(mod.weight, mod.weight_scale_inv)[:shapes[s][0], :shapes[s][1]].T
                        for mod in layers[s]]
                    _, bad = timed(res["linears"][s][m], name, fn, xs[s, m], layers[s], device, want, 1e-2, fp8_bytes[s])
                    if bad:
                        res["errors"][f"{name}, {s}, M={m}"] = f"relative error {res['linears'][s][m][name]['rel_err']} over 1e-2"
                log(f"{name:34s} {s:13s} " + "  ".join(f"M={m}: {res['linears'][s][m][name]['us']:7.2f} us" for m in ms))
        except Exception as ex:  # tiles Triton cannot build
            res["errors"][name] = f"{type(ex).__name__}: {str(ex)[:200]}"
            log(f"{name}: {res['errors'][name]}")

    # ---- routed experts (N tokens x K of E)
    e, d, inter, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    w13s = [(torch.randn(e, 2 * inter, d, device=device, generator=g) / d ** 0.5).to(dtype) for _ in range(copies)]
    w2s = [(torch.randn(e, d, inter, device=device, generator=g) / inter ** 0.5).to(dtype) for _ in range(copies)]
    fp8_experts = []
    for w13, w2 in zip(w13s, w2s):
        ex = FP8InferenceExperts(e, d, inter, device=device)
        ex.w13.zero_()
        ex.w2.zero_()
        for i in range(e):
            for name, w in (("w13", w13[i]), ("w2", w2[i])):
                q, s = quantize_weight(w.float())
                getattr(ex, name)[i].view(torch.uint8)[:w.shape[0], :w.shape[1]] = q.view(torch.uint8)
                getattr(ex, name + "_scale_inv")[i].copy_(s.float())
        fp8_experts.append(ex)
    for n in ns:
        x = torch.randn(n, d, device=device, generator=g).to(dtype)
        indices = torch.stack([torch.randperm(e, device=device, generator=g)[:k] for _ in range(n)])
        gates = torch.rand(n, k, device=device, generator=g)
        chosen = len(set(indices.reshape(-1).tolist()))
        r = res["experts"][n] = {"experts_read": chosen}
        ex0 = fp8_experts[0]
        fp8_bytes_e = chosen * (ex0.w13[0].numel() + ex0.w2[0].numel() + 4 * (ex0.w13_scale_inv[0].numel() + ex0.w2_scale_inv[0].numel()))
        want = {a16: [small_batch_experts_fp8_reference(x, indices, gates, ex.w13, ex.w13_scale_inv, ex.w2,
                                                        ex.w2_scale_inv, d, False, weight_only=a16) for ex in fp8_experts]
                for a16 in (False, True)}
        if device.type == "cuda":
            timed(r, EXPERTS_BF16, lambda a, ww: small_batch_experts(a, indices, gates, *ww), x, list(zip(w13s, w2s)),
                  device, None, 0, chosen * 3 * inter * d * 2)
        for tiles in expert_sweep:
            name = expert_name(tiles)
            if time.time() > deadline + 60:
                res["skipped"].append(f"{name}, N={n}")
                continue
            try:
                _, bad = timed(r, name, lambda a, ex, t=tiles: small_batch_experts_fp8(a, indices, gates, ex, t), x,
                               fp8_experts, device, want[tiles.weight_only], 1e-2, fp8_bytes_e)
                if bad:
                    res["errors"][f"{name}, N={n}"] = f"relative error {r[name]['rel_err']} over 1e-2"
            except Exception as ex:
                res["errors"][f"{name}, N={n}"] = f"{type(ex).__name__}: {str(ex)[:200]}"
        log(f"experts N={n}: " + "  ".join(f"{kk}: {v['us']} us" for kk, v in r.items() if isinstance(v, dict)))

    res["best"], res["step"] = summarise(res, shapes, mix, ms, linear_sweep)
    res["seconds"] = round(time.time() - T0, 1)
    json_path.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {json_path}")
    print(json.dumps({kk: res[kk] for kk in ("device", "date", "commit", "step", "errors", "skipped")}))
    return 0


def summarise(res, shapes, mix, ms, sweep):
    """best[shape][M]: the fastest correct FP8 tiles; step[M]: one decode step's dense projections summed for
    the FP8 layer path, the BF16 kernel, the best FP8 tiles per shape and the best single Fp8GemvTiles."""
    names = [gemv_name(t) for t in sweep]

    def ok(name, s, m):
        return name in res["linears"][s][m] and name not in res["errors"] and f"{name}, {s}, M={m}" not in res["errors"]

    best, step = {s: {} for s in shapes}, {}
    for m in ms:
        for s in shapes:
            runs = res["linears"][s][m]
            b = min((n for n in names if ok(n, s, m)), key=lambda n: runs[n]["us"], default=None)
            best[s][m] = b and {"tiles": b, "us": runs[b]["us"], "gb_s": runs[b]["gb_s"],
                                "vs_layer": round(runs[LAYER]["us"] / runs[b]["us"], 2)}
        whole = [n for n in names if all(ok(n, s, m) for s in shapes)]
        total = {n: sum(mix[s] * res["linears"][s][m][n]["us"] for s in shapes) for n in whole}
        single = min(total, key=total.get, default=None)
        step[m] = {"layer_us": round(sum(mix[s] * res["linears"][s][m][LAYER]["us"] for s in shapes), 1),
                   "best_single_tiles": single, "best_single_us": single and round(total[single], 1)}
        if all(BF16 in res["linears"][s][m] for s in shapes):
            step[m]["bf16_kernel_us"] = round(sum(mix[s] * res["linears"][s][m][BF16]["us"] for s in shapes), 1)
        log(f"M={m} step: {step[m]}")
    return best, step


if __name__ == "__main__":
    sys.exit(main())
