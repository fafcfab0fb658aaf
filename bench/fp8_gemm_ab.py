"""A/B timing of the Gluon expert GEMMs (dsv3/fp8/gluon_gemm.py) at the `bench` experts' shapes, on one GPU.

    python bench/fp8_gemm_ab.py --ablate --out DIR            # what the epilogue and the promotion cost
    git show main:dsv3/fp8/gluon_gemm.py > ab_main.py         # in the repository root: it travels to the GPU
    git show my-branch:dsv3/fp8/gluon_gemm.py > ab_branch.py
    python bench/fp8_gemm_ab.py --against ab_main.py ab_branch.py --stress 300 --out DIR
    python bench/fp8_gemm_ab.py --ablate --build-only         # make the variants' modules (CPU, Triton installed)

Times the grouped Fprop (with and without the token-order row map) and Wgrad at 16,384 tokens x top-8 over 32
experts (w13: 2048 -> 2 x 1024, w2: 1024 -> 2048), three interleaved repetitions per kernel (TFLOP/s; the
H200's clocks sag over a job, so compare within a repetition), for the working tree's gluon_gemm.py ("tree") and:
  --against FILE ...  other versions of gluon_gemm.py (named by their file stems); their outputs must equal
                  the Triton kernels' as the tree's do;
  --ablate        variants made from the tree's source, whose results are wrong (timing bounds only):
                  nostore (the epilogue runs only under a runtime condition that never holds, so nothing is
                  eliminated), nopromo (the promotion is acc + d: no scales), nostore+nopromo;
  --stress N      N back-to-back calls of each exact kernel on NaN-filled outputs, each compared with the
                  Triton kernels' result (counts the calls with any wrong element: races show here);
  --swiglu        also the experts' w2 Dgrad (da [M, 1024] from dy [M, 2048]) followed by SwiGLU's backward, as
                  FP8RoutedFn's backward runs it: the tree's GEMM storing da, then reference.swiglu_backward
                  compiled by Inductor (as in the training step), against the same GEMM with SwiGLU's
                  backward in its epilogue (kernels.SWIGLU_BWD_GLUON); microseconds per call, and how many
                  BF16 elements of dh differ (by at most one step: sigmoid's rounding).
  --dense         also every dense FP8 Linear of a bench step (attention projections, the shared expert, the
                  dense FFN; 16,384 tokens): its Fprop/Dgrad and Wgrad through cuBLAS (ops.gemm, `cublas`,
                  as the step runs them) against the tree's Gluon kernels as one group (G = 1);
                  microseconds per call, per-step totals (each shape times its calls), and the relative
                  difference of the two results (different accumulation orders: not bytes).  Then each
                  Fprop at decode's 1 and 8 rows, where cuBLAS takes no call (M % 16): kernels.gemm with
                  DENSE_GLUON off (_gemm_kernel) and on.
Writes fp8_gemm_ab.json into --out.  Results: bench/results/README.md, FP8 runs 20-21."""
import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STORE_HEAD = "    out = acc.to(C.dtype.element_ty)\n"
GUARD = "    if scr == 7777:\n"  # a runtime value no caller passes as the store's row stride
EDITS = {"nopromo": [("    return acc + d * (a_s * b_s)\n", "    return acc + d\n"),
                     ("        return acc + d * a_s * b_s\n", "        return acc + d\n")]}


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def variant(name: str):
    """The tree's gluon_gemm.py with the edits of each "+"-joined variant name, imported from a temporary file."""
    src = (ROOT / "dsv3" / "fp8" / "gluon_gemm.py").read_text()
    for key in name.split("+"):
        if key == "nostore":  # _store's body from its first statement on, indented under GUARD
            head, rest = src.split(STORE_HEAD)
            body, tail = rest.split("\n\n\n", 1)
            body = "\n".join("    " + line if line else line for line in (STORE_HEAD + body).split("\n"))
            src = head + GUARD + body + "\n\n\n" + tail
        for a, b in EDITS.get(key, []):
            assert a in src, (name, a)
            src = src.replace(a, b)
    tag = "gg_" + name.replace("+", "_")
    path = Path(tempfile.gettempdir()) / f"{tag}.py"
    path.write_text(src)
    return load(tag, path)


