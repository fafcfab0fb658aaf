"""What `dsv3 generate` and `dsv3 chat` share: argument parsing that fails with one line, device and
dtype resolution, loading a checkpoint with its tokenizer, and printing text as tokens stream in."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..device import resolve_device as _resolve_device
from ..train.checkpointing import resolve_checkpoint

from ..cli import UsageError
from .sampling import SamplingParams

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input as a UsageError (one line, exit code 2) instead of usage + exit."""

    def error(self, message: str):
        raise UsageError(message)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint folder (config.json, safetensors, tokenizer.json), or a run folder (its latest checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="tokens to generate per sequence (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, 1 = off (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens, 0 = off (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random).  It reproduces a run of the same prompts, "
                   "batch and mode: a prompt's continuation also depends on its batch-mates and on --speculative")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (needs a checkpoint with an MTP layer)")
    p.add_argument("--num-draft", type=int, default=None, metavar="K", help="MTP draft tokens per step with --speculative (default 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights and cache dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--fp8-weights", action="store_true",
                   help="an FP8 checkpoint (DeepSeek's releases, `dsv3 export --fp8`) keeps its e4m3 weights and 128x128 "
                        "scales and runs its GEMMs in FP8 (`dsv3.fp8.load_fp8_for_inference`; one byte per stored FP8 weight; "
                        "on a CPU through the pure-torch reference, slower than dequantised weights); default: "
                        "dequantised once at load to --dtype")
    p.add_argument("--cuda-graphs", action="store_true", help="capture decode steps in CUDA graphs (GPU only); compiles them first with torch.compile")
    p.add_argument("--no-compile", action="store_true",
                   help="with --cuda-graphs, do not torch.compile the decode steps (no compile wait before the first "
                        "tokens; more kernels per step)")


def resolve_device(name: str) -> torch.device:
    try:
        return _resolve_device(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if args.num_draft is not None and not args.speculative:
        raise UsageError("--num-draft sets the drafts of --speculative decoding: add --speculative")
    if args.num_draft is None:
        args.num_draft = 1
    if args.num_draft < 1:
        raise UsageError("--num-draft must be at least 1")
    try:
        return SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None


def load(args: argparse.Namespace):
    """-> (Generator, Tokenizer) for --ckpt on --device/--dtype; every problem is a UsageError.  A run
    folder in --ckpt is replaced by its latest checkpoint."""
    from ..data.tokenizer import Tokenizer
    from .engine import Generator

    path = Path(args.ckpt)
    if not path.is_dir():
        raise UsageError(f"checkpoint folder {path} does not exist")
    try:
        path = resolve_checkpoint(path)  # a run folder stands for its latest checkpoint
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not (path / "tokenizer.json").is_file():
        raise UsageError(f"{path} has no tokenizer.json (save the tokenizer into the checkpoint folder)")
    device = resolve_device(args.device)
    try:
        tokenizer = Tokenizer.load(path)
        model = load_model(path, device, resolve_dtype(args.dtype, device), args.fp8_weights)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    except KeyError as e:  # a config.json without a required field
        raise UsageError(f"{path / 'config.json'} lacks the field {e}") from None
    except (ValueError, OSError) as e:
        raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UsageError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    args.ckpt = str(path)  # the checkpoint itself, for what the command reads beside it
    if args.speculative and not model.cfg.num_mtp_layers:
        raise UsageError("--speculative needs a checkpoint with an MTP layer (num_nextn_predict_layers >= 1)")
    # ids past the tokenizer's would decode to nothing: never choose them
    limit = tokenizer.vocab_size if tokenizer.vocab_size < model.cfg.vocab_size else None
    return Generator(model, cuda_graphs=args.cuda_graphs, compile=False if args.no_compile else None,
                     vocab_limit=limit), tokenizer


def load_model(path: Path, device: torch.device, dtype: torch.dtype, fp8_weights: bool):
    """from_pretrained, or with fp8_weights the FP8 loader; a checkpoint without FP8 weights is refused
    for it rather than silently run in --dtype."""
    import dsv3

    if not fp8_weights:
        return dsv3.from_pretrained(path, device=device, dtype=dtype)
    from ..fp8 import load_fp8_for_inference

    if not json.loads((path / "config.json").read_text()).get("quantization_config"):
        raise UsageError(f"--fp8-weights: {path} stores no FP8 weights (its config.json has no quantization_config); "
                         "`dsv3 export --fp8` writes them")
    return load_fp8_for_inference(path, device=device, dtype=dtype)


class TextStream:
    """Prints a growing token sequence as text.  Decodes only the tokens since the last clean character
    boundary (byte-level BPE: the text of a sequence is the concatenation of its pieces' bytes, so a tail
    that starts at such a boundary decodes on its own), and holds back a trailing U+FFFD: a multi-byte
    character whose bytes have not all arrived.  Linear in the sequence, where decoding it all each time
    was quadratic (2 ms per token at 8 K tokens)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.start = 0  # ids[:start] are printed whole
        self.printed = 0  # characters of decode(ids[start:]) printed so far

    def add(self, ids: list[int]) -> None:
        self.ids += ids
        tail = self.tokenizer.decode(self.ids[self.start:])
        whole = not tail.endswith("\ufffd")
        text = tail if whole else tail.rstrip("\ufffd")
        if len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
        if whole:  # a clean boundary: start the next tail here
            self.start, self.printed = len(self.ids), 0
        else:
            self.printed = max(self.printed, len(text))

    def close(self) -> str:
        """Prints what is held back (an incomplete character as U+FFFD) and a newline -> the whole text."""
        self.out.write(self.tokenizer.decode(self.ids[self.start:])[self.printed:] + "\n")
        self.out.flush()
        return self.tokenizer.decode(self.ids)


def stats_line(out) -> str:
    line = (f"[{out.new_tokens} tokens, prefill {out.prompt_tokens} tokens in {out.prefill_s:.2f} s, "
            f"decode {out.decode_tok_s:.1f} tok/s")
    if out.acceptance_rate is not None:
        line += f", MTP acceptance {out.acceptance_rate:.0%}"
    return line + "]"
