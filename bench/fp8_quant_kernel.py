"""The FP8 activation quantiser (dsv3.fp8.kernels.quant_act) at the `bench` training step's shapes, on one GPU.

    python bench/fp8_quant_kernel.py [--out DIR] [--deadline 120]
    python bench/fp8_quant_kernel.py --smoke      # CPU, `tiny` shapes: the reference (+ the kernel if TRITON_INTERPRET=1)
    python bench/fp8_quant_kernel.py --fused      # the MoE's fused quantisers against their unfused pairs (GPU)

Why: the FP8 step's profile (bench/results/fp8_2026-12-01_profile_fp8.txt) spends 41.5 ms of 188 ms per
step in `_quant_act_kernel`, about 140 `quant_both` calls that each read a BF16 activation or gradient
once and write it twice in e4m3 (1x128 tiles, and 128x1 tiles transposed): 4 bytes per element.  A
copy moves the same 4 bytes per element, so `x.clone()` is timed beside each shape as the floor.

For every activation and gradient shape a `bench` step quantises (`step_shapes`: per layer, the
inputs of each FP8 Linear and of the two grouped expert GEMMs in forward, their output gradients in
backward) it times quant_act with both layouts under each variant of the sweep (warps per 128x128
tile; IEEE division or multiplication by the reciprocal of the scale; the Triton kernel or the Gluon
one, `gluon_quant.py`), and rows-only and cols-only at the default.  Timing: triton.testing.do_bench
(median; it flushes L2 between runs).  GB/s counts 2 bytes read and 2 written per element.  Each
variant's output is compared byte by byte with its torch twin (`reference.quant_rows/quant_cols`, or
the same maths with the reciprocal): "mismatch" is the fraction of e4m3 bytes that differ (0
expected), "vs_division" the fraction that differ from the division's.  The step mix sums every shape
times its calls per step, per variant.

--fused times, at the routed experts' shapes (tokens x top-k rows), each quantiser that FP8RoutedFn
fuses with its producer against the unfused pair it replaces (the producer compiled by Inductor, as in
the training step, then quant_act): the dispatch gather (forward), the gather times the gates
(backward), each also by the Gluon quantiser at 8 and 4 warps, and SwiGLU at 4, 8 and 16 warps (Gluon: 8
and 4).  Then the weights' 128x128 blocks (quant_weight) at three bench shapes, Triton against Gluon.
(Run 17 also timed a fused SwiGLU backward, slower than its pair and deleted; its numbers are in
fp8_quant_fused_2026-12-02_run17.json.)  Each fused output is compared with its torch twin on the first
--check-rows rows (dequantised, relative error).

Prints a table and a final JSON line; writes fp8_quant_kernel_<date>.json into --out.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import T0, git_commit, kernel_bench_parser, log, triton_interpreter, write_results  # noqa: E402
from dsv3 import ModelConfig  # noqa: E402
from dsv3.fp8 import reference as ref  # noqa: E402

# (warps, recip, gluon) in priority order (a deadline cuts from the end): the default first
SWEEP = [(4, True, False), (8, True, True), (4, True, True), (8, True, False), (16, True, False), (8, False, False),
         (4, False, False), (16, False, False)]


def step_shapes(cfg: ModelConfig, tokens: int) -> dict[str, tuple[int, int, int, str]]:
    """"MxK" -> (M, K, calls per training step, which tensors) of every quant_both a `bench` step runs
    (MTP off): the x of each FP8 Linear / grouped GEMM in forward, the dy of each in backward (K = its
    output dim).  Shapes that several tensors share are merged."""
    h, n_moe, n_dense, layers = cfg.hidden_size, cfg.num_layers - cfg.first_k_dense, cfg.first_k_dense, cfg.num_layers
    shared, inter = cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.moe_intermediate_size
    routed = tokens * cfg.num_experts_per_tok
    listed = [  # (tensor, M, K, calls)
        ("x of wq_a, wkv_a", tokens, h, 2 * layers), ("x of wq_b", tokens, cfg.q_lora_rank, layers),
        ("x of wkv_b", tokens, cfg.kv_lora_rank, layers), ("x of wo", tokens, cfg.num_heads * cfg.v_head_dim, layers),
        ("x of shared w1, w3", tokens, h, 2 * n_moe), ("x of shared w2", tokens, shared, n_moe),
        ("x of dense w1, w3", tokens, h, 2 * n_dense), ("x of dense w2", tokens, cfg.intermediate_size, n_dense),
        ("x of experts w13", routed, h, n_moe), ("x of experts w2", routed, inter, n_moe),
        ("dy of wq_a", tokens, cfg.q_lora_rank, layers),
        ("dy of wkv_a", tokens, cfg.kv_lora_rank + cfg.qk_rope_head_dim, layers),
        ("dy of wq_b", tokens, cfg.num_heads * cfg.qk_head_dim, layers),
        ("dy of wkv_b", tokens, cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), layers),
        ("dy of wo", tokens, h, layers), ("dy of shared w1, w3", tokens, shared, 2 * n_moe),
        ("dy of shared w2", tokens, h, n_moe), ("dy of dense w1, w3", tokens, cfg.intermediate_size, 2 * n_dense),
        ("dy of dense w2", tokens, h, n_dense), ("dy of experts w13", routed, 2 * inter, n_moe),
        ("dy of experts w2", routed, h, n_moe)]
    shapes: dict[str, tuple[int, int, int, str]] = {}
    for tensor, m, k, calls in listed:
        if calls:
            _, _, before, names = shapes.get(f"{m}x{k}", (m, k, 0, ""))
            shapes[f"{m}x{k}"] = (m, k, before + calls, f"{names}; {tensor}" if names else tensor)
    return shapes


def twin(x: torch.Tensor, recip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's maths in torch (fp32): q [M, Kp] (1x128 tiles) and qt [Kp, Mp] (128x1, transposed).
    recip: reference.py's (x times the scale's reciprocal); else an IEEE division per element."""
    if recip:
        return ref.quant_rows(x)[0], ref.quant_cols(x)[0]

    def divided(t: torch.Tensor) -> torch.Tensor:  # [R, C] -> e4m3, 1x128 tiles along C
        r, c = t.shape
        tiles = t.view(r, c // ref.BLOCK, ref.BLOCK)
        s = ref._scale(tiles.abs().amax(-1), False)
        return (tiles / s[..., None]).clamp(-ref.FP8_MAX, ref.FP8_MAX).to(ref.FP8_DTYPE).view(r, c)

    xf = ref._pad2(x.float())  # [Mp, Kp]
    return divided(xf)[: x.shape[0]], divided(xf.t().contiguous())


def mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.view(torch.uint8) != b.view(torch.uint8)).double().mean().item()


