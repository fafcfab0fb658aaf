"""Tile sweep of the Triton FP8 grouped kernels at the `bench` expert shapes, on one GPU.

    python bench/fp8_kernel_sweep.py [--out DIR] [--speed] [--quick]

For the routed experts' two projections (w13: 2048 -> 2 x 1024, w2: 1024 -> 2048; 16,384 tokens x top-8
over 32 experts, random routing), times BF16 `torch._grouped_mm` (Fprop and Wgrad) and our grouped
Fprop (`kernels.GEMM_CFG`) and grouped Wgrad (`kernels.WGRAD_CFG`) kernels under each candidate tile
(BM/BN or BN/BK, warps, stages), checking every candidate's output against the first one's, and the
grouped Fprop and Wgrad through `gluon_gemm.py` (`kernels.GEMM_GLUON` / `WGRAD_GLUON`, table "gluon")
against the default kernels' outputs.  Prints TFLOP/s per candidate and the quantisation kernels' times, writes fp8_kernel_sweep.json into --out,
and with --speed sets the best tiles (and the Gluon kernels where they win) and runs `bench/fp8_validation.py`'s whole-step speed section
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
WGRADS = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4)]  # BN, BK, ...


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")


def sweep(tokens: int = 16384, experts: int = 32, topk: int = 8, dim: int = 2048, inter: int = 1024,
          quick: bool = False) -> dict:
    from dsv3.fp8 import kernels as K  # Triton: GPU machines only

    dev = "cuda"
    m = tokens * topk
    g = torch.Generator(device=dev).manual_seed(0)
    counts = torch.bincount(torch.randint(0, experts, (m,), device=dev, generator=g), minlength=experts)
    offs = counts.cumsum(0).to(torch.int32)
    res: dict = {"gemm": {}, "wgrad": {}, "gluon": {}, "bf16": {}, "quant_ms": {}}
    gluon_flags = K.GEMM_GLUON, K.WGRAD_GLUON
    K.GEMM_GLUON = K.WGRAD_GLUON = False  # the tile tables time the Triton kernels; Gluon has its own rows
    for name, (n, k) in {"w13": (2 * inter, dim), "w2": (dim, inter)}.items():
        o = grouped_operands(m, n, k, experts, dev)
        x, w, dy, wb, xq, xs, xqt, xst, wq, ws, dyt, dyts = (o[key] for key in ("x", "w", "dy", "wb", "xq", "xs", "xqt", "xst",
                                                                              "wq", "ws", "dyt", "dyts"))
        flop = 2 * m * n * k
        tf = lambda ms: round(flop / ms / 1e9, 1)  # noqa: E731
        res["bf16"][name] = {"fprop": tf(bench(lambda: torch._grouped_mm(x, wb, offs=offs))),
                             "wgrad": tf(bench(lambda: torch._grouped_mm(dy.t(), x, offs=offs)))}
        print(name, "bf16 grouped_mm", res["bf16"][name], flush=True)
        for table, cfgs, cfg_dict, keys, run in (
                ("gemm", GEMMS, K.GEMM_CFG, ("BM", "BN"),
                 lambda: ops.grouped_gemm(xq, xs, wq, ws, counts, torch.bfloat16, "triton")),
                ("wgrad", WGRADS, K.WGRAD_CFG, ("BN", "BK"),
                 lambda: ops.grouped_wgrad(dyt, dyts, xqt, xst, counts, torch.float32, "triton"))):
            saved, first = dict(cfg_dict), None
            if quick:  # the default tile only
                cfgs = [(cfg_dict[keys[0]], cfg_dict[keys[1]], cfg_dict["num_warps"], cfg_dict["num_stages"])]
            for a, b, warps, stages in cfgs:
                cfg_dict.update({keys[0]: a, keys[1]: b, "num_warps": warps, "num_stages": stages})
                try:
                    y = run().float()  # timed below without this conversion (it would add ~0.4 ms per call)
                    first = y if first is None else first
                    err = ((y - first).norm() / first.norm()).item()
                    t = tf(bench(run))
                except Exception as e:  # a tile Triton cannot build (shared memory, registers)
                    t, err = None, f"{type(e).__name__}: {str(e)[:160]}"
                res[table].setdefault(str((a, b, warps, stages)), {})[name] = t
                print(name, table, (a, b, warps, stages), t, "TFLOP/s, rel. diff to the first tile", err, flush=True)
            cfg_dict.clear()
            cfg_dict.update(saved)
        # the grouped Fprop and Wgrad through gluon_gemm.py (kernels.GEMM_GLUON / WGRAD_GLUON), each
        # against the default kernel's output, at gluon_gemm.STAGES (rows "fprop", "wgrad") and at one stage more
        from dsv3.fp8 import gluon_gemm

        for kind, flag, run in (
                ("fprop", "GEMM_GLUON", lambda: ops.grouped_gemm(xq, xs, wq, ws, counts, torch.bfloat16, "triton")),
                ("wgrad", "WGRAD_GLUON", lambda: ops.grouped_wgrad(dyt, dyts, xqt, xst, counts, torch.float32, "triton"))):
            default = run().float()
            stages = gluon_gemm.STAGES
            for st in (stages, stages + 1):
                setattr(K, flag, True)
                gluon_gemm.STAGES = st
                try:
                    y = run().float()
                    row = {"tflops": tf(bench(run)), "rel_diff": ((y - default).norm() / default.norm()).item(),
                           "equal": bool(torch.equal(y, default))}
                except Exception as e:  # a Triton without Gluon, or a compile failure on this machine
                    row = f"{type(e).__name__}: {str(e)[:300]}"
                finally:
                    setattr(K, flag, False)
                    gluon_gemm.STAGES = stages
                key = kind if st == stages else f"{kind}, {st} stages"
                res["gluon"].setdefault(key, {})[name] = row
                print(name, key, "through Gluon (promotion overlapped)", row, flush=True)
        res["quant_ms"][name] = {"quant_both": round(bench(lambda: ops.quant_both(x, False, "triton")), 3),
                                 "quant_weight": round(bench(lambda: ops.quant_weight(w, "triton")), 3)}
        print(name, "quantisation ms", res["quant_ms"][name], flush=True)
    K.GEMM_GLUON, K.WGRAD_GLUON = gluon_flags
    return res


def best(table: dict) -> tuple:
    """The tile with the least time over both projections (harmonic combination of TFLOP/s)."""
    ok = {c: v for c, v in table.items() if all(isinstance(v.get(n), float) for n in ("w13", "w2"))}
    return eval(max(ok, key=lambda c: 1 / (1 / ok[c]["w13"] + 1 / ok[c]["w2"])))  # keys are str(tuple) of ints


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--out", default=".", help="folder for fp8_kernel_sweep.json")
    p.add_argument("--speed", action="store_true", help="then time whole BF16 and FP8 steps with the best tiles")
    p.add_argument("--quick", action="store_true", help="only the default tile of each table (kernels.py), and Gluon")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8_kernel_sweep needs a CUDA GPU")
    import datetime

    import triton

    from bench.common import git_commit

    res = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "commit": git_commit(),
           "torch": torch.__version__, "triton": triton.__version__, **sweep(quick=args.quick)}
    bg, bw = best(res["gemm"]), best(res["wgrad"])
    res["best"] = {"gemm": bg, "wgrad": bw}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp8_kernel_sweep.json").write_text(json.dumps(res, indent=1) + "\n")
    print("best gemm (BM, BN, warps, stages)", bg, "best wgrad (BN, BK, warps, stages)", bw, flush=True)
    if args.speed:
        from dsv3.fp8 import kernels as K

        K.GEMM_CFG.update(BM=bg[0], BN=bg[1], num_warps=bg[2], num_stages=bg[3])
        K.WGRAD_CFG.update(BN=bw[0], BK=bw[1], num_warps=bw[2], num_stages=bw[3])
        # the Gluon kernels where they are correct and faster than the best tile at both projections
        for kind, flag, table, tile in (("fprop", "GEMM_GLUON", "gemm", bg), ("wgrad", "WGRAD_GLUON", "wgrad", bw)):
            rows = res["gluon"].get(kind, {})
            setattr(K, flag, all(isinstance(rows.get(p), dict) and rows[p]["rel_diff"] < 1e-6
                                 and rows[p]["tflops"] > res[table][str(tile)][p] for p in ("w13", "w2")))
            print(flag, getattr(K, flag), flush=True)
        res["speed_with"] = {"GEMM_GLUON": K.GEMM_GLUON, "WGRAD_GLUON": K.WGRAD_GLUON}
        (Path(args.out) / "fp8_kernel_sweep.json").write_text(json.dumps(res, indent=1) + "\n")
        from bench import fp8_validation

        fp8_validation.main(["--sections", "env,speed", "--out", str(Path(args.out) / "speed")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
