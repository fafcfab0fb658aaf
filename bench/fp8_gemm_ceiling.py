"""Where the FP8 expert GEMM's ceiling lies, on one GPU: the routed experts' shapes as one dense GEMM
(M = 16,384 tokens x top-8 rows, an upper bound for the grouped kernels), through

  triton_plain      a plain Triton FP8 matmul with our Fprop tile (128x128x128, 8 warps, 3 stages) and no
                    scales: what the tile and its pipeline reach without the per-block promotion;
  ours              our block-scaled kernel (`kernels.gemm`, the same tile, promotion every 128);
  cublas_blockwise  `torch._scaled_mm` with 1x128 x 128x128 scales (cuBLAS's own promoting kernel);
  cublas_tensorwise `torch._scaled_mm` with one scale per tensor (no promotion; cuBLAS picks its tile).

    python bench/fp8_gemm_ceiling.py [--out DIR]

If triton_plain is near ours, the promotion is not what holds the kernel back (the tile and the memory
traffic it implies are); a cuBLAS path well above both says how much a different tile could give.
Writes fp8_gemm_ceiling.json into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _plain_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def plain_fp8_matmul(A, B, C, M, N, K, sam, sbn, scm, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """C [M, N] = A [M, K] @ B [N, K]^T, e4m3 in, fp32 accumulated in the dot, bf16 out."""
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptrs = A + rm[:, None] * sam + rk[None, :]
        b_ptrs = B + rn[:, None] * sbn + rk[None, :]
        acc = tl.zeros((BM, BN), tl.float32)
        for _ in range(0, K, BK):
            acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs).T, acc)
            a_ptrs += BK
            b_ptrs += BK
        tl.store(C + rm[:, None] * scm + rn[None, :], acc.to(tl.bfloat16))

    return plain_fp8_matmul


def measure(m: int = 16384 * 8, dim: int = 2048, inter: int = 1024) -> dict:
    import triton
    import triton.testing

    from dsv3.fp8 import kernels, ops

    bench = lambda fn: triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")  # noqa: E731
    plain = _plain_kernel()
    res = {}
    for name, (n, k) in {"w13": (2 * inter, dim), "w2": (dim, inter)}.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda") * 0.02
        xq, xs, _, _ = ops.quant_both(x, False, "triton")
        wq, ws, _ = ops.quant_weight(w, "triton")
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        one = torch.ones((), device="cuda")
        c = kernels.GEMM_CFG
        runs = {
            "triton_plain": lambda: plain[(n // c["BN"], m // c["BM"])](
                xq, wq, out, m, n, k, xq.stride(0), wq.stride(0), out.stride(0), BM=c["BM"], BN=c["BN"], BK=c["BK"],
                num_warps=c["num_warps"], num_stages=c["num_stages"]),
            "ours": lambda: kernels.gemm(xq, xs, wq, ws, torch.bfloat16),
            "cublas_blockwise": lambda: ops._scaled_mm(xq, xs, wq, ws, torch.bfloat16),
            "cublas_tensorwise": lambda: torch._scaled_mm(xq, wq.t(), one, one, out_dtype=torch.bfloat16),
        }
        flop = 2 * m * n * k
        res[name] = {}
        for key, fn in runs.items():
            try:
                res[name][key] = round(flop / bench(fn) / 1e9, 1)
            except Exception as e:  # a path this torch or GPU lacks
                res[name][key] = f"{type(e).__name__}: {str(e)[:200]}"
            print(name, key, res[name][key], "TFLOP/s", flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--out", default=".", help="folder for fp8_gemm_ceiling.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8_gemm_ceiling needs a CUDA GPU")
    import datetime

    from bench.common import git_commit

    res = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "commit": git_commit(),
           "torch": torch.__version__, **measure()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp8_gemm_ceiling.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
