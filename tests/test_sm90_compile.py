"""Every Triton kernel compiles for the H200 (sm_90) on any machine where Triton is installed, GPU or not:
Triton lowers to PTX and runs the ptxas it ships, so type, shape and layout errors surface here, before
scarce device time is spent (the CPU interpreter runs the maths but compiles nothing).  Each kernel is
compiled at the `bench` config's shapes with the tiles and launch options its op uses by default.
Skipped where Triton is not installed (the CPU-only CI) and under TRITON_INTERPRET=1 (kernels are then
interpreted functions, with nothing to compile)."""

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted, not compiled", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dsv3.fp8 import kernels as fp8_kernels  # noqa: E402
from dsv3.inference import gemv, latent_small, mla_decode, moe_small, route_small  # noqa: E402

H200 = GPUTarget("cuda", 90, 32)


def compile_sm90(fn, pointers: dict[str, str], constexprs: dict, floats=(), ones=(), loose=(), float_type="fp32",
                 **options):
    """fn compiled as a launch specialises it: pointers by element type and 16-byte aligned; `ones` (unit
    strides, one-row batches) are the constant 1, as Triton makes any integer argument equal to 1;
    `loose` integers carry no alignment; every other integer is a multiple of 16 (the bench shapes'
    sizes and strides); the named floats are float_type (a launch passes fp32, inductor fp64).  The specialisations matter: without them loads are
    not vectorised and the software pipeline is not built, so the kernel is not the one a GPU runs.
    -> the compiled kernel (asm and metadata)."""
    signature, attrs, values = {}, {}, dict(constexprs)
    for i, p in enumerate(fn.params):
        if p.is_constexpr or p.name in ones:
            signature[p.name] = "constexpr"
            values.setdefault(p.name, 1)
            continue
        if p.name in pointers:
            signature[p.name] = "*" + pointers[p.name]
        else:
            signature[p.name] = float_type if p.name in floats else "i32"
        if p.name not in floats and p.name not in loose:
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = {p.name for p in fn.params if p.is_constexpr} - set(values)
    assert not missing, f"constexprs not given: {missing}"
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=values, attrs=attrs), target=H200, options=options)


BF16, F32, I64, I32, FP8 = "bf16", "fp32", "i64", "i32", "fp8e4nv"
E, K, D, INTER = 32, 8, 2048, 1024  # the bench config's routed experts
gemv_tiles, slot_tiles, em_tiles, mla_tiles = gemv.GemvTiles(), moe_small.Tiles(), moe_small.ExpertMajorTiles(), mla_decode.MLATiles()

