"""Inference with FP8 weights kept FP8: a released (or `save_pretrained(fp8=True)`) checkpoint's e4m3
weights and 128x128 `weight_scale_inv` are loaded as they are and multiplied as FP8 on every call
(activations quantised online per 1x128 tile, spec §3.6; with power-of-two scales when the checkpoint's
`quantization_config.scale_fmt` is "ue8m0", as DeepSeek's `act_quant` does for V3.1-era checkpoints),
never dequantised per call.

    model = load_fp8_for_inference("path/to/checkpoint", device="cuda")

Held in FP8: every Linear the checkpoint stores in FP8 inside attention (wq / wq_a, wq_b, wkv_a, wo),
the dense MLPs, the shared experts, and the routed experts (stacked, when moe_intermediate_size is a
multiple of 128 so the gate and up blocks stack).  Dequantised once at load, to `dtype`:
  - wkv_b, which absorbed MLA decoding reads as a matrix (DeepSeek's demo dequantises it too);
  - anything the checkpoint stores in higher precision (embedding, head, norms, router, eh_proj).
The safetensors are read here with the checkpoint package's name map (`dsv3.checkpoint.names`); the
checkpoint package itself always dequantises.  Unknown or missing tensors are errors, as there.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..checkpoint.fp8 import dequantize_named
from ..checkpoint.hf_io import _weight_map, place, read_config
from ..model import Transformer
from ..model.attention import MLA
from ..model.dtypes import keep_dtypes
from ..model.layers import MLP
from ..model.moe import Experts
from . import ops
from .reference import BLOCK, ceil128

SCALE = "_scale_inv"
FP8 = torch.float8_e4m3fn
DEQUANTISED = ("attn.wkv_b",)  # read as a matrix by absorbed attention


def _pad_fp8(q: torch.Tensor) -> torch.Tensor:
    """[..., N, K] e4m3 -> zero-padded [..., Np, Kp] (padding must be exact zeros for the GEMMs)."""
    n, k = q.shape[-2:]
    return F.pad(q.view(torch.uint8), (0, ceil128(k) - k, 0, ceil128(n) - n)).view(FP8)


class FP8InferenceLinear(nn.Module):
    """y = x W^T, W held as e4m3 [Np, Kp] (`weight`) with 128x128 scales (`weight_scale_inv`)."""

    def __init__(self, in_features: int, out_features: int, backend: str = "auto", device=None, pow2: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.backend, self.pow2 = in_features, out_features, backend, pow2
        np_, kp = ceil128(out_features), ceil128(in_features)
        self.register_buffer("weight", torch.empty(np_, kp, dtype=FP8, device=device))
        self.register_buffer("weight_scale_inv", torch.empty(np_ // BLOCK, kp // BLOCK, device=device))

    def _apply(self, fn, recurse=True):  # model.to(bfloat16) keeps the e4m3 weight and its fp32 scales
        return keep_dtypes(self, {"weight": FP8, "weight_scale_inv": torch.float32}, super()._apply, fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = ops.default_backend(x.device) if self.backend == "auto" else self.backend
        xq, xs = ops.quant_rows(x.reshape(-1, x.shape[-1]), self.pow2, b)
        y = ops.gemm(xq, xs, self.weight, self.weight_scale_inv, x.dtype, b)[:, :self.out_features]
        return y.reshape(*x.shape[:-1], self.out_features)


class FP8InferenceExperts(nn.Module):
    """Stacked routed experts in e4m3: w13 [E, 2I, Dp] (gate rows, then up), w2 [E, Dp, Ip], 128x128 scales."""

    def __init__(self, n_experts: int, dim: int, inter: int, backend: str = "auto", device=None, pow2: bool = False):
        super().__init__()
        self.dim, self.inter, self.backend, self.pow2 = dim, inter, backend, pow2
        dp, ip = ceil128(dim), ceil128(inter)
        self.register_buffer("w13", torch.empty(n_experts, 2 * inter, dp, dtype=FP8, device=device))
        self.register_buffer("w13_scale_inv", torch.empty(n_experts, 2 * inter // BLOCK, dp // BLOCK, device=device))
        self.register_buffer("w2", torch.empty(n_experts, dp, ip, dtype=FP8, device=device))
        self.register_buffer("w2_scale_inv", torch.empty(n_experts, dp // BLOCK, ip // BLOCK, device=device))

    def _apply(self, fn, recurse=True):  # model.to(bfloat16) keeps the e4m3 weights and their fp32 scales
        return keep_dtypes(self, {"w13": FP8, "w13_scale_inv": torch.float32, "w2": FP8, "w2_scale_inv": torch.float32},
                           super()._apply, fn, recurse)

    def _b(self, x):
        return ops.default_backend(x.device) if self.backend == "auto" else self.backend

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] sorted by expert, counts [E] -> [M, D]."""
        b = self._b(x)
        h = ops.grouped_gemm(*ops.quant_rows(x, self.pow2, b), self.w13, self.w13_scale_inv, counts, x.dtype, b)
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate) * up
        return ops.grouped_gemm(*ops.quant_rows(a, self.pow2, b), self.w2, self.w2_scale_inv, counts, x.dtype, b)[:, :self.dim]

    def forward_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        b = self._b(x)
        gate, up = ops.gemm(*ops.quant_rows(x, self.pow2, b), self.w13[e], self.w13_scale_inv[e], x.dtype, b).chunk(2, dim=-1)
        return ops.gemm(*ops.quant_rows(F.silu(gate) * up, self.pow2, b), self.w2[e], self.w2_scale_inv[e], x.dtype,
                        b)[:, :self.dim]


