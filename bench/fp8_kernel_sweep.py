"""Tile sweep of the Triton FP8 grouped kernels at the `bench` expert shapes, on one GPU.

    python bench/fp8_kernel_sweep.py [--out DIR] [--speed]

For the routed experts' two projections (w13: 2048 -> 2 x 1024, w2: 1024 -> 2048; 16,384 tokens x top-8
over 32 experts, random routing), times BF16 `torch._grouped_mm` (Fprop and Wgrad) and our grouped
Fprop (`kernels.GEMM_CFG`) and grouped Wgrad (`kernels.WGRAD_CFG`) kernels under each candidate tile
(BM/BN or BN/BK, warps, stages), checking every candidate's output against the first one's, and the
grouped Fprop through TMA descriptors (`kernels.GEMM_TMA`, table "gemm_tma"), each tile checked against
the default kernel's output (expected bitwise equal: "gemm_tma_rel_diff").  Prints TFLOP/s per
candidate and the quantisation kernels' times, writes fp8_kernel_sweep.json into --out,
and with --speed sets the best tiles and runs `bench/fp8_validation.py`'s whole-step speed section
(BF16 vs FP8 at 8 x 2048) with them.  The defaults in kernels.py came from this sweep (2026-12-01, H200:
bench/results/fp8_kernels_2026-12-01.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fp8_validation import grouped_operands  # noqa: E402
from dsv3.fp8 import ops  # noqa: E402

GEMMS = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3), (128, 256, 8, 3), (64, 256, 4, 3), (64, 128, 4, 4),
         (128, 64, 4, 4), (256, 128, 8, 3)]  # BM, BN, warps, stages
GEMM_TMAS = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 8, 5), (128, 256, 8, 3),
             (64, 128, 4, 4)]  # BM, BN, warps, stages; the first is GEMM_CFG's.  (128, 256) spills (sm_90 compile)
WGRADS = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4)]  # BN, BK, ...


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")


def sweep(tokens: int = 16384, experts: int = 32, topk: int = 8, dim: int = 2048, inter: int = 1024) -> dict:
    from dsv3.fp8 import kernels as K  # Triton: GPU machines only

    dev = "cuda"
    m = tokens * topk
    g = torch.Generator(device=dev).manual_seed(0)
    counts = torch.bincount(torch.randint(0, experts, (m,), device=dev, generator=g), minlength=experts)
    offs = counts.cumsum(0).to(torch.int32)
    res: dict = {"gemm": {}, "gemm_tma": {}, "gemm_tma_rel_diff": {}, "wgrad": {}, "bf16": {}, "quant_ms": {}}
    for name, (n, k) in {"w13": (2 * inter, dim), "w2": (dim, inter)}.items():
        o = grouped_operands(m, n, k, experts, dev)
        x, w, dy, wb, xq, xs, xqt, xst, wq, ws, dyt, dyts = (o[key] for key in ("x", "w", "dy", "wb", "xq", "xs", "xqt", "xst",
                                                                              "wq", "ws", "dyt", "dyts"))
        flop = 2 * m * n * k
        tf = lambda ms: round(flop / ms / 1e9, 1)  # noqa: E731
        res["bf16"][name] = {"fprop": tf(bench(lambda: torch._grouped_mm(x, wb, offs=offs))),
                             "wgrad": tf(bench(lambda: torch._grouped_mm(dy.t(), x, offs=offs)))}
        print(name, "bf16 grouped_mm", res["bf16"][name], flush=True)
        gemm = lambda: ops.grouped_gemm(xq, xs, wq, ws, counts, torch.bfloat16, "triton")  # noqa: E731
        default = gemm().float()  # GEMM_CFG's tile through pointer loads: what each TMA candidate must equal
        for table, cfgs, cfg_dict, keys, run, tma in (
                ("gemm", GEMMS, K.GEMM_CFG, ("BM", "BN"), gemm, False),
                ("gemm_tma", GEMM_TMAS, K.GEMM_CFG, ("BM", "BN"), gemm, True),
                ("wgrad", WGRADS, K.WGRAD_CFG, ("BN", "BK"),
                 lambda: ops.grouped_wgrad(dyt, dyts, xqt, xst, counts, torch.float32, "triton"), False)):
            saved, first = dict(cfg_dict), default if tma else None
            K.GEMM_TMA = tma
            for a, b, warps, stages in cfgs:
                cfg_dict.update({keys[0]: a, keys[1]: b, "num_warps": warps, "num_stages": stages})
                try:
                    y = run().float()  # timed below without this conversion
                    first = y if first is None else first
                    err = ((y - first).norm() / first.norm()).item()
                    t = tf(bench(run))
                except Exception as e:  # a tile Triton cannot build (shared memory, registers)
                    t, err = None, f"{type(e).__name__}: {str(e)[:160]}"
                res[table].setdefault(str((a, b, warps, stages)), {})[name] = t
                if tma:
                    res["gemm_tma_rel_diff"].setdefault(str((a, b, warps, stages)), {})[name] = err
                print(name, table, (a, b, warps, stages), t, "TFLOP/s, rel. diff to the", "default kernel" if tma else
                      "first tile", err, flush=True)
            K.GEMM_TMA = False
            cfg_dict.clear()
            cfg_dict.update(saved)
        res["quant_ms"][name] = {"quant_both": round(bench(lambda: ops.quant_both(x, False, "triton")), 3),
                                 "quant_weight": round(bench(lambda: ops.quant_weight(w, "triton")), 3)}
        print(name, "quantisation ms", res["quant_ms"][name], flush=True)
    return res


def cublas_per_expert(tokens: int = 16384, experts: int = 32, topk: int = 8, dim: int = 2048, inter: int = 1024) -> dict:
    """The routed experts as one cuBLAS block-wise `torch._scaled_mm` per expert, with the row counts known
    on the host (a real layer would read them with a sync per layer) and rounded down to multiples of 128
    (cuBLAS's 1x128 scales along a K of tokens need aligned groups): Fprop (1x128 x 128x128) and Wgrad
    (1x128 x 1x128), each against our Triton kernel on the same aligned counts (TFLOP/s, rel. diff)."""
    from dsv3.fp8 import reference as ref

    dev = "cuda"
    m = tokens * topk
    g = torch.Generator(device=dev).manual_seed(0)
    counts = torch.bincount(torch.randint(0, experts, (m,), device=dev, generator=g), minlength=experts) // 128 * 128
    rows = counts.tolist()
    starts = [sum(rows[:e]) for e in range(experts)]
    mu = sum(rows)
    res: dict = {}
    for name, (n, k) in {"w13": (2 * inter, dim), "w2": (dim, inter)}.items():
        o = grouped_operands(mu, n, k, experts, dev)
        xq, xs, xqt, xst, wq, ws, dyt, dyts = (o[key] for key in ("xq", "xs", "xqt", "xst", "wq", "ws", "dyt", "dyts"))
        # per-expert operands cut outside the timing: scales must be column-major for each slice itself
        xs_e = [ref.col_major(xs[s:s + r]) for s, r in zip(starts, rows)]
        dyts_e = [ref.col_major(dyts[:, s // 128:(s + r) // 128]) for s, r in zip(starts, rows)]
        ws_e = [ws[e].contiguous() for e in range(experts)]  # 128x128 blocks: scale_b is its transpose
        xst_e = [ref.col_major(xst[:, s // 128:(s + r) // 128]) for s, r in zip(starts, rows)]
        out = torch.empty(mu, n, device=dev, dtype=torch.bfloat16)
        dw = torch.empty(experts, n, k, device=dev, dtype=torch.float32)

        def fprop():
            for e, (s, r) in enumerate(zip(starts, rows)):
                if r:
                    out[s:s + r] = torch._scaled_mm(xq[s:s + r], wq[e].t(), scale_a=xs_e[e], scale_b=ws_e[e].t(),
                                                    out_dtype=torch.bfloat16)
            return out

        def wgrad():
            for e, (s, r) in enumerate(zip(starts, rows)):
                if r:
                    dw[e] = torch._scaled_mm(dyt[:, s:s + r], xqt[:, s:s + r].t(), scale_a=dyts_e[e], scale_b=xst_e[e].t(),
                                             out_dtype=torch.float32)
            return dw

        flop = 2 * mu * n * k
        tf = lambda ms: round(flop / ms / 1e9, 1)  # noqa: E731
        row = {}
        for kind, cub, tri in (
                ("fprop", fprop, lambda: ops.grouped_gemm(xq, xs, wq, ws, counts, torch.bfloat16, "triton")),
                ("wgrad", wgrad, lambda: ops.grouped_wgrad(dyt, dyts, xqt, xst, counts, torch.float32, "triton"))):
            try:
                yc, yt = cub().float(), tri().float()
                row[kind] = {"cublas": tf(bench(cub)), "triton": tf(bench(tri)),
                             "rel_diff": ((yc - yt).norm() / yt.norm()).item()}
            except Exception as e:  # cuBLAS refusing a layout
                row[kind] = f"{type(e).__name__}: {str(e)[:200]}"
            print(name, "per-expert cuBLAS", kind, row[kind], flush=True)
        res[name] = row
    return res


def best(table: dict) -> tuple | None:
    """The tile with the least time over both projections (harmonic combination of TFLOP/s)."""
    ok = {c: v for c, v in table.items() if all(isinstance(v.get(n), float) for n in ("w13", "w2"))}
    if not ok:  # every tile failed (gemm_tma off Hopper)
        return None
    return eval(max(ok, key=lambda c: 1 / (1 / ok[c]["w13"] + 1 / ok[c]["w2"])))  # keys are str(tuple) of ints


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--out", default=".", help="folder for fp8_kernel_sweep.json")
    p.add_argument("--speed", action="store_true", help="then time whole BF16 and FP8 steps with the best tiles")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8_kernel_sweep needs a CUDA GPU")
    res = sweep()
    res["cublas_per_expert"] = cublas_per_expert()
    bg, bw = best(res["gemm"]), best(res["wgrad"])
    res["best"] = {"gemm": bg, "gemm_tma": best(res["gemm_tma"]), "wgrad": bw}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp8_kernel_sweep.json").write_text(json.dumps(res, indent=1) + "\n")
    print("best gemm (BM, BN, warps, stages)", bg, "best gemm through TMA", res["best"]["gemm_tma"],
          "best wgrad (BN, BK, warps, stages)", bw, flush=True)
    if args.speed:
        from dsv3.fp8 import kernels as K

        K.GEMM_CFG.update(BM=bg[0], BN=bg[1], num_warps=bg[2], num_stages=bg[3])
        K.WGRAD_CFG.update(BN=bw[0], BK=bw[1], num_warps=bw[2], num_stages=bw[3])
        from bench import fp8_validation

        fp8_validation.main(["--sections", "env,speed", "--out", str(Path(args.out) / "speed")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
