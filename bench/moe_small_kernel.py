"""Small-batch routed experts against the grouped path, at the `bench` expert shapes, on one GPU.

    python bench/moe_small_kernel.py [--out DIR] [--layers 8] [--deadline 55]
    python bench/moe_small_kernel.py --smoke          # CPU: the twin (and the kernels if TRITON_INTERPRET=1)

For N = 1, 2, 4 tokens (D 2048, I 1024, E 32, top-8, BF16, random distinct experts per token) it times
the routed-experts part of a decode MoE layer:
  grouped        what moe_forward did before: LocalDispatcher.dispatch + expert_ffn (two
                 torch._grouped_mm) + combine, eager kernels in a CUDA graph, and compiled (inductor);
  small          dsv3.inference.moe_small.small_batch_experts under each candidate of a tile sweep:
                 the gate/up kernel's tiles first (down at its default), then the down kernel's tiles
                 and variant ("partials" / "loop_k") with the best gate/up tiles; then the default and
                 the best tiles compiled.
Each timing is a CUDA graph of the path over --layers layers with their own weights and routing (a
decode step's pattern; 8 layers of experts are 3.2 GB, far past the 60 MB L2), replayed under
triton.testing.do_bench (which also flushes L2 between replays), divided by the layer count.
Effective GB/s counts N*K expert reads of 3*D*I*2 bytes each (a repeated expert counted again).
Every output is checked against the fp32 twin on the same BF16 inputs (relative Frobenius error).

Prints a table and a final JSON line; writes moe_small_kernel_<date>.json into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import T0, git_commit, log  # noqa: E402
from dsv3.inference.moe_small import Tiles, small_batch_experts, small_batch_experts_reference  # noqa: E402
from dsv3.model.moe import LocalDispatcher, expert_ffn  # noqa: E402

# (BLOCK_I, BLOCK_D, warps, stages) of the gate/up kernel
UP = [(16, 256, 4, 3), (8, 256, 4, 3), (32, 128, 4, 3), (16, 128, 4, 3), (16, 512, 4, 3), (8, 512, 4, 3),
      (16, 256, 8, 3), (32, 256, 8, 3), (16, 256, 4, 1), (4, 512, 4, 3)]
# (variant, BLOCK_D, BLOCK_I, warps, stages) of the down kernel
DOWN = [("partials", 16, 256, 4, 3), ("partials", 8, 256, 4, 3), ("partials", 32, 128, 4, 3), ("partials", 16, 512, 4, 3),
        ("partials", 32, 256, 8, 3), ("partials", 16, 256, 4, 1), ("loop_k", 16, 256, 4, 3), ("loop_k", 8, 256, 4, 3),
        ("loop_k", 8, 512, 4, 3), ("loop_k", 4, 512, 4, 3), ("loop_k", 16, 512, 8, 3)]


TWIN = "twin (fp32 maths on gathered weights)"
GROUPED = "grouped (dispatch + 2x _grouped_mm + combine)"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def grouped_path(x, indices, weights, w13, w2):
    """The routed part of moe_forward before the small path: sort, two grouped GEMMs, combine."""
    disp = LocalDispatcher(w13.shape[0])
    rows, counts, order = disp.dispatch(x, indices)
    return disp.combine(expert_ffn(rows, w13, w2, counts), weights, order)


def make_layers(n_layers, ns, k, e, d, inter, device, dtype, seed=0):
    """Per layer: its own experts' weights, and per N its own routing and tokens."""
    g = torch.Generator(device=device).manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        w13 = (torch.randn(e, 2 * inter, d, device=device, generator=g) / d ** 0.5).to(dtype)
        w2 = (torch.randn(e, d, inter, device=device, generator=g) / inter ** 0.5).to(dtype)
        routes = {}
        for n in ns:
            indices = torch.rand(n, e, device=device, generator=g).topk(k, dim=-1).indices  # distinct per token
            gates = torch.rand(n, k, device=device, generator=g) + 0.1
            gates = gates / gates.sum(-1, keepdim=True) * 2.5
            routes[n] = (torch.randn(n, d, device=device, generator=g).to(dtype), indices, gates)
        layers.append((w13, w2, routes))
    return layers


