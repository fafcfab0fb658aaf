"""Model configuration: one frozen dataclass, named presets, HF config round-trip, FLOP and parameter counts.

Every choice a checkpoint depends on is a field here (design principle 3); nothing in the model
branches on a dimension.  Field names follow DeepSeek's Hugging Face `config.json` where one exists, so
`from_hf_config` / `to_hf_config` are mostly renames.  Choices the spec marks UNCONFIRMED are fields
with the default we picked and a note saying so.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# config.json's routing methods: DeepSeek-V3's bias-adjusted group-limited top-k, and V2's two
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


@dataclass(frozen=True)
class ModelConfig:
    # --- sizes
    vocab_size: int = 129280
    hidden_size: int = 7168
    num_layers: int = 61
    num_heads: int = 128
    intermediate_size: int = 18432  # dense SwiGLU FFN of the first `first_k_dense` layers
    first_k_dense: int = 3
    # --- Multi-head Latent Attention (spec §1.4); q_lora_rank = 0 means a plain q projection (V2-Lite)
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # --- DeepSeekMoE (spec §1.6)
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # The aux-loss-free balancing bias, used only for selection (spec §1.7).  DeepSeek's code creates it
    # only when dim == 7168; here it is a field.  With it, group scores are top-2 sums; without, group max.
    use_expert_bias: bool = True
    # Complementary sequence-wise balance loss weight alpha (report: 1e-4).  The indicator f_i counts the
    # experts actually routed to (biased top-k), and the loss is averaged over sequences and summed over
    # layers: both UNCONFIRMED in the report, chosen here.
    seq_aux_alpha: float = 1e-4
    # --- positions: RoPE on the decoupled 64 dims, YaRN when rope_factor > 1 (spec §1.5)
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    max_position_embeddings: int = 163840
    # --- multi-token prediction (spec §1.9)
    num_mtp_layers: int = 1
    # Whether h^0 fed to MTP is the main model's hidden state after the final RMSNorm (as vLLM/SGLang do
    # with the released weights) or before it.  UNCONFIRMED for training; after-norm by default.
    mtp_hidden_after_norm: bool = True
    # --- misc
    rms_norm_eps: float = 1e-6
    init_std: float = 0.006  # report: N(0, 0.006^2) for every learnable weight
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        checks = [
            (self.scoring_func in ("sigmoid", "softmax"), f"scoring_func must be sigmoid or softmax, got {self.scoring_func!r}"),
            (self.n_routed_experts % self.n_group == 0, "n_routed_experts must be divisible by n_group"),
            (1 <= self.topk_group <= self.n_group, "topk_group must be in [1, n_group]"),
            (self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok exceeds n_routed_experts"),
            (self.num_experts_per_tok <= self.topk_group * self.n_routed_experts // self.n_group,
             "top-k experts do not fit into the allowed groups"),
            (self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even"),
            (0 <= self.first_k_dense <= self.num_layers, "first_k_dense must be within [0, num_layers]"),
            (not self.tie_word_embeddings, "tied embeddings are not supported (DeepSeek-V3 does not tie)"),
        ]
        if self.use_expert_bias and self.n_group > 1:
            checks.append((self.n_routed_experts // self.n_group >= 2, "top-2 group scores need >= 2 experts per group"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid ModelConfig: {msg}")

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    @property
    def yarn_enabled(self) -> bool:
        return self.rope_factor > 1.0

    @property
    def rope_attention_factor(self) -> float:
        """YaRN's factor on cos/sin, mscale(s, mscale) / mscale(s, mscale_all_dim) (1 for every DeepSeek
        release; transformers' `attention_factor`); 1 without YaRN."""
        if not self.yarn_enabled:
            return 1.0

        def m(k: float) -> float:
            return 0.1 * k * math.log(self.rope_factor) + 1.0

        return m(self.mscale) / m(self.mscale_all_dim) if self.mscale and self.mscale_all_dim else m(1.0)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale^2 under YaRN (spec §1.4: 0.135234 for the 671B config)."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn_enabled and self.mscale_all_dim:
            m = 0.1 * self.mscale_all_dim * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_config(cls, config: dict | str | Path) -> "ModelConfig":
        """Reads a DeepSeek-V2/V3 `config.json` (dict or path to the file or its folder)."""
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            config = json.loads(path.read_text())
        c = dict(config)
        rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("yarn", "default"):
            raise ValueError(f"unsupported rope type {rope_type!r} (dsv3 implements default and yarn)")
        yarn = rope_type == "yarn"
        if yarn and rope.get("factor") is None:
            raise ValueError("rope_scaling of type yarn has no factor")
        # fields that would change the model, refused rather than ignored
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported (DeepSeek's experts and MLPs use silu)")
        if c.get("rope_interleave", True) is False:
            raise ValueError("rope_interleave false is not supported: dsv3 rotates adjacent pairs of the rope dims, "
                             "the layout DeepSeek's checkpoints are stored in (rope_interleave true)")
        if c.get("moe_layer_freq", 1) != 1:  # V2/V3 use 1: every layer past first_k_dense_replace is MoE
            raise ValueError(f"moe_layer_freq {c['moe_layer_freq']} is not supported (dsv3 builds an MoE layer "
                             "after every first_k_dense_replace dense one, moe_layer_freq 1)")
        scoring = c.get("scoring_func", "sigmoid")
        topk_method = c.get("topk_method", "noaux_tc" if scoring == "sigmoid" else "greedy")
        if topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method {topk_method!r} is not supported (one of {', '.join(TOPK_METHODS)})")
        # DeepSeek-V2's "greedy" takes the top-k over all experts: no group restriction
        groups = (1, 1) if topk_method == "greedy" else (c.get("n_group") or 1, c.get("topk_group") or 1)
        q_lora = c.get("q_lora_rank")
        defaults = cls()
        cfg = cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            intermediate_size=c["intermediate_size"],
            first_k_dense=c.get("first_k_dense_replace", 0),
            q_lora_rank=q_lora or 0,
            kv_lora_rank=c["kv_lora_rank"],
            qk_nope_head_dim=c["qk_nope_head_dim"],
            qk_rope_head_dim=c["qk_rope_head_dim"],
            v_head_dim=c["v_head_dim"],
            moe_intermediate_size=c["moe_intermediate_size"],
            n_routed_experts=c["n_routed_experts"],
            n_shared_experts=c.get("n_shared_experts") or 0,
            num_experts_per_tok=c["num_experts_per_tok"],
            n_group=groups[0],
            topk_group=groups[1],
            scoring_func=scoring,
            norm_topk_prob=c.get("norm_topk_prob", True),
            routed_scaling_factor=c.get("routed_scaling_factor", 1.0),
            use_expert_bias=topk_method == "noaux_tc",
            # the release's `aux_loss_alpha` (0.001) is the inference code's, unused there; the report's alpha for
            # the sequence-wise loss is 1e-4 (spec §1.8), so a fine-tune from a release keeps 1e-4 unless told
            seq_aux_alpha=c.get("seq_aux_alpha", defaults.seq_aux_alpha),
            rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
            rope_factor=float(rope.get("factor", 1.0)) if yarn else 1.0,
            original_max_position_embeddings=rope.get("original_max_position_embeddings", c.get("max_position_embeddings", 4096)),
            beta_fast=rope.get("beta_fast", 32.0),
            beta_slow=rope.get("beta_slow", 1.0),
            mscale=rope.get("mscale", 1.0),
            mscale_all_dim=rope.get("mscale_all_dim", 0.0 if yarn else 1.0),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            num_mtp_layers=c.get("num_nextn_predict_layers", c.get("num_mtp_layers", 0)) or 0,
            mtp_hidden_after_norm=c.get("mtp_hidden_after_norm", True),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            init_std=c.get("init_std", defaults.init_std),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            bos_token_id=c.get("bos_token_id", 0) if c.get("bos_token_id") is not None else 0,
            eos_token_id=_first(c.get("eos_token_id", 1)),
        )
        given = rope.get("attention_factor")
        if given is not None and not math.isclose(float(given), cfg.rope_attention_factor, rel_tol=1e-6):
            raise ValueError(f"rope attention_factor {given} differs from the one YaRN's mscale and mscale_all_dim give "
                             f"({cfg.rope_attention_factor:.6g}); dsv3 derives it and does not take another")
        return cfg

    def to_hf_config(self, torch_dtype: str = "bfloat16") -> dict:
        """The `config.json` that transformers' DeepseekV3ForCausalLM (and vLLM/SGLang) read."""
        rope: dict[str, Any] = {"rope_type": "default", "type": "default", "rope_theta": self.rope_theta}
        if self.yarn_enabled:
            rope = {
                "rope_type": "yarn", "type": "yarn", "rope_theta": self.rope_theta,
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                "mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim,
            }
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_nextn_predict_layers": self.num_mtp_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "q_lora_rank": self.q_lora_rank or None,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "topk_method": "noaux_tc" if self.use_expert_bias else ("greedy" if self.n_group == 1 else "group_limited_greedy"),
            "scoring_func": self.scoring_func,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "first_k_dense_replace": self.first_k_dense,
            "moe_layer_freq": 1,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope if self.yarn_enabled else None,
            "rope_parameters": rope,
            "rope_interleave": True,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": self.init_std,
            "torch_dtype": torch_dtype,
            # dsv3-only fields (ignored by other readers), so a round trip loses nothing
            "seq_aux_alpha": self.seq_aux_alpha,
            "init_std": self.init_std,
            "mtp_hidden_after_norm": self.mtp_hidden_after_norm,
        }

    # ------------------------------------------------------------------ counts
    def param_counts(self) -> dict[str, int]:
        """Parameter counts from the dimensions (spec §1.2).  `active` counts what one token touches,
        embedding included (the report's 37B); `active_matmul` excludes the embedding lookup (the
        N_active of benchmarks.md's FLOP formula).  `mtp_checkpoint` adds the stored copies of the
        embedding and head that the HF layout keeps in each MTP layer (how the release reaches 685B)."""
        d, v = self.hidden_size, self.vocab_size
        attn = self._attention_matmul_params() + 2 * d  # + the two block norms
        attn += (self.q_lora_rank or 0) + self.kv_lora_rank  # latent norms
        dense_ffn = 3 * d * self.intermediate_size
        expert = 3 * d * self.moe_intermediate_size
        shared = self.n_shared_experts * expert
        router = self.n_routed_experts * d + (self.n_routed_experts if self.use_expert_bias else 0)
        moe_total = self.n_routed_experts * expert + shared + router
        moe_active = self.num_experts_per_tok * expert + shared + self.n_routed_experts * d
        embed = head = v * d
        main = embed + head + d + self.first_k_dense * (attn + dense_ffn) + self.num_moe_layers * (attn + moe_total)
        mtp_unique = self.num_mtp_layers * (attn + moe_total + 2 * d * d + 3 * d)
        active = embed + head + d + self.first_k_dense * (attn + dense_ffn) + self.num_moe_layers * (attn + moe_active)
        return {
            "total": main,
            "mtp": mtp_unique,
            "total_with_mtp": main + mtp_unique,
            "mtp_checkpoint": main + mtp_unique + self.num_mtp_layers * (embed + head),
            "active": active,
            "active_matmul": self.active_matmul_params(),
        }

    def _attention_matmul_params(self) -> int:
        d, h = self.hidden_size, self.num_heads
        q = d * self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim if self.q_lora_rank else d * h * self.qk_head_dim
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * d

    def active_matmul_params(self, include_mtp: bool = False) -> int:
        """N_active of benchmarks.md: matmul weights one token touches (attention projections, dense FFN
        or shared + top-k experts, router, lm_head), embedding lookup excluded."""
        d = self.hidden_size
        expert = 3 * d * self.moe_intermediate_size
        moe = (self.num_experts_per_tok + self.n_shared_experts) * expert + self.n_routed_experts * d
        attn = self._attention_matmul_params()
        n = self.vocab_size * d + self.first_k_dense * (attn + 3 * d * self.intermediate_size) + self.num_moe_layers * (attn + moe)
        if include_mtp:  # each MTP depth: eh_proj, one MoE block, and the shared head again
            n += self.num_mtp_layers * (2 * d * d + attn + moe + self.vocab_size * d)
        return n

    def flops_per_token(self, seq_len: int, include_mtp: bool = False) -> float:
        """Training FLOPs per token (forward + backward): 6 N_active + 3 L T H (d_qk + d_v)."""
        layers = self.num_layers + (self.num_mtp_layers if include_mtp else 0)
        attn = 3 * layers * seq_len * self.num_heads * (self.qk_head_dim + self.v_head_dim)
        return 6 * self.active_matmul_params(include_mtp) + attn