def time_swiglu_backward(m: int, experts: int, dim: int, inter: int, counts: torch.Tensor, mods: dict) -> dict:
    """The w2 Dgrad with SwiGLU's backward after it (FP8RoutedFn): unfused (the tree's GEMM storing da, then
    Inductor's kernel for reference.swiglu_backward) against fused (kernels.grouped_gemm_swiglu_backward),
    and the fused kernel of each other module in mods (--against); us per call."""
    import triton.testing

    from bench.fp8_validation import grouped_operands
    from dsv3.fp8 import gluon_gemm, kernels
    from dsv3.fp8 import reference as ref

    o = grouped_operands(m, inter, dim, experts, "cuda")  # dy's 1x128 tiles [M, dim] x w2^T's blocks [E, I, dim]
    h = (torch.randn(m, 2 * inter, device="cuda") * 3).to(torch.bfloat16)
    da = torch.empty(m, inter, device="cuda", dtype=torch.bfloat16)
    ops_ = (o["xq"], o["xs"], o["wq"], o["ws"], counts)
    swiglu_backward = torch.compile(ref.swiglu_backward, dynamic=False)
    runs = {"gemm (da only)": lambda: gluon_gemm.grouped_gemm(*ops_, da),
            "unfused": lambda: swiglu_backward(h, gluon_gemm.grouped_gemm(*ops_, da)),
            "fused": lambda: kernels.grouped_gemm_swiglu_backward(*ops_, h)}
    dh = torch.empty_like(h)
    for tag, mod in mods.items():
        if tag != "tree" and "swiglu_h" in mod.grouped_gemm.__code__.co_varnames:
            runs[f"fused {tag}"] = lambda mod=mod: mod.grouped_gemm(*ops_, dh, swiglu_h=h)
    want, got = runs["unfused"]().float(), runs["fused"]().float()
    out = {"differing_fraction": round((got != want).float().mean().item(), 6),
           "within_one_bf16_step": bool(((got - want).abs() <= want.abs() * 2 ** -7).all()), "us": {}}
    for _ in range(3):
        for key, fn in runs.items():
            out["us"].setdefault(key, []).append(round(1e3 * triton.testing.do_bench(fn, warmup=5, rep=30), 1))
    return out


def dense_shapes(tokens: int) -> dict[str, tuple[int, int, int]]:
    """The bench step's dense FP8 Linears: name -> (N, K, calls per step), MTP off."""
    from dsv3 import ModelConfig

    c = ModelConfig.from_preset("bench")
    moe, dense, layers = c.num_layers - c.first_k_dense, c.first_k_dense, c.num_layers
    shared = c.moe_intermediate_size * c.n_shared_experts
    return {"wq_a": (c.q_lora_rank, c.hidden_size, layers),
            "wkv_a": (c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size, layers),
            "wq_b": (c.num_heads * c.qk_head_dim, c.q_lora_rank, layers),
            "wkv_b": (c.num_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, layers),
            "wo": (c.hidden_size, c.num_heads * c.v_head_dim, layers),
            "shared w1, w3": (shared, c.hidden_size, 2 * moe), "shared w2": (c.hidden_size, shared, moe),
            "dense w1, w3": (c.intermediate_size, c.hidden_size, 2 * dense), "dense w2": (c.hidden_size, c.intermediate_size, dense)}