def per_layer_us(fn, layers, n, device) -> tuple[float, list[torch.Tensor]]:
    """Mean time of fn over the layers, in a CUDA graph on GPU (wall clock on CPU); and the outputs."""
    def step():
        return [fn(*routes[n], w13, w2) for w13, w2, routes in layers]

    outs = step()  # compiles (Triton, inductor) outside the capture
    if device.type != "cuda":
        t = time.perf_counter()
        step()
        return (time.perf_counter() - t) * 1e6 / len(layers), outs
    import triton.testing

    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    ms = triton.testing.do_bench(graph.replay, warmup=5, rep=30, return_mode="median")
    graph.replay()
    torch.cuda.synchronize()
    return ms * 1e3 / len(layers), [o.clone() for o in outs]


def measure(name, fn, layers, ns, refs, device, res, bytes_per_slot, k, tol) -> dict | None:
    """Times fn at every N, checks it against the twin (an error past tol is recorded), one row per N."""
    row = {}
    try:
        for n in ns:
            us, outs = per_layer_us(fn, layers, n, device)
            err = max(rel(o, r) for o, r in zip(outs, refs[n]))
            row[n] = {"us": round(us, 2), "gb_s": round(n * k * bytes_per_slot / us / 1e3, 1), "rel_err": float(f"{err:.2e}")}
            if not err <= tol:
                res["errors"][f"{name}, N={n}"] = f"relative error {err:.2e} against the twin, over {tol}"
    except Exception as ex:  # a tile Triton cannot build, or an out-of-memory
        res["errors"][name] = f"{type(ex).__name__}: {str(ex)[:200]}"
        log(f"{name}: {res['errors'][name]}")
        return None
    res["runs"][name] = row
    log(f"{name:58s} " + "  ".join(f"N={n}: {r['us']:7.2f} us {r['gb_s']:6.0f} GB/s err {r['rel_err']:.1e}"
                                   for n, r in row.items()))
    return row