def _first(x: Any) -> int:
    return x[0] if isinstance(x, (list, tuple)) else x


_V3_ROUTING = dict(scoring_func="sigmoid", norm_topk_prob=True, use_expert_bias=True)

PRESETS: dict[str, dict[str, Any]] = {
    # CPU, seconds: every feature on (q-LoRA, groups, bias, YaRN, MTP) at toy width.
    "tiny": dict(
        vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384, first_k_dense=1,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        moe_intermediate_size=64, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_factor=1.0, original_max_position_embeddings=512,
        max_position_embeddings=512, num_mtp_layers=1, **_V3_ROUTING,
    ),
    # CPU minutes / one GPU.
    "small": dict(
        vocab_size=16384, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536, first_k_dense=1,
        q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        moe_intermediate_size=256, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=6,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_factor=1.0, original_max_position_embeddings=2048,
        max_position_embeddings=2048, num_mtp_layers=1, **_V3_ROUTING,
    ),
    # benchmarks.md's `bench` table exactly (MTP depth 0 for peer comparisons; replace(num_mtp_layers=1) for MTP runs).
    "bench": dict(
        vocab_size=32768, hidden_size=2048, num_layers=8, num_heads=16, intermediate_size=8192, first_k_dense=1,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        moe_intermediate_size=1024, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=8,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_factor=1.0, original_max_position_embeddings=4096,
        max_position_embeddings=4096, num_mtp_layers=0, **_V3_ROUTING,
    ),
    # DeepSeek-V2-Lite shape (spec §1.10 config_16B): softmax scoring, no q-LoRA, no groups, no bias.
    "16b": dict(
        vocab_size=102400, hidden_size=2048, num_layers=27, num_heads=16, intermediate_size=10944, first_k_dense=1,
        q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        n_group=1, topk_group=1, scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        use_expert_bias=False, rope_factor=40.0, original_max_position_embeddings=4096, mscale=0.707,
        mscale_all_dim=0.707, max_position_embeddings=163840, num_mtp_layers=0,
    ),
    # DeepSeek-V3 exactly (spec §1.1, §5.2).
    "671b": dict(),
}
