"""The one-launch routing kernel (dsv3.inference.route_small) against Router.forward at the `bench` decode shapes.

    python bench/route_kernel.py [--out DIR] [--deadline S]
    python bench/route_kernel.py --smoke           # tiny config on CPU (+ the kernel under TRITON_INTERPRET=1)

For 1, 8 and 64 tokens, times routing of one MoE layer: the model's Router.forward (eager, and compiled as
the decode step compiles it) and the kernel under each candidate RouteTiles.  Each timed CUDA graph runs
--layers routers of distinct random weights (the decode step's MoE layers), so no weight stays in L2
between calls; the figure is per layer.  Every candidate is checked against Router.forward: the chosen
experts agree on >= 99 % of tokens (fp32 sums in another order may flip a near-tie), and the gates of the
agreeing tokens within 1e-5.  Writes route_kernel_<date>.json; "best" is the candidate with the least
summed time over the cases among those that pass.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (T0, kernel_bench_parser, kernel_bench_results, log, timed_candidates,  # noqa: E402
                          triton_interpreter, write_results)
from dsv3 import ModelConfig  # noqa: E402
from dsv3.inference import route_small  # noqa: E402
from dsv3.inference.route_small import RouteTiles, small_route  # noqa: E402
from dsv3.model.moe import Router  # noqa: E402

TOKENS = [1, 8, 64]
# priority order (a deadline cuts from the end): the default first
SWEEP = [
    RouteTiles(),  # d1024 w8 s3: the 2026-12-01 sweep's best
    RouteTiles(block_d=256),  # the first guess
    RouteTiles(block_d=512, warps=8),
    RouteTiles(block_d=512, warps=4),
    RouteTiles(block_d=1024, warps=4),
    RouteTiles(block_d=128, warps=4),
    RouteTiles(block_d=256, warps=4),
    RouteTiles(stages=1),
    RouteTiles(stages=4),
    RouteTiles(block_d=2048, warps=16, stages=1),
    RouteTiles(block_d=2048, warps=8, stages=1),
    RouteTiles(block_d=256, warps=2),
    # the split path (SPLIT_ROUTE): the GEMV over `split` programs per token, then a selecting launch
    route_small.SPLIT_TILES,
    RouteTiles(block_d=256, warps=4, stages=1, split=8),
    RouteTiles(block_d=64, warps=2, stages=1, split=32),
    RouteTiles(block_d=128, warps=2, stages=1, split=16),
    RouteTiles(block_d=512, warps=4, stages=2, split=4),
]


def tiles_name(t: RouteTiles) -> str:
    return f"d{t.block_d} w{t.warps} s{t.stages}" + (f" split{t.split}" if t.split > 1 else "")


def make_layers(cfg: ModelConfig, n_layers: int, tokens: int, device, dtype) -> list[tuple[Router, torch.Tensor]]:
    """Per layer: a Router with random weights and a routing bias of both signs, and fresh random x [tokens, D]."""
    layers = []
    for i in range(n_layers):
        torch.manual_seed(i)
        gate = Router(cfg)
        with torch.no_grad():
            gate.weight.normal_(0, cfg.hidden_size ** -0.5)
            if gate.bias is not None:
                gate.bias.normal_(0, 0.3)
        gate = gate.to(device=device, dtype=dtype)
        layers.append((gate, torch.randn(tokens, cfg.hidden_size, device=device, dtype=dtype)))
    return layers


def agreement(outs, want) -> tuple[float, float]:
    """(share of tokens whose experts equal the twin's, worst gate difference on those tokens)."""
    same, total, worst = 0, 0, 0.0
    for (gates, idx), (w_gates, w_idx) in zip(outs, want):
        rows = (idx == w_idx).all(-1)
        same, total = same + int(rows.sum()), total + rows.numel()
        if rows.any():
            worst = max(worst, (gates[rows] - w_gates[rows]).abs().max().item())
    return same / total, worst


def main(argv=None) -> int:
    p = kernel_bench_parser(__doc__, "tiny config on CPU: the twin, + the kernel if TRITON_INTERPRET=1")
    p.add_argument("--layers", type=int, default=7, help="routers of distinct weights per timed graph")
    p.add_argument("--deadline", type=float, default=90, help="seconds; sweep candidates after it are skipped")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    interpret = device.type == "cpu" and triton_interpreter()
    if args.smoke:
        preset, tokens, dtype, n_layers = "tiny", [1, 3], torch.float32, 2
    else:
        preset, tokens, dtype, n_layers = "bench", TOKENS, torch.bfloat16, args.layers
    cfg = ModelConfig.from_preset(preset)
    sweep = SWEEP if device.type == "cuda" else ([RouteTiles(block_d=32, warps=4)] if interpret else [])
    res = kernel_bench_results(args, device, preset, layers=n_layers, tokens=tokens,
                               tiles={tiles_name(t): asdict(t) for t in sweep})
    log(f"device {res['device']}, {preset}, tokens {tokens}, {n_layers} routers per graph, {len(sweep)} tile candidates")
    deadline = T0 + args.deadline

    def twin(gate, x):
        r = gate(x)
        return r.weights, r.indices

    compiled_twin = torch.compile(twin) if device.type == "cuda" else None
    for n in tokens:
        key = str(n)
        layers = make_layers(cfg, n_layers, n, device, dtype)
        with torch.no_grad():
            want = [twin(*layer) for layer in layers]
        row = res["runs"].setdefault(key, {})
        paths = [("torch", twin)] + ([("torch compiled", compiled_twin)] if compiled_twin else [])
        paths += [(tiles_name(t), lambda gate, x, t=t: small_route(gate, x, t)) for t in sweep]
        for name, us, outs in timed_candidates(paths, layers, device, deadline, key, res):
            same, gate_err = agreement(outs, want)
            row[name] = {"us": round(us, 2), "same_experts": round(same, 4), "gate_err": float(f"{gate_err:.2e}")}
            log(f"{n:>4} tokens  {name:<16} {us:8.2f} us  same experts {same:.4f}  gate err {gate_err:.1e}")
        del layers
    kernels = {k for r in res["runs"].values() for k in r if k not in ("torch", "torch compiled")}
    ok = {k for k in kernels if all(k in r and r[k]["same_experts"] >= 0.99 and r[k]["gate_err"] <= 1e-5
                                    for r in res["runs"].values())}
    res["best"] = min(ok, key=lambda k: sum(r[k]["us"] for r in res["runs"].values()), default=None)
    res["summary"] = {key: {"torch_us": r["torch"]["us"], "torch_compiled_us": r.get("torch compiled", {}).get("us"),
                            "default_us": r.get(tiles_name(RouteTiles()), {}).get("us"),
                            "best_us": r.get(res["best"], {}).get("us")} for key, r in res["runs"].items()}
    log(f"best tiles over all cases: {res['best']}")
    for key, s in res["summary"].items():
        log(f"{key:>4} tokens: torch {s['torch_us']} us, compiled {s['torch_compiled_us']} us, "
            f"default tiles {s['default_us']} us, best {s['best_us']} us")
    write_results(res, args.out, "route_kernel", args.smoke, ("device", "date", "commit", "best", "summary", "errors"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
