"""`dsv3 chat`: a multi-turn conversation with a checkpoint in DeepSeek's chat template.

Each turn appends the user message to the history, encodes it with `Tokenizer.encode_chat`
(BOS, system text, <｜User｜>…<｜Assistant｜>; what users type stays text, so it cannot inject a
marker), generates until EOS and streams the reply token by token.  `/exit` or end of input (Ctrl-D)
ends the session, `/reset` clears the history; Ctrl-C stops a reply and drops that turn, and at the
prompt it clears the line.  `--message` runs one turn and exits.  The whole history is re-prefilled
every turn (no prefix reuse across turns).
"""

from __future__ import annotations

import argparse
import sys

from ..cli import UsageError
from .cli_common import Parser, TextStream, add_model_args, load, sampling_from_args, stats_line

EXAMPLES = """examples:
  dsv3 chat --ckpt runs/demo/latest
  dsv3 chat --ckpt runs/demo/latest --system 'You are a terse assistant.' --temperature 0.3
  dsv3 chat --ckpt runs/demo/latest --message 'What is a latent KV cache?'    # one turn, then exit
"""


def build_parser() -> Parser:
    p = Parser(prog="dsv3 chat", description="Chat with a checkpoint using the DeepSeek chat template (streamed, multi-turn).",
               epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--message", help="send this one message, print the reply and exit (non-interactive)")
    p.add_argument("--system", default="", help="system prompt (default: none)")
    p.add_argument("--stats", action="store_true", help="print token counts and speed after each reply")
    add_model_args(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    sampling = sampling_from_args(args)
    gen, tokenizer = load(args)
    history = [{"role": "system", "content": args.system}] if args.system else []

    context = gen.cfg.max_position_embeddings

    def reply(message: str) -> None:
        history.append({"role": "user", "content": message})
        ids = tokenizer.encode_chat(history, add_generation_prompt=True)
        room = context - len(ids)  # a reply stops at the model's context
        if room < 1:
            history.pop()
            raise UsageError(f"the conversation ({len(ids)} tokens) fills the model's context of {context} tokens; "
                             "/reset starts a new one")
        stream = TextStream(tokenizer)
        out = gen.generate([ids], max_new_tokens=min(args.max_new_tokens, room), sampling=sampling,
                           stop_ids=[tokenizer.eos_id], speculative=args.speculative, num_draft=args.num_draft,
                           on_tokens=lambda new: stream.add(new[0]))
        history.append({"role": "assistant", "content": stream.close()})
        if args.stats:
            print(stats_line(out), file=sys.stderr)

    if args.message is not None:
        reply(args.message)
        return 0
    print(f"chatting with {args.ckpt}; /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    interactive = sys.stdin.isatty()
    system = list(history)
    while True:
        try:
            message = input("> " if interactive else "")  # piped input: the replies alone on stdout
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, as shells do
            print(file=sys.stderr)
            continue
        if message.strip() == "/exit":
            return 0
        if message.strip() == "/reset":
            history[:] = system
            print("(history cleared)", file=sys.stderr)
            continue
        if message.strip():
            turn = len(history)
            try:
                reply(message)
            except UsageError as e:  # the context is full: say so and keep the session
                print(f"dsv3 chat: {e}", file=sys.stderr)
            except KeyboardInterrupt:  # Ctrl-C stops this reply; the turn leaves the history
                del history[turn:]
                print(file=sys.stdout, flush=True)
                print("(reply interrupted; that turn is dropped)", file=sys.stderr)
