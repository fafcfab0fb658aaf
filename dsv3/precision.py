"""The precision policy, in one place and printed at start (design principle 10).

BF16 runs keep fp32 master weights, gradients and AdamW moments, and compute matmuls and attention
under BF16 autocast; RMSNorm, softmax, the router GEMM, losses and the routing bias stay fp32 (the
report keeps embedding, head, router, norms and the attention core out of FP8 for the same reasons).

FP8 runs (spec §3) are BF16 runs whose Linear layers and routed experts are swapped by
`prepare_model` for FP8 versions (`dsv3.fp8`): all three GEMMs in e4m3 with 1x128 activation tiles and
128x128 weight blocks, fp32 promotion every 128 K-elements.  On a CPU they run through the pure-torch
reference (slow, exact emulation); on Hopper through cuBLAS block-wise `_scaled_mm` and Triton.
"""

from __future__ import annotations

import torch

POLICY = {
    "fp32": {"autocast": None, "master": "fp32", "matmuls": "fp32", "attention": "fp32"},
    "bf16": {"autocast": torch.bfloat16, "master": "fp32", "matmuls": "bf16", "attention": "bf16 in, fp32 softmax"},
    "fp8": {"autocast": torch.bfloat16, "master": "fp32",
            "matmuls": "fp8 e4m3 block-scaled for attention projections, dense MLP, shared and routed experts; "
                       "bf16 for embedding, head, MTP eh_proj",
            "attention": "bf16 in, fp32 softmax"},
}
ALWAYS_FP32 = "RMSNorm math, router GEMM + sigmoid, routing bias, softmax, losses"


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in POLICY:
        raise ValueError(f"unknown precision {precision!r}; choose from auto, {', '.join(POLICY)}")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    return POLICY[precision]["autocast"]


def describe(precision: str, moments: str = "fp32", fp8_scales: str = "spec") -> str:
    """The policy line printed at start; `moments` is the AdamW moments' storage (TrainConfig.moments)."""
    p = POLICY[precision]
    text = (f"precision {precision}: master weights {p['master']}, matmuls {p['matmuls']}, attention {p['attention']}, "
            f"AdamW moments {moments}; always fp32: {ALWAYS_FP32}")
    if precision == "fp8":
        from .fp8.convert import FP8_LAYERS, KEPT_LAYERS

        scales = {"spec": "power-of-2 scales for wo and the routed experts, amax/448 elsewhere",
                  "amax": "amax/448 scales", "pow2": "power-of-2 scales"}[fp8_scales]
        text += (f"\n  FP8 e4m3 (Fprop, Dgrad, Wgrad; 1x128 activation/gradient tiles, 128x128 weight blocks, online amax, {scales}; "
                 "inputs quantised from bf16, as autocast hands them to a Linear): "
                 + "; ".join(FP8_LAYERS)
                 + "".join(f"\n  kept {k}: {v}" for k, v in KEPT_LAYERS.items()))
    return text


def prepare_model(model: torch.nn.Module, precision: str, fp8_scales: str = "spec",
                  fp8_keep: tuple[str, ...] = ()) -> torch.nn.Module:
    """Model changes a precision needs before training: fp8 swaps in the FP8 layers (parameters kept),
    with `fp8_scales` and `fp8_keep` (module-name prefixes left BF16) as `dsv3.fp8.convert` explains;
    fp32/bf16 need none (autocast does the work)."""
    if precision == "fp8":
        from .fp8 import convert_to_fp8

        return convert_to_fp8(model, scales=fp8_scales, keep=tuple(fp8_keep))
    return model
