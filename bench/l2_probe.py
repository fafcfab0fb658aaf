"""Can batch-1 decoding's small GEMVs read their weights from L2?  A probe on one GPU, `bench` shapes.

    python bench/l2_probe.py [--out DIR]

The batch-1 step's small projections (wq_b, wo, and the wq_a + wkv_a pair: 6-9 MB each) stream at only
1.3-1.7 TB/s in their kernel (bench/gemv_kernel.py): a launch that short is mostly ramp and tail.  Between
them run latency-bound kernels (the MLA core, routing, norms: ~1/3 of the step) that leave HBM idle.  If
weights prefetched into L2 while those run made the GEMV much shorter, a prefetch riding on the
latency-bound launches would pay.  Measured here, each a CUDA graph timed with triton's do_bench (which
flushes L2 before each replay), per shape (weight [N, K], x one BF16 row):

  cold      one GEMV (small_m_linear), weights from HBM
  warm      the same GEMV right after itself: (time of 8 back-to-back calls - one call) / 7
  sleep     torch.cuda._sleep (one thread spinning ~10 us): the stand-in for latency-bound kernels
  serial    sleep, then the GEMV
  overlap   sleep on one stream while a prefetch kernel (`prefetch_l2`: every program reads its slice
            through L2 and keeps one fp32 sum) reads the weights on another; join; then the GEMV
  prefetch  the prefetch kernel alone

overlap - sleep is what a GEMV costs once its weights were prefetched behind latency-bound work; against
serial - sleep (the cold GEMV) it bounds what the idea can give; warm against cold bounds it from the other
side.  wq_a stands for the pair; the dense w2 and the head (32 and 128 MB) are past what L2 holds, as
controls.  Prints a table and a final JSON line; writes l2_probe_<date>.json into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import git_commit, log  # noqa: E402
from bench.gemv_kernel import decode_shapes  # noqa: E402
from dsv3 import ModelConfig  # noqa: E402
from dsv3.inference.gemv import small_m_linear  # noqa: E402

SHAPES = ("wq_a", "wq_b", "wo", "dense w2", "head")
SLEEP_CYCLES = 20_000  # ~10 us at the H200's ~1.98 GHz


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _prefetch_kernel(W, OUT, numel, per_program, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid * per_program
        for off in range(start, start + per_program, BLOCK):
            i = off + tl.arange(0, BLOCK)
            acc += tl.load(W + i, mask=i < numel, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(OUT + pid, tl.sum(acc))
except ImportError:  # CPU-only torch: the probe needs a GPU anyway
    triton = None


def prefetch_l2(w: torch.Tensor, programs: int = 264, block: int = 4096) -> torch.Tensor:
    """Reads every element of w once through L2 (loads marked .cg: L2 only); each program keeps one fp32
    sum of its slice so the loads are not dead code.  -> [programs] sums."""
    out = torch.empty(programs, device=w.device, dtype=torch.float32)
    per = triton.cdiv(triton.cdiv(w.numel(), programs), block) * block
    _prefetch_kernel[(programs,)](w, out, w.numel(), per, BLOCK=block, num_warps=4)
    return out


def graph_us(fn) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=50, return_mode="median") * 1e3


def probe(n: int, k: int, side: torch.cuda.Stream) -> dict:
    """The module docstring's timings for one weight [n, k] (BF16), µs."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)

    def sleep():
        torch.cuda._sleep(SLEEP_CYCLES)

    def gemv():
        small_m_linear(x, w)

    def overlap():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        sleep()
        with torch.cuda.stream(side):
            prefetch_l2(w)
        main.wait_stream(side)
        gemv()

    def eight():
        for _ in range(8):
            gemv()

    cold, t8 = graph_us(gemv), graph_us(eight)
    r = {"mb": round(w.numel() * 2 / 2**20, 1), "cold_us": round(cold, 2), "warm_us": round((t8 - cold) / 7, 2),
         "sleep_us": round(graph_us(sleep), 2), "serial_us": round(graph_us(lambda: (sleep(), gemv())), 2),
         "overlap_us": round(graph_us(overlap), 2), "prefetch_us": round(graph_us(lambda: prefetch_l2(w)), 2)}
    r["gemv_after_overlap_us"] = round(r["overlap_us"] - r["sleep_us"], 2)
    r["gemv_after_sleep_us"] = round(r["serial_us"] - r["sleep_us"], 2)
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for l2_probe_<date>.json")
    p.add_argument("--commit", default=None, help="the commit to record (default: git's HEAD)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("l2_probe needs a CUDA device")
    cfg = ModelConfig.from_preset("bench")
    shapes = decode_shapes(cfg)
    res = {"date": datetime.date.today().isoformat(), "commit": args.commit or git_commit(),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "sleep_cycles": SLEEP_CYCLES,
           "shapes": {}}
    side = torch.cuda.Stream()
    for name in SHAPES:
        n, k = shapes[name]
        res["shapes"][name] = r = probe(n, k, side)
        log(f"{name} {n}x{k}: {r}")
    print(f"{'shape':10} {'MB':>6} {'cold':>7} {'warm':>7} {'sleep':>7} {'serial':>7} {'overlap':>8} {'prefetch':>9}")
    for name, r in res["shapes"].items():
        print(f"{name:10} {r['mb']:6.1f} {r['cold_us']:7.2f} {r['warm_us']:7.2f} {r['sleep_us']:7.2f} "
              f"{r['serial_us']:7.2f} {r['overlap_us']:8.2f} {r['prefetch_us']:9.2f}")
    if args.out:
        path = Path(args.out) / f"l2_probe_{res['date']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
