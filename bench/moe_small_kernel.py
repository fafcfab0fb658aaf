"""Small-batch routed experts against the grouped path, at the `bench` expert shapes, on one GPU.

    python bench/moe_small_kernel.py [--out DIR] [--layers 8] [--deadline 90] [--budget 135]
    python bench/moe_small_kernel.py --smoke          # CPU: the twin (and the kernels if TRITON_INTERPRET=1)

For N = 1, 2, 4, 8, 32, 64 tokens (D 2048, I 1024, E 32, top-8, BF16, random distinct experts per token)
it times the routed-experts part of a decode MoE layer three ways:
  grouped        moe_forward's path past N*K = E: LocalDispatcher.dispatch + expert_ffn (two
                 torch._grouped_mm) + combine;
  slot-major     dsv3.inference.moe_small.small_batch_experts (moe_forward's path for N*K <= E) at its
                 default tiles at every N, and its tile sweep at N = 1, 2, 4, where it runs: the gate/up
                 kernel's tiles first (down at its default), then the down kernel's tiles and variant
                 ("partials" / "loop_k") with the best gate/up tiles;
  expert-major   dsv3.inference.moe_small.expert_major_experts (on no path yet: this run decides its rule,
                 `use_expert_major`) at every N, with a small sweep: BLOCK_M and the gate/up tiles first,
                 then the down tiles with the best of those.
A sweep's best tiles are those with the least time relative to the first candidate, summed over its Ns.
Sweeps stop at --deadline; then the grouped path and each variant's best tiles run compiled (inductor,
what a compiled decode step runs), N by N until --budget.  The summary names, per N, each way's time
and the fastest row of all: what `use_expert_major` and `use_small_batch` should follow.
Each timing is a CUDA graph of the path over --layers layers with their own weights and routing (a
decode step's pattern; 8 layers of experts are 3.2 GB, far past the 60 MB L2), replayed under
triton.testing.do_bench (which also flushes L2 between replays), divided by the layer count.
Effective GB/s counts the distinct experts each layer's routing touches, 3*D*I*2 bytes each: the least
any path must read.  (The 2026-12-01 results counted N*K expert reads, a repeated expert again.)
Every output is checked against the fp32 twin on the same BF16 inputs (relative Frobenius error).

Prints a table and a final JSON line; writes moe_small_kernel_<date>.json into --out.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import T0, git_commit, kernel_bench_parser, log, results_path, triton_interpreter  # noqa: E402
from dsv3.inference.moe_small import (  # noqa: E402
    ExpertMajorTiles,
    Tiles,
    expert_major_experts,
    small_batch_experts,
    small_batch_experts_reference,
)
from dsv3.model.moe import LocalDispatcher, expert_ffn  # noqa: E402

# (BLOCK_I, BLOCK_D, warps, stages) of the gate/up kernel
UP = [(16, 256, 4, 3), (8, 256, 4, 3), (32, 128, 4, 3), (16, 128, 4, 3), (16, 512, 4, 3), (8, 512, 4, 3),
      (16, 256, 8, 3), (32, 256, 8, 3), (16, 256, 4, 1), (4, 512, 4, 3)]
# (variant, BLOCK_D, BLOCK_I, warps, stages) of the down kernel
DOWN = [("partials", 16, 256, 4, 3), ("partials", 8, 256, 4, 3), ("partials", 32, 128, 4, 3), ("partials", 16, 512, 4, 3),
        ("partials", 32, 256, 8, 3), ("partials", 16, 256, 4, 1), ("loop_k", 16, 256, 4, 3), ("loop_k", 8, 256, 4, 3),
        ("loop_k", 8, 512, 4, 3), ("loop_k", 4, 512, 4, 3), ("loop_k", 16, 512, 8, 3)]
# expert-major: (BLOCK_M, BLOCK_I, BLOCK_D, warps, stages) of the gate/up kernel, first the first guess
EM_UP = [(16, 16, 256, 4, 3), (16, 32, 256, 4, 3), (16, 16, 128, 4, 3), (16, 16, 512, 4, 3), (16, 64, 128, 4, 3),
         (32, 16, 256, 4, 3), (64, 16, 128, 4, 3), (16, 16, 256, 2, 3), (16, 32, 256, 8, 4)]
# (BLOCK_D_OUT, BLOCK_I_IN, warps, stages) of its down kernel
EM_DOWN = [(16, 256, 4, 3), (32, 256, 4, 3), (16, 512, 4, 3), (16, 128, 4, 4), (64, 128, 4, 3), (16, 256, 2, 3)]
SLOT_MAJOR_NS = (1, 2, 4)  # where the slot-major op runs (N*K <= E at the bench config); its sweep stays there


TWIN = "twin (fp32 maths on gathered weights)"
GROUPED = "grouped (dispatch + 2x _grouped_mm + combine)"
COMPILED = ", compiled"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def grouped_path(x, indices, weights, w13, w2):
    """The routed part of moe_forward where neither kernel runs: sort, two grouped GEMMs, combine."""
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


def measure(name, fn, layers, ns, refs, device, res, bytes_per_n, tol, until=None) -> dict | None:
    """Times fn at each N (stopping past the time `until`), checks it against the twin (an error past tol
    is recorded), one row per N."""
    row = {}
    try:
        for n in ns:
            if until is not None and time.time() > until:
                res["errors"][f"{name}, N={n}"] = "skipped: past --budget"
                continue
            us, outs = per_layer_us(fn, layers, n, device)
            err = max(rel(o, r) for o, r in zip(outs, refs[n]))
            row[n] = {"us": round(us, 2), "gb_s": round(bytes_per_n[n] / us / 1e3, 1), "rel_err": float(f"{err:.2e}")}
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


def relative_score(row: dict, base: dict, ns) -> float:
    """A sweep's ranking: the time relative to the first candidate's, summed over the Ns (so that N = 64's
    larger times do not outweigh N = 1's); inf if a timing is missing."""
    return sum(row[n]["us"] / base[n]["us"] if n in row and n in base else float("inf") for n in ns)


def tiles_name(t: Tiles) -> str:
    return (f"slot-major up({t.up_block_i}x{t.up_block_d},w{t.up_warps},s{t.up_stages}) "
            f"{t.down}({t.down_block_d}x{t.down_block_i},w{t.down_warps},s{t.down_stages})")


def em_tiles_name(t: ExpertMajorTiles) -> str:
    return (f"expert-major m{t.block_m} up({t.block_i}x{t.block_d},w{t.up_warps},s{t.up_stages}) "
            f"down({t.block_d_out}x{t.block_i_in},w{t.down_warps},s{t.down_stages})")


def main(argv=None) -> int:
    p = kernel_bench_parser(__doc__, "toy shapes on CPU: the twin, + kernels if TRITON_INTERPRET=1")
    p.add_argument("--layers", type=int, default=8, help="layers of distinct weights per timed graph")
    p.add_argument("--deadline", type=float, default=90,
                   help="seconds; sweep candidates after it are skipped (the compiled runs follow, ~40 s)")
    p.add_argument("--budget", type=float, default=135, help="seconds; the compiled runs skip the Ns left after it")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    date = datetime.date.today().isoformat()
    json_path = results_path(args.out, "moe_small_kernel", args.smoke)
    if args.smoke:
        ns, k, e, d, inter, dtype, n_layers = [1, 2], 2, 8, 64, 48, torch.float32, 2
    else:
        ns, k, e, d, inter, dtype, n_layers = [1, 2, 4, 8, 32, 64], 8, 32, 2048, 1024, torch.bfloat16, args.layers
    small_ns = [n for n in ns if n in SLOT_MAJOR_NS]
    interpret = device.type == "cpu" and triton_interpreter()
    kernels = device.type == "cuda" or interpret  # else (CPU without Triton) the twin stands in for the kernels
    res: dict = {"date": date, "commit": args.commit or git_commit(), "smoke": args.smoke, "torch": torch.__version__,
                 "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "shape": {"D": d, "I": inter, "E": e, "K": k, "N": ns, "dtype": str(dtype).split(".")[-1]},
                 "layers": n_layers, "runs": {}, "errors": {}}
    if device.type == "cuda":
        import triton

        res["triton"] = triton.__version__
    log(f"device {res['device']}, D {d} I {inter} E {e} K {k}, N {ns}, {n_layers} layers, {dtype}")

    layers = make_layers(n_layers, ns, k, e, d, inter, device, dtype)
    touched = {n: sum(routes[n][1].unique().numel() for _, _, routes in layers) / n_layers for n in ns}
    bytes_per_expert = 3 * d * inter * torch.finfo(dtype).bits // 8
    bytes_per_n = {n: touched[n] * bytes_per_expert for n in ns}
    res["experts_touched"] = touched  # per layer, the mean over layers
    refs = {n: [small_batch_experts_reference(*routes[n], w13, w2) for w13, w2, routes in layers] for n in ns}
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # one bf16 rounding of the output; fp32: summation order

    def go(name, fn, at=ns, until=None):
        return measure(name, fn, layers, at, refs, device, res, bytes_per_n, tol, until)

    deadline, budget = T0 + args.deadline, T0 + args.budget

    go(TWIN, small_batch_experts_reference, small_ns)  # timed where cheap: at N = 64 it gathers ~13 GB a layer
    go(GROUPED, grouped_path)
    slot_best, em_best = Tiles(), ExpertMajorTiles()
    if kernels:  # the first guesses at every N, then the sweeps while the deadline allows
        go(tiles_name(slot_best), _with(slot_best))
        go(em_tiles_name(em_best), _em_with(em_best))
        full = device.type == "cuda"  # the interpreter runs a candidate or two of each stage
        em_best = sweep_expert_major(go, ns, deadline, res["runs"], EM_UP if full else EM_UP[:2],
                                     EM_DOWN if full else EM_DOWN[:2])
        slot_best = sweep_slot_major(go, small_ns, deadline, res["runs"], UP if full else UP[:1],
                                     DOWN if full else [c for c in DOWN if c[1:] == DOWN[0][1:]])
    if device.type == "cuda":  # what a compiled decode step runs (one compile per N and path)
        compiled = lambda fn: torch.compile(fn, fullgraph=True, dynamic=False)  # noqa: E731
        go(GROUPED + COMPILED, compiled(grouped_path), until=budget)
        go(em_tiles_name(em_best) + COMPILED, compiled(_em_with(em_best)), until=budget)
        go(tiles_name(slot_best) + COMPILED, compiled(_with(slot_best)), until=budget)
    res["default_tiles"], res["best_tiles"] = asdict(Tiles()), asdict(slot_best)
    res["expert_major_default_tiles"], res["expert_major_best_tiles"] = asdict(ExpertMajorTiles()), asdict(em_best)

    res["summary"] = summarise(res["runs"], ns, "slot-major" if kernels else TWIN)
    res["seconds"] = round(time.time() - T0, 1)
    json_path.write_text(json.dumps(res, indent=1) + "\n")
    cols = ("grouped_us", "grouped_compiled_us", "small_us", "small_compiled_us", "expert_major_us",
            "expert_major_compiled_us")
    print(f"\nbest tiles: {tiles_name(slot_best)}; {em_tiles_name(em_best)}\n"
          f"{'N':>3} " + " ".join(f"{c:>24}" for c in cols) + "  fastest")
    for n, s in res["summary"].items():
        print(f"{n:>3} " + " ".join(f"{s[c]!s:>24}" for c in cols) + f"  {s['fastest']} ({s['fastest_us']} us)")
    log(f"wrote {json_path}")
    print(json.dumps({k: res[k] for k in ("device", "date", "commit", "shape", "best_tiles", "expert_major_best_tiles",
                                          "summary", "errors")}))
    return 0


def sweep(go, name, make_fn, first, candidates, ns, deadline, runs):
    """Times the candidates not yet in runs (none after the deadline) at ns, and returns the one with the
    least relative_score against `first`, which is already timed; `first` where nothing else was."""
    base, scores = runs.get(name(first)), {}
    for t in [first, *candidates]:
        if name(t) not in runs and time.time() < deadline:
            go(name(t), make_fn(t), ns)
        if base is not None and name(t) in runs:
            scores[t] = relative_score(runs[name(t)], base, ns)
    return min(scores, key=scores.get, default=first)


def sweep_expert_major(go, ns, deadline, runs, up_grid, down_grid) -> ExpertMajorTiles:
    """BLOCK_M and the gate/up tiles (down at its first guess), then the down tiles with the best of those."""
    first = ExpertMajorTiles()
    ups = [replace(first, block_m=bm, block_i=bi, block_d=bd, up_warps=w, up_stages=s) for bm, bi, bd, w, s in up_grid]
    best_up = sweep(go, em_tiles_name, _em_with, first, ups, ns, deadline, runs)
    downs = [replace(best_up, block_d_out=bd, block_i_in=bi, down_warps=w, down_stages=s) for bd, bi, w, s in down_grid]
    return sweep(go, em_tiles_name, _em_with, best_up, downs, ns, deadline, runs)


def sweep_slot_major(go, ns, deadline, runs, up_grid, down_grid) -> Tiles:
    """The gate/up kernel's tiles (down at its default), then the down kernel's tiles and variant."""
    first = Tiles()
    ups = [replace(first, up_block_i=bi, up_block_d=bd, up_warps=w, up_stages=s) for bi, bd, w, s in up_grid]
    best_up = sweep(go, tiles_name, _with, first, ups, ns, deadline, runs)
    downs = [replace(best_up, down=v, down_block_d=bd, down_block_i=bi, down_warps=w, down_stages=s)
             for v, bd, bi, w, s in down_grid]
    return sweep(go, tiles_name, _with, best_up, downs, ns, deadline, runs)


def summarise(runs: dict, ns, slot_major: str) -> dict:
    """Per N: each path's fastest row, eager (in a CUDA graph) and compiled, and the fastest row of all.
    slot_major: the name prefix of the slot-major rows (the twin's where the kernels did not run)."""
    def best(prefix, n, compiled):
        times = [row[n]["us"] for name, row in runs.items()
                 if name.startswith(prefix) and name.endswith(COMPILED) == compiled and n in row]
        return min(times, default=None)

    summary = {}
    for n in ns:
        timed = {name: row[n]["us"] for name, row in runs.items() if n in row and name != TWIN}
        fastest = min(timed, key=timed.get, default=None)
        summary[n] = {"grouped_us": best(GROUPED, n, False), "grouped_compiled_us": best(GROUPED, n, True),
                      "small_us": best(slot_major, n, False), "small_compiled_us": best(slot_major, n, True),
                      "expert_major_us": best("expert-major", n, False),
                      "expert_major_compiled_us": best("expert-major", n, True),
                      "fastest": fastest, "fastest_us": timed.get(fastest)}
    return summary


def _with(tiles: Tiles):
    return lambda x, indices, weights, w13, w2: small_batch_experts(x, indices, weights, w13, w2, tiles)


def _em_with(tiles: ExpertMajorTiles):
    return lambda x, indices, weights, w13, w2: expert_major_experts(x, indices, weights, w13, w2, tiles=tiles)


if __name__ == "__main__":
    sys.exit(main())