def tiles_name(t: Tiles) -> str:
    return (f"small up({t.up_block_i}x{t.up_block_d},w{t.up_warps},s{t.up_stages}) "
            f"{t.down}({t.down_block_d}x{t.down_block_i},w{t.down_warps},s{t.down_stages})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy shapes on CPU: the twin, + kernels if TRITON_INTERPRET=1")
    p.add_argument("--out", default=None, help="folder for the JSON (default bench/results; with --smoke a temporary folder)")
    p.add_argument("--commit", default=None, help="git commit of the code measured (default: $DSV3_COMMIT or git)")
    p.add_argument("--layers", type=int, default=8, help="layers of distinct weights per timed graph")
    p.add_argument("--deadline", type=float, default=55,
                   help="seconds; sweep candidates after it are skipped (the compiled runs follow, ~25 s)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    date = datetime.date.today().isoformat()
    if args.out is None:
        import tempfile

        args.out = tempfile.mkdtemp(prefix="dsv3_bench_") if args.smoke else str(ROOT / "bench" / "results")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"moe_small_kernel_{date}{'_smoke' if args.smoke else ''}.json"
    if args.smoke:
        ns, k, e, d, inter, dtype, n_layers = [1, 2], 2, 8, 64, 48, torch.float32, 2
    else:
        ns, k, e, d, inter, dtype, n_layers = [1, 2, 4], 8, 32, 2048, 1024, torch.bfloat16, args.layers
    interpret = device.type == "cpu" and _triton_interpreter()
    res: dict = {"date": date, "commit": args.commit or git_commit(), "smoke": args.smoke, "torch": torch.__version__,
                 "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "shape": {"D": d, "I": inter, "E": e, "K": k, "N": ns, "dtype": str(dtype).split(".")[-1]},
                 "layers": n_layers, "runs": {}, "errors": {}}
    if device.type == "cuda":
        import triton

        res["triton"] = triton.__version__
    bytes_per_slot = 3 * d * inter * torch.finfo(dtype).bits // 8
    log(f"device {res['device']}, D {d} I {inter} E {e} K {k}, N {ns}, {n_layers} layers, {dtype}")

    layers = make_layers(n_layers, ns, k, e, d, inter, device, dtype)
    refs = {n: [small_batch_experts_reference(*routes[n], w13, w2) for w13, w2, routes in layers] for n in ns}
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # one bf16 rounding of the output; fp32: summation order
    go = lambda name, fn: measure(name, fn, layers, ns, refs, device, res, bytes_per_slot, k, tol)  # noqa: E731
    deadline = T0 + args.deadline

    go(TWIN, small_batch_experts_reference)
    go(GROUPED, grouped_path)
    best = Tiles()
    if device.type == "cuda" or interpret:
        default = Tiles()
        total = lambda row: sum(r["us"] for r in row.values())  # noqa: E731
        up_grid = UP if device.type == "cuda" else UP[:1]
        down_grid = DOWN if device.type == "cuda" else [c for c in DOWN if c[1:] == DOWN[0][1:]]
        scores = {}
        for bi, bd, warps, stages in up_grid:  # gate/up tiles, down at its default
            t = replace(default, up_block_i=bi, up_block_d=bd, up_warps=warps, up_stages=stages)
            if time.time() < deadline and (row := go(tiles_name(t), _with(t))):
                scores[t] = total(row)
        best_up = min(scores, key=scores.get, default=default)
        for variant, bd, bi, warps, stages in down_grid:  # down tiles, gate/up at its best
            t = replace(best_up, down=variant, down_block_d=bd, down_block_i=bi, down_warps=warps, down_stages=stages)
            if t not in scores and time.time() < deadline and (row := go(tiles_name(t), _with(t))):
                scores[t] = total(row)
        best = min(scores, key=scores.get, default=default)
    if device.type == "cuda":  # what a compiled decode step runs (after the sweep's deadline: ~6 compiles)
        go(GROUPED + ", compiled", torch.compile(grouped_path, fullgraph=True, dynamic=False))
        go("small best tiles, compiled", torch.compile(_with(best), fullgraph=True, dynamic=False))
    res["default_tiles"], res["best_tiles"] = asdict(Tiles()), asdict(best)

    small_name = tiles_name(best) if tiles_name(best) in res["runs"] else TWIN  # the twin: CPU without Triton
    runs, summary = res["runs"], {}
    for n in ns:
        g, s = (runs.get(name, {}).get(n) for name in (GROUPED, small_name))
        gc, sc = (runs.get(name, {}).get(n) for name in (GROUPED + ", compiled", "small best tiles, compiled"))
        summary[n] = {"grouped_us": g and g["us"], "small_us": s and s["us"], "small_gb_s": s and s["gb_s"],
                      "speedup": g and s and round(g["us"] / s["us"], 2),
                      "grouped_compiled_us": gc and gc["us"], "small_compiled_us": sc and sc["us"],
                      "speedup_compiled": gc and sc and round(gc["us"] / sc["us"], 2)}
    res["small_path"], res["summary"], res["seconds"] = small_name, summary, round(time.time() - T0, 1)
    json_path.write_text(json.dumps(res, indent=1) + "\n")
    cols = ("grouped_us", "small_us", "small_gb_s", "speedup", "grouped_compiled_us", "small_compiled_us", "speedup_compiled")
    print(f"\nsmall: {small_name}\n{'N':>3} " + " ".join(f"{c:>19}" for c in cols))
    for n, s in summary.items():
        print(f"{n:>3} " + " ".join(f"{s[c]!s:>19}" for c in cols))
    log(f"wrote {json_path}")
    print(json.dumps({k: res[k] for k in ("device", "date", "commit", "shape", "small_path", "best_tiles", "summary",
                                          "errors")}))
    return 0


def _with(tiles: Tiles):
    return lambda x, indices, weights, w13, w2: small_batch_experts(x, indices, weights, w13, w2, tiles)


def _triton_interpreter() -> bool:
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
