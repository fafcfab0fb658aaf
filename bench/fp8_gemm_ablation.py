"""What the Gluon expert GEMMs (dsv3/fp8/gluon_gemm.py) lose to their epilogue and to their promotion, on one GPU.

    python bench/fp8_gemm_ablation.py --out DIR      # H200: ~1 min, writes fp8_gemm_ablation.json
    python bench/fp8_gemm_ablation.py --build-only   # make the variants' modules (CPU, Triton installed)

Times, at the `bench` experts' shapes (16,384 tokens x top-8 over 32 experts; w13 2048 -> 2 x 1024, w2 1024 ->
2048), the grouped Fprop (with and without the token-order row map) and Wgrad of gluon_gemm.py and of variants
made from its source (wrong results, timing bounds only):
  - nostore: the epilogue runs only under a runtime condition that never holds (so nothing is eliminated);
  - nopromo: the promotion is acc + d (no scales: a plain FP8 GEMM in the same pipeline);
  - nostore+nopromo: both.
Three interleaved repetitions per kernel (TFLOP/s); the H200's clocks sag over a job, so compare within a
repetition.  Results: bench/results/README.md, FP8 run 20."""
import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EDITS = {
    "nostore": [("    out = acc.to(C.dtype.element_ty)\n", "    if scr == 7777:\n        out = acc.to(C.dtype.element_ty)\n"),
                ],
    "nopromo": [("    return acc + d * (a_s * b_s)\n", "    return acc + d\n"),
                ("        return acc + d * a_s * b_s\n", "        return acc + d\n")],
}


def variant(name: str):
    """gluon_gemm.py with the edits of each "+"-joined variant name, imported from a temporary file."""
    src = (ROOT / "dsv3" / "fp8" / "gluon_gemm.py").read_text()
    for key in name.split("+"):
        for a, b in EDITS[key]:
            assert a in src, (name, a)
            src = src.replace(a, b)
    if "nostore" in name:  # indent the rest of _store's body under the guard
        head, rest = src.split("    if scr == 7777:\n        out = acc.to(C.dtype.element_ty)\n")
        body, tail = rest.split("\n\n\n", 1)
        body = "\n".join("    " + line if line else line for line in body.split("\n"))
        src = head + "    if scr == 7777:\n        out = acc.to(C.dtype.element_ty)\n" + body + "\n\n\n" + tail
    path = Path(tempfile.gettempdir()) / f"gg_{name.replace('+', '_')}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"gg_{name.replace('+', '_')}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--out", default=".", help="folder for fp8_gemm_ablation.json")
    p.add_argument("--build-only", action="store_true", help="only make the variants' modules (no GPU needed)")
    args = p.parse_args(argv)
    from dsv3.fp8 import gluon_gemm  # Triton with Gluon: imported past --help

    mods = {"main": gluon_gemm, **{v: variant(v) for v in ("nostore", "nopromo", "nostore+nopromo")}}
    if args.build_only:
        print({k: m.__name__ for k, m in mods.items()})
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("fp8_gemm_ablation needs a CUDA GPU")
    import triton.testing

    from bench.fp8_validation import grouped_operands

    tokens, experts, topk, dim, inter = 16384, 32, 8, 2048, 1024
    m = tokens * topk
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.bincount(torch.randint(0, experts, (m,), device="cuda", generator=g), minlength=experts)
    ends = counts.cumsum(0)
    perm = torch.randperm(m, device="cuda", generator=g)
    res = {}
    for name, (n, k) in {"w13": (2 * inter, dim), "w2": (dim, inter)}.items():
        o = grouped_operands(m, n, k, experts, "cuda")
        flop = 2 * m * n * k
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        wout = torch.empty(experts, n, k, device="cuda")
        runs = {}
        for tag, mod in mods.items():
            fprop = (o["xq"], o["xs"], o["wq"], o["ws"], counts, out)
            wgrad = (o["dyt"], o["dyts"], o["xqt"], o["xst"], ends, wout)
            runs[f"fprop {tag}"] = lambda mod=mod, a=fprop: mod.grouped_gemm(*a)
            runs[f"fprop map {tag}"] = lambda mod=mod, a=fprop: mod.grouped_gemm(*a, perm)
            runs[f"wgrad {tag}"] = lambda mod=mod, a=wgrad: mod.grouped_wgrad(*a)
        for rep in range(3):
            for key, fn in runs.items():
                ms = triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
                res.setdefault(name, {}).setdefault(key, []).append(round(flop / ms / 1e9, 1))
        for key, v in res[name].items():
            print(name, key, v, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp8_gemm_ablation.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