def main(argv=None) -> int:
    p = kernel_bench_parser(__doc__, "tiny shapes on CPU: the twins, + the kernel if TRITON_INTERPRET=1")
    p.add_argument("--tokens", type=int, default=8 * 2048, help="tokens per step (the bench step: 8 x 2048)")
    p.add_argument("--check-rows", type=int, default=16384, help="rows of each shape compared byte by byte with the twin")
    p.add_argument("--deadline", type=float, default=120, help="seconds; sweep variants after it are skipped")
    p.add_argument("--fused", action="store_true", help="time the MoE's fused quantisers instead (GPU)")
    args = p.parse_args(argv)
    if args.fused:
        return fused(args)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    interpret = device.type == "cpu" and triton_interpreter()
    preset, tokens = ("tiny", 256) if args.smoke else ("bench", args.tokens)
    cfg = ModelConfig.from_preset(preset)
    shapes = step_shapes(cfg, tokens)
    res: dict = {"date": datetime.date.today().isoformat(), "commit": args.commit or git_commit(), "smoke": args.smoke,
                 "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "preset": preset, "tokens": tokens, "shapes": {k: list(v) for k, v in shapes.items()},
                 "runs": {}, "mismatch": {}, "vs_division": {}, "skipped": []}
    log(f"device {res['device']}, {preset}, {len(shapes)} shapes, {sum(v[2] for v in shapes.values())} quant_both per step")
    if device.type != "cuda" and not interpret:
        for key, (m, k, _, _) in shapes.items():
            x = torch.randn(m, k)
            res["vs_division"][key] = mismatch(twin(x, recip=True)[0], twin(x, recip=False)[0])
        log("no GPU and no Triton interpreter: twins only; reciprocal vs division mismatch per shape: "
            + ", ".join(f"{k} {v:.1e}" for k, v in res["vs_division"].items()))
        return finish(res, args)

    from dsv3.fp8.kernels import quant_act

    def timed(fn) -> float:
        if device.type != "cuda":
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3

    deadline = T0 + args.deadline
    gen = torch.Generator(device=device).manual_seed(0)
    for key, (m, k, calls, _) in shapes.items():
        # fresh N(0, 1) with a few larger entries, so 1x128 and 128x1 scales differ
        x = torch.randn(m, k, device=device, generator=gen)
        x = (x * (1 + 8 * (torch.rand(m, k, device=device, generator=gen) < 1e-3))).to(torch.bfloat16)
        check = x[: min(args.check_rows, m) // ref.BLOCK * ref.BLOCK or m]
        row = res["runs"].setdefault(key, {})
        row["copy"] = timed(lambda: x.clone())
        for warps, recip, gluon in SWEEP if device.type == "cuda" else [(4, True, False), (8, False, False)]:
            name = f"{'gluon ' if gluon else ''}w{warps}{' recip' if recip else ''}"
            kw = dict(warps=warps, recip=recip, gluon=gluon)
            if time.time() > deadline:
                res["skipped"].append(f"{key} {name}")
                continue
            q, _, qt, _ = quant_act(check, rows=True, cols=True, **kw)
            want_q, want_qt = twin(check.cpu(), recip)
            res["mismatch"].setdefault(key, {})[name] = max(mismatch(q.cpu(), want_q), mismatch(qt.cpu(), want_qt))
            if recip and key not in res["vs_division"]:
                res["vs_division"][key] = mismatch(want_q, twin(check.cpu(), recip=False)[0])
            row[name] = timed(lambda: quant_act(x, rows=True, cols=True, **kw))
        if time.time() <= deadline:
            row["default rows only"] = timed(lambda: quant_act(x, rows=True, cols=False, gluon=False))
            row["default cols only"] = timed(lambda: quant_act(x, rows=False, cols=True, gluon=False))
        gbs = {n: 4 * m * k / (us * 1e3) for n, us in row.items()}
        log(f"{key:>14} x{calls:<3} " + "  ".join(f"{n} {us:8.1f} us {gbs[n]:5.0f} GB/s" for n, us in row.items()))
    variants = sorted({n for row in res["runs"].values() for n in row})
    res["step_ms"] = {n: round(sum(row[n] * shapes[key][2] for key, row in res["runs"].items()) / 1e3, 3)
                      for n in variants if all(n in row for row in res["runs"].values())}
    log("per step (each shape x its calls): " + ", ".join(f"{n} {ms} ms" for n, ms in res["step_ms"].items()))
    both = {n: ms for n, ms in res["step_ms"].items() if "only" not in n and n != "copy"}
    clean = {n: ms for n, ms in both.items() if all(res["mismatch"][k].get(n, 1) == 0 for k in res["mismatch"])}
    res["best"] = min(clean, key=clean.get, default=None)
    log(f"best variant with twin-exact output: {res['best']}")
    return finish(res, args)


def fused(args) -> int:
    """The fused quantisers of dsv3.fp8.experts.FP8RoutedFn against their unfused pairs (see the docstring)."""
    if not torch.cuda.is_available():
        log("--fused times GPU kernels and needs CUDA; on a CPU, tests/test_fp8_fused.py checks them under "
            "TRITON_INTERPRET=1")
        return 2
    import triton.testing

    from dsv3.fp8 import kernels

    dev = torch.device("cuda")
    cfg = ModelConfig.from_preset("bench")
    n, k, d, inter = args.tokens, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    rows = n * k
    res: dict = {"date": datetime.date.today().isoformat(), "commit": args.commit or git_commit(), "torch": torch.__version__,
                 "device": torch.cuda.get_device_name(), "tokens": n, "rows": rows, "us": {}, "rel_err": {}}
    g = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(n, d, device=dev, generator=g).to(bf)
    src = torch.randperm(rows, device=dev, generator=g) // k
    gate = torch.rand(rows, device=dev, generator=g)
    h = (torch.randn(rows, 2 * inter, device=dev, generator=g) * 2).to(bf)

    def timed(fn) -> float:
        return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3

    def quant(t):
        return kernels.quant_act(t, rows=True, cols=True, gluon=False)

    gather_w = torch.compile(lambda t, i, w: (t.index_select(0, i).float() * w[:, None]).to(bf))
    swiglu = torch.compile(lambda t: ref.swiglu(t))
    cases = {  # name -> (unfused, {variant: fused}, twin of the fused operand)
        "gather": (lambda: quant(x.index_select(0, src)),
                   {"fused": lambda: kernels.quant_act(x, True, True, src=src, gluon=False),
                    **{f"gluon w{w}": (lambda w=w: kernels.quant_act(x, True, True, src=src, gluon=True, warps=w))
                       for w in (8, 4)}},
                   lambda r: ref.gathered(x, src[:r])),
        "gather x gate": (lambda: quant(gather_w(x, src, gate)),
                          {"fused": lambda: kernels.quant_act(x, True, True, src=src, row_mul=gate, gluon=False),
                           **{f"gluon w{w}": (lambda w=w: kernels.quant_act(x, True, True, src=src, row_mul=gate,
                                                                            gluon=True, warps=w)) for w in (8, 4)}},
                          lambda r: ref.gathered(x, src[:r], gate[:r])),
        "swiglu": (lambda: quant(swiglu(h)),
                   {**{f"w{w}": (lambda w=w: kernels.swiglu_quant(h, warps=w, gluon=False)) for w in (4, 8, 16)},
                    **{f"gluon w{w}": (lambda w=w: kernels.swiglu_quant(h, warps=w, gluon=True)) for w in (8, 4)}},
                   lambda r: ref.swiglu(h[:r])),
    }
    r = min(args.check_rows, rows)
    for name, (unfused, variants, twin_of) in cases.items():
        times = {"unfused": timed(unfused)}
        want = ref.dequant_rows(*ref.quant_rows(twin_of(r)))
        for v, fn in variants.items():
            times[v] = timed(fn)
            q, s, _, _ = fn()
            got = ref.dequant_rows(q[:r], s[:r])
            res["rel_err"][f"{name} {v}"] = ((got - want).norm() / want.norm()).item()
        res["us"][name] = times
        log(f"{name:>16}: " + "  ".join(f"{v} {us:7.1f} us" for v, us in times.items())
            + "  rel err " + ", ".join(f"{res['rel_err'][f'{name} {v}']:.1e}" for v in variants))
    # the weights' 128x128 blocks (quant_weight, every FP8 weight once per step): the Triton and the Gluon kernel
    res["weights_us"], res["weights_equal"] = {}, {}
    for name, shape in {"w13 experts": (cfg.n_routed_experts, 2 * inter, d), "w2 experts": (cfg.n_routed_experts, d, inter),
                        "wq_b": (cfg.num_heads * cfg.qk_head_dim, cfg.q_lora_rank)}.items():
        w = torch.randn(*shape, device=dev, generator=g) * 0.02
        res["weights_us"][name] = {v: timed(lambda v=v: kernels.quant_weight(w, gluon=v == "gluon")) for v in ("triton", "gluon")}
        res["weights_equal"][name] = all(
            torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                        b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
            for a, b in zip(kernels.quant_weight(w, gluon=True), kernels.quant_weight(w, gluon=False)))
        log(f"{'weights ' + name:>16}: " + "  ".join(f"{v} {us:7.1f} us" for v, us in res["weights_us"][name].items())
            + f"  same bytes: {res['weights_equal'][name]}")
    layers = cfg.num_layers - cfg.first_k_dense
    res["moe_layers"] = layers
    res["saved_ms_per_step"] = round(layers * sum(t["unfused"] - min(v for kk, v in t.items() if kk != "unfused")
                                                  for t in res["us"].values()) / 1e3, 3)
    log(f"unfused - best fused, x {layers} MoE layers: {res['saved_ms_per_step']} ms per step "
        "(the unfused producers' own kernels included; the step also loses Inductor's gather copies)")
    write_results(res, args.out, "fp8_quant_fused", False, ("device", "date", "commit", "saved_ms_per_step", "rel_err"))
    return 0


def finish(res: dict, args) -> int:
    write_results(res, args.out, "fp8_quant_kernel", args.smoke, ("device", "date", "commit", "step_ms", "best", "vs_division"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
