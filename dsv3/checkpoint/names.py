"""The one weight-name map between dsv3's state dict and the Hugging Face DeepSeek-V3 layout (spec §5.3).

dsv3 names follow DeepSeek's official inference code (wq_a, wkv_b, w1/w2/w3, ...); HF names follow
`config.json` checkpoints.  Two structural differences:
  - routed experts are stacked in dsv3 (`experts.w13` [E, 2I, D] = gate rows then up rows, `experts.w2`
    [E, D, I]) and stored per expert in HF (`experts.E.{gate,up,down}_proj.weight`);
  - MTP depth k lives at HF layer `num_layers + k`, holding extra norms, `eh_proj`, a full block, and
    stored copies of the embedding and head (`embed_tokens`, `shared_head.head`) that dsv3 shares.
Anything not in this map is an error: nothing is dropped by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import ModelConfig

# dsv3 block-relative name -> HF layer-relative name
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared.w2.weight": "mlp.shared_experts.down_proj.weight",
}
MTP_NAMES = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "head_norm.weight": "shared_head.norm.weight",
}
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
# HF-only copies of shared tensors inside each MTP layer -> the dsv3 tensor they copy
MTP_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
EXPERT_PARTS = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", 0)}

_BLOCK_FROM_HF = {v: k for k, v in BLOCK_NAMES.items()}
_MTP_FROM_HF = {v: k for k, v in MTP_NAMES.items()}
_TOP_FROM_HF = {v: k for k, v in TOP_NAMES.items()}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
# Linear weights the released checkpoint stores in FP8 (everything but embedding, head, norms, router, eh_proj)
_FP8_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                         r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight")


@dataclass(frozen=True)
class Target:
    """Where one HF tensor goes in dsv3: a plain tensor, one expert's slice of a stacked tensor, or a copy."""

    name: str  # dsv3 state-dict key
    expert: int | None = None  # expert index for stacked expert weights
    half: int = 0  # for w13: 0 = gate rows, 1 = up rows
    copy_of_shared: bool = False  # an MTP-layer copy of the embedding/head: checked, not loaded


def hf_to_dsv3(hf_name: str, cfg: ModelConfig) -> Target:
    if hf_name in _TOP_FROM_HF:
        return Target(_TOP_FROM_HF[hf_name])
    m = _LAYER.fullmatch(hf_name)
    if m is None:
        raise KeyError(hf_name)
    layer, rest = int(m.group(1)), m.group(2)
    if layer < cfg.num_layers:
        prefix = f"layers.{layer}."
    elif layer < cfg.num_layers + cfg.num_mtp_layers:
        prefix = f"mtp.{layer - cfg.num_layers}."
        if rest in _MTP_FROM_HF:
            return Target(prefix + _MTP_FROM_HF[rest])
        if rest in MTP_COPIES:
            return Target(MTP_COPIES[rest], copy_of_shared=True)
        prefix += "block."
    else:
        raise KeyError(hf_name)
    e = _EXPERT.fullmatch(rest)
    if e is not None:
        stacked, half = EXPERT_PARTS[e.group(2)]
        return Target(f"{prefix}ffn.experts.{stacked}", expert=int(e.group(1)), half=half)
    if rest not in _BLOCK_FROM_HF:
        raise KeyError(hf_name)
    return Target(prefix + _BLOCK_FROM_HF[rest])


def dsv3_to_hf(name: str, cfg: ModelConfig) -> list[tuple[str, Target]]:
    """The HF tensors one dsv3 tensor becomes (several for stacked experts), each with its slice."""
    if name in TOP_NAMES:
        return [(TOP_NAMES[name], Target(name))]
    parts = name.split(".")
    if parts[0] == "layers":
        hf_prefix, rest = f"model.layers.{parts[1]}.", ".".join(parts[2:])
    elif parts[0] == "mtp":
        hf_prefix, rest = f"model.layers.{cfg.num_layers + int(parts[1])}.", ".".join(parts[2:])
        if rest in MTP_NAMES:
            return [(hf_prefix + MTP_NAMES[rest], Target(name))]
        rest = rest.removeprefix("block.")
    else:
        raise KeyError(name)
    if rest.startswith("ffn.experts."):
        stacked = rest.rsplit(".", 1)[1]
        hf_parts = [p for p, (s, _) in EXPERT_PARTS.items() if s == stacked]
        return [
            (f"{hf_prefix}mlp.experts.{e}.{p}.weight", Target(name, expert=e, half=EXPERT_PARTS[p][1]))
            for e in range(cfg.n_routed_experts) for p in hf_parts
        ]
    if rest not in BLOCK_NAMES:
        raise KeyError(name)
    return [(hf_prefix + BLOCK_NAMES[rest], Target(name))]


def mtp_copy_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(HF name, dsv3 source) for the embedding/head copies written into every MTP layer."""
    return [(f"model.layers.{cfg.num_layers + k}.{hf}", ours) for k in range(cfg.num_mtp_layers) for hf, ours in MTP_COPIES.items()]


def is_fp8_linear(hf_name: str) -> bool:
    return _FP8_LINEAR.fullmatch(hf_name) is not None
