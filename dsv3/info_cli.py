"""`dsv3 info`: a preset's or checkpoint's resolved config, parameter counts and training FLOPs per token."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .cli import UsageError
from .config import PRESETS, ModelConfig

EXAMPLES = """\
examples:
  dsv3 info 671b              # DeepSeek-V3: 671.0B params, 37.6B active per token
  dsv3 info bench --seq-len 2048
  dsv3 info runs/demo/latest  # a checkpoint folder's config.json
"""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv3 info", description=__doc__.split(":", 1)[1].strip(), epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint folder")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for the FLOP count (default 4096)")
    args = p.parse_args(argv)
    try:
        cfg = ModelConfig.from_preset(args.what) if args.what in PRESETS else ModelConfig.from_hf_config(Path(args.what))
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{args.what}: not a preset or a readable checkpoint config ({e})") from None
    for f in dataclasses.fields(cfg):
        print(f"{f.name:34s} {getattr(cfg, f.name)}")
    counts = cfg.param_counts()
    print()
    print(f"{'parameters (main model)':34s} {_count(counts['total'])}")
    print(f"{'parameters (with MTP)':34s} {_count(counts['total_with_mtp'])}  ({_count(counts['mtp_checkpoint'])} as stored in HF layout)")
    print(f"{'active per token':34s} {_count(counts['active'])}  ({_count(counts['active_matmul'])} matmul, embedding excluded)")
    print(f"{'training FLOPs/token @ T=' + str(args.seq_len):34s} {cfg.flops_per_token(args.seq_len) / 1e9:.2f} GFLOP")
    print(f"{'latent KV cache per token':34s} {cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)} values")
    return 0


def _count(n: int) -> str:
    """A parameter count with three significant places: 671.0 B, 2.451 B, 3.28 M."""
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
