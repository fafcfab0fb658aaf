"""The FP8 decode kernels (dsv3/inference/gemv_fp8.py, moe_small_fp8.py) compile for an H100/H200 (sm_90) without
a GPU, through Triton's ahead-of-time path and its bundled ptxas: every mode (in-kernel quantisation, prequant,
weight-only), both dot forms, the pair and the shared-expert slot.  This catches what the interpreter cannot:
types that differ between the branches of a run-time `if`, layouts, register and shared-memory limits.  Their numbers
are the interpreted and GPU tests' business.  Skipped without Triton (CI) and under TRITON_INTERPRET=1, where
@triton.jit gives interpreted functions.
"""

import inspect
import itertools
import os

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreted kernels do not compile")

from dsv3.inference import gemv_fp8, moe_small_fp8  # noqa: E402


# integer arguments a launch at the bench shapes passes as multiples of 16, which Triton's JIT specialises on (as it
# does every pointer, torch's allocations being 16-byte aligned): without these hints the loads compile to bytes
DIVISIBLE_BY_16 = {"N", "K", "KP", "K_SPLIT", "N1", "N2", "D", "sxm", "shm"}


def compiles(fn, types: dict, consts: dict, warps: int = 4, stages: int = 3):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(fn.fn).parameters)
    signature = {p: "constexpr" if p in consts else types[p] for p in params}
    aligned = [p for p in params if p not in consts and (types[p].startswith("*") or p in DIVISIBLE_BY_16)]
    src = ASTSource(fn, signature, constexprs={(params.index(k),): v for k, v in consts.items()},
                    attrs={(params.index(p),): [["tt.divisibility", 16]] for p in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


MODES = [(False, False), (True, False), (False, True)]  # (prequant, weight_only)
LINEAR_MODES = [m + (False,) for m in MODES] + [(False, True, True)]  # and block_dots
GEMV = dict(XS="*fp32", W="*fp8e4nv", WS="*fp32", OUT="*bf16", M="i32", N="i32", K="i32", KP="i32", K_SPLIT="i32",
            sxm="i32", sxk="i32")


@pytest.mark.parametrize("mma,even_k", list(itertools.product([False, True], [False, True])))
@pytest.mark.parametrize("prequant,weight_only,block_dots", LINEAR_MODES)
def test_linear_kernel_compiles(mma, even_k, prequant, weight_only, block_dots):
    compiles(gemv_fp8._fp8_gemv_kernel, dict(GEMV, X="*fp8e4nv" if prequant else "*bf16"),
             dict(BLOCK_M=16 if mma else 2, BLOCK_N=32, GROUPS=4, POW2=False, MMA=mma, DOT_BF16=True, EVEN_K=even_k,
                  PREQ=prequant, A16=weight_only, A16_BLOCKS=block_dots, PDL=True))


@pytest.mark.parametrize("mma", [False, True])
@pytest.mark.parametrize("prequant,weight_only,block_dots", LINEAR_MODES)
def test_pair_kernel_compiles(mma, prequant, weight_only, block_dots):
    types = dict(X="*fp8e4nv" if prequant else "*bf16", XS="*fp32", W1="*fp8e4nv", WS1="*fp32", OUT1="*bf16", N1="i32",
                 W2="*fp8e4nv", WS2="*fp32", OUT2="*bf16", N2="i32", TILES1="i32", M="i32", K="i32", KP="i32",
                 sxm="i32", sxk="i32")
    compiles(gemv_fp8._fp8_gemv_pair_kernel, types,
             dict(BLOCK_M=16 if mma else 1, BLOCK_N=32, GROUPS=4, POW2=True, MMA=mma, DOT_BF16=True, EVEN_K=True,
                  PREQ=prequant, A16=weight_only, A16_BLOCKS=block_dots, PDL=True))


@pytest.mark.parametrize("slots", [8, 9], ids=["routed", "with_shared"])
@pytest.mark.parametrize("prequant,weight_only", MODES)
def test_expert_kernels_compile(slots, prequant, weight_only):
    """The bench config's experts (D 2048, I 1024, top 8); SLOTS 9 is the shared expert's slot."""
    act = "*fp8e4nv" if prequant else None
    compiles(moe_small_fp8._gate_up_fp8_kernel,
             dict(X=act or "*bf16", XS="*fp32", sxm="i32", sxk="i32", IDX="*i64", W13="*fp8e4nv", WS13="*fp32",
                  SW1="*fp8e4nv", SS1="*fp32", SW3="*fp8e4nv", SS3="*fp32", H="*fp32", NK="i32", D="i32"),
             dict(I=1024, DP=2048, K=8, BLOCK_I=16, GROUPS=4, POW2=False, PREQ=prequant, A16=weight_only, PDL=True))
    compiles(moe_small_fp8._down_fp8_kernel,
             dict(H=act or "*fp32", HS="*fp32", shm="i32", shk="i32", IDX="*i64", GATES="*fp32", W2="*fp8e4nv",
                  WS2="*fp32", SW2="*fp8e4nv", SS2="*fp32", OUT="*bf16", NK="i32", D="i32"),
             dict(I=1024, DP=2048, K=8, SLOTS=slots, BLOCK_D=4, GROUPS=8, POW2=False, PREQ=prequant, A16=weight_only,
                  PDL=True))