def activation_scales_pow2(hf_config: dict) -> bool:
    """Whether activations are quantised with power-of-two scales: `quantization_config.scale_fmt` "ue8m0"
    (spec §3.6); absent or None means plain amax / 448 scales."""
    fmt = (hf_config.get("quantization_config") or {}).get("scale_fmt")
    if fmt not in (None, "ue8m0"):
        raise ValueError(f"quantization_config.scale_fmt {fmt!r} is not supported (None or 'ue8m0')")
    return fmt == "ue8m0"


def _fp8_targets(model: Transformer, path: Path, weight_map: dict[str, str]) -> set[str]:
    """dsv3 module names whose weights the checkpoint stores in e4m3 and that can stay FP8."""
    cfg = model.cfg
    fp8_tensors = set()
    for shard in set(weight_map.values()):
        with safe_open(path / shard, "pt") as f:
            fp8_tensors |= {k for k in f.keys() if f.get_slice(k).get_dtype() == "F8_E4M3"}
    linears, experts_fp8 = set(), set()
    for hf_name in weight_map:
        if hf_name.endswith(SCALE):
            continue
        t = place(hf_name, cfg, model.state_dict())
        if t is None or t.copy_of_shared:
            continue  # no place in the model: the loader reports it
        module = t.name.rsplit(".", 1)[0]
        if t.expert is not None:
            if hf_name in fp8_tensors:
                experts_fp8.add(module)  # "layers.L.ffn.experts"
        elif hf_name in fp8_tensors and not module.endswith(DEQUANTISED):
            owner = model.get_submodule(module.rsplit(".", 1)[0])
            if isinstance(owner, (MLA, MLP)):
                linears.add(module)
    expert_ok = cfg.moe_intermediate_size % BLOCK == 0  # gate and up 128-row blocks stack into w13
    return linears | {e for e in experts_fp8 if expert_ok}


def load_fp8_for_inference(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                           backend: str = "auto", **model_kwargs) -> Transformer:
    """A HF-layout FP8 checkpoint -> an eval `Transformer` whose FP8 layers hold e4m3 weights + scales."""
    path = Path(path)
    weight_map = _weight_map(path)
    hf_config, cfg = read_config(path, weight_map)
    pow2 = activation_scales_pow2(hf_config)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(cfg, **model_kwargs)
    keep = _fp8_targets(model, path, weight_map)
    for name in keep:
        parent, child = name.rsplit(".", 1)
        old = model.get_submodule(name)
        if isinstance(old, Experts):
            e, two_i, d = old.w13.shape
            new = FP8InferenceExperts(e, d, two_i // 2, backend, device="meta", pow2=pow2)
        else:
            new = FP8InferenceLinear(old.in_features, old.out_features, backend, device="meta", pow2=pow2)
        setattr(model.get_submodule(parent), child, new)

    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    unknown = []
    with ExitStack() as stack:
        handles = {}

        def read(name):
            shard = weight_map[name]
            if shard not in handles:
                handles[shard] = stack.enter_context(safe_open(path / shard, "pt", device="cpu"))
            return handles[shard].get_tensor(name)

        for hf_name in weight_map:
            if hf_name.endswith(SCALE):
                continue
            t = place(hf_name, cfg, expected)
            if t is None:
                if read(hf_name).numel():  # empty tensors without a place (transformers' n_shared_experts 0)
                    unknown.append(hf_name)
                continue
            if t.copy_of_shared:
                continue
            tensor = read(hf_name)
            module = t.name.rsplit(".", 1)[0]
            fp8 = tensor.dtype.is_floating_point and tensor.dtype.itemsize == 1 or hf_name + SCALE in weight_map
            scale = read(hf_name + SCALE).float() if hf_name + SCALE in weight_map else None
            if fp8 and (tensor.dtype != FP8 or scale is None):
                dequantize_named(f"{path}: {hf_name}", tensor, scale, dtype)  # raises, naming the problem
            if t.expert is not None and module in keep:
                stacked = t.name.rsplit(".", 1)[1]  # w13 | w2
                buf = state.setdefault(t.name, torch.zeros(expected[t.name].shape, dtype=torch.uint8, device=device))
                sbuf = state.setdefault(t.name + SCALE, torch.zeros(expected[t.name + SCALE].shape, device=device))
                rows, srows = tensor.shape[0], scale.shape[0]
                padded = _pad_fp8(tensor).view(torch.uint8)[:rows] if stacked == "w13" else _pad_fp8(tensor).view(torch.uint8)
                if stacked == "w13":
                    buf[t.expert, t.half * rows:(t.half + 1) * rows] = padded.to(device)
                    sbuf[t.expert, t.half * srows:(t.half + 1) * srows] = scale.to(device)
                else:
                    buf[t.expert] = padded.to(device)
                    sbuf[t.expert] = scale.to(device)
            elif module in keep:
                state[t.name] = _pad_fp8(tensor).to(device)
                state[t.name + SCALE] = scale.to(device)
            else:
                value = dequantize_named(f"{path}: {hf_name}", tensor, scale, torch.float32) if fp8 else tensor
                want = torch.float32 if t.name.endswith("gate.bias") else dtype
                if t.expert is None:
                    state[t.name] = value.to(device=device, dtype=want)
                else:
                    buf = state.setdefault(t.name, torch.empty(expected[t.name].shape, dtype=dtype, device=device))
                    rows = value.shape[0]
                    buf[t.expert, t.half * rows:(t.half + 1) * rows] = value.to(device=device, dtype=dtype)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} checkpoint tensors have no place in the model: {', '.join(sorted(unknown)[:10])}")
    for name, v in state.items():
        if v.dtype == torch.uint8:
            state[name] = v.view(FP8)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path}: {len(missing)} model tensors are missing from the checkpoint: {', '.join(missing[:10])}")
    model.load_state_dict(state, strict=True, assign=True)
    model.rope.reset_parameters(device)
    return model.eval()
