"""`dsv3 export`: any checkpoint to a Hugging Face folder, in the dtype (or the FP8 layout) asked for.

Reads a single-device checkpoint or an exported folder (HF layout already: re-stored, e.g. as BF16 or
block-scaled FP8 for inference) and a distributed run's DCP checkpoints, which `dsv3 eval`/`generate`
cannot read directly: an intermediate step of a torchrun run becomes evaluable this way.  The
tokenizer files (tokenizer.json, tokenizer_config.json with the chat template, generation_config.json)
go along when the checkpoint has them.  With --fp8, a source stored with power-of-two scales (V3.1's
`scale_fmt: ue8m0`) is written the same way, so its FP8 bytes come back unchanged.  The new folder is
written beside --out and swapped in when complete: a failed export leaves the old one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from .cli import UsageError

EXAMPLES = """\
examples:
  dsv3 export --ckpt runs/ep/checkpoints/step_000500 --out runs/ep/hf_500      # a torchrun run's DCP step
  dsv3 export --ckpt runs/ep --out runs/ep/hf_latest                           # a run folder: its latest
  dsv3 export --ckpt runs/demo/latest --out demo_bf16 --dtype bf16
  dsv3 export --ckpt runs/bench/latest --out bench_fp8 --fp8                  # e4m3 + 128x128 scales, as V3 ships
"""

DTYPES = ("fp32", "bf16")
CARRIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")  # copied when present


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3 export", description=__doc__.split("\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, metavar="DIR",
                   help="a checkpoint folder (HF layout or a DCP checkpoints/step_N) or a run folder (its latest)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="storage dtype of the weights (default: fp32)")
    p.add_argument("--fp8", action="store_true", help="store the linear weights the release stores in FP8 as e4m3 "
                                                      "with 128x128 weight_scale_inv (the rest in --dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def _source(path: Path) -> tuple[str, Path]:
    """("hf" | "dcp", folder) for a checkpoint folder or a run folder (-> its `latest`)."""
    from .distributed.checkpoint import STATE_FILE as DCP_STATE

    if not path.exists():
        raise UsageError(f"{path}: no such checkpoint")
    if not (path / "config.json").is_file() and not (path / DCP_STATE).is_file() and (path / "latest").exists():
        path = (path / "latest").resolve()
    if (path / "config.json").is_file():
        return "hf", path
    if (path / DCP_STATE).is_file():
        return "dcp", path
    raise UsageError(f"{path}: not a checkpoint (neither config.json nor {DCP_STATE})")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    src, out = Path(args.ckpt), Path(args.out)
    kind, folder = _source(src)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists: --overwrite to replace it, or another --out")
    if out.resolve() == folder.resolve():
        raise UsageError("--out is the checkpoint itself: choose another folder")

    import torch

    from .checkpoint import from_pretrained, save_pretrained

    try:
        if kind == "hf":
            model = from_pretrained(folder, device="cpu", dtype=torch.float32)
        else:
            from .distributed.checkpoint import load_model

            model = load_model(folder)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UsageError(str(e)) from None
    scale_fmt = None
    if args.fp8 and kind == "hf":  # keep V3.1's power-of-two scales (the source's own FP8 bytes)
        scale_fmt = (json.loads((folder / "config.json").read_text()).get("quantization_config") or {}).get("scale_fmt")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export.", dir=out.parent))
    try:
        save_pretrained(model, tmp / "model", dtype=torch.float32 if args.dtype == "fp32" else torch.bfloat16,
                        fp8=args.fp8, scale_fmt=scale_fmt)
        for name in CARRIED:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / "model" / name)
        if out.exists():  # only now that the new folder is complete
            shutil.rmtree(out)
        os.replace(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {folder} ({'distributed checkpoint' if kind == 'dcp' else 'Hugging Face layout'}) -> {out} "
          f"({args.dtype}{', FP8 linear weights' if args.fp8 else ''})")
    return 0