KERNELS = {
    "gemv": (gemv._small_m_linear_kernel, {"X": BF16, "W": BF16, "OUT": BF16},
             dict(BLOCK_M=16, BLOCK_N=gemv_tiles.block_n, BLOCK_K=gemv_tiles.block_k, MMA=gemv_tiles.mma, EVEN_M=False,
                  EVEN_N=True, EVEN_K=True, ROUND_X=False), (), dict(num_warps=gemv_tiles.warps, num_stages=gemv_tiles.stages)),
    "gemv float out": (gemv._small_m_linear_kernel, {"X": BF16, "W": BF16, "OUT": F32},  # the head's fp32 logits
                       dict(BLOCK_M=16, BLOCK_N=gemv_tiles.block_n, BLOCK_K=gemv_tiles.block_k, MMA=gemv_tiles.mma,
                            EVEN_M=False, EVEN_N=True, EVEN_K=True, ROUND_X=True), (),
                       dict(num_warps=gemv_tiles.warps, num_stages=gemv_tiles.stages)),
    "gemv fma split-K": (gemv._small_m_linear_kernel, {"X": BF16, "W": BF16, "OUT": F32},
                         dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=256, MMA=False, EVEN_M=True, EVEN_N=True, EVEN_K=False,
                              ROUND_X=False), (),
                         dict(num_warps=4, num_stages=3)),
    "gemv pair": (gemv._small_m_linear_pair_kernel,
                  {"X": BF16, "W1": BF16, "W2": BF16, "OUT1": BF16, "OUT2": BF16, "DELTA": BF16, "NW": BF16, "X_OUT": BF16},
                  dict(BLOCK_M=16, BLOCK_N=gemv_tiles.block_n, BLOCK_K=gemv_tiles.block_k, MMA=gemv_tiles.mma, EVEN_M=False,
                       EVEN_N1=True, EVEN_N2=True, EVEN_K=True, NORM=False, HAS_DELTA=False), ("eps",),
                  dict(num_warps=gemv_tiles.warps, num_stages=gemv_tiles.stages)),
    "gemv pair norm": (gemv._small_m_linear_pair_kernel,
                       {"X": BF16, "W1": BF16, "W2": BF16, "OUT1": BF16, "OUT2": BF16, "DELTA": BF16, "NW": BF16, "X_OUT": BF16},
                       dict(BLOCK_M=1, BLOCK_N=gemv.NORM_TILES.block_n, BLOCK_K=gemv.NORM_TILES.block_k, MMA=gemv.NORM_TILES.mma,
                            EVEN_M=True, EVEN_N1=True, EVEN_N2=True, EVEN_K=True, NORM=True, HAS_DELTA=True), ("eps",),
                       dict(num_warps=gemv.NORM_TILES.warps, num_stages=gemv.NORM_TILES.stages)),
    "route": (route_small._route_kernel, {"X": BF16, "W": BF16, "BIAS": F32, "GATES": F32, "INDICES": I64},
              dict(E=E, G=4, TOPK_GROUP=2, K=K, K_P2=K, HAS_BIAS=True, NORM=True, BLOCK_D=route_small.RouteTiles().block_d,
                   EVEN_D=True), ("scale",), dict(num_warps=route_small.RouteTiles().warps,
                                                   num_stages=route_small.RouteTiles().stages)),
    "route split partials": (route_small._route_partial_kernel, {"X": BF16, "W": BF16, "PARTS": F32},
                             dict(E=E, SPLIT=route_small.SPLIT_TILES.split, BLOCK_D=route_small.SPLIT_TILES.block_d, EVEN_D=True),
                             (), dict(num_warps=route_small.SPLIT_TILES.warps, num_stages=route_small.SPLIT_TILES.stages)),
    "route split partials norm": (route_small._route_partial_norm_kernel,
                                  {"X": BF16, "DELTA": BF16, "NW": BF16, "H": BF16, "X_OUT": BF16, "W": BF16, "PARTS": F32},
                                  dict(E=E, SPLIT=route_small.SPLIT_TILES.split, BLOCK_D=route_small.SPLIT_TILES.block_d,
                                       ROW_BLOCK=D, HAS_DELTA=True), ("eps",),
                                  dict(num_warps=route_small.SPLIT_TILES.warps, num_stages=route_small.SPLIT_TILES.stages)),
    "route split finish": (route_small._route_finish_kernel, {"PARTS": F32, "BIAS": F32, "GATES": F32, "INDICES": I64},
                           dict(E=E, G=4, TOPK_GROUP=2, K=K, K_P2=K, HAS_BIAS=True, NORM=True, SPLIT=route_small.SPLIT_TILES.split,
                                SPLIT_P2=route_small.SPLIT_TILES.split), ("scale",), dict(num_warps=route_small.SPLIT_TILES.warps)),
    "mla absorb": (mla_decode._absorb_kernel, {"QN": BF16, "W": BF16, "QL": BF16, "QP": BF16, "POS": I64, "COS": F32,
                                               "SIN": F32, "QPR": BF16},
                   dict(NOPE=128, NOPE_P2=128, C=512, BLOCK_C=mla_tiles.absorb_block_c, HALF=32, HALF_P2=32), (),
                   dict(num_warps=mla_tiles.absorb_warps)),
    "mla attend": (mla_decode._attend_kernel, {"QL": BF16, "QP": BF16, "KV": BF16, "POS": I64, "OP": F32, "MP": F32, "LP": F32},
                   dict(H=16, C=512, C_P2=512, ROPE=64, ROPE_P2=64, BLOCK_H=mla_tiles.block_h, BLOCK_S=mla_tiles.block_s,
                        SPLIT_S=mla_tiles.split_s), ("scale",),
                   dict(num_warps=mla_tiles.attend_warps, num_stages=mla_tiles.attend_stages)),
    "mla out": (mla_decode._out_kernel, {"OP": F32, "MP": F32, "LP": F32, "W": BF16, "OUT": BF16},
                dict(NOPE=128, C=512, C_P2=512, DV=128, BLOCK_V=mla_tiles.out_block_v), (), dict(num_warps=mla_tiles.out_warps)),
    "latent": (latent_small._norm_rope_write_kernel, {"QA": BF16, "KVA": BF16, "COS": F32, "SIN": F32, "QW": BF16,
                                                      "KVW": BF16, "QOUT": BF16, "KV": BF16, "POS": I64},
               dict(Q=1536, Q_P2=2048, C=512, C_P2=512, HALF=32, HALF_P2=32), ("eps_q", "eps_kv"),
               dict(num_warps=latent_small.LatentTiles().warps)),
    "experts gate/up": (moe_small._gate_up_kernel, {"X": BF16, "IDX": I64, "W13": BF16, "WS1": BF16, "WS3": BF16, "H": F32},
                        dict(D=D, I=INTER, K=K, BLOCK_I=slot_tiles.up_block_i, BLOCK_D=slot_tiles.up_block_d, EVEN_D=True,
                             EVEN_I=True), (), dict(num_warps=slot_tiles.up_warps, num_stages=slot_tiles.up_stages)),
    "experts gate/up routed": (moe_small._gate_up_routed_kernel,
                               {"X": BF16, "PARTS": F32, "BIAS": F32, "IDX": I64, "GATES": F32, "W13": BF16, "WS1": BF16,
                                "WS3": BF16, "H": F32},
                               dict(D=D, I=INTER, K=K, E=E, G=4, TOPK_GROUP=2, K_P2=K, HAS_BIAS=True, NORM=True,
                                    SPLIT=route_small.SPLIT_TILES.split, SPLIT_P2=route_small.SPLIT_TILES.split,
                                    BLOCK_I=slot_tiles.up_block_i, BLOCK_D=slot_tiles.up_block_d, EVEN_D=True, EVEN_I=True),
                               ("scale",), dict(num_warps=slot_tiles.up_warps, num_stages=slot_tiles.up_stages)),
    "experts down": (moe_small._down_kernel, {"H": F32, "IDX": I64, "GATES": F32, "W2": BF16, "WS2": BF16, "OUT": BF16},
                     dict(D=D, I=INTER, K=K, SLOTS=K + 1, BLOCK_D=slot_tiles.down_block_d, BLOCK_I=slot_tiles.down_block_i,
                          EVEN_D=True, EVEN_I=True), (), dict(num_warps=slot_tiles.down_warps, num_stages=slot_tiles.down_stages)),
    "expert-major gate/up": (moe_small._em_gate_up_kernel, {"X": BF16, "ORDER": I64, "COUNTS": I32, "STARTS": I32, "W13": BF16,
                                                            "WS1": BF16, "WS3": BF16, "H": BF16},
                             dict(E=E, D=D, I=INTER, K=K, BLOCK_M=em_tiles.block_m, BLOCK_I=em_tiles.block_i,
                                  BLOCK_D=em_tiles.block_d, EVEN_D=True, EVEN_I=True), (),
                             dict(num_warps=em_tiles.up_warps, num_stages=em_tiles.up_stages)),
    "expert-major down": (moe_small._em_down_kernel, {"H": BF16, "ORDER": I64, "COUNTS": I32, "STARTS": I32, "GATES": F32,
                                                      "W2": BF16, "WS2": BF16, "P": F32},
                          dict(E=E, D=D, I=INTER, BLOCK_M=em_tiles.block_m, BLOCK_D=em_tiles.block_d_out,
                               BLOCK_I=em_tiles.block_i_in, EVEN_D=True, EVEN_I=True), (),
                          dict(num_warps=em_tiles.down_warps, num_stages=em_tiles.down_stages)),
    "fp8 quant act": (fp8_kernels._quant_act_kernel, {"X": BF16, "Q": FP8, "S": F32, "QT": FP8, "ST": F32},
                      dict(ROWS=True, COLS=True, POW2=False, B=128, EVEN_M=True, EVEN_K=True, RECIP=True, GATHER=False,
                           ROW_MUL=False, SWIGLU=False), (), dict(num_warps=4)),
    # the MoE's fused quantisers (FP8RoutedFn): dispatch gather (x gates in backward), SwiGLU
    "fp8 quant gathered": (fp8_kernels._quant_act_kernel, {"X": BF16, "IDX": I64, "MUL": F32, "Q": FP8, "S": F32, "QT": FP8,
                                                           "ST": F32},
                           dict(ROWS=True, COLS=True, POW2=True, B=128, EVEN_M=True, EVEN_K=True, RECIP=True, GATHER=True,
                                ROW_MUL=True, SWIGLU=False), (), dict(num_warps=4)),
    "fp8 swiglu quant": (fp8_kernels._quant_act_kernel, {"X": BF16, "Q": FP8, "S": F32, "QT": FP8, "ST": F32},
                         dict(ROWS=True, COLS=True, POW2=True, B=128, EVEN_M=True, EVEN_K=True, RECIP=True, GATHER=False,
                              ROW_MUL=False, SWIGLU=True), (), dict(num_warps=fp8_kernels.SWIGLU_WARPS)),
    "fp8 grouped gemm": (fp8_kernels._gemm_kernel, {"A": FP8, "AS": F32, "Bw": FP8, "BS": F32, "C": BF16, "COUNTS": I64,
                                                    "ROWMAP": I64},
                         dict(G=E, G_P2=E, GROUPED=True, B_ROW_SCALES=False, EVEN_N=True, MAP_ROWS=True,
                              **{k: v for k, v in fp8_kernels.GEMM_CFG.items() if not k.startswith("num_")}), (),
                         {k: v for k, v in fp8_kernels.GEMM_CFG.items() if k.startswith("num_")}),
    "fp8 grouped wgrad": (fp8_kernels._wgrad_kernel, {"AT": FP8, "ATS": F32, "BT": FP8, "BTS": F32, "C": F32, "ENDS": I64},
                          dict(GROUPED=True, **{k: v for k, v in fp8_kernels.WGRAD_CFG.items() if not k.startswith("num_")}), (),
                          {k: v for k, v in fp8_kernels.WGRAD_CFG.items() if k.startswith("num_")}),
}
KERNELS["latent layer 1"] = KERNELS["latent"]
# the tiny test config's shapes, which the GPU decode tests run: padded heads, rope and latent; 2 experts per group
KERNELS |= {
    "route, tiny": (route_small._route_kernel, KERNELS["route"][1],
                    dict(KERNELS["route"][2], E=8, G=4, TOPK_GROUP=2, K=3, K_P2=4, BLOCK_D=64), ("scale",), dict(num_warps=8)),
    "mla attend, tiny": (mla_decode._attend_kernel, KERNELS["mla attend"][1],
                         dict(KERNELS["mla attend"][2], H=4, C=32, C_P2=32, ROPE=8, ROPE_P2=16), ("scale",),
                         KERNELS["mla attend"][4]),
    "latent, tiny": (latent_small._norm_rope_write_kernel, KERNELS["latent"][1],
                     dict(Q=48, Q_P2=64, C=32, C_P2=32, HALF=4, HALF_P2=4), ("eps_q", "eps_kv"), KERNELS["latent"][4]),
    "mla out, tiny": (mla_decode._out_kernel, KERNELS["mla out"][1], dict(NOPE=16, C=32, C_P2=32, DV=16, BLOCK_V=16), (),
                      KERNELS["mla out"][4]),
}