def time_dense(tokens: int) -> dict:
    """Each dense FP8 Linear's three GEMMs, cuBLAS (as the step runs them) against the tree's Gluon kernels
    with one group: Fprop [M, K] x [N, K], Dgrad [M, N] x [K, N], Wgrad over the M tokens; us per call."""
    import triton.testing

    from bench.fp8_validation import grouped_operands
    from dsv3.fp8 import gluon_gemm, ops

    counts = torch.tensor([tokens], device="cuda")
    out = {"us": {}, "rel_diff": {}, "per_step_ms": {"cublas": 0.0, "gluon": 0.0, "best of the two": 0.0}}

    def rel(a, b):
        return round(((a.float() - b.float()).norm() / b.float().norm()).item(), 7)

    for name, (n, k, calls) in dense_shapes(tokens).items():
        o = grouped_operands(tokens, n, k, 1, "cuda")
        wq, ws = o["wq"], o["ws"]  # [1, Np, Kp], [1, Np/128, Kp/128]
        wqt, wst = ops.quant_weight(o["w"], "triton")[2], ws.transpose(1, 2)  # the Dgrad's B, W^T: [1, Kp, Np]
        dyq, dys, _, _ = ops.quant_both(o["dy"], False, "triton")
        fprop_out = torch.empty(tokens, wq.shape[1], device="cuda", dtype=torch.bfloat16)
        dgrad_out = torch.empty(tokens, wqt.shape[1], device="cuda", dtype=torch.bfloat16)
        wgrad_out = torch.empty(1, o["dyt"].shape[0], o["xqt"].shape[0], device="cuda")
        gemms = {
            "fprop": (lambda: ops.gemm(o["xq"], o["xs"], wq[0], ws[0], torch.bfloat16, "cublas"),
                      lambda: gluon_gemm.grouped_gemm(o["xq"], o["xs"], wq, ws, counts, fprop_out),
                      gluon_gemm.takes(o["xq"], wq, ws, False)),
            "dgrad": (lambda: ops.gemm(dyq, dys, wqt[0], wst[0], torch.bfloat16, "cublas"),
                      lambda: gluon_gemm.grouped_gemm(dyq, dys, wqt, wst, counts, dgrad_out),
                      gluon_gemm.takes(dyq, wqt, wst, False)),
            "wgrad": (lambda: ops.gemm(o["dyt"], o["dyts"], o["xqt"], o["xst"], torch.float32, "cublas"),
                      lambda: gluon_gemm.grouped_wgrad(o["dyt"], o["dyts"], o["xqt"], o["xst"], counts, wgrad_out),
                      gluon_gemm.wgrad_takes(o["dyt"], o["xqt"], o["xst"], counts))}
        for kind, (cublas, gluon, takes) in gemms.items():
            key = f"{name} {kind}"
            us = {"cublas": 1e3 * triton.testing.do_bench(cublas, warmup=5, rep=30)}
            if takes:
                out["rel_diff"][key] = rel(gluon().reshape(-1), cublas().reshape(-1))
                us["gluon"] = 1e3 * triton.testing.do_bench(gluon, warmup=5, rep=30)
            out["us"][key] = {k: round(v, 1) for k, v in us.items()}
            out["per_step_ms"]["cublas"] += calls * us["cublas"] / 1e3
            out["per_step_ms"]["gluon"] += calls * us.get("gluon", us["cublas"]) / 1e3
            out["per_step_ms"]["best of the two"] += calls * min(us.values()) / 1e3
            print(key, out["us"][key], out["rel_diff"].get(key), flush=True)
    out["per_step_ms"] = {k: round(v, 3) for k, v in out["per_step_ms"].items()}
    out["decode_fprop_us"] = time_decode_fprop()
    return out


