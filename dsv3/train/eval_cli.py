"""`dsv3 eval`: validation loss and bits per byte of a checkpoint on a text source.

A checkpoint written by `dsv3 train` carries its run's train_config.json: without --data, eval rebuilds
that run's corpus with the run's data, split seed (`val_seed`), FIM seed and rate and byte budget, so the
validation split is the one the run held out (another split seed would score training documents).  It scores
the whole split unless --max-batches is given; the run's own validation used its eval_batches batches.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..cli import UsageError

EXAMPLES = """\
examples:
  dsv3 eval --ckpt runs/demo/latest                      # the run's own validation split
  dsv3 eval --ckpt runs/demo/latest --max-batches 8      # as the run's validation measured it
  dsv3 eval --ckpt runs/demo/latest --data notes.txt --split all --seq-len 256
"""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv3 eval", description=__doc__.split(":", 1)[1].strip(), epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder (or a run folder: its latest checkpoint)")
    p.add_argument("--data", default=None,
                   help="text file/folder/.jsonl/.parquet (default: the run's data, else the built-in corpus)")
    p.add_argument("--split", choices=["val", "all"], default="val",
                   help="the held-out split, or every token of the data (default: val)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the run's, else 256)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default: the run's, else 8)")
    p.add_argument("--max-batches", type=int, default=None, help="score only the first N batches (default: all)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--cache-dir", default=None, help="tokenised-corpus cache (default: the run's, else ~/.cache/dsv3)")
    args = p.parse_args(argv)
    for name in ("seq_len", "batch_size", "max_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")

    import numpy as np

    from ..checkpoint import from_pretrained
    from ..data.tokenizer import Tokenizer
    from .checkpointing import resolve_checkpoint
    from .data_setup import run_corpus
    from .evaluate import bits_per_byte, evaluate, scored_text
    from ..device import resolve_device

    try:
        ckpt = resolve_checkpoint(args.ckpt)
        tokenizer = Tokenizer.load(ckpt)
        device = resolve_device(args.device)
        model = from_pretrained(ckpt, device=device)
        run = _run_config(ckpt, args)
        args.seq_len, args.batch_size = args.seq_len or run.seq_len, args.batch_size or run.batch_size
        corpus = run_corpus(run, tokenizer)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UsageError(str(e)) from None
    # all: the training stream as trained on (FIM-rearranged; its sentinels stand for no bytes) + val
    tokens = corpus.val_tokens if args.split == "val" else np.concatenate([corpus.train_tokens, corpus.val_tokens])
    try:
        loss = evaluate(model, tokens, args.seq_len, args.batch_size, args.max_batches, device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"checkpoint {ckpt}")
    print(f"data {run.data or 'built-in corpus'} ({args.split}, {len(tokens):,} tokens; split seed {run.val_seed})")
    scored = scored_text(tokens, args.seq_len, args.batch_size, args.max_batches, tokenizer.byte_lengths())
    print(f"loss {loss:.4f} nats/token  bits/byte {bits_per_byte(loss, *scored):.4f}  perplexity {np.exp(loss):.2f}")
    return 0


def _run_config(ckpt: Path, args: argparse.Namespace):
    """The TrainConfig whose corpus settings to rebuild: the checkpoint's run's (train_config.json) when
    --data is absent or names the run's data; otherwise a fresh one for --data (seed 0, no FIM)."""
    from .config import TrainConfig

    saved = Path(ckpt) / "train_config.json"
    run = TrainConfig.from_json(saved.read_text()) if saved.is_file() else None
    if run is None or (args.data is not None and (run.data is None or Path(args.data).resolve() != Path(run.data).resolve())):
        run = TrainConfig(data=args.data, fim_rate=0.0, seq_len=args.seq_len or 256, batch_size=args.batch_size or 8)
    changes = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    return dataclasses.replace(run, **changes)
