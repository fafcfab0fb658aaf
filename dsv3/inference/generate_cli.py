"""`dsv3 generate`: continue one or more prompts with a checkpoint, batched.

Prompts are encoded with the checkpoint's tokenizer, generated as one ragged batch, and printed
prompt + continuation.  BOS starts a prompt as the checkpoint's training started a document: a
`dsv3 train` checkpoint (its train_config.json is there) saw documents packed as `doc EOS` with no BOS
(spec §2's FIM/packing layout), so none is added; DeepSeek's released models expect BOS first.
--bos / --no-bos decide otherwise.  A single prompt streams token by token; several are
printed when the batch is done.  Generation stops at EOS or --max-new-tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import UsageError
from .cli_common import Parser, TextStream, add_model_args, load, sampling_from_args, stats_line

EXAMPLES = """examples:
  dsv3 generate --ckpt runs/demo/latest --prompt 'def fib(n):'
  dsv3 generate --ckpt runs/demo/latest --prompt 'import os' --prompt 'class Stack:' --temperature 0
  dsv3 generate --ckpt runs/small/latest --prompts-file prompts.txt --max-new-tokens 64 --seed 0
  dsv3 generate --ckpt runs/small/latest --prompt 'def main():' --speculative --temperature 0
  dsv3 generate --ckpt ckpt/ --prompt 'Hello' --device cuda --dtype bf16 --cuda-graphs
  dsv3 generate --ckpt DeepSeek-V3-fp8/ --prompt 'Hello' --device cuda --fp8-weights   # e4m3 weights, FP8 GEMMs
"""


def build_parser() -> Parser:
    p = Parser(prog="dsv3 generate", description="Generate text from a checkpoint (batched; latent KV cache; optional MTP speculative decoding).",
               epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", "--prompt-file", metavar="F", help="a UTF-8 text file with one prompt per line (blank lines skipped; a prompt cannot span lines)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start prompts with the BOS token (default: no for a dsv3 train checkpoint, whose "
                        "documents carried none; yes otherwise)")
    add_model_args(p)
    return p


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"prompts file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"prompts file {path} is not UTF-8 text") from None
        # lines end at "\n" alone (str.splitlines would also cut at form feeds and other separators,
        # common in source files); a Windows "\r\n" ending loses its "\r"
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        found = [line for line in lines if line.strip()]
        if not found:
            raise UsageError(f"prompts file {path} holds no prompt (one per line; blank lines are skipped)")
        prompts += found
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompts-file")
    return prompts


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    prompts = read_prompts(args)
    sampling = sampling_from_args(args)
    gen, tokenizer = load(args)
    add_bos = args.bos if args.bos is not None else not (Path(args.ckpt) / "train_config.json").is_file()
    bos = [tokenizer.bos_id] if add_bos else []
    ids = [bos + tokenizer.encode(p) for p in prompts]
    if any(len(i) == 0 for i in ids):
        raise UsageError("a prompt encodes to no tokens (an empty prompt without BOS)")
    context = gen.cfg.max_position_embeddings
    if max(map(len, ids)) + args.max_new_tokens > context:
        raise UsageError(f"the longest prompt ({max(map(len, ids))} tokens) plus --max-new-tokens {args.max_new_tokens} "
                         f"exceeds the model's context of {context} tokens")

    stream = None
    if len(prompts) == 1:
        sys.stdout.write(prompts[0])
        stream = TextStream(tokenizer)
    out = gen.generate(ids, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_ids=[tokenizer.eos_id],
                       speculative=args.speculative, num_draft=args.num_draft,
                       on_tokens=(lambda new: stream.add(new[0])) if stream else None)
    if stream:
        stream.close()
    else:
        for i, (prompt, tokens) in enumerate(zip(prompts, out.tokens)):
            print(f"--- [{i}] ({out.finish_reasons[i]}, {len(tokens)} tokens)")
            print(prompt + tokenizer.decode(tokens))
    print(stats_line(out), file=sys.stderr)
    return 0