def time_decode_fprop() -> dict:
    """Each dense Fprop at 1 and 8 rows (decode), us per call: _gemm_kernel against the Gluon kernel."""
    import triton.testing

    from bench.fp8_validation import grouped_operands
    from dsv3.fp8 import kernels

    res = {}
    for rows in (1, 8):
        for name, (n, k, _) in dense_shapes(rows).items():
            o = grouped_operands(rows, n, k, 1, "cuda")
            args = (o["xq"], o["xs"], o["wq"][0], o["ws"][0], torch.bfloat16)
            us = {}
            for flag, label in ((False, "triton"), (True, "gluon")):
                kernels.DENSE_GLUON, kernels.DENSE_GLUON_MIN_ROWS = flag, 1
                us[label] = round(1e3 * triton.testing.do_bench(lambda: kernels.gemm(*args), warmup=5, rep=20), 1)
            res[f"{name} M={rows}"] = us
            print(f"decode {name} M={rows}", us, flush=True)
    kernels.DENSE_GLUON, kernels.DENSE_GLUON_MIN_ROWS = True, 4096
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--out", default=".", help="folder for fp8_gemm_ab.json")
    p.add_argument("--against", type=Path, nargs="+", default=[], help="other gluon_gemm.py files to time with the tree's")
    p.add_argument("--ablate", action="store_true", help="also the nostore / nopromo variants of the tree's kernels")
    p.add_argument("--stress", type=int, default=0, metavar="N", help="N checked back-to-back calls per exact kernel")
    p.add_argument("--swiglu", action="store_true", help="also the w2 Dgrad + SwiGLU backward, unfused against fused")
    p.add_argument("--dense", action="store_true", help="also the dense FP8 Linears: cuBLAS against the Gluon kernels")
    p.add_argument("--build-only", action="store_true", help="only make the modules (no GPU needed)")
    args = p.parse_args(argv)
    from dsv3.fp8 import gluon_gemm  # Triton with Gluon: imported past --help

    mods = {"tree": gluon_gemm}
    for path in args.against:
        mods[path.stem] = load(f"gg_{path.stem}", path)
    if args.ablate:
        mods.update({v: variant(v) for v in ("nostore", "nopromo", "nostore+nopromo")})
    if args.build_only:
        print({k: m.__name__ for k, m in mods.items()})
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("fp8_gemm_ab needs a CUDA GPU")
    import triton.testing

    from bench.common import git_commit
    from bench.fp8_validation import grouped_operands
    from dsv3.fp8 import kernels

    tokens, experts, topk, dim, inter = 16384, 32, 8, 2048, 1024
    m = tokens * topk
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.bincount(torch.randint(0, experts, (m,), device="cuda", generator=g), minlength=experts)
    ends = counts.cumsum(0)
    perm = torch.randperm(m, device="cuda", generator=g)
    res = {"device": torch.cuda.get_device_name(), "commit": git_commit(), "tflops": {}, "equal_to_triton": {},
           "stress_wrong_calls": {}}
    exact = ["tree"] + [path.stem for path in args.against]
    for name, (n, k) in {"w13": (2 * inter, dim), "w2": (dim, inter)}.items():
        o = grouped_operands(m, n, k, experts, "cuda")
        flop = 2 * m * n * k
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        wout = torch.empty(experts, n, k, device="cuda")
        fprop = (o["xq"], o["xs"], o["wq"], o["ws"], counts, out)
        wgrad = (o["dyt"], o["dyts"], o["xqt"], o["xst"], ends, wout)
        runs = {}
        for tag, mod in mods.items():
            runs[f"fprop {tag}"] = lambda mod=mod, a=fprop: mod.grouped_gemm(*a)
            runs[f"fprop map {tag}"] = lambda mod=mod, a=fprop: mod.grouped_gemm(*a, perm)
            runs[f"wgrad {tag}"] = lambda mod=mod, a=wgrad: mod.grouped_wgrad(*a)
        # the Triton kernels' results, for the equality and stress checks
        flags = kernels.GEMM_GLUON, kernels.WGRAD_GLUON
        kernels.GEMM_GLUON = kernels.WGRAD_GLUON = False
        want = {"fprop": kernels.grouped_gemm(*fprop[:5], torch.bfloat16),
                "fprop map": kernels.grouped_gemm(*fprop[:5], torch.bfloat16, perm),
                "wgrad": kernels.grouped_wgrad(*wgrad[:4], counts, torch.float32)}
        kernels.GEMM_GLUON, kernels.WGRAD_GLUON = flags
        for kind, ref in want.items():
            dest = wout if kind == "wgrad" else out
            for tag in exact:
                dest.fill_(float("nan"))
                runs[f"{kind} {tag}"]()
                res["equal_to_triton"][f"{name} {kind} {tag}"] = bool(torch.equal(dest, ref))
                if args.stress:
                    wrong = torch.zeros((), dtype=torch.int64, device="cuda")
                    for _ in range(args.stress):
                        dest.fill_(float("nan"))
                        runs[f"{kind} {tag}"]()
                        wrong += (dest != ref).any()
                    res["stress_wrong_calls"][f"{name} {kind} {tag}"] = f"{wrong.item()} of {args.stress}"
        for rep in range(3):
            for key, fn in runs.items():
                ms = triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
                res["tflops"].setdefault(name, {}).setdefault(key, []).append(round(flop / ms / 1e9, 1))
        for key, v in res["tflops"][name].items():
            print(name, key, v, flush=True)
    print("equal to the Triton kernels:", res["equal_to_triton"], "\nstress:", res["stress_wrong_calls"], flush=True)
    if args.dense:
        res["dense"] = time_dense(tokens)
        print("dense FP8 Linears:", json.dumps(res["dense"]["per_step_ms"]), flush=True)
    if args.swiglu:
        res["swiglu_backward"] = time_swiglu_backward(m, experts, dim, inter, counts,
                                                      {k: v for k, v in mods.items() if k in exact})
        print("w2 Dgrad + SwiGLU backward:", res["swiglu_backward"], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp8_gemm_ab.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
