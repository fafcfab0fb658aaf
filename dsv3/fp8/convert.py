"""Which layers of a `dsv3.Transformer` run in FP8, and the in-place swap that makes them (spec §3.1).

FP8 (all three GEMMs, e4m3, fine-grained scales): the attention projections (wq / wq_a, wq_b, wkv_a,
wkv_b, wo), the dense MLPs, the shared experts and the routed experts, in the main blocks and in MTP
blocks.  Kept as they are, for the report's reasons:
  - embedding and output head: the vocabulary ends, sensitive to low precision; BF16 under autocast;
  - MTP `eh_proj`: stored BF16 in the released checkpoint, kept BF16;
  - router GEMM + sigmoid, routing bias: fp32 (selection is sensitive to small score changes);
  - RMSNorms, softmax, the attention core softmax(q k^T) v: BF16 inputs with fp32 maths;
  - master weights and gradients: fp32 (the params stay fp32 `nn.Parameter`s); AdamW moments fp32 or bf16.
The swapped modules keep the same parameters (the same tensors) and state_dict keys.

Scales (`scales`, TrainConfig.fp8_scales): "amax" is amax/448 for every tile; "spec" rounds the scales of
the attention output projection `wo` and of the routed experts up to powers of two, as the report does
for the wo input (its E5M6 cache, re-tiled 1x128 -> 128x1 without error) and for the FP8 dispatch to the
experts and the gradient returned through it (spec §3.4).  One flag per layer covers its activation and
its output gradient alike, so "spec" also rounds wo's output gradient and the SwiGLU output's scales:
our choice (the report names only the tensors above).  "pow2" rounds every FP8 layer's scales.
"""

from __future__ import annotations

from torch import nn

from ..model.attention import MLA
from ..model.layers import MLP
from ..model.moe import MoE, Experts
from .experts import FP8Experts
from .linear import FP8Linear

FP8_LAYERS = ("attention projections wq/wq_a, wq_b, wkv_a, wkv_b, wo", "dense MLP w1, w2, w3",
              "shared experts w1, w2, w3", "routed experts w13, w2 (grouped)")
KEPT_LAYERS = {
    "embedding": "bf16 (autocast): lookup, no GEMM; kept out of FP8 by the report",
    "output head": "bf16 (autocast): logits are sensitive to low precision (report §3.3.1)",
    "MTP eh_proj": "bf16 (autocast): stored BF16 in the released checkpoint",
    "router GEMM, sigmoid, routing bias": "fp32: top-k selection is sensitive to small score changes",
    "RMSNorm": "fp32 maths",
    "attention core softmax(qk^T)v": "bf16 inputs, fp32 softmax",
    "master weights, gradients": "fp32 (AdamW moments: fp32, or bf16 with --moments bf16)",
}


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.layers) + [m.block for m in model.mtp]


def fp8_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every module `convert_to_fp8` swaps (or has swapped)."""
    out = {}
    for name, m in model.named_modules():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        owner = model.get_submodule(parent) if parent else model
        if isinstance(m, Experts):
            out[name] = m
        elif isinstance(m, nn.Linear) and isinstance(owner, (MLA, MLP)):
            out[name] = m
    return out


SCALES = ("spec", "amax", "pow2")


def convert_to_fp8(model: nn.Module, backend: str = "auto", scales: str = "spec", keep: tuple[str, ...] = ()) -> nn.Module:
    """Swaps the FP8 layers of a `Transformer` in place (parameters shared) and returns it; `scales` as
    in the module docstring.  `keep`: module-name prefixes left as they are (BF16 under autocast), e.g.
    ("layers.0.attn",): not the report's policy, an experiment (bench/fp8_grad_error.py found layer 0's
    query path and the embedding's gradient dominated by FP8 error in a trained small model)."""
    if scales not in SCALES:
        raise ValueError(f"FP8 scales must be one of {SCALES}, got {scales!r}")
    names = {id(m): n for n, m in model.named_modules()}
    swappable = set(fp8_modules(model))
    unknown = [k for k in keep if not any(n == k or n.startswith(k + ".") for n in swappable)]
    if unknown:
        raise ValueError(f"FP8 keep prefixes match no FP8 layer: {unknown} (e.g. 'layers.0.attn', 'layers.3.ffn.experts')")
    for block in _blocks(model):
        for owner in [m for m in block.modules() if isinstance(m, (MLA, MLP, MoE))]:
            for child_name, child in list(owner.named_children()):
                full = f"{names[id(owner)]}.{child_name}"
                if any(full == k or full.startswith(k + ".") for k in keep):
                    continue
                spec_pow2 = (isinstance(owner, MLA) and child_name == "wo") or isinstance(child, Experts)
                pow2 = scales == "pow2" or (scales == "spec" and spec_pow2)
                if isinstance(child, nn.Linear) and isinstance(owner, (MLA, MLP)) and not isinstance(child, FP8Linear):
                    setattr(owner, child_name, FP8Linear.from_linear(child, backend, pow2))
                elif isinstance(child, Experts) and not isinstance(child, FP8Experts):
                    setattr(owner, child_name, FP8Experts.from_experts(child, backend, pow2))
    return model


def describe_model(model: nn.Module) -> str:
    """One line per kind of layer: what runs FP8 in this model, and what stays higher precision."""
    fp8 = [n for n, m in fp8_modules(model).items() if isinstance(m, (FP8Linear, FP8Experts))]
    pow2 = [n for n, m in fp8_modules(model).items() if getattr(m, "pow2", False)]
    lines = [f"FP8 e4m3 ({len(fp8)} modules; Fprop/Dgrad/Wgrad, 1x128 activation tiles, 128x128 weight blocks): "
             + "; ".join(FP8_LAYERS), f"  power-of-2 scales: {len(pow2)} modules"]
    lines += [f"  {k}: {v}" for k, v in KEPT_LAYERS.items()]
    return "\n".join(lines)
