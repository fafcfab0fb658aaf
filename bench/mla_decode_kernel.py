"""The absorbed-MLA decode kernels (dsv3.inference.mla_decode) against their torch twin at the `bench`
attention shapes, on one GPU.

    python bench/mla_decode_kernel.py [--out DIR] [--layers 8] [--deadline 120]
    python bench/mla_decode_kernel.py --smoke      # CPU, `tiny` shapes: the twin (+ the kernels if TRITON_INTERPRET=1)

For each case (sequences x query tokens per sequence, cached slots): batch-1 decoding, an MTP verify
(2 tokens), batch 8, batch 32 verifying 2 tokens, and a 2 K-token cache at batch 1, it times one
layer's absorbed attention (from q_nope / q_pe to the per-head outputs, before wo):
  torch           q_pe rotated (`apply_rope`), then `attention.absorbed_attention`: what decoding runs
                  without the kernels, in a CUDA graph
  torch compiled  the same under torch.compile (what a compiled decode step runs)
  kernels         `mla_decode` under each MLATiles of a sweep, in a CUDA graph
Each timing is a CUDA graph over --layers layers with their own wkv_b and cache (the weights of 8
layers and their caches are far past the 60 MB L2 only for long caches; a decode step reads them once
each), replayed under triton.testing.do_bench (median, L2 flushed), divided by the layers.  Outputs
are checked against the fp32 twin on the same BF16 inputs (max error / max of the reference).

Prints a table and a final JSON line; writes mla_decode_kernel_<date>.json into --out.
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
from dsv3.inference.attention import absorbed_attention  # noqa: E402
from dsv3.inference.cache import causal_mask  # noqa: E402
from dsv3.inference.mla_decode import MLATiles, mla_decode  # noqa: E402
from dsv3.model.attention import MLA  # noqa: E402
from dsv3.model.rope import RotaryEmbedding, apply_rope  # noqa: E402

# (sequences, query tokens each, cached slots)
CASES = [(1, 1, 256), (1, 2, 256), (8, 1, 256), (32, 2, 256), (1, 1, 2048)]
# priority order (a deadline cuts from the end): the default first
SWEEP = [
    MLATiles(),  # split 64: the 2026-12-01 sweep's best
    MLATiles(block_s=32, split_s=32),  # smaller splits: more attend programs over a short cache (trend of 2026-12-01)
    MLATiles(block_s=16, split_s=16),
    MLATiles(block_s=16, split_s=32),
    MLATiles(block_s=32, split_s=32, attend_warps=2),
    MLATiles(split_s=256),  # the first guess
    MLATiles(split_s=128),
    MLATiles(split_s=512),
    MLATiles(block_s=32, split_s=128),
    MLATiles(attend_warps=8),
    MLATiles(absorb_block_c=128, out_block_v=64),
    MLATiles(absorb_block_c=32, out_block_v=16),
    MLATiles(attend_stages=3, split_s=128),
]


def tiles_name(t: MLATiles) -> str:
    return (f"absorb c{t.absorb_block_c} w{t.absorb_warps} | attend h{t.block_h} s{t.block_s} split{t.split_s} "
            f"w{t.attend_warps} st{t.attend_stages} | out v{t.out_block_v} w{t.out_warps}")


def make_layers(cfg: ModelConfig, n_layers: int, case, device, dtype):
    """Per layer: an MLA (random weights) and its operands (fresh random queries and cache)."""
    b, t, s = case
    positions = torch.arange(s - t, s, device=device).expand(b, t).contiguous()  # the last t slots of each sequence
    layers = []
    for i in range(n_layers):
        torch.manual_seed(i)
        attn = MLA(cfg).to(device).eval()
        with torch.no_grad():
            for p in attn.parameters():
                p.normal_(0, 0.05)
        h, c, rope = attn.n_heads, cfg.kv_lora_rank, attn.rope
        q_nope = torch.randn(b, t, h, attn.nope, device=device)
        q_pe = torch.randn(b, t, h, rope, device=device)
        kv = torch.randn(b, s + 64, c + rope, device=device)[:, :s]  # a view into a longer buffer, as the cache's
        rope = RotaryEmbedding(cfg).to(device)  # its fp32 cos / sin tables, which the kernels index by position
        layers.append((attn, q_nope, q_pe, kv, causal_mask(positions, s), positions, rope))
    want = []
    with torch.no_grad():
        for attn, q_nope, q_pe, kv, visible, positions, rope in layers:
            want.append(twin(attn, q_nope, q_pe, kv, visible, positions, rope))
    cast = [(attn.to(dtype), q_nope.to(dtype), q_pe.to(dtype), kv.to(dtype), *rest) for attn, q_nope, q_pe, kv, *rest in layers]
    return cast, want


def twin(attn, q_nope, q_pe, kv, visible, positions, rope):
    """What decoding runs without the kernels: cos / sin at the positions, q_pe rotated, then the absorbed
    attention in torch ops."""
    cos, sin = rope.lookup(positions)
    return absorbed_attention(attn, q_nope, apply_rope(q_pe, cos, sin), kv, visible)


def err(outs, want) -> float:
    return max(((o.double() - w.double()).abs().max() / w.double().abs().max()).item() for o, w in zip(outs, want))


def main(argv=None) -> int:
    p = kernel_bench_parser(__doc__, "tiny shapes on CPU: the twin, + the kernels if TRITON_INTERPRET=1")
    p.add_argument("--layers", type=int, default=8, help="layers of distinct weights and caches per timed graph")
    p.add_argument("--deadline", type=float, default=120, help="seconds; sweep candidates after it are skipped")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    interpret = device.type == "cpu" and triton_interpreter()
    if args.smoke:
        preset, cases, dtype, n_layers = "tiny", [(1, 1, 40), (2, 2, 40)], torch.float32, 2
    else:
        preset, cases, dtype, n_layers = "bench", CASES, torch.bfloat16, args.layers
    cfg = ModelConfig.from_preset(preset)
    sweep = SWEEP if device.type == "cuda" else ([MLATiles(block_s=16, split_s=16)] if interpret else [])
    res = kernel_bench_results(args, device, preset, layers=n_layers, cases=[list(c) for c in cases],
                               tiles={tiles_name(t): asdict(t) for t in sweep})
    log(f"device {res['device']}, {preset}, {len(cases)} cases, {n_layers} layers per graph, {len(sweep)} tile candidates")
    deadline = T0 + args.deadline
    compiled_twin = torch.compile(twin) if device.type == "cuda" else None
    for case in cases:
        key = "x".join(map(str, case))
        layers, want = make_layers(cfg, n_layers, case, device, dtype)
        row = res["runs"].setdefault(key, {})
        paths = [("torch", twin)] + ([("torch compiled", compiled_twin)] if compiled_twin else [])
        for t in sweep:
            paths.append((tiles_name(t), lambda attn, qn, qp, kv, vis, pos, rope, t=t: mla_decode(
                qn, qp, kv, pos, rope.cos_table, rope.sin_table, attn.wkv_b.weight, attn.dv, attn.softmax_scale, t)))
        for name, us, outs in timed_candidates(paths, layers, device, deadline, key, res):
            row[name] = {"us": round(us, 2), "err": err(outs, want)}
            log(f"{key:>10} {name:<70} {us:9.2f} us  err {row[name]['err']:.1e}")
        del layers
    kernels = {n for r in res["runs"].values() for n in r if n not in ("torch", "torch compiled")}
    score = {n: sum(r[n]["us"] / r["torch"]["us"] for r in res["runs"].values()) for n in kernels
             if all(n in r and r[n]["err"] < 5e-2 for r in res["runs"].values())}
    res["best"] = min(score, key=score.get, default=None)
    res["summary"] = {key: {"torch_us": r["torch"]["us"], "torch_compiled_us": r.get("torch compiled", {}).get("us"),
                            "best_us": r.get(res["best"], {}).get("us")} for key, r in res["runs"].items()}
    log(f"best tiles over all cases: {res['best']}")
    for key, s in res["summary"].items():
        log(f"{key:>10} torch {s['torch_us']} us, compiled {s['torch_compiled_us']} us, kernels {s['best_us']} us")
    write_results(res, args.out, "mla_decode_kernel", args.smoke, ("device", "date", "commit", "best", "summary", "errors"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
