"""The GPU benchmarks' CPU smoke modes: the scripts a scarce device run depends on must not break on CPU.
(bench/dist_throughput.py has its own: tests/distributed/test_dist_bench_smoke.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(script: str, *args: str, timeout: int = 300) -> None:
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_decode_smoke_writes_every_section(tmp_path):
    run("decode.py", "--preset", "tiny", "--smoke", "--sections", "dsv3,gemv,pair,route,mla,new,fp8,profile,prefill,mtp,hf",
        "--switch-batches", "1", "--out", str(tmp_path))
    (result,) = tmp_path.glob("decode_*_smoke.json")
    res = json.loads(result.read_text())
    assert res["errors"] == {}
    assert res["bs1_tok_s"] > 0 and res["bs1_speedup_vs_hf"] > 0 and res["prefill"]["tok_s"] > 0
    assert res["profile_bs1"]["top"] and res["profile_bs1"]["per_step"] > 0
    assert res["mtp_speedup_bs1"] is not None
    fp8 = res["dsv3_fp8_weights"]  # the tiny preset's experts (I = 64) stay BF16; its attention and MLPs go FP8
    assert set(fp8) == {"1", "4"} and all(r["tok_s"] > 0 and r["roofline_tok_s"] > res["dsv3"][b]["roofline_tok_s"]
                                          for b, r in fp8.items())
    assert set(res["mtp"]["bs1"]["bookkeeping_compiled"]) == {"speculative", "plain"}
    assert set(res["mtp"]["bs1"]["profile"]) == {"plain", "speculative"}  # CUDA only: "skipped" here
    # each switch section flips its default; on a CPU the kernels' rules fall back to the torch paths
    for key in ("dsv3_triton_gemv_off", "dsv3_pair_gemv_off", "dsv3_route_kernel_off", "dsv3_mla_kernel_off", "dsv3_new_kernels_flipped"):
        assert res[key]["1"]["tok_s"] > 0 and set(res[key]) == {"1"}, key  # --switch-batches 1


@pytest.mark.slow
def test_fp8_validation_smoke_seeds_and_merge(tmp_path):
    smoke = ("--smoke", "--steps", "10")  # the merge logic needs no more; bf16 matmuls are slow on CPUs
    run("fp8_validation.py", *smoke, "--seeds", "0,1", "--out", str(tmp_path / "a"))
    run("fp8_validation.py", *smoke, "--seed", "2", "--out", str(tmp_path / "b"))
    run("fp8_validation.py", *smoke, "--seed", "2", "--arms", "bf16_round", "--out", str(tmp_path / "c"))  # seed 2's control, apart
    run("fp8_validation.py", *smoke, "--seed", "0", "--arms", "fp8,fp8_round", "--deterministic", "--out", str(tmp_path / "d"))
    (det,) = (tmp_path / "d").glob("fp8_*.json")
    det = json.loads(det.read_text())
    assert det["steps"] == 10 and det["preset"] == "tiny"  # flags beside --smoke win over its settings
    assert det["deterministic"] and set(det["runs_by_seed"]["0"]) == {"fp8", "fp8_round"}
    assert det["runs_by_seed"]["0"]["fp8"]["loss"] != det["runs_by_seed"]["0"]["fp8_round"]["loss"]
    det_file = (tmp_path / "d").rename(tmp_path / "deterministic_apart")  # another protocol: not merged below
    runs = sorted(f for f in tmp_path.glob("*/fp8_*.json") if det_file not in f.parents)
    run("fp8_validation.py", "--merge", *map(str, runs), "--out", str(tmp_path / "m"))
    (merged,) = (tmp_path / "m").glob("fp8_*.json")
    res = json.loads(merged.read_text())
    r = subprocess.run([sys.executable, str(BENCH / "fp8_validation.py"), "--merge", str(runs[0]),
                        *map(str, det_file.glob("fp8_*.json")), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode != 0 and "only runs of one config combine" in r.stderr
    assert set(res["runs_by_seed"]["2"]) == {"fp8", "bf16", "bf16_round"} and res["control_bf16_round"]["seeds"] == [2]
    assert res["seeds"] == [0, 1, 2] and set(res["per_seed"]) == {"0", "1", "2"}
    assert 0 <= res["max_rel_loss_err"] < 0.05 and set(res["bf16_seed_to_seed"]) == {"0-1", "1-2"}
    assert set(res["seed_bias"]["fp8"]["per_seed"]) == {"0", "1", "2"} and res["seed_bias"]["fp8"]["se"] is not None
    assert list((tmp_path / "m").glob("fp8_*_loss.png"))


def test_fp8_grad_error_smoke(tmp_path):
    """The gradient comparison runs end to end: BF16 stays near fp32 (its rounding only), FP8 further, and a
    --keep variant is measured beside them."""
    run("fp8_grad_error.py", "--preset", "tiny", "--batch", "2", "--seq", "64", "--warm", "2", "--probes", "1",
        "--keep", "layers.0.attn", "--sensitivity", "--data-bytes", str(2 << 20), "--out", str(tmp_path))
    (result,) = tmp_path.glob("fp8_grad_error_*.json")
    probe = json.loads(result.read_text())["probes"][0]
    arms, sens = probe["arms"], probe["sensitivity"]
    assert 0 < sens["q_a_rel_err"] < 0.2 and all(0 < sens[k]["embed_rel_err"] for k in (
        "fp8 values", "fp8 errors shuffled over tokens", "isotropic noise, same norm"))
    assert set(arms) == {"bf16", "fp8", "fp8 keep layers.0.attn"}
    assert arms["bf16"]["rel_err"] < arms["fp8"]["rel_err"] < 0.5 and arms["bf16"]["cos"] > 0.99


@pytest.mark.slow
def test_fp8_validation_trains_on_a_given_corpus(tmp_path):
    """--data: the runs read the given folder (recorded as data_source), not the built-in corpus."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 200)
    run("fp8_validation.py", "--smoke", "--steps", "5", "--data", str(corpus), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"))
    (result,) = (tmp_path / "out").glob("fp8_*.json")
    res = json.loads(result.read_text())
    assert res["data_source"] == str(corpus) and res["data"].startswith(str(corpus)) and res["errors"] == {}


def test_fp8_seed_bias_of_the_committed_validation():
    """The signed per-seed gap on the H200 run of 2026-12-01 (bench/results/fp8_2026-12-01.json), as its
    README section quotes it: FP8 +1.82 / +0.50 / -1.40 %, mean +0.31 %, standard error 0.94 %."""
    sys.path.insert(0, str(BENCH))
    try:
        import fp8_validation
    finally:
        sys.path.remove(str(BENCH))
    runs = json.loads((BENCH / "results" / "fp8_2026-12-01.json").read_text())["runs_by_seed"]
    bias = fp8_validation.seed_bias(runs, sorted(runs, key=int))
    fp8, control = bias["fp8"], bias["control"]
    assert [round(100 * fp8["per_seed"][s], 2) for s in "012"] == [1.82, 0.50, -1.40]
    assert round(100 * fp8["mean"], 2) == 0.31 and round(100 * fp8["se"], 2) == 0.94
    assert round(100 * control["mean"], 2) == 0.83


def test_loss_curves_recomputes_run24_from_the_committed_runs(tmp_path):
    """bench/loss_curves.py on the H200 runs of 2026-12-03 at 8 x 2048 (bench/results/fp8_2026-12-03_run24_*), as
    their README section quotes them: BF16 against itself 1.45 %, FP8 against BF16 3.46 %, FP8 against itself 9.77 %."""
    pre = BENCH / "results" / "fp8_2026-12-03_run24_bench_seed0"
    run("loss_curves.py", f"bf16_a={pre}_a.json:bf16", f"bf16_b={pre}_bf16_b.json:bf16", f"fp8_a={pre}_a.json:fp8",
        f"fp8_b={pre}_fp8_b.json:fp8", "--ref", "bf16_a,bf16_b", "--name", "r", "--out", str(tmp_path))
    res = json.loads((tmp_path / "r.json").read_text())
    pairs = {k: (v["max_rel_loss_err"], v["signed_mean_rel_loss_err"]) for k, v in res["pairs_pct"].items()}
    assert [round(x, 2) for x in pairs["bf16_b vs bf16_a"]] == [1.45, -0.40]
    assert [round(x, 2) for x in pairs["fp8_a vs bf16_a"]] == [3.46, -1.88]
    assert round(pairs["fp8_b vs fp8_a"][0], 2) == 9.77 and (tmp_path / "r.png").exists()
    r = subprocess.run([sys.executable, str(BENCH / "loss_curves.py"), f"x={pre}_a.json:bf16_round", "--ref", "x",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "no arm 'bf16_round'" in r.stderr


def test_loss_curves_recomputes_run25_from_the_committed_runs(tmp_path):
    """The run-25 pairs on a corpus that 1,000 steps do not repeat (bench/results/fp8_2026-12-03_run25_*), as the
    README quotes them: BF16 against itself 5.16 %, FP8 against itself 2.59 %, FP8 against BF16 2.06 %."""
    pre = BENCH / "results" / "fp8_2026-12-03_run25_corpus_pair"
    run("loss_curves.py", f"bf16_a={pre}_a.json:bf16", f"fp8_a={pre}_a.json:fp8", f"bf16_b={pre}_b.json:bf16",
        f"fp8_b={pre}_b.json:fp8", "--ref", "bf16_a,bf16_b", "--name", "r", "--out", str(tmp_path))
    pairs = {k: v["max_rel_loss_err"] for k, v in json.loads((tmp_path / "r.json").read_text())["pairs_pct"].items()}
    assert [round(pairs[k], 2) for k in ("bf16_b vs bf16_a", "fp8_b vs fp8_a", "fp8_a vs bf16_a", "fp8_b vs bf16_b")] \
        == [5.16, 2.59, 2.06, 3.58]


def test_loss_curves_recomputes_run26_deterministic_repeats(tmp_path):
    """Run 26 (bench/results/fp8_2026-12-03_run26_deterministic_*): BF16 twice under --deterministic.  With
    attention on cuDNN (300 steps) the repeats part by 1.22 %; pinned to SDPA's memory-efficient kernel (200
    steps) every step's loss is bit-equal."""
    pre = BENCH / "results" / "fp8_2026-12-03_run26_deterministic"
    for kind, steps, want in (("_cudnn", 300, 1.22), ("", 200, 0.0)):
        run("loss_curves.py", f"a={pre}{kind}_a.json:bf16", f"b={pre}{kind}_b.json:bf16", "--ref", "a", "--name", "r",
            "--out", str(tmp_path))
        assert round(json.loads((tmp_path / "r.json").read_text())["pairs_pct"]["b vs a"]["max_rel_loss_err"], 2) == want
        a, b = (json.loads(Path(f"{pre}{kind}_{x}.json").read_text())["runs_by_seed"]["0"]["bf16"]["loss"] for x in "ab")
        assert len(a) == steps and (a == b) == (want == 0.0)


def test_loss_curves_recomputes_run27_fp8_against_bf16(tmp_path):
    """Run 27 (bench/results/fp8_2026-12-04_run27_lr2.2e-4_deterministic.json): 1,000 deterministic steps at the
    bench batch and lr 2.2e-4.  FP8 against BF16 1.32 %, the BF16-rounded-init control 1.44 %."""
    f = BENCH / "results" / "fp8_2026-12-04_run27_lr2.2e-4_deterministic.json"
    run("loss_curves.py", f"a={f}:bf16", f"f={f}:fp8", f"r={f}:bf16_round", "--ref", "a", "--name", "r",
        "--out", str(tmp_path))
    pairs = json.loads((tmp_path / "r.json").read_text())["pairs_pct"]
    assert tuple(round(pairs[k]["max_rel_loss_err"], 2) for k in ("f vs a", "r vs a")) == (1.32, 1.44)
    assert round(100 * json.loads(f.read_text())["max_rel_loss_err"], 2) == 1.32
    # the FP8 arm repeated twice at 200 steps: bit-equal, and equal to the 1,000-step run until their LR decays part
    a, b = (json.loads((BENCH / "results" / f"fp8_2026-12-04_run27_fp8_repeat_{x}.json").read_text())
            ["runs_by_seed"]["0"]["fp8"]["loss"] for x in "ab")
    long = json.loads(f.read_text())["runs_by_seed"]["0"]["fp8"]["loss"]
    assert len(a) == 200 and a == b and a[:162] == long[:162] and a[162] != long[162]


def test_run28_recomputes_from_its_files(tmp_path):
    """Run 28 (bench/results/fp8_2026-12-04_run28_*): seed 1 of run 27's FP8/BF16 pair, joined with seed 0 by
    --merge (run 27's merged file wrote data_source None: the merge reads its data line): 1.32 % and 1.33 % apart
    per seed, 0.73 % on the seed-mean curves.  With the balancing biases frozen (gamma 0), seed 0: FP8 2.53 %,
    the control 2.00 %."""
    res_dir = BENCH / "results"
    files = [res_dir / "fp8_2026-12-04_run27_lr2.2e-4_deterministic.json",
             *(res_dir / f"fp8_2026-12-04_run28_seed1_{arm}.json" for arm in ("fp8", "bf16"))]
    run("fp8_validation.py", "--merge", *map(str, files), "--out", str(tmp_path))
    (merged,) = tmp_path.glob("fp8_*.json")
    res = json.loads(merged.read_text())
    committed = json.loads((res_dir / "fp8_2026-12-04_run28_seeds0-1_deterministic.json").read_text())
    assert round(100 * res["max_rel_loss_err"], 2) == round(100 * committed["max_rel_loss_err"], 2) == 0.73
    assert [round(100 * res["per_seed"][s]["max_rel_loss_err"], 2) for s in "01"] == [1.32, 1.33]
    assert res["data_source"].endswith("site-packages/transformers") and res["bias_update_rate"] == 1e-3
    f = res_dir / "fp8_2026-12-04_run28_gamma0_deterministic.json"
    run("loss_curves.py", f"a={f}:bf16", f"f={f}:fp8", f"r={f}:bf16_round", "--ref", "a", "--name", "g",
        "--out", str(tmp_path))
    pairs = json.loads((tmp_path / "g.json").read_text())["pairs_pct"]
    assert tuple(round(pairs[k]["max_rel_loss_err"], 2) for k in ("f vs a", "r vs a")) == (2.53, 2.00)
    assert json.loads(f.read_text())["bias_update_rate"] == 0.0


def test_loss_curves_recomputes_the_cpu_lr_sensitivity_runs(tmp_path):
    """bench/results/fp8_2026-12-03_cpu_tiny_lr*.json: the `tiny` preset on the CPU (deterministic), 400 steps of
    8 x 256.  BF16 against its BF16-rounded init: 1.60 % apart at lr 8e-4, 0.29 % at 2e-4; FP8 against BF16: 1.75 %
    and 0.19 %."""
    for lr, want in (("8e-4", (1.60, 1.75)), ("2e-4", (0.29, 0.19))):
        f = BENCH / "results" / f"fp8_2026-12-03_cpu_tiny_lr{lr}"
        run("loss_curves.py", f"a={f}.json:bf16", f"r={f}.json:bf16_round", f"f={f}_fp8.json:fp8", "--ref", "a",
            "--name", "r", "--out", str(tmp_path))
        pairs = json.loads((tmp_path / "r.json").read_text())["pairs_pct"]
        assert tuple(round(pairs[k]["max_rel_loss_err"], 2) for k in ("r vs a", "f vs a")) == want


def test_train_throughput_smoke(tmp_path):
    run("train_throughput.py", "--smoke", "--out", str(tmp_path))
    (result,) = tmp_path.glob("train_*_smoke.json")
    res = json.loads(result.read_text())
    assert res["errors"] == {} and res["dsv3_tok_s"] > 0 and res["hf_tok_s"] > 0 and res["speedup_vs_hf"] > 0


def test_gemv_fp8_kernel_smoke(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the FP8 layers' path only: what CI runs
    run("gemv_fp8_kernel.py", "--smoke", "--out", str(tmp_path))
    (result,) = tmp_path.glob("gemv_fp8_kernel_*_smoke.json")
    res = json.loads(result.read_text())
    assert res["errors"] == {} and all(res["step"][m]["layer_us"] > 0 for m in ("1", "2"))
    assert set(res["linears"]["head"]["1"]) == {"FP8InferenceLinear"} and res["experts"]["1"]["experts_read"] > 0


def test_moe_small_kernel_smoke(tmp_path):
    run("moe_small_kernel.py", "--smoke", "--out", str(tmp_path))
    (result,) = tmp_path.glob("moe_small_kernel_*_smoke.json")
    res = json.loads(result.read_text())
    assert res["errors"] == {} and set(res["summary"]) == {"1", "2"}
    assert all(s["grouped_us"] > 0 and s["small_us"] > 0 for s in res["summary"].values())


def test_gemv_kernel_smoke(tmp_path):
    run("gemv_kernel.py", "--smoke", "--out", str(tmp_path))
    (result,) = tmp_path.glob("gemv_kernel_*_smoke.json")
    res = json.loads(result.read_text())
    assert res["errors"] == {} and set(res["step"]) == {"1", "2"}
    assert all(s["all"]["linear_us"] > 0 for s in res["step"].values())
    assert set(res["runs"]) == set(res["step_mix"]) and res["step_mix"]["head"] == 1


def test_fp8_quant_kernel_smoke(tmp_path):
    run("fp8_quant_kernel.py", "--smoke", "--out", str(tmp_path))
    (result,) = tmp_path.glob("fp8_quant_kernel_*_smoke.json")
    res = json.loads(result.read_text())
    assert res["shapes"] and set(res["vs_division"]) == set(res["shapes"])


def test_mla_decode_kernel_smoke(tmp_path):
    run("mla_decode_kernel.py", "--smoke", "--out", str(tmp_path))
    (result,) = tmp_path.glob("mla_decode_kernel_*_smoke.json")
    res = json.loads(result.read_text())
    assert res["errors"] == {} and set(res["summary"]) == {"1x1x40", "2x2x40"}
    assert all(s["torch_us"] > 0 for s in res["summary"].values())


def test_route_kernel_smoke(tmp_path):
    run("route_kernel.py", "--smoke", "--out", str(tmp_path))
    (result,) = tmp_path.glob("route_kernel_*_smoke.json")
    res = json.loads(result.read_text())
    assert res["errors"] == {} and set(res["summary"]) == {"1", "3"}
    assert all(s["torch_us"] > 0 for s in res["summary"].values())


def test_timeline_stats_splits_kernels_gaps_and_host_time():
    sys.path.insert(0, str(BENCH.parent))
    from bench.decode import timeline_stats

    # two steps of three kernels; 1-2 us gaps inside a step, 100 us between steps; one overlapping pair
    step = [(0, 10), (11, 20), (22, 30)]
    kernels = step + [(s + 130, e + 130) for s, e in step] + [(135, 138)]
    r = timeline_stats(kernels, steps=2)
    assert r["kernel_us_per_step"] == 27.0 and r["gap_us_per_step"] == 3.0 and r["median_gap_us"] == 2.0
    assert r["between_steps_us"] == 100.0 and r["kernels_per_step"] == 3.5 and r["span_us_per_step"] == 80.0
    # named kernels, every gap counted (a training step's profile): the longest first, with its neighbours
    named = [(s, e, f"k{i}") for i, (s, e) in enumerate(sorted(kernels))]
    r = timeline_stats(named, steps=2, step_gap_us=float("inf"), top=2)
    assert r["gap_us_per_step"] == 53.0 and r["longest_gaps"] == [[100.0, "k2", "k3"], [2.0, "k1", "k2"]]


def test_fp8_gemm_ab_builds_its_variants(tmp_path):
    """bench/fp8_gemm_ab.py edits gluon_gemm.py's source into its ablation variants: the edits must still
    apply to today's kernel (where Triton with Gluon is installed; --help everywhere)."""
    run("fp8_gemm_ab.py", "--help")
    pytest.importorskip("triton.experimental.gluon")
    ref = tmp_path / "ref_gluon_gemm.py"
    ref.write_text((BENCH.parent / "dsv3" / "fp8" / "gluon_gemm.py").read_text())
    run("fp8_gemm_ab.py", "--ablate", "--against", str(ref), "--build-only")


def test_fp8_gemm_ab_dense_shapes_are_the_bench_models_fp8_linears():
    """bench/fp8_gemm_ab.py --dense times the dense FP8 Linears of a bench step: the (N, K) shapes and calls
    per step it lists are exactly those of the FP8 Linears convert_to_fp8 would make of a bench model."""
    sys.path.insert(0, str(BENCH.parent))
    import torch
    from torch import nn

    from bench.fp8_gemm_ab import dense_shapes
    from dsv3 import ModelConfig, Transformer
    from dsv3.fp8.convert import fp8_modules

    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset("bench"))
    linears: dict[tuple[int, int], int] = {}
    for m in fp8_modules(model).values():
        if isinstance(m, nn.Linear):
            linears[(m.out_features, m.in_features)] = linears.get((m.out_features, m.in_features), 0) + 1
    listed: dict[tuple[int, int], int] = {}
    for n, k, calls in dense_shapes(16384).values():
        listed[(n, k)] = listed.get((n, k), 0) + calls
    assert listed == linears
