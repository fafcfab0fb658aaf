"""`dsv3 eval`: validation loss and bits per byte of a checkpoint on a text source."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import UsageError

EXAMPLES = """\
examples:
  dsv3 eval --ckpt runs/demo/latest                      # the built-in corpus's validation split
  dsv3 eval --ckpt runs/demo/latest --data notes.txt --seq-len 256
"""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv3 eval", description=__doc__.split(":", 1)[1].strip(), epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder (or a run folder: its latest checkpoint)")
    p.add_argument("--data", default=None, help="text file/folder/.jsonl/.parquet; default: the built-in corpus")
    p.add_argument("--split", choices=["val", "all"], default="val", help="evaluate the held-out split, or every token of --data")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default="~/.cache/dsv3")
    args = p.parse_args(argv)

    import numpy as np

    from ..checkpoint import from_pretrained
    from ..data.dataset import TokenizedCorpus
    from ..data.tokenizer import Tokenizer
    from .checkpointing import resolve_checkpoint
    from .evaluate import bits_per_byte, evaluate
    from ..device import resolve_device

    try:
        ckpt = resolve_checkpoint(args.ckpt)
        tokenizer = Tokenizer.load(ckpt)
        device = resolve_device(args.device)
        model = from_pretrained(ckpt, device=device)
        corpus = TokenizedCorpus.build(args.data, tokenizer, Path(args.cache_dir).expanduser() / "corpora", fim_rate=0.0)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UsageError(str(e)) from None
    if args.split == "val":
        tokens, n_bytes = corpus.val_tokens, corpus.val_bytes
    else:
        tokens = np.concatenate([corpus.train_tokens, corpus.val_tokens])
        n_bytes = corpus.meta["train_bytes"] + corpus.val_bytes
    try:
        loss = evaluate(model, tokens, args.seq_len, args.batch_size, args.max_batches, device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"checkpoint {ckpt}")
    print(f"data {args.data or 'built-in corpus'} ({args.split}, {len(tokens):,} tokens)")
    print(f"loss {loss:.4f} nats/token  bits/byte {bits_per_byte(loss, len(tokens), n_bytes):.4f}  perplexity {np.exp(loss):.2f}")
    return 0