# the decode kernels as a batch-1 decode on sm90 launches them, with PDL: waiting on the kernel before
# (griddepcontrol, sm90+)
KERNELS = {name: (fn, pointers, dict(constexprs, PDL=True) if "PDL" in fn.arg_names else constexprs, floats, options)
           for name, (fn, pointers, constexprs, floats, options) in KERNELS.items()}


# (ones, loose) per kernel, as its launch at batch 1 of the bench config specialises it (see compile_sm90):
# unit strides and one-row counts; sizes that need not be multiples of 16
SPECIALISED = {
    "gemv": (("M",), ()), "gemv float out": (("M",), ()), "gemv fma split-K": (("M",), ()), "gemv pair": (("M",), ()), "gemv pair norm": (("M",), ()),
    "mla absorb": (("R", "spos_r"), ()), "mla attend": (("b_of_row_div", "spos_r"), ("S",)),
    "mla out": (("n_split",), ()),
    # one row at its own position (positions [1, 1]: both strides 1); the layer index and the cache's length
    # are any integers; "latent layer 1" is the layer whose index Triton makes the constant 1
    "latent": (("T", "spos_b", "spos_t"), ("layer", "S")), "latent layer 1": (("T", "spos_b", "spos_t", "layer"), ("S",)),
    "experts gate/up": ((), ("NK",)), "experts gate/up routed": ((), ("NK",)), "experts down": ((), ("NK",)),
    "expert-major gate/up": ((), ("NK",)), "expert-major down": ((), ("NK",)),
    "fp8 quant act": (("sxk", "ssm", "sstk"), ()), "fp8 quant weight": (("swk", "ssk"), ()),
    "fp8 quant gathered": (("sxk", "ssm", "sstk"), ()), "fp8 swiglu quant": (("sxk", "ssm", "sstk"), ()),
    "fp8 grouped gemm": (("sak", "sasm", "sbk", "sbsk", "scn"), ()),
    "fp8 grouped wgrad": (("sar", "sasn", "sbr", "sbsk", "sck"), ()),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_compiles_for_sm90(name):
    fn, pointers, constexprs, floats, options = KERNELS[name]
    ones, loose = SPECIALISED.get(name.split(",")[0], ((), ()))
    compiled = compile_sm90(fn, pointers, constexprs, floats, ones, loose, **options)
    assert compiled.asm["cubin"], name
    if constexprs.get("PDL"):
        ptx = compiled.asm["ptx"]
        assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" not in ptx, name
    assert compiled.metadata.shared <= 227 * 1024, f"{name}: {compiled.metadata.shared} B of shared memory (H200: 227 KB)"


@pytest.mark.parametrize("name", [n for n in KERNELS if KERNELS[n][3]])
def test_kernel_compiles_with_fp64_scalars(name):
    """Inductor hands a Python float to a user kernel as fp64 (torch 2.11); the kernels must still compile,
    with their fp32 maths intact (a loop-carried fp32 value promoted to fp64 is a compile error)."""
    fn, pointers, constexprs, floats, options = KERNELS[name]
    ones, loose = SPECIALISED.get(name.split(",")[0], ((), ()))
    assert compile_sm90(fn, pointers, constexprs, floats, ones, loose, float_type="fp64", **options).asm["cubin"], name



def ptxas_log(ptx: str) -> str:
    """ptxas -v's report (registers, spills, warnings) for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        return subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(Path(tmp) / "k.ptx"), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True).stderr


@pytest.mark.parametrize("name", ["fp8 quant act", "fp8 quant gathered", "fp8 swiglu quant"])
def test_quantiser_holds_its_tile_in_registers(name):
    """A 128x128 tile per program: at its default warps, each quantiser must not spill to local memory."""
    fn, pointers, constexprs, floats, options = KERNELS[name]
    ones, loose = SPECIALISED[name]
    log = ptxas_log(compile_sm90(fn, pointers, constexprs, floats, ones, loose, **options).asm["ptx"])
    assert "0 bytes spill stores" in log, log


def max_fmas_under_wgmma(ptx: str) -> int:
    """The longest run of fp32 FMAs issued while a wgmma group is outstanding, reading the PTX in order:
    a commit adds a group, `wgmma.wait_group N` leaves at most N."""
    outstanding = run = best = 0
    for line in ptx.splitlines():
        if "wgmma.commit_group" in line:
            outstanding += 1
        elif "wgmma.wait_group" in line:
            outstanding = min(outstanding, int(line.split("aligned")[1].strip(" ;")))
            run = 0
        elif "fma.rn.f32" in line and outstanding:
            run += 1
            best = max(best, run)
    return best


def unfenced_slot_reads(ptx: str) -> int:
    """Slot releases (mbarrier arrives) preceded, since the last fence.proxy.async, by shared-memory loads
    of the kind that read TMA-filled data in the consumers (`ld.shared.v2`: the Wgrad's column scales).  The
    slot's next TMA write is in the async proxy; without the fence it raced those reads (run 20)."""
    pending, unfenced = False, 0
    for line in ptx.splitlines():
        if "ld.shared.v2" in line:
            pending = True
        elif "fence.proxy.async" in line:
            pending = False
        elif "mbarrier.arrive" in line and "expect_tx" not in line:
            unfenced += pending
            pending = False
    return unfenced


GLUON = {  # kernel name: (pointers besides the two descriptors, arguments that are the constant 1, REGS key)
    "_grouped_gemm_kernel": ({"AS": F32, "BS": F32, "C": BF16, "COUNTS": I64, "ROWMAP": I64, "H": BF16},
                             ("sasm", "sbsk", "scn"), "gemm"),
    "_grouped_wgrad_kernel": ({"ATS": F32, "C": F32, "ENDS": I64}, ("sasn", "sck"), "wgrad"),
}


@pytest.mark.parametrize("epilogue", ["store", "store_fp32", "map_rows", "swiglu_bwd"])
@pytest.mark.parametrize("name", list(GLUON))
def test_gluon_kernel_compiles_for_sm90_with_the_promotion_overlapped(name, epilogue):
    """dsv3/fp8/gluon_gemm.py (kernels.GEMM_GLUON / WGRAD_GLUON) compiles for the H200 at the bench
    experts' launch (E-way grouped, unit scale and output strides): 12 warps (two consumer warpgroups and
    a producer, `setmaxnreg`), operands by TMA; and the point of these kernels holds in the code the GPU
    runs: a block's promotion (64 fp32 FMAs per thread) is issued while another block's wgmma is
    outstanding, and ptxas keeps the wgmmas asynchronous (no C7514 "wgmma.mma_async instructions are
    serialized", which a copy of in-flight accumulator registers causes) without spilling under the
    consumers' and the producer's register budgets; and no slot whose data the threads read is released to
    the TMA without a proxy fence (`unfenced_slot_reads`).  Epilogues of the Fprop/Dgrad: a plain store,
    rows stored through a map (MAP_ROWS, FP8RoutedFn's token order), SwiGLU's backward (SWIGLU_BWD), and an
    fp32 output (a dense Linear's Dgrad outside autocast, kernels.DENSE_GLUON)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from dsv3.fp8 import gluon_gemm

    fn = getattr(gluon_gemm, name)
    pointers, ones, regs = GLUON[name]
    if epilogue == "store_fp32":
        pointers = dict(pointers, C=F32)
    desc = {rows: f"tensordesc<{FP8}[{rows}, {gluon_gemm.BK}],{gluon_gemm.operand_layout(rows)!r}>"
            for rows in (gluon_gemm.BM, gluon_gemm.BN)}  # A's tile: BM rows of the product; B's: BN
    consumer, producer = gluon_gemm.REGS[regs]
    constexprs = dict(STAGES=gluon_gemm.STAGES, num_warps=4, CONSUMER_REGS=consumer, PRODUCER_REGS=producer,
                      **dict.fromkeys(ones, 1))
    if "G" in fn.arg_names:
        constexprs.update(G=E, G_P2=E, MAP_ROWS=epilogue == "map_rows", SWIGLU_BWD=epilogue == "swiglu_bwd")
    elif epilogue != "store":
        pytest.skip("the Wgrad has one epilogue")
    signature, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr or p.name in ones:
            signature[p.name] = "constexpr"
        elif p.name == "bts_desc":  # the Wgrad's column scales, one [1, 128] fp32 row per block
            layout = gl.NVMMASharedLayout.get_default_for([1, gluon_gemm.BN], gl.float32)
            signature[p.name] = f"tensordesc<{F32}[1, {gluon_gemm.BN}],{layout!r}>"
        elif p.name.endswith("_desc"):
            signature[p.name] = desc[gluon_gemm.BM if p.name.startswith("a") else gluon_gemm.BN]
        else:
            signature[p.name] = "*" + pointers[p.name] if p.name in pointers else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=H200, options=dict(num_warps=4, maxnreg=gluon_gemm.MAXNREG))
    ptx = compiled.asm["ptx"]
    assert compiled.metadata.num_warps == 12 and "setmaxnreg" in ptx and "cp.async.bulk.tensor" in ptx
    assert compiled.metadata.shared <= 227 * 1024
    assert max_fmas_under_wgmma(ptx) >= 64, "no promotion overlaps a wgmma"
    assert unfenced_slot_reads(ptx) == 0, "a slot read by threads is released to the TMA without fence.proxy.async"
    log = ptxas_log(ptx)
    assert "C7514" not in log and "serialized" not in log, log
    assert "0 bytes spill stores" in log, log


def test_gluon_gemm_host_wrappers_bind_every_kernel_argument(monkeypatch):
    """gluon_gemm.grouped_gemm / grouped_wgrad, run on the CPU with the kernel launch stubbed: every kernel
    parameter is bound exactly once (positionally or by name, launch options aside), one persistent
    program per SM at most, and the TMA descriptors' blocks are the tiles the kernels are written for.
    The GPU tests cover these wrappers only on a GPU; this keeps a host-side slip visible anywhere."""
    import torch

    from dsv3.fp8 import gluon_gemm

    launches = []

    class Stub:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.fn, grid, args, kw))

    for name in GLUON:
        monkeypatch.setattr(gluon_gemm, name, Stub(getattr(gluon_gemm, name)))
    monkeypatch.setattr(gluon_gemm, "_sms", lambda device: 132)
    m, k, n, counts = 1000, 512, 384, torch.tensor([300, 0, 1, 600, 99])
    fp8 = torch.float8_e4m3fn
    a, a_s = torch.zeros(m, k, dtype=fp8), torch.ones(k // 128, m).t()
    b3, b_s3 = torch.zeros(len(counts), n, k, dtype=fp8), torch.ones(len(counts), n // 128, k // 128)
    gluon_gemm.grouped_gemm(a, a_s, b3, b_s3, counts, torch.empty(m, n, dtype=torch.bfloat16), torch.randperm(m))
    at, bt = torch.zeros(n, 1024, dtype=fp8), torch.zeros(k, 1024, dtype=fp8)
    gluon_gemm.grouped_wgrad(at, torch.ones(8, n).t(), bt, torch.ones(8, k).t(), counts.cumsum(0),
                             torch.empty(len(counts), n, k))
    tiles = {"_grouped_gemm_kernel": 132, "_grouped_wgrad_kernel": min(132, len(counts) * (n // 128) * (k // 128))}
    for fn, grid, args, kw in launches:
        names = fn.arg_names
        bound = names[:len(args)] + [key for key in kw if key in names]
        assert len(args) <= len(names) and sorted(bound) == sorted(names), (fn.fn.__name__, set(names) ^ set(bound))
        assert set(kw) - set(names) <= {"num_warps", "maxnreg"}, set(kw) - set(names)
        assert grid == (tiles[fn.fn.__name__], )
        descs = {p: v for p, v in zip(names, args) if p in ("a_desc", "b_desc", "at_desc", "bt_desc")}  # operands
        assert {p: list(d.block_shape) for p, d in descs.items()} == {
            p: [gluon_gemm.BM if p.startswith("a") else gluon_gemm.BN, gluon_gemm.BK] for p in descs}
    assert [fn.fn.__name__ for fn, *_ in launches] == list(GLUON)


GLUON_QUANT = {  # case: (kernel name, pointer types, constexprs, arguments that are the constant 1)
    "plain": ("_quant_act_gluon_kernel", {"X": BF16, "Q": FP8, "S": F32, "QT": FP8, "ST": F32},
              dict(POW2=False, B=128, EVEN_M=True, EVEN_K=True, GATHER=False, ROW_MUL=False, SWIGLU=False),
              ("sxk", "ssm", "sstk")),
    "gathered x gates": ("_quant_act_gluon_kernel", {"X": BF16, "IDX": I64, "MUL": F32, "Q": FP8, "S": F32, "QT": FP8,
                                                      "ST": F32},
                         dict(POW2=True, B=128, EVEN_M=True, EVEN_K=True, GATHER=True, ROW_MUL=True, SWIGLU=False),
                         ("sxk", "ssm", "sstk")),
    "swiglu": ("_quant_act_gluon_kernel", {"X": BF16, "Q": FP8, "S": F32, "QT": FP8, "ST": F32},
               dict(POW2=True, B=128, EVEN_M=True, EVEN_K=True, GATHER=False, ROW_MUL=False, SWIGLU=True),
               ("sxk", "ssm", "sstk")),
    "weight": ("_quant_weight_gluon_kernel", {"W": F32, "Q": FP8, "S": F32, "QT": FP8}, dict(B=128, EVEN=True),
               ("swk", "ssk")),
}


@pytest.mark.parametrize("case", list(GLUON_QUANT))
@pytest.mark.parametrize("warps", [4, 8])
def test_gluon_quantiser_compiles_for_sm90_without_a_shared_memory_transpose(case, warps):
    """dsv3/fp8/gluon_quant.py (kernels.QUANT_GLUON, SWIGLU_GLUON, WEIGHT_GLUON) at the bench shapes: no spills;
    the operand read in 16-byte vectors and QT written in 4-byte vectors; shared memory only for the
    amax reductions (no byte accesses to it, the transpose of the Triton kernels)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from dsv3.fp8 import gluon_quant

    name, pointers, constexprs, ones = GLUON_QUANT[case]
    fn = getattr(gluon_quant, name)
    constexprs = dict(constexprs, num_warps=warps, **dict.fromkeys(ones, 1))
    signature, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr or p.name in ones:
            signature[p.name] = "constexpr"
        else:
            signature[p.name] = "*" + pointers[p.name] if p.name in pointers else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=H200, options=dict(num_warps=warps))
    ptx = compiled.asm["ptx"]
    assert "ld.global.v4.b32" in ptx and "st.global.b32" in ptx
    assert not any(op in ptx for op in ("ld.shared.b8", "ld.shared.u8", "st.shared.b8", "st.shared.u8"))
    assert compiled.metadata.shared <= 4096
    assert "0 bytes spill stores" in ptxas_log(ptx)
